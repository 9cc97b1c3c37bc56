//! TLS on the coordinator's port, the handshake done here (tokio-rustls) rather than by tonic's
//! acceptor, whose ALPN offers h2 alone: this one offers h2 and http/1.1, so gRPC and browsers
//! get HTTP/2 while HTTP/1.1-only clients (`curl --http1.1`, Python `requests`, Prometheus
//! scrapers) still reach the dashboard and `/metrics`. A handshake gets 10 s; a failed one is
//! logged with the peer and the reason (a worker that does not trust the certificate shows up
//! here as well as in its own log).
//!
//! With a client CA (`--tls-client-ca`) it is mutual TLS: every connection, the dashboard's
//! included, must present a certificate that CA signed (for the client-auth purpose), or the
//! handshake fails. Workers and clients present theirs from `SMELT_TLS_CERT` and
//! `SMELT_TLS_KEY` (`smelt_proto::tls`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::crypto::aws_lc_rs;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use smelt_proto::tls::read;
use tokio_stream::wrappers::ReceiverStream;
use tracing::warn;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate expiring within this many days is warned about at start.
const EXPIRY_WARNING_DAYS: i64 = 14;

/// The coordinator's TLS configuration from its certificate chain and private key (PEM files),
/// and the CA its clients' certificates must chain to (mutual TLS; none: no client certificate
/// asked), checked now: a missing file, a file without a PEM certificate or key, or a key that
/// is not the certificate's is an error naming the file.
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Arc<ServerConfig>, String> {
    let cert_pem = read("TLS certificate", cert)?;
    let key_pem = read("TLS private key", key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("TLS certificate {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("TLS certificate {}: no PEM certificate in it", cert.display()));
    }
    // said here too, not only in every refused worker's log
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    if let Some(concern) = crate::cert_validity::validity(&chain[0]).and_then(|v| crate::cert_validity::concern(v, now, EXPIRY_WARNING_DAYS)) {
        warn!(cert = %cert.display(), "tls certificate: {concern}");
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| format!("TLS private key {}: no PEM private key in it", key.display()))?;
    // the crypto provider named, not the process default: one less way to fail at run time
    let provider = Arc::new(aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS protocol versions: {e}"))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let pem = read("TLS client CA", ca)?;
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&pem) {
                let c = c.map_err(|e| format!("TLS client CA {}: {e}", ca.display()))?;
                roots.add(c).map_err(|e| format!("TLS client CA {}: {e}", ca.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("TLS client CA {}: no PEM certificate in it", ca.display()));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("TLS client CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, private)
        .map_err(|e| format!("TLS certificate {} with key {}: {e}", cert.display(), key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Closes a connection whose handshake failed so that the client reads the alert saying why (a
/// client certificate refused: with TLS 1.3 the client already sends its first request).
/// Dropping the socket with that request unread would reset the connection, and a reset can
/// overtake the alert; so: half-close after the alert, read what the client still sends until
/// it closes (2 s at most), then drop.
async fn linger(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// The TLS connections accepted on `listener`, for tonic's `serve_with_incoming_shutdown`. The
/// accept loop ends when the server drops the stream.
pub fn incoming(listener: TcpListener, config: Arc<ServerConfig>) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // out of file descriptors and the like: wait, do not spin
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp).into_fallible()).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err((e, tcp))) => {
                        warn!(peer = %peer, error = %e, "tls handshake failed");
                        linger(tcp).await;
                    }
                    Err(_) => warn!(peer = %peer, timeout_s = HANDSHAKE_TIMEOUT.as_secs(), "tls handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
