//! TLS between the coordinator and its workers and clients (rustls, through tonic), so that the
//! bearer token (`auth`) and the job specs never cross an untrusted network in clear.
//!
//! The coordinator serves TLS when given a certificate chain and its private key (PEM files:
//! `smelt coordinator --tls-cert --tls-key`, coordinator/src/tls_accept.rs); gRPC and the
//! dashboard then share the one TLS port. This module is the client side.
//! A worker or client reaches it at an `https://` URL and checks its certificate against the CA
//! in the PEM file that `SMELT_TLS_CA` names (a private CA, or the self-signed certificate
//! itself), or else against the system's trusted roots. An `http://` URL stays plain text.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// The environment variable naming the PEM file of the CA workers and clients trust.
pub const TLS_CA_ENV: &str = "SMELT_TLS_CA";

/// A PEM file's bytes, or an error naming `what` and the file.
pub fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
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
    endpoint.tls_config(tls).map_err(|e| {
        let why = innermost(&e);
        let hint = if why.contains("no native certs") { format!(" (this machine has no trusted CA certificates: set {TLS_CA_ENV} to the coordinator's CA)") } else { String::new() };
        format!("TLS for {url}: {why}{hint}")
    })
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
