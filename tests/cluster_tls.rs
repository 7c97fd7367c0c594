//! TLS and mutual TLS between coordinator and workers, with certificates made for the test:
//! a worker that trusts the coordinator's CA trains; with mutual TLS a worker without a client
//! certificate is refused and one with a certificate from the right CA trains.

mod common;
use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use std::path::Path;

/// Writes ca.pem, server.pem/server.key (for "localhost") and client.pem/client.key,
/// client2.pem/client2.key (workers, also named "dtrain-worker" for chain lanes).
fn certificates(dir: &Path) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, hosts) in
        [("server", &["localhost"][..]), ("client", &["worker", "dtrain-worker"]), ("client2", &["dtrain-worker"])]
    {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// A temporary directory with the certificates and a two-shard job in it; the job's path.
fn tls_dir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let job = write_job(dir.path(), "shards = 2").to_str().unwrap().to_string();
    (dir, job)
}

fn p(dir: &Path, f: &str) -> String {
    dir.join(f).to_str().unwrap().to_string()
}

#[test]
fn tls_and_mutual_tls() {
    let (dir, job) = tls_dir();
    let (d, job) = (dir.path(), job.as_str());

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

/// A chain under mutual TLS: two workers with their own certificates pass the parameters and
/// the running sum to each other on a mutual-TLS lane (their certificates carry "dtrain-worker"),
/// and the coordinator's lanes to the chain's ends are mutual TLS too (its certificate, theirs
/// checked against its client CA); every step goes over the chain on lanes (a lane that failed
/// its handshake would make the step fall back, or take a stream), and the weights are the
/// in-process run's.
#[test]
fn a_chain_under_mutual_tls() {
    let (dir, job) = tls_dir();
    let (d, job) = (dir.path(), job.as_str());
    let local = d.join("local");
    let o = run(&["train", "--config", job, "--run-dir", local.to_str().unwrap(), "-q", "--local"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut cmd = coordinator();
    cmd.env_remove("DTRAIN_TOKEN");
    cmd.args([
        "train",
        "--config",
        job,
        "--run-dir",
        &p(d, "chain"),
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ]);
    cmd.args(["--tls-cert", &p(d, "server.pem"), "--tls-key", &p(d, "server.key"), "--tls-client-ca", &p(d, "ca.pem")]);
    cmd.args(["--min-workers", "2", "--no-shared-memory", "--topology", "chain"]);
    let c = Proc::start(cmd);
    let url = listening_url(&c).replace("http://127.0.0.1", "https://localhost");
    let workers: Vec<Proc> = ["client", "client2"]
        .iter()
        .map(|who| {
            let (pem, key) = (format!("{who}.pem"), format!("{who}.key"));
            let tls = ["--tls-ca", &p(d, "ca.pem"), "--tls-cert", &p(d, &pem), "--tls-key", &p(d, &key)];
            worker_with(&url, &[&tls[..], &["--peer-listen", "127.0.0.1:0", "--name", who]].concat(), None)
        })
        .collect();
    let mut c = c;
    let (ok, out) = c.finish(60);
    assert!(ok, "{out}");
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("shard round trip")).collect();
    assert!(!lines.is_empty(), "{out}");
    for line in lines {
        let steps = line.split("topology chain on ").nth(1).unwrap_or_default();
        let (on, rest) = steps.split_once(" of ").unwrap_or_default();
        assert!(
            !on.is_empty() && rest.starts_with(&format!("{on} step(s), 0 fell back")),
            "every step chained: {line}"
        );
        assert!(rest.contains(&format!("the star, {on} on lanes")), "the chain's ends on mutual-TLS lanes: {line}");
    }
    assert!(
        std::fs::read(d.join("chain/final.safetensors")).unwrap()
            == std::fs::read(local.join("final.safetensors")).unwrap()
    );
    // Between the members, a mutual-TLS lane: the first dialed it to the second.
    let outputs: Vec<String> = workers.into_iter().map(|mut w| w.finish(30).1).collect();
    let dialed = outputs.iter().filter(|o| o.contains("a mutual-TLS lane to the successor at 127.0.0.1:")).count();
    assert_eq!(dialed, 1, "{outputs:?}");
}
