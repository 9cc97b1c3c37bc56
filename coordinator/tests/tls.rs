//! TLS on the coordinator's one port: gRPC and the dashboard served over TLS with a certificate
//! signed by a test CA (rcgen), reached by clients that trust that CA; refused to plain-text
//! clients and to clients that trust another CA or only the system's roots; bad certificate or
//! key files refused at start, naming the file.

mod common;

use common::*;
use smelt_coordinator::{bind, CoordinatorConfig, TlsFiles};
use smelt_proto::v1::job_service_client::JobServiceClient;
use smelt_proto::v1::ListJobsRequest;

fn files(t: &certs::TlsFiles) -> Option<TlsFiles> {
    Some(TlsFiles { cert: t.cert.clone(), key: t.key.clone(), client_ca: None })
}

/// Connects to `url` trusting `ca` (None: the system's roots); the error's innermost cause.
async fn connect(url: &str, ca: Option<&std::path::Path>) -> Result<JobServiceClient<tonic::transport::Channel>, String> {
    let endpoint = smelt_proto::tls::endpoint_trusting(url, ca)?;
    let channel = endpoint.connect().await.map_err(|e| smelt_proto::tls::innermost(&e))?;
    Ok(JobServiceClient::new(channel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_the_dashboard_go_over_tls_to_clients_that_trust_its_ca_only() {
    let (d, db) = tmp();
    let ours = certs::make(d.path(), "ours");
    let theirs = certs::make(d.path(), "theirs");
    let coord = start_with(&db, None, files(&ours)).await;
    assert!(coord.url.starts_with("https://"));

    // a client trusting our CA: a whole call (submit, then list) over TLS
    let mut jobs = connect(&coord.url, Some(&ours.ca)).await.expect("a TLS client trusting the CA");
    let job = submit(&mut jobs, &spec("over-tls", 1, 0, 0)).await;
    let listed = jobs.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert_eq!(listed.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), [job.id.as_str()]);

    // the dashboard's API on the same port, over TLS, to a client that speaks HTTP/1.1 only
    let reply = http::get_tls(coord.addr, "/api/overview", &ours.ca).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body.contains(&job.id), "{}", reply.body);

    // a client trusting another CA, or only the system's roots: the handshake fails, naming why
    // (the system's roots made another test CA, so that this holds on a machine without any)
    std::env::set_var("SSL_CERT_FILE", &theirs.ca);
    for (who, ca) in [("another CA", Some(theirs.ca.as_path())), ("the system's roots", None)] {
        let err = connect(&coord.url, ca).await.err().unwrap_or_else(|| panic!("a client trusting {who} connected"));
        println!("trusting {who}: {err}");
        assert!(err.contains("certificate") || err.contains("UnknownIssuer"), "{who}: {err}");
    }
    // a URL whose scheme is neither http nor https is refused before anything is sent
    let err = connect(&format!("grpcs://{}", coord.addr), Some(&ours.ca)).await.err().expect("a grpcs:// URL was taken");
    assert!(err.contains("must be http:// or https://"), "{err}");
    // a plain-text client gets no gRPC answer from the TLS port
    let plain = format!("http://{}", coord.addr);
    let refused = match connect(&plain, None).await {
        Err(_) => true,
        Ok(mut c) => c.list_jobs(ListJobsRequest::default()).await.is_err(),
    };
    assert!(refused, "a plain-text client was answered by the TLS port");
    // and a plain-text HTTP request is not served the API
    let plain_http = tokio::time::timeout(PATIENCE, async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(coord.addr).await.unwrap();
        s.write_all(b"GET /api/overview HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw).await;
        raw
    })
    .await
    .expect("the TLS port hung up on a plain-text request");
    assert!(!String::from_utf8_lossy(&plain_http).contains(&job.id), "the API answered in plain text");
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_or_key_files_are_refused_at_start_naming_the_file() {
    let (d, db) = tmp();
    let good = certs::make(d.path(), "good");
    let other = certs::make(d.path(), "other");
    let garbage = d.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = d.path().join("missing.pem");
    let cases = [
        ("a missing certificate", missing.clone(), good.key.clone(), "missing.pem"),
        ("a missing key", good.cert.clone(), missing.clone(), "missing.pem"),
        ("a file with no certificate", garbage.clone(), good.key.clone(), "garbage.pem"),
        ("a file with no key", good.cert.clone(), garbage.clone(), "garbage.pem"),
        // the key a certificate does not hold
        ("another certificate's key", good.cert.clone(), other.key.clone(), "other-key.pem"),
    ];
    for (what, cert, key, named) in cases {
        let mut cfg = CoordinatorConfig::new("127.0.0.1:0".parse().unwrap(), &db);
        cfg.tls = Some(TlsFiles { cert, key, client_ca: None });
        let err = match bind(cfg).await {
            Ok(_) => panic!("{what}: the coordinator started"),
            Err(e) => format!("{e:#}"),
        };
        println!("{what}: {err}");
        assert!(err.contains(named), "{what}: {err}");
    }
    // a client CA file that is missing or holds no certificate
    for (what, ca, named) in [("a missing client CA", &missing, "missing.pem"), ("a client CA with no certificate", &garbage, "garbage.pem")] {
        let mut cfg = CoordinatorConfig::new("127.0.0.1:0".parse().unwrap(), &db);
        cfg.tls = Some(TlsFiles { cert: good.cert.clone(), key: good.key.clone(), client_ca: Some(ca.clone()) });
        let err = match bind(cfg).await {
            Ok(_) => panic!("{what}: the coordinator started"),
            Err(e) => format!("{e:#}"),
        };
        println!("{what}: {err}");
        assert!(err.contains(named) && err.contains("TLS client CA"), "{what}: {err}");
    }
    // nothing was created for a coordinator that did not start
    assert!(!db.exists(), "a refused start created the database");
}

/// Connects to `url` trusting `ca` and presenting `identity` (cert, key), and lists the jobs:
/// the listing, or the innermost cause of the failure (with mutual TLS, a refused client may
/// only learn it at its first call).
async fn list_as(url: &str, ca: &std::path::Path, identity: Option<(&std::path::Path, &std::path::Path)>) -> Result<usize, String> {
    let identity = identity.map(|(cert, key)| smelt_proto::tls::ClientIdentity { cert, key });
    let endpoint = smelt_proto::tls::endpoint_with(url, Some(ca), identity)?;
    let channel = endpoint.connect().await.map_err(|e| smelt_proto::tls::innermost(&e))?;
    let mut jobs = JobServiceClient::new(channel);
    let listed = jobs.list_jobs(ListJobsRequest::default()).await.map_err(|e| smelt_proto::tls::innermost(&e))?;
    Ok(listed.into_inner().jobs.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_clients_whose_certificate_its_client_ca_signed() {
    let (d, db) = tmp();
    let ours = certs::make(d.path(), "ours");
    let theirs = certs::make(d.path(), "theirs");
    let mut tls = files(&ours).unwrap();
    tls.client_ca = Some(ours.ca.clone());
    let coord = start_with(&db, None, Some(tls)).await;

    // a client presenting a certificate our CA signed: served
    let mut jobs = connect_as(&coord.url, &ours).await;
    let job = submit(&mut jobs, &spec("mutual", 1, 0, 0)).await;
    assert_eq!(list_as(&coord.url, &ours.ca, Some((&ours.client_cert, &ours.client_key))).await, Ok(1));
    // the dashboard too, to an HTTP/1.1 client presenting it
    let reply = http::get_tls_as(coord.addr, "/api/overview", &ours.ca, Some((&ours.client_cert, &ours.client_key))).await.expect("served");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body.contains(&job.id), "{}", reply.body);

    // no client certificate: refused (a call may learn no more than "connection closed"), and
    // the probe reads the reason every time, and what to do
    let none = list_as(&coord.url, &ours.ca, None).await.expect_err("a client without a certificate was served");
    println!("without a certificate, the call: {none}");
    let why = smelt_proto::tls::refusal_with(&coord.url, Some(&ours.ca), None).await.expect("the probe read no refusal");
    println!("without a certificate, the probe: {why}");
    assert!(why.contains("CertificateRequired (the coordinator requires a client certificate: set SMELT_TLS_CERT and SMELT_TLS_KEY)"), "{why}");
    assert!(http::get_tls_as(coord.addr, "/api/overview", &ours.ca, None).await.is_err(), "the dashboard served a client without a certificate");
    // a certificate another CA signed: refused, saying the coordinator does not accept it
    let theirs_id = smelt_proto::tls::ClientIdentity { cert: &theirs.client_cert, key: &theirs.client_key };
    list_as(&coord.url, &ours.ca, Some((&theirs.client_cert, &theirs.client_key))).await.expect_err("another CA's client was served");
    let why = smelt_proto::tls::refusal_with(&coord.url, Some(&ours.ca), Some(theirs_id)).await.expect("the probe read no refusal");
    println!("another CA's certificate, the probe: {why}");
    assert!(why.contains("UnknownCA (the coordinator does not accept this client certificate"), "{why}");
    // the accepted certificate: no refusal; and a coordinator without mutual TLS refuses none
    let ours_id = smelt_proto::tls::ClientIdentity { cert: &ours.client_cert, key: &ours.client_key };
    assert_eq!(smelt_proto::tls::refusal_with(&coord.url, Some(&ours.ca), Some(ours_id)).await, None);
    // nor is a coordinator that is not there taken for one that refuses (a worker would exit)
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    assert_eq!(smelt_proto::tls::refusal_with(&format!("https://{closed}"), Some(&ours.ca), None).await, None);
    // half an identity is refused before anything is sent
    std::env::set_var("SMELT_TLS_CERT", &ours.client_cert);
    std::env::remove_var("SMELT_TLS_KEY");
    let err = smelt_proto::tls::endpoint(&coord.url).err().expect("a certificate without its key was taken");
    assert!(err.contains("SMELT_TLS_CERT is set but SMELT_TLS_KEY is not"), "{err}");
    std::env::remove_var("SMELT_TLS_CERT");
    coord.stop().await;
}

async fn connect_as(url: &str, t: &certs::TlsFiles) -> JobServiceClient<tonic::transport::Channel> {
    let identity = smelt_proto::tls::ClientIdentity { cert: &t.client_cert, key: &t.client_key };
    let channel = smelt_proto::tls::endpoint_with(url, Some(&t.ca), Some(identity)).unwrap().connect().await.unwrap();
    JobServiceClient::new(channel)
}
