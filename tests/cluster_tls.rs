//! TLS and mutual TLS between coordinator and workers, with certificates made for the test:
//! a worker that trusts the coordinator's CA trains; with mutual TLS a worker without a client
//! certificate is refused and one with a certificate from the right CA trains.

mod common;
use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use std::path::Path;

/// Writes ca.pem, server.pem/server.key (for "localhost") and client.pem/client.key.
fn certificates(dir: &Path) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, host) in [("server", "localhost"), ("client", "worker")] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![host.to_string()]).unwrap().signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

fn p(dir: &Path, f: &str) -> String {
    dir.join(f).to_str().unwrap().to_string()
}

#[test]
fn tls_and_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certificates(d);
    let job = write_job(d, "shards = 2");
    let job = job.to_str().unwrap();

    // TLS: the worker verifies the coordinator's certificate.
    let mut cmd = coordinator();
    cmd.args(["train", "--config", job, "--run-dir", &p(d, "tls"), "--listen", "127.0.0.1:0", "-q"]);
    cmd.args(["--tls-cert", &p(d, "server.pem"), "--tls-key", &p(d, "server.key")]);
    let c = Proc::start(cmd);
    let url = listening_url(&c).replace("http://127.0.0.1", "https://localhost");
    let _w = worker(&url, &["--tls-ca", &p(d, "ca.pem")]);
    let mut c = c;
    let (ok, out) = c.finish(60);
    assert!(ok, "{out}");

    // Mutual TLS: no client certificate, no entry; the right one trains (no token needed), and
    // its certificate is who it is for faults and evictions, whatever name it gives.
    let mut cmd = coordinator();
    cmd.env_remove("DTRAIN_TOKEN");
    cmd.args(["train", "--config", job, "--run-dir", &p(d, "mtls"), "--listen", "127.0.0.1:0"]);
    cmd.args(["--tls-cert", &p(d, "server.pem"), "--tls-key", &p(d, "server.key"), "--tls-client-ca", &p(d, "ca.pem")]);
    let c = Proc::start(cmd);
    let url = listening_url(&c).replace("http://127.0.0.1", "https://localhost");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_worker"));
    cmd.args(["--coordinator", &url, "--tls-ca", &p(d, "ca.pem"), "--retry-for", "1"]);
    let mut anonymous = Proc::start(cmd);
    let (ok, out) = anonymous.finish(30);
    assert!(!ok && out.contains("cannot reach the coordinator"), "a worker without a client certificate got in: {out}");
    let _w = worker_with(
        &url,
        &["--tls-ca", &p(d, "ca.pem"), "--tls-cert", &p(d, "client.pem"), "--tls-key", &p(d, "client.key")],
        None,
    );
    let joined = c.wait_for(") joined", 30);
    assert!(joined.contains("joined as certificate "), "{joined}");
    let mut c = c;
    let (ok, out) = c.finish(60);
    assert!(ok, "{out}");
    assert_eq!(
        std::fs::read(d.join("tls/final.safetensors")).unwrap(),
        std::fs::read(d.join("mtls/final.safetensors")).unwrap()
    );
}
