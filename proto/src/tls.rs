//! TLS between the coordinator and its workers and clients (rustls, through tonic), so that the
//! bearer token (`auth`) and the job specs never cross an untrusted network in clear.
//!
//! The coordinator serves TLS when given a certificate chain and its private key (PEM files:
//! `smelt coordinator --tls-cert --tls-key`, coordinator/src/tls_accept.rs); gRPC and the
//! dashboard then share the one TLS port. This module is the client side.
//! A worker or client reaches it at an `https://` URL and checks its certificate against the CA
//! in the PEM file that `SMELT_TLS_CA` names (a private CA, or the self-signed certificate
//! itself), or else against the system's trusted roots. An `http://` URL stays plain text.
//! Where the coordinator asks for client certificates (mutual TLS, `--tls-client-ca`), a worker
//! or client presents the certificate chain and key in the PEM files `SMELT_TLS_CERT` and
//! `SMELT_TLS_KEY` name.

use std::path::{Path, PathBuf};

use tokio_rustls::rustls::AlertDescription;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The environment variable naming the PEM file of the CA workers and clients trust.
pub const TLS_CA_ENV: &str = "SMELT_TLS_CA";

/// The environment variables naming a worker's or client's own certificate chain and private
/// key (PEM), for a coordinator that requires client certificates.
pub const TLS_CERT_ENV: &str = "SMELT_TLS_CERT";
pub const TLS_KEY_ENV: &str = "SMELT_TLS_KEY";

/// A client certificate chain and its private key, PEM files.
#[derive(Clone, Copy, Debug)]
pub struct ClientIdentity<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// A PEM file's bytes, or an error naming `what` and the file.
pub fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// An endpoint for the coordinator at `url`: TLS for `https://` (trusting `SMELT_TLS_CA`'s CA
/// when set, else the system's roots), plain text for `http://`.
pub fn endpoint(url: &str) -> Result<Endpoint, String> {
    let env = TlsEnv::read()?;
    endpoint_with(url, env.ca.as_deref(), env.identity())
}

/// What the environment says about TLS: the CA to trust, and this process's certificate.
struct TlsEnv {
    ca: Option<PathBuf>,
    cert: Option<(PathBuf, PathBuf)>,
}

impl TlsEnv {
    fn read() -> Result<TlsEnv, String> {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let (ca, cert, key) = (var(TLS_CA_ENV), var(TLS_CERT_ENV), var(TLS_KEY_ENV));
        let cert = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => return Err(format!("{TLS_CERT_ENV} is set but {TLS_KEY_ENV} is not: a client certificate needs its private key")),
            (None, Some(_)) => return Err(format!("{TLS_KEY_ENV} is set but {TLS_CERT_ENV} is not: a private key needs its certificate")),
        };
        Ok(TlsEnv { ca, cert })
    }

    fn identity(&self) -> Option<ClientIdentity<'_>> {
        self.cert.as_ref().map(|(cert, key)| ClientIdentity { cert, key })
    }
}

/// Why the coordinator at an `https://` URL refuses this process's TLS connections, if it does:
/// a probe (a TLS handshake as `endpoint` would make it, then one HTTP/1.1 request) that reads
/// the alert a refusing coordinator sends. A refused client certificate (mutual TLS) is only
/// told after the handshake, when the client has already sent its first request, and a gRPC call
/// then often fails with nothing better than "connection closed"; the probe waits for the
/// answer, so it reads the reason every time. `None`: the coordinator served the request (or is
/// unreachable, or the URL is not https: other errors say so).
pub async fn refusal(url: &str) -> Option<String> {
    let env = TlsEnv::read().ok()?;
    refusal_with(url, env.ca.as_deref(), env.identity()).await
}

/// `refusal` with the CA file and the client certificate given.
pub async fn refusal_with(url: &str, ca: Option<&Path>, identity: Option<ClientIdentity<'_>>) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls::{crypto::aws_lc_rs, ClientConfig, RootCertStore};

    let endpoint = Endpoint::from_shared(url.to_string()).ok()?;
    let uri = endpoint.uri();
    if uri.scheme_str() != Some("https") {
        return None;
    }
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(443);
    let mut roots = RootCertStore::empty();
    match ca {
        Some(ca) => {
            for c in CertificateDer::pem_file_iter(ca).ok()? {
                roots.add(c.ok()?).ok()?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    let builder = ClientConfig::builder_with_provider(std::sync::Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let chain = CertificateDer::pem_file_iter(id.cert).ok()?.collect::<Result<Vec<_>, _>>().ok()?;
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(id.key).ok()?).ok()?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(host.clone()).ok()?;
    let patience = std::time::Duration::from_secs(5);
    let probe = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.ok()?;
        // only an alert refusing this process's certificate is an answer: anything else (a
        // reset, a close, a front end that speaks h2 alone) says nothing about it
        let refused = |e: std::io::Error| refusal_alert(&e).map(|_| innermost(&e));
        let mut tls = match tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await {
            Ok(t) => t,
            Err(e) => return refused(e),
        };
        let request = format!("HEAD / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", uri.authority().map_or(host.as_str(), |a| a.as_str()));
        if let Err(e) = tls.write_all(request.as_bytes()).await {
            return refused(e);
        }
        let mut first = [0u8; 16];
        match tls.read(&mut first).await {
            Err(e) => refused(e),
            Ok(_) => None,
        }
    };
    tokio::time::timeout(patience, probe).await.ok().flatten()
}

/// `endpoint` with the CA file given (`None`: the system's roots) and no client certificate.
pub fn endpoint_trusting(url: &str, ca: Option<&Path>) -> Result<Endpoint, String> {
    endpoint_with(url, ca, None)
}

/// `endpoint` with the CA file and the client certificate given.
pub fn endpoint_with(url: &str, ca: Option<&Path>, identity: Option<ClientIdentity<'_>>) -> Result<Endpoint, String> {
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| format!("coordinator URL {url:?} is not a valid URL: {e}"))?;
    // the URI parser takes any digits for a port, and one past 65535 was then dialled as the
    // scheme's default port ("connection refused" at :80)
    let authority = endpoint.uri().authority().map(|a| a.as_str()).unwrap_or_default();
    if let Some((_, port)) = authority.rsplit_once(':').filter(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
        if !port.parse::<u16>().is_ok_and(|p| p > 0) {
            return Err(format!("coordinator URL {url:?}: {port} is not a port (1 to 65535)"));
        }
    }
    match endpoint.uri().scheme_str() {
        Some("https") => {}
        Some("http") => return Ok(endpoint),
        // anything else would go out in plain text, token included
        other => return Err(format!("coordinator URL {url:?}: the scheme must be http:// or https://, not {}", other.unwrap_or("none"))),
    }
    let tls = match ca {
        Some(ca) => {
            let pem = read(&format!("{TLS_CA_ENV}:"), ca)?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(format!("{TLS_CA_ENV}: {} holds no PEM certificate", ca.display()));
            }
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
        }
        None => ClientTlsConfig::new().with_native_roots(),
    };
    let tls = match identity {
        None => tls,
        Some(id) => {
            let cert = read(&format!("{TLS_CERT_ENV}:"), id.cert)?;
            let key = read(&format!("{TLS_KEY_ENV}:"), id.key)?;
            if !String::from_utf8_lossy(&cert).contains("-----BEGIN CERTIFICATE-----") {
                return Err(format!("{TLS_CERT_ENV}: {} holds no PEM certificate", id.cert.display()));
            }
            if !String::from_utf8_lossy(&key).contains("PRIVATE KEY-----") {
                return Err(format!("{TLS_KEY_ENV}: {} holds no PEM private key", id.key.display()));
            }
            tls.identity(Identity::from_pem(cert, key))
        }
    };
    endpoint.tls_config(tls).map_err(|e| {
        let why = innermost(&e);
        let hint = if why.contains("no native certs") { format!(" (this machine has no trusted CA certificates: set {TLS_CA_ENV} to the coordinator's CA)") } else { String::new() };
        format!("TLS for {url}: {why}{hint}")
    })
}

/// The alert a coordinator sent that refuses this process's client certificate, if that is what
/// `e` is, at any depth of its causes (an `io::Error` wrapping rustls's error included): the
/// typed value, not its wording.
pub fn refusal_alert(e: &(dyn std::error::Error + 'static)) -> Option<AlertDescription> {
    use tokio_rustls::rustls::Error as TlsError;
    let mut cause = Some(e);
    while let Some(c) = cause {
        let tls = c.downcast_ref::<TlsError>().or_else(|| c.downcast_ref::<std::io::Error>()?.get_ref()?.downcast_ref::<TlsError>());
        if let Some(TlsError::AlertReceived(alert)) = tls {
            let refuses_certificate = matches!(
                alert,
                AlertDescription::CertificateRequired
                    | AlertDescription::BadCertificate
                    | AlertDescription::UnsupportedCertificate
                    | AlertDescription::CertificateExpired
                    | AlertDescription::CertificateRevoked
                    | AlertDescription::CertificateUnknown
                    | AlertDescription::UnknownCA
                    | AlertDescription::AccessDenied
            );
            return refuses_certificate.then_some(*alert);
        }
        cause = c.source();
    }
    None
}

/// What to do about a refused client certificate.
fn alert_hint(alert: AlertDescription) -> String {
    match alert {
        AlertDescription::CertificateRequired => format!("the coordinator requires a client certificate: set {TLS_CERT_ENV} and {TLS_KEY_ENV}"),
        AlertDescription::CertificateExpired => {
            format!("the coordinator finds this client's certificate ({TLS_CERT_ENV}) expired or not yet valid: renew it, or check the clocks")
        }
        AlertDescription::UnsupportedCertificate => {
            format!("the coordinator does not accept this client certificate for client authentication: its extendedKeyUsage must include clientAuth ({TLS_CERT_ENV})")
        }
        _ => format!(
            "the coordinator does not accept this client certificate ({TLS_CERT_ENV}): it must be signed by the CA given to its --tls-client-ca"
        ),
    }
}

/// The innermost cause of an error: what actually went wrong ("invalid peer certificate: ..."),
/// with what to do about the usual certificate mistakes.
pub fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let what = cause.to_string();
    let lower = what.to_ascii_lowercase();
    if let Some(alert) = refusal_alert(e) {
        return format!("{what} ({})", alert_hint(alert));
    }
    let hint = if what.contains("UnknownIssuer") {
        format!(" (the coordinator's certificate is not signed by the CA in {TLS_CA_ENV}, or, without it, by one the system trusts)")
    } else if what.contains("CaUsedAsEndEntity") {
        " (the coordinator's certificate is a CA certificate, as `openssl req -x509` makes: sign a server certificate with that CA and serve that one; README.md, \"TLS\")".to_string()
    } else if what.contains("NotValidForName") || lower.contains("not valid for name") {
        " (the coordinator's certificate does not name the host of the URL: add it to its subjectAltName)".to_string()
    } else if what.contains("Expired") || lower.contains("certificate expired") {
        " (the coordinator's certificate has expired: renew it)".to_string()
    } else if lower.contains("not valid yet") || what.contains("NotValidYet") {
        " (the coordinator's certificate is not valid yet: check the clocks)".to_string()
    } else if lower.contains("invalidcontenttype") || lower.contains("corrupt message") {
        " (the coordinator does not serve TLS: use http://)".to_string()
    } else if lower.contains("h2 protocol error") {
        " (if the coordinator serves TLS, use https://)".to_string()
    } else {
        String::new()
    };
    format!("{what}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coordinator_url_is_refused_for_its_scheme_or_a_port_out_of_range() {
        for ok in ["http://127.0.0.1:7070", "http://[::1]:7070", "http://coordinator", "http://h:65535"] {
            assert!(endpoint_with(ok, None, None).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("http://127.0.0.1:99999", "99999 is not a port"),
            ("http://127.0.0.1:0", "0 is not a port"),
            ("ftp://127.0.0.1:7070", "must be http:// or https://"),
            ("not a url", "not a valid URL"),
        ] {
            let e = endpoint_with(bad, None, None).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
