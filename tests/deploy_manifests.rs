//! The Kubernetes manifests and the binaries cannot drift apart: every container's args parse
//! with the binary's own command-line parser, and the ConfigMap's job file is a valid job.
//! (yamllint and kubernetes-validate --strict check the manifests themselves in `.ci/run`.)

#[path = "../crates/bin/coordinator_cli.rs"]
#[allow(dead_code)]
mod coordinator_cli;
#[path = "../crates/bin/worker_cli.rs"]
#[allow(dead_code)]
mod worker_cli;

use clap::Parser;
use std::path::Path;

fn manifest(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s").join(name)).unwrap()
}

/// The block list under the first `key:` line (our manifests write lists one item a line;
/// comment lines are skipped).
fn block_list(text: &str, key: &str) -> Vec<String> {
    let mut lines = text.lines().skip_while(|l| l.trim() != format!("{key}:"));
    let head = lines.next().unwrap_or_else(|| panic!("no {key}: block"));
    let indent = head.len() - head.trim_start().len();
    lines
        .filter(|l| !l.trim_start().starts_with('#'))
        .take_while(|l| l.len() - l.trim_start().len() > indent && l.trim_start().starts_with("- "))
        .map(|l| l.trim_start()[2..].trim().to_string())
        .collect()
}

#[test]
fn coordinator_args_parse() {
    let args = block_list(&manifest("coordinator-job.yaml"), "args");
    assert!(args.len() > 3, "{args:?}");
    let cli = coordinator_cli::Cli::try_parse_from(std::iter::once("coordinator".to_string()).chain(args))
        .unwrap_or_else(|e| panic!("coordinator-job.yaml args: {e}"));
    let coordinator_cli::Command::Train(t) = cli.command else { panic!("the coordinator Job must run `train`") };
    assert!(t.auto_resume && t.listen.is_some() && t.token_file.is_some(), "a restartable, authenticated cluster run");
}

#[test]
fn worker_args_parse() {
    let args = block_list(&manifest("workers.yaml"), "args");
    let cli = worker_cli::Cli::try_parse_from(std::iter::once("worker".to_string()).chain(args))
        .unwrap_or_else(|e| panic!("workers.yaml args: {e}"));
    assert!(cli.coordinator.starts_with("http://dtrain-coordinator:") && cli.health_listen.is_some());
    // Chains: the peer port is listened on, advertised with the pod's IP, and open in the pod spec.
    let port = cli.peer_listen.expect("--peer-listen").port();
    assert_eq!(cli.peer_advertise.as_deref(), Some(format!("$(POD_IP):{port}").as_str()));
    let workers = manifest("workers.yaml");
    assert!(workers.contains(&format!("containerPort: {port}")) && workers.contains("fieldPath: status.podIP"));
}

#[test]
fn configmap_holds_a_valid_job() {
    let text = manifest("job-config.yaml");
    let mut lines = text.lines().skip_while(|l| l.trim() != "job.toml: |");
    lines.next().expect("a job.toml block");
    let body: Vec<&str> =
        lines.take_while(|l| l.starts_with("    ") || l.is_empty()).map(|l| l.get(4..).unwrap_or("")).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.toml");
    std::fs::write(&path, body.join("\n")).unwrap();
    let job = dtrain_fit::session::load_job(&path, None, None, None).unwrap_or_else(|e| panic!("job-config.yaml: {e}"));
    assert_eq!(job.model.num_params(), 50_890);
}

/// The Secret ships a placeholder the coordinator refuses, so a run whose Secret was not
/// replaced stops at start with a line saying how to create it, instead of running with a token
/// everyone who read the repository knows.
#[test]
fn the_secrets_placeholder_is_refused() {
    let secret = manifest("token-secret.yaml");
    let line = secret.lines().find(|l| l.trim_start().starts_with("token:")).expect("a token: line");
    let shipped = line.trim_start().trim_start_matches("token:").trim();
    assert_eq!(shipped, dtrain_cluster::auth::PLACEHOLDER);
    let refused = dtrain_cluster::auth::validate(shipped).unwrap_err();
    assert!(refused.contains("create the dtrain-token Secret"), "{refused}");
}
