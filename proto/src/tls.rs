//! TLS between the coordinator and its workers and clients (rustls, through tonic), so that the
//! bearer token (`auth`) and the job specs never cross an untrusted network in clear.
//!
//! The coordinator serves TLS when given a certificate chain and its private key (PEM files:
//! `smelt coordinator --tls-cert --tls-key`); gRPC and the dashboard then share the one TLS port.
//! A worker or client reaches it at an `https://` URL and checks its certificate against the CA
//! in the PEM file that `SMELT_TLS_CA` names (a private CA, or the self-signed certificate
//! itself), or else against the system's trusted roots. An `http://` URL stays plain text.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// The environment variable naming the PEM file of the CA workers and clients trust.
pub const TLS_CA_ENV: &str = "SMELT_TLS_CA";

fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// The coordinator's TLS configuration from its certificate chain and private key (PEM),
/// checked here: a missing file, a file that holds no PEM certificate or key, or a key that does
/// not make a usable identity is an error naming the file.
pub fn server_config(cert: &Path, key: &Path) -> Result<ServerTlsConfig, String> {
    let cert_pem = read("TLS certificate", cert)?;
    let key_pem = read("TLS private key", key)?;
    if !String::from_utf8_lossy(&cert_pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("TLS certificate {}: no PEM certificate in it", cert.display()));
    }
    if !String::from_utf8_lossy(&key_pem).contains("PRIVATE KEY-----") {
        return Err(format!("TLS private key {}: no PEM private key in it", key.display()));
    }
    let config = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
    // rustls checks the pair only when the acceptor is built: build one now, so a bad key fails
    // at start-up rather than at the first connection
    Server::builder()
        .tls_config(config.clone())
        .map_err(|e| format!("TLS certificate {} with key {}: {}", cert.display(), key.display(), innermost(&e)))?;
    Ok(config)
}

/// An endpoint for the coordinator at `url`: TLS for `https://` (trusting `SMELT_TLS_CA`'s CA
/// when set, else the system's roots), plain text for `http://`.
pub fn endpoint(url: &str) -> Result<Endpoint, String> {
    let ca = std::env::var_os(TLS_CA_ENV).filter(|v| !v.is_empty());
    endpoint_trusting(url, ca.as_deref().map(Path::new))
}

/// `endpoint` with the CA file given (`None`: the system's roots).
pub fn endpoint_trusting(url: &str, ca: Option<&Path>) -> Result<Endpoint, String> {
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| format!("coordinator URL {url:?} is not a valid URL: {e}"))?;
    if endpoint.uri().scheme_str() != Some("https") {
        return Ok(endpoint);
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
    endpoint.tls_config(tls).map_err(|e| format!("TLS for {url}: {}", innermost(&e)))
}

/// The innermost cause of an error: what actually went wrong ("invalid peer certificate: ..."),
/// with what to do about the usual certificate mistakes.
pub fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let what = cause.to_string();
    let hint = if what.contains("UnknownIssuer") {
        format!(" (the coordinator's certificate is not signed by the CA in {TLS_CA_ENV}, or, without it, by one the system trusts)")
    } else if what.contains("CaUsedAsEndEntity") {
        " (the coordinator's certificate is a CA certificate, as `openssl req -x509` makes: sign a server certificate with that CA and serve that one; README.md, \"TLS\")".to_string()
    } else if what.contains("NotValidForName") {
        " (the coordinator's certificate does not name the host of the URL: add it to its subjectAltName)".to_string()
    } else if what.contains("Expired") {
        " (the coordinator's certificate has expired)".to_string()
    } else {
        String::new()
    };
    format!("{what}{hint}")
}
