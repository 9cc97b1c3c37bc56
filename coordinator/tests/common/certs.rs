//! Certificates for the TLS tests, made by rcgen: a CA, a server certificate it signs for
//! `localhost` and 127.0.0.1, and a client certificate it signs (mutual TLS), written as PEM
//! files. (Also included by cli/tests/tls.rs.)
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

pub struct TlsFiles {
    /// The CA's certificate: what workers and clients trust (`SMELT_TLS_CA`).
    pub ca: PathBuf,
    /// The coordinator's certificate chain and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A client certificate the CA signed (for client authentication) and its key: what a
    /// worker presents to a coordinator that requires one (`SMELT_TLS_CERT`, `SMELT_TLS_KEY`).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A CA named `name` and a server certificate it signed, in `dir` under `name`-prefixed files.
pub fn make(dir: &Path, name: &str) -> TlsFiles {
    make_for(dir, name, &["localhost", "127.0.0.1"])
}

/// As `make`, the server certificate naming `hosts`.
pub fn make_for(dir: &Path, name: &str, hosts: &[&str]) -> TlsFiles {
    make_with(dir, name, hosts, |_| {})
}

/// As `make`, the server certificate valid only through 2001 (long expired).
pub fn make_expired(dir: &Path, name: &str) -> TlsFiles {
    make_with(dir, name, &["localhost", "127.0.0.1"], |p| {
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
    })
}

fn make_with(dir: &Path, name: &str, hosts: &[&str], server: impl FnOnce(&mut CertificateParams)) -> TlsFiles {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut params = CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>()).unwrap();
    server(&mut params);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params.distinguished_name.push(DnType::CommonName, format!("{name} worker"));
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = KeyPair::generate().unwrap();
    let client_cert = client_params.signed_by(&client_key, &ca).unwrap();
    let file = |what: &str| dir.join(format!("{name}-{what}.pem"));
    let files = TlsFiles { ca: file("ca"), cert: file("cert"), key: file("key"), client_cert: file("client-cert"), client_key: file("client-key") };
    std::fs::write(&files.ca, ca.pem()).unwrap();
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    std::fs::write(&files.client_cert, client_cert.pem()).unwrap();
    std::fs::write(&files.client_key, client_key.serialize_pem()).unwrap();
    files
}
