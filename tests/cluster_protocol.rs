//! Guarantee 6 at the protocol level, with hand-made clients: a wrong protocol version, an
//! oversized message and a worker that sends NaN gradients are refused with a clear status,
//! and training is unaffected.

mod common;
use common::*;
use dtrain_proto::{Connection, FromWorker, Hello, ShardResult, Tensor, ToWorker, Welcome, PROTOCOL_VERSION};
use std::time::Duration;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Joins as a hand-made worker (messages up to 256 MiB, beyond the coordinator's limit).
async fn join(url: &str, hello: Hello) -> Result<(Connection, Option<Welcome>), tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string()).unwrap().connect().await.unwrap();
    let token = dtrain_cluster::auth::bearer(TOKEN);
    let mut conn = Connection::open(channel, 256 << 20, &[(dtrain_cluster::auth::HEADER, token)], hello).await?;
    let welcome = match conn.next().await? {
        Some(ToWorker::Welcome(w)) => Some(w),
        _ => None,
    };
    Ok((conn, welcome))
}

/// Opens the gradient slots a coordinator offered in `w` and says so.
async fn attach(w: &Welcome, conn: &Connection) -> dtrain_cluster::shm::SharedFile {
    let config: dtrain_fit::config::JobConfig = toml::from_str(&w.job_toml).unwrap();
    let n = dtrain_fit::Job::build(config, Default::default()).unwrap().model.num_params();
    let o = w.shared_memory.as_ref().expect("shared memory offered over loopback");
    let slots = dtrain_cluster::shm::SharedFile::open(o.path.as_ref(), o.nonce, n, o.slots as usize, true).unwrap();
    // Truncating the slots would kill the coordinator with SIGBUS as it reads them: sealed.
    let file = std::fs::OpenOptions::new().write(true).open(&o.path).unwrap();
    assert!(file.set_len(0).is_err(), "a worker truncated its slots");
    conn.send(FromWorker::Attached).await.unwrap();
    slots
}

/// A coordinator of the test job (`fit.shards` from `shards`) listening on loopback with
/// `flags`, beside an in-process run of the same job as the reference.
struct Scenario {
    dir: tempfile::TempDir,
    c: Proc,
    url: String,
}

impl Scenario {
    fn start(shards: &str, flags: &[&str]) -> Scenario {
        let dir = tempfile::tempdir().unwrap();
        let job = write_job(dir.path(), shards);
        let local = dir.path().join("local");
        let o = run(&["train", "--config", job.to_str().unwrap(), "--run-dir", local.to_str().unwrap(), "-q"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let mut cmd = train(&job, &dir.path().join("run"));
        cmd.args(["--listen", "127.0.0.1:0"]).args(flags);
        let c = Proc::start(cmd);
        let url = listening_url(&c);
        Scenario { dir, c, url }
    }

    /// Waits for the coordinator to succeed; true if its final weights are the in-process run's.
    fn same_weights_as_in_process(mut self) -> bool {
        let (ok, out) = self.c.finish(120);
        assert!(ok, "{out}");
        let read = |run: &str| std::fs::read(self.dir.path().join(run).join("final.safetensors")).unwrap();
        read("run") == read("local")
    }
}

/// The next work the coordinator sends (other messages skipped); `None` once the stream ends,
/// fails, or is quiet for 30 s.
async fn next_work(conn: &mut Connection) -> Option<dtrain_proto::Work> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), conn.next()).await {
            Ok(Ok(Some(ToWorker::Work(w)))) => return Some(w),
            Ok(Ok(Some(_))) => continue,
            _ => return None,
        }
    }
}

/// Joins as `name` and builds the job's compute, as a real worker would.
async fn join_computing(url: &str, name: &str) -> (Connection, dtrain_cluster::worker::Compute) {
    let hello = Hello { protocol_version: PROTOCOL_VERSION, name: name.into(), peer_address: None };
    let (conn, welcome) = join(url, hello).await.unwrap();
    let config: dtrain_fit::config::JobConfig = toml::from_str(&welcome.unwrap().job_toml).unwrap();
    (conn, dtrain_cluster::worker::Compute::new(dtrain_fit::Job::build(config, Default::default()).unwrap()))
}

#[test]
fn wrong_version_and_oversized_messages_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), "shards = 2");
    let mut cmd = train(&job, &dir.path().join("run"));
    cmd.args(["--listen", "127.0.0.1:0", "--worker-wait", "20", "-q"]);
    let c = Proc::start(cmd);
    let url = listening_url(&c);
    rt().block_on(async {
        let e = join(&url, Hello { protocol_version: PROTOCOL_VERSION + 1, name: "old".into(), peer_address: None })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        assert!(e.message().contains("protocol version"), "{e}");
        let e =
            join(&url, Hello { protocol_version: PROTOCOL_VERSION, name: "x".repeat(65 << 20), peer_address: None })
                .await
                .unwrap_err();
        assert!(
            matches!(e.code(), tonic::Code::ResourceExhausted | tonic::Code::OutOfRange | tonic::Code::Internal),
            "{e}"
        );
    });
    // The coordinator still trains once a real worker joins.
    let _w = worker(&url, &[]);
    let mut c = c;
    let (ok, out) = c.finish(60);
    assert!(ok, "{out}");
}

/// A worker that answers every shard with NaN gradients, in its messages or in its shared-memory
/// slots: the coordinator recomputes the shard as referee, finds it finite, evicts the worker by
/// name at its first lie, and the weights equal an in-process run.
#[test]
fn nan_gradients_are_recomputed_and_the_sender_dropped() {
    nan_gradients(false, false);
}

#[test]
fn nan_gradients_in_shared_memory_are_recomputed_and_the_sender_dropped() {
    nan_gradients(true, false);
}

/// A NaN worker alone: the second opinion is the coordinator's own (never the same worker's),
/// the worker is evicted, and training waits for an honest one.
#[test]
fn a_lone_nan_worker_is_contradicted_by_the_coordinator() {
    nan_gradients(false, true);
}

fn nan_gradients(shared: bool, alone: bool) {
    let min = if alone { "1" } else { "2" };
    let mut flags = vec!["--min-workers", min];
    if !shared {
        flags.push("--no-shared-memory");
    }
    let s = Scenario::start("shards = 2", &flags);
    let (c, url) = (&s.c, s.url.clone());
    let evil = std::thread::spawn({
        let url = url.clone();
        move || {
            rt().block_on(async {
                let hello = Hello { protocol_version: PROTOCOL_VERSION, name: "evil".into(), peer_address: None };
                let (mut conn, welcome) = join(&url, hello).await.unwrap();
                let mut slots = if shared { Some(attach(&welcome.unwrap(), &conn).await) } else { None };
                while let Some(w) = next_work(&mut conn).await {
                    let n = match &w.params {
                        Tensor::Inline(bytes) => bytes.len() / 4,
                        Tensor::Shared => 0,
                        Tensor::Chained => panic!("no chain: this worker has no peer port"),
                    };
                    assert_eq!(n == 0, shared, "parameters in shared memory exactly when offered");
                    for s in w.shards {
                        let gradient = match slots.as_mut() {
                            Some(slots) => {
                                slots.region_mut(s.index() as usize).unwrap().fill(f32::NAN);
                                Tensor::Shared
                            }
                            None => Tensor::Inline(dtrain_proto::f32_bytes(&vec![f32::NAN; n])),
                        };
                        // Plausible sums: only the gradient is wrong.
                        let claimed =
                            dtrain_nn::ShardStats { loss_sum: 1.0, activity: 0.0, correct: 0, rows: s.rows().into() };
                        let r = ShardResult { step: w.step, index: s.index(), gradient, claimed, compute_micros: 1 };
                        let _ = conn.send(FromWorker::Result(r)).await;
                    }
                }
            })
        }
    });
    c.wait_for("(evil) joined", 30);
    let good = (!alone).then(|| worker(&url, &["--name", "good"]));
    // The coordinator recomputes the shard as referee, and evicts the worker it contradicts.
    let line = c.wait_for("evil (worker 1) sent a result for shard", 30);
    assert!(line.contains("differs from the coordinator's recomputation; evicting it (its party is refused for 60s)"));
    let _good = good.unwrap_or_else(|| {
        c.wait_for("no live worker; waiting", 30);
        worker(&url, &["--name", "good"])
    });
    assert!(s.same_weights_as_in_process());
    evil.join().unwrap();
}

/// A worker holding the token that computes honestly for its first steps, then sends finite
/// but wrong gradients (x1000) for every shard: verification (`--verify 0.05`) catches it,
/// the coordinator's recomputation names it, it is evicted and refused when it comes back
/// under the same name, training goes back to before its first unchecked result, and the
/// final weights equal an in-process run's bit for bit.
#[test]
fn a_finite_liar_is_caught_evicted_and_its_damage_undone() {
    let s = Scenario::start("shards = 3", &["--min-workers", "3", "--verify", "0.05"]);
    const HONEST_STEPS: u64 = 3;
    let liar = std::thread::spawn({
        let url = s.url.clone();
        move || {
            rt().block_on(async {
                let (mut conn, mut compute) = join_computing(&url, "liar").await;
                let mut lies = 0;
                while let Some(w) = next_work(&mut conn).await {
                    let step = w.step;
                    for mut r in compute.run(w).unwrap() {
                        if step >= HONEST_STEPS {
                            let Tensor::Inline(bytes) = &r.gradient else { panic!("tensors on the stream") };
                            let mut g = vec![0.0f32; bytes.len() / 4];
                            dtrain_proto::copy_f32s("gradient", bytes, &mut g).unwrap();
                            g.iter_mut().for_each(|x| *x *= 1000.0);
                            r.gradient = Tensor::Inline(dtrain_proto::f32_bytes(&g));
                            lies += 1;
                        }
                        if conn.send(FromWorker::Result(r)).await.is_err() {
                            break;
                        }
                    }
                }
                // Evicted: the same name from the same address is refused.
                let hello = Hello { protocol_version: PROTOCOL_VERSION, name: "liar".into(), peer_address: None };
                (lies, join(&url, hello).await.map(|_| ()).unwrap_err())
            })
        }
    });
    s.c.wait_for("(liar) joined", 30);
    let _good = [worker(&s.url, &["--name", "good-1"]), worker(&s.url, &["--name", "good-2"])];
    let caught = s.c.wait_for("liar (worker 1) sent a result for shard", 60);
    assert!(caught.contains("evicting it"), "{caught}");
    let back = s.c.wait_for("going back to step", 60);
    assert!(back.contains("unchecked results of liar (worker 1) went into steps"), "{back}");
    let (lies, refused) = liar.join().unwrap();
    assert!(lies > 0, "the liar sent wrong gradients before it was caught");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("evicted"), "{refused}");
    let counted = s.c.wait_for("evicted 1, rolled back 1 time(s)", 60);
    assert!(counted.starts_with("cluster:"), "the cluster line counts it: {counted}");
    assert!(s.same_weights_as_in_process(), "the final weights equal an honest in-process run's");
}

/// A worker that answers its first work with 200 copies of its results is closed as a flood
/// (the coordinator never queues more results than the work that is out), a party holds at
/// most two streams at once, and training ends with an in-process run's weights.
#[test]
fn a_flooding_worker_is_closed_and_a_party_holds_at_most_two_streams() {
    let s = Scenario::start("shards = 2", &["--min-workers", "2"]);
    let twins = rt().block_on(async {
        let twin = || Hello { protocol_version: PROTOCOL_VERSION, name: "twin".into(), peer_address: None };
        let (a, b) = (join(&s.url, twin()).await.unwrap(), join(&s.url, twin()).await.unwrap());
        let third = join(&s.url, twin()).await.map(|_| ()).unwrap_err();
        assert_eq!(third.code(), tonic::Code::ResourceExhausted, "{third}");
        assert!(third.message().contains("2 stream(s) of this worker"), "{third}");
        (a, b)
    });
    drop(twins);
    let flood = std::thread::spawn({
        let url = s.url.clone();
        move || {
            rt().block_on(async {
                let (mut conn, mut compute) = join_computing(&url, "flood").await;
                let mut sent = 0;
                while let Some(w) = next_work(&mut conn).await {
                    let results = compute.run(w).unwrap();
                    for _ in 0..200 {
                        for r in &results {
                            let copy = ShardResult { gradient: r.gradient.clone(), ..*r };
                            if conn.send(FromWorker::Result(copy)).await.is_err() {
                                return sent;
                            }
                            sent += 1;
                        }
                    }
                }
                sent
            })
        }
    });
    s.c.wait_for("(flood) joined", 30);
    let _good = worker(&s.url, &["--name", "good"]);
    s.c.wait_for("(flood) left: sent more results than it was given work", 30);
    assert!(s.same_weights_as_in_process());
    assert!(flood.join().unwrap() > 2, "the flood was sent");
}

/// A worker that takes work and never answers, then reconnects after each drop to stall the
/// next step too: its missed deadlines count against its party across reconnects, and at the
/// third it is refused; training ends with the in-process weights.
#[test]
fn a_worker_that_stalls_and_reconnects_is_refused_after_three_misses() {
    let s = Scenario::start("shards = 2", &["--min-workers", "2", "--step-timeout", "1"]);
    let staller = std::thread::spawn({
        let url = s.url.clone();
        move || {
            rt().block_on(async {
                let mut stalls = 0;
                loop {
                    let hello =
                        Hello { protocol_version: PROTOCOL_VERSION, name: "staller".into(), peer_address: None };
                    let mut conn = match join(&url, hello).await {
                        Ok((conn, _)) => conn,
                        Err(refused) => return (stalls, refused),
                    };
                    // Take work, answer nothing, until the coordinator drops this stream.
                    while let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_secs(30), conn.next()).await {
                        stalls += u32::from(matches!(m, ToWorker::Work(_)));
                    }
                }
            })
        }
    });
    s.c.wait_for("(staller) joined", 30);
    let _good = worker(&s.url, &["--name", "good"]);
    let line = s.c.wait_for("after 3 missed deadlines", 60);
    assert!(line.contains("dropping staller (worker") && line.contains("its party is refused for 60s"), "{line}");
    let (stalls, refused) = staller.join().unwrap();
    assert!(stalls >= 3, "it stalled {stalls} steps");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(s.same_weights_as_in_process());
}

/// The gRPC health service answers SERVING on the coordinator (for its service) and on a
/// worker started with --health-listen, as Kubernetes probes expect.
#[test]
fn health_services_report_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), "");
    let mut cmd = train(&job, &dir.path().join("run"));
    cmd.args(["--listen", "127.0.0.1:0", "--worker-wait", "20", "--min-workers", "2", "-q"]);
    let c = Proc::start(cmd);
    let url = listening_url(&c);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let health = format!("127.0.0.1:{port}");
    // While the coordinator waits for its second worker, both sides are idle and answer.
    let _w = worker(&url, &["--health-listen", &health]);
    rt().block_on(async {
        let check = |addr: String, service: &'static str| async move {
            for _ in 0..100 {
                if let Ok(ch) = tonic::transport::Endpoint::from_shared(addr.clone()).unwrap().connect().await {
                    let mut h = HealthClient::new(ch);
                    let r = h.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
                    return r.status;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("no health service at {addr}");
        };
        assert_eq!(check(url.clone(), "dtrain.v1.Coordinator").await, ServingStatus::Serving as i32);
        assert_eq!(check(format!("http://{health}"), "").await, ServingStatus::Serving as i32);
    });
    let _w2 = worker(&url, &[]);
    let mut c = c;
    let (ok, out) = c.finish(60);
    assert!(ok, "{out}");
}
