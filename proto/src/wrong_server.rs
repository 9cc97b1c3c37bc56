//! What answers at a coordinator URL when it is not a smelt coordinator, for an error that says
//! so instead of "h2 protocol error" (or "Unimplemented") repeated: a web server on the port, a
//! coordinator serving TLS reached by `http://`, or some other gRPC service.

use std::time::Duration;

use tonic::transport::Endpoint;

/// The `server` header of every coordinator answer: what the probe recognises a smelt
/// coordinator by (it serves its dashboard over HTTP/1 on the same port).
pub const SERVER_HEADER: &str = "smelt-coordinator";

/// How long the probe waits for the server to connect and answer.
const PATIENCE: Duration = Duration::from_secs(3);

/// Whether a call's error could mean that the server at the URL is not a smelt coordinator: it
/// served no such method, or the connection failed (a server that does not speak HTTP/2 ends
/// it with a protocol error, or just closes it). [`wrong_server`] then asks what answers there.
pub fn maybe_wrong_server(e: &tonic::Status) -> bool {
    use tonic::Code;
    e.code() == Code::Unimplemented
        || (matches!(e.code(), Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled)
            && (e.message() == "transport error" || e.message().contains("h2 protocol error")))
}

/// Why the server at `url` is not a smelt coordinator, given the error `e` of a call to it
/// (see [`maybe_wrong_server`]), probing an `http://` URL for what answers there instead: an
/// HTTP/1 server (its status line quoted) that is not a coordinator's dashboard (every
/// coordinator answer carries [`SERVER_HEADER`]), or a TLS server. `None` when nothing says it
/// is the wrong server (a coordinator restarting, unreachable, or answering after all).
pub async fn wrong_server(url: &str, e: &tonic::Status) -> Option<String> {
    // tonic maps an HTTP 404 without a grpc-status to Unimplemented: that server speaks HTTP/2
    // but not gRPC (a proxy, another service)
    if e.code() == tonic::Code::Unimplemented && e.message().contains("grpc-status header missing") {
        return Some(format!(
            "the server at {url} is no gRPC server ({}): not a smelt coordinator (a proxy or another service?); is the address right?",
            e.message()
        ));
    }
    if e.code() == tonic::Code::Unimplemented {
        return Some(format!(
            "the server at {url} answers gRPC but has no such method ({}): it is not a smelt coordinator, or one older than this program",
            if e.message().is_empty() { "Unimplemented" } else { e.message() }
        ));
    }
    if !maybe_wrong_server(e) {
        return None;
    }
    let endpoint = Endpoint::from_shared(url.to_string()).ok()?;
    let uri = endpoint.uri();
    if uri.scheme_str() != Some("http") {
        return None; // https: a TLS front end that does not speak h2 is not told apart here
    }
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
    tokio::time::timeout(PATIENCE, probe(&host, port, &authority)).await.ok().flatten().map(|what| match what {
        Answer::Http1(status_line) => {
            format!("an HTTP/1 server answers at {url} (\"{status_line}\"), not a smelt coordinator (gRPC over HTTP/2): is the port right?")
        }
        Answer::Tls => format!("the server at {url} speaks TLS: use an https:// URL (and SMELT_TLS_CA if its certificate is self-signed)"),
    })
}

enum Answer {
    /// Its status line.
    Http1(String),
    Tls,
}

/// Sends an HTTP/1.1 request and reads what comes back: an HTTP/1 status line, or a TLS record
/// (a TLS server answers plain text with an alert, or a handshake record).
async fn probe(host: &str, port: u16, authority: &str) -> Option<Answer> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect((host, port)).await.ok()?;
    let request = format!("HEAD / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // the status line and headers (or a TLS record header)
    while answer.len() < 16 * 1024 && !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
        if matches!(answer.first(), Some(0x15 | 0x16)) && answer.len() >= 3 && answer[1] == 3 {
            return Some(Answer::Tls); // a TLS record: alert or handshake, version 3.x
        }
    }
    if answer.starts_with(b"HTTP/") {
        let head = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        if head.lines().any(|l| l.strip_prefix("server:").is_some_and(|v| v.trim() == SERVER_HEADER)) {
            return None; // a smelt coordinator after all (its dashboard answered)
        }
        let line = answer.split(|&b| b == b'\r' || b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line).into_owned();
        // a 5xx is a proxy in front of a coordinator that is away (restarting), as likely as
        // another server: nothing to conclude
        if line.split_whitespace().nth(1).is_some_and(|code| code.starts_with('5')) {
            return None;
        }
        return Some(Answer::Http1(line));
    }
    None
}
