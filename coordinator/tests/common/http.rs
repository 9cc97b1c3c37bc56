//! A plain HTTP/1.1 client over a TCP socket, as a browser or curl talks to the dashboard: one
//! request per connection (`Connection: close`), the body read to the end.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Reply {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// `GET path`, with `authorization: Bearer <token>` when a token is given.
pub async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Reply {
    request(addr, "GET", path, token, &[]).await
}

/// `method path` with an empty body, the token as for `get`, and `headers` besides.
pub async fn request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, headers: &[(&str, &str)]) -> Reply {
    let s = TcpStream::connect(addr).await.expect("connect");
    request_over(s, addr, method, path, token, headers).await
}

/// `GET path` over TLS, trusting the CA certificate in the PEM file `ca`, offering HTTP/1.1 alone
/// by ALPN (as `curl --http1.1`, Python's `requests` or a Prometheus scraper on HTTP/1.1).
pub async fn get_tls(addr: SocketAddr, path: &str, ca: &std::path::Path) -> Reply {
    get_tls_as(addr, path, ca, None).await.expect("TLS handshake")
}

/// `get_tls` presenting a client certificate and key (mutual TLS); the handshake's or the
/// request's failure as an error.
pub async fn get_tls_as(addr: SocketAddr, path: &str, ca: &std::path::Path, identity: Option<(&std::path::Path, &std::path::Path)>) -> Result<Reply, String> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca).expect("read the CA")).expect("add the CA");
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = vec![CertificateDer::from_pem_file(cert).expect("read the client certificate")];
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key).expect("read the client key")).expect("client auth")
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from(addr.ip().to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.map_err(|e| e.to_string())?;
    request_over_checked(tls, addr, "GET", path, None, &[]).await
}

async fn request_over(
    s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> Reply {
    request_over_checked(s, addr, method, path, token, headers).await.expect("the request")
}

/// `request_over`, a failure to write, read or find a reply's head an error.
async fn request_over_checked(
    mut s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let mut extra = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    for (k, v) in headers {
        extra += &format!("{k}: {v}\r\n");
    }
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Accept: */*\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.map_err(|e| format!("write request: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.map_err(|e| format!("read reply: {e}"))?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| format!("no reply head in {} bytes", raw.len()))?;
    let head = String::from_utf8(raw[..split].to_vec()).expect("ascii headers");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{status_line}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Ok(Reply { status, headers, body: String::from_utf8(body).expect("utf-8 body") })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}
