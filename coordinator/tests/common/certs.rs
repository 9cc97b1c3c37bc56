//! Certificates for the TLS tests, made by rcgen: a CA and a server certificate it signs, for
//! `localhost` and 127.0.0.1, written as PEM files. (Also included by cli/tests/tls.rs.)
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};

pub struct TlsFiles {
    /// The CA's certificate: what workers and clients trust (`SMELT_TLS_CA`).
    pub ca: PathBuf,
    /// The coordinator's certificate chain and key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA named `name` and a server certificate it signed, in `dir` under `name`-prefixed files.
pub fn make(dir: &Path, name: &str) -> TlsFiles {
    make_for(dir, name, &["localhost", "127.0.0.1"])
}

/// As `make`, the server certificate naming `hosts`.
pub fn make_for(dir: &Path, name: &str, hosts: &[&str]) -> TlsFiles {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let params = CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let files = TlsFiles { ca: dir.join(format!("{name}-ca.pem")), cert: dir.join(format!("{name}-cert.pem")), key: dir.join(format!("{name}-key.pem")) };
    std::fs::write(&files.ca, ca.pem()).unwrap();
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}
