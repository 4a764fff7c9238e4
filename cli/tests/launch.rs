//! `upcycle launch` end to end with real processes on the CPU (workers under one
//! `mpirun` job, or spawned directly and talking over TCP, on one launcher or on two
//! launchers as two nodes): the same losses and parameters as a plain `mpirun -np 2` run; a worker
//! killed with SIGKILL mid-run, or in the middle of a checkpoint save, is followed by a
//! restart from the latest whole checkpoint that ends bit-identical to the uninterrupted run; with no restart left the launcher exits
//! with the worker's status and why; SIGINT leaves no process behind; a plan with a frozen
//! and a full phase on 2 and 4 workers runs end to end (and is skipped when rerun); the
//! emitted SLURM script starts the right workers under stub `sbatch`/`srun`; a killed
//! worker of one node restarts both nodes; a wrong token is turned away and logged; a node
//! that never comes is named; garbage, a flood and a stalled handshake at a training
//! job's rendezvous port are each answered, dropped and logged, and the job ends the
//! same. Real
//! recordings (pocketsphinx's LibriVox clips).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use upcycle_parallel::store::wire;
use upcycle_parallel::testing::free_port;
use upcycle_trainer::checkpoint;

mod common;
use common::*;

/// step -> loss (a step run again after a restart counts once, with its last value).
fn losses(out: &Path) -> BTreeMap<u64, f64> {
    metrics(out)
        .iter()
        .filter_map(|l| Some((l.get("step")?.as_u64()?, l.get("loss")?.as_f64()?)))
        .collect()
}

fn assert_same_parameters(a: &Path, b: &Path) {
    let x = checkpoint::read_group(a, "model").unwrap();
    let y = checkpoint::read_group(b, "model").unwrap();
    assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
    for (name, t) in &x {
        assert!(t.equal(&y[name]), "{name} differs");
    }
}

/// A running `upcycle launch`, its stderr read line by line.
struct Launcher {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Launcher {
    /// `upcycle launch ARGS` (its stderr echoed for the test log).
    fn spawn(args: &[&str]) -> Self {
        Self::spawn_with(args, &[])
    }

    /// As [`Launcher::spawn`], with `env` set.
    fn spawn_with(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_upcycle"))
            .arg("launch")
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Launcher {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The worker pids it announces next ("workers started: rank 0 pid 12, ...").
    fn worker_pids(&mut self) -> Vec<i32> {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .expect("the launcher announces its workers");
            self.seen.push(line.clone());
            if let Some(list) = line.strip_prefix("upcycle launch: workers started: ") {
                return list
                    .split(", ")
                    .map(|w| w.rsplit(' ').next().unwrap().parse().unwrap())
                    .collect();
            }
        }
    }

    /// Waits for it to end: its status and everything it wrote to stderr.
    fn finish(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().unwrap();
        self.seen.extend(self.lines.iter());
        (status, self.seen.join("\n"))
    }
}

/// Waits until training in `out` has logged `step`.
fn wait_for_step(out: &Path, step: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let logged = || {
        std::fs::read_to_string(out.join("metrics.jsonl")).is_ok_and(|m| {
            // The last line may be half written.
            m.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .any(|l| l.get("step").and_then(|s| s.as_u64()) >= Some(step))
        })
    };
    while !logged() {
        assert!(Instant::now() < deadline, "step {step} never came");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until a save of step `from` or later is being written under `root` (its
/// `.step-N.tmp` exists); its name.
fn wait_for_save(root: &Path, from: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let staging = std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let step: u64 = name
                    .strip_prefix(".step-")?
                    .strip_suffix(".tmp")?
                    .parse()
                    .ok()?;
                (step >= from).then_some(name)
            });
        if let Some(name) = staging {
            return name;
        }
        assert!(Instant::now() < deadline, "no save from step {from} began");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sigkill(pid: i32) {
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_name().to_str()?.parse::<i32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle).then_some(cmd)
        })
        .collect()
}

fn train_args<'a>(config: &'a str, data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--config",
        config,
        "--data",
        data,
        "--out",
        out,
        "--max-steps",
        steps,
        "--device",
        "cpu",
    ]
}

#[test]
fn launched_runs_equal_mpirun_and_a_killed_worker_is_restarted_from_the_latest_checkpoint() {
    use rand::{Rng, SeedableRng};
    let tmp = tempfile::tempdir().unwrap();
    let (data, config) = setup(tmp.path(), "upcycle_conf: {seed: 3, eval_interval: 2}\n");
    let (c, d) = (config.to_str().unwrap(), data.to_str().unwrap());
    let steps = 14;
    let straight = tmp.path().join("straight");
    run_workers(2, &config, &data, &straight, steps, &[]);
    let last = format!("checkpoints/step-{steps}");

    // Through the launcher: the same run.
    let launched = tmp.path().join("launched");
    let s = steps.to_string();
    let mut args = vec!["--nproc-per-node", "2", "--"];
    args.extend(train_args(c, d, launched.to_str().unwrap(), &s));
    let mut l = Launcher::spawn(&args);
    assert_eq!(l.worker_pids().len(), 2);
    let (status, err) = l.finish();
    assert!(status.success(), "{err}");
    assert_eq!(losses(&launched), losses(&straight));
    assert_same_parameters(&straight.join(&last), &launched.join(&last));

    // A worker killed at a random step: one restart, from the latest checkpoint.
    let killed = tmp.path().join("killed");
    let at = rand_chacha::ChaCha8Rng::seed_from_u64(7).random_range(3..steps - 2);
    eprintln!("killing rank 1 at step {at}");
    let mut args = vec!["--nproc-per-node", "2", "--max-restarts", "2", "--"];
    args.extend(train_args(c, d, killed.to_str().unwrap(), &s));
    let mut l = Launcher::spawn(&args);
    let pids = l.worker_pids();
    wait_for_step(&killed, at);
    sigkill(pids[1]);
    let second = l.worker_pids();
    assert!(second.iter().all(|p| !pids.contains(p)), "new workers");
    let (status, err) = l.finish();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("rank 1 was killed by signal 9; all workers stopped; restart 1 of 2"),
        "{err}"
    );
    assert!(
        err.contains("resuming"),
        "the restart resumed a checkpoint: {err}"
    );
    assert_eq!(losses(&killed), losses(&straight), "killed at step {at}");
    assert_same_parameters(&straight.join(&last), &killed.join(&last));

    // A worker killed in the middle of a checkpoint save (each stage of a save made to
    // last 300 ms): the previous checkpoint is whole, the restart resumes from it, and the
    // run still ends bit-identical.
    let saving = tmp.path().join("saving");
    let mut args = vec!["--nproc-per-node", "2", "--max-restarts", "2", "--"];
    args.extend(train_args(c, d, saving.to_str().unwrap(), &s));
    let mut l = Launcher::spawn_with(&args, &[("UPCYCLE_FAULT_SAVE_PAUSE_MS", "300")]);
    let pids = l.worker_pids();
    let staging = wait_for_save(&saving.join("checkpoints"), 4);
    sigkill(pids[1]);
    eprintln!("killed rank 1 while {staging} was being written");
    let (status, err) = l.finish();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("rank 1 was killed by signal 9; all workers stopped; restart 1 of 2")
            && err.contains("resuming"),
        "{err}"
    );
    assert_eq!(losses(&saving), losses(&straight), "killed in {staging}");
    assert_same_parameters(&straight.join(&last), &saving.join(&last));

    // No restart left: the launcher ends with the worker's status and the reason.
    let failed = tmp.path().join("failed");
    let mut args = vec!["--nproc-per-node", "2", "--"];
    args.extend(train_args(c, d, failed.to_str().unwrap(), "1000"));
    let mut l = Launcher::spawn(&args);
    let pids = l.worker_pids();
    wait_for_step(&failed, 2);
    sigkill(pids[0]);
    let (status, err) = l.finish();
    assert_eq!(status.code(), Some(128 + 9), "{err}");
    assert!(
        err.contains("rank 0 was killed by signal 9") && err.contains("no restart left"),
        "{err}"
    );
}

const TOKEN: &str = "launch-test-token-0123456789";

/// The arguments of node `node`'s launcher of a job of two nodes, one worker each, on the
/// TCP backend, then `extra` and the command.
fn two_node_args(node: usize, port: &str, extra: &[&str], train: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--backend",
        "tcp",
        "--nnodes",
        "2",
        "--node-rank",
        &node.to_string(),
        "--nproc-per-node",
        "1",
        "--master-port",
        port,
        "--join-timeout-s",
        "60",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args.push("--".into());
    args.extend(train.iter().map(|a| a.to_string()));
    args
}

fn spawn_node(args: &[String]) -> Launcher {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Launcher::spawn_with(&args, &[(upcycle_parallel::store::TOKEN_VAR, TOKEN)])
}

/// What [`hostile_connections`] saw answered.
struct Hostile {
    garbage: wire::HelloReply,
    busy: usize,
    /// Kept open, mid-handshake, while the job goes on.
    stalled: std::net::TcpStream,
}

impl Hostile {
    /// Each hostile connection was answered as it should be and the launcher logged it;
    /// the stalled one, open while the job ran to its end, was answered at its deadline
    /// (10 s) or closed when the launcher ended first.
    fn logged_in(mut self, log: &str) {
        let refused = |r: &wire::HelloReply, why: &str| matches!(r, wire::HelloReply::Refused(w) if w.contains(why));
        assert!(
            refused(&self.garbage, "unknown protocol"),
            "{:?}",
            self.garbage
        );
        assert!(
            self.busy > 0,
            "no connection of the flood was answered busy"
        );
        let timeout = "no handshake (timed out after 10.0 s)";
        let stalled = wire::read_hello_reply(&mut self.stalled);
        match &stalled {
            wire::HelloReply::Closed => {}
            r => assert!(refused(r, timeout) && log.contains(timeout), "{r:?}\n{log}"),
        }
        for why in [
            "not a rendezvous client (unknown protocol)",
            "connections are presenting their token already (the limit)",
        ] {
            assert!(
                log.contains(why),
                "the launcher did not log {why:?}:\n{log}"
            );
        }
    }
}

/// While a job trains, connections to its rendezvous port at `master` that send garbage,
/// flood it (200 at once, more than it lets present a token together), and stall in the
/// middle of a handshake (for longer than the handshake may take: 10 s).
fn hostile_connections(master: &str) -> Hostile {
    use std::io::Write;
    use std::net::TcpStream;
    let connect = || {
        let s = TcpStream::connect(master).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    };
    let mut stall = connect();
    stall.write_all(&wire::hello(TOKEN)[..6]).unwrap();
    let mut garbage = connect();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let garbage = wire::read_hello_reply(&mut garbage);
    let mut flood: Vec<TcpStream> = (0..200).map(|_| connect()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let busy = flood
        .iter_mut()
        .map(|s| {
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            matches!(wire::read_hello_reply(s), wire::HelloReply::Busy(_))
        })
        .filter(|&busy| busy)
        .count();
    drop(flood);
    Hostile {
        garbage,
        busy,
        stalled: stall,
    }
}

#[test]
fn tcp_workers_and_two_nodes_equal_mpirun_and_a_killed_worker_restarts_every_node() {
    use upcycle_parallel::store::{Store, StoreError};
    let tmp = tempfile::tempdir().unwrap();
    // One libtorch thread per worker, however they were started: mpirun binds each rank to
    // a core (one thread), the launcher's direct workers share the machine's cores, and
    // CPU kernels add in another order with another thread count.
    let (data, config) = setup(
        tmp.path(),
        "upcycle_conf: {seed: 3, eval_interval: 2, threads: 1}\n",
    );
    let (c, d) = (config.to_str().unwrap(), data.to_str().unwrap());
    let steps = 10;
    let s = steps.to_string();
    let straight = tmp.path().join("straight");
    run_workers(2, &config, &data, &straight, steps, &[]);
    let last = format!("checkpoints/step-{steps}");

    // One launcher, two workers spawned directly, talking over TCP (no MPI anywhere).
    let tcp = tmp.path().join("tcp");
    let mut args = vec![
        "--backend",
        "tcp",
        "--nproc-per-node",
        "2",
        "--master-port",
        "0",
        "--",
    ];
    args.extend(train_args(c, d, tcp.to_str().unwrap(), &s));
    let mut l = Launcher::spawn(&args);
    let pids = l.worker_pids();
    assert_eq!(pids.len(), 2);
    for pid in pids {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&env).contains("OMPI_COMM_WORLD"),
            "not under mpirun"
        );
    }
    let (status, err) = l.finish();
    assert!(status.success(), "{err}");
    assert_eq!(losses(&tcp), losses(&straight));
    assert_same_parameters(&straight.join(&last), &tcp.join(&last));

    // Two launchers as two nodes of one job (loopback), one worker each. A stranger with
    // a wrong token, and a worker with a wrong token, are turned away meanwhile.
    let nodes = tmp.path().join("nodes");
    let port = free_port().to_string();
    let train = train_args(c, d, nodes.to_str().unwrap(), &s);
    let mut zero = spawn_node(&two_node_args(0, &port, &[], &train));
    let mut one = spawn_node(&two_node_args(1, &port, &[], &train));
    let master = format!("127.0.0.1:{port}");
    let e = Store::connect(
        &master,
        "not-the-token-of-this-job",
        Duration::from_secs(30),
    )
    .unwrap_err();
    assert!(matches!(e, StoreError::Rejected { .. }), "{e}");
    let rogue = Command::new(env!("CARGO_BIN_EXE_upcycle"))
        .args(train_args(
            c,
            d,
            tmp.path().join("rogue").to_str().unwrap(),
            &s,
        ))
        .envs([
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", port.as_str()),
            (
                upcycle_parallel::store::TOKEN_VAR,
                "another-jobs-token-0123",
            ),
        ])
        .output()
        .unwrap();
    let rogue_err = String::from_utf8_lossy(&rogue.stderr);
    assert!(!rogue.status.success(), "{rogue_err}");
    assert!(
        rogue_err.contains("refused the connection: wrong rendezvous token")
            && rogue_err.contains("UPCYCLE_RDZV_TOKEN"),
        "{rogue_err}"
    );
    assert_eq!(zero.worker_pids().len(), 1);
    assert_eq!(one.worker_pids().len(), 1);
    let hostile = hostile_connections(&master);
    let (status, err0) = zero.finish();
    assert!(status.success(), "{err0}");
    let (status, err1) = one.finish();
    assert!(status.success(), "{err1}");
    assert_eq!(
        err0.matches(": wrong rendezvous token").count(),
        2,
        "{err0}"
    );
    hostile.logged_in(&err0);
    assert_eq!(losses(&nodes), losses(&straight));
    assert_same_parameters(&straight.join(&last), &nodes.join(&last));

    // A worker of node 1 killed at a random step: both nodes stop and restart together,
    // and the run ends bit-identical to the uninterrupted one.
    use rand::{Rng, SeedableRng};
    let killed = tmp.path().join("killed");
    let at = rand_chacha::ChaCha8Rng::seed_from_u64(11).random_range(3..steps - 2);
    eprintln!("killing node 1's worker at step {at}");
    let port = free_port().to_string();
    let train = train_args(c, d, killed.to_str().unwrap(), &s);
    let restarts = ["--max-restarts", "2"];
    let mut zero = spawn_node(&two_node_args(0, &port, &restarts, &train));
    let mut one = spawn_node(&two_node_args(1, &port, &restarts, &train));
    let first0 = zero.worker_pids();
    let first1 = one.worker_pids();
    wait_for_step(&killed, at);
    sigkill(first1[0]);
    let second0 = zero.worker_pids();
    let second1 = one.worker_pids();
    assert!(
        !first0.contains(&second0[0]) && !first1.contains(&second1[0]),
        "new workers on both nodes"
    );
    let (status, err0) = zero.finish();
    assert!(status.success(), "{err0}");
    let (status, err1) = one.finish();
    assert!(status.success(), "{err1}");
    // Both nodes name the killed worker (rank 0, which lost its peer, may have failed
    // too and is then named as well).
    for err in [&err0, &err1] {
        let line = err
            .lines()
            .find(|l| l.contains("all workers stopped; restart 1 of 2"))
            .unwrap_or_else(|| panic!("no restart announced: {err}"));
        assert!(
            line.contains("node 1: rank 1 was killed by signal 9"),
            "{line}"
        );
    }
    assert!(
        err0.contains("resuming"),
        "the restart resumed a checkpoint: {err0}"
    );
    assert_eq!(losses(&killed), losses(&straight), "killed at step {at}");
    assert_same_parameters(&straight.join(&last), &killed.join(&last));
}

#[test]
fn expert_parallel_workers_on_two_nodes_equal_mpirun() {
    // 4 experts, 2 on each node's worker: tokens cross the nodes by all-to-all, the
    // groups are split over TCP.
    let tmp = tempfile::tempdir().unwrap();
    let (data, _) = setup(tmp.path(), "");
    let config = deterministic_moe_config(tmp.path(), 2, 3);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "upcycle_conf: {seed: 4,",
        "upcycle_conf: {threads: 1, seed: 4,",
    );
    std::fs::write(&config, text).unwrap();
    let straight = tmp.path().join("mpirun");
    run_workers(2, &config, &data, &straight, 6, &["--ep", "2"]);
    let nodes = tmp.path().join("nodes");
    let port = free_port().to_string();
    let mut train = train_args(
        config.to_str().unwrap(),
        data.to_str().unwrap(),
        nodes.to_str().unwrap(),
        "6",
    );
    train.extend(["--ep", "2"]);
    let launchers: Vec<Launcher> = (0..2)
        .map(|n| spawn_node(&two_node_args(n, &port, &[], &train)))
        .collect();
    for l in launchers {
        let (status, err) = l.finish();
        assert!(status.success(), "{err}");
    }
    assert_eq!(losses(&nodes).len(), 6);
    assert_eq!(losses(&nodes), losses(&straight));
    assert_same_parameters(
        &straight.join("checkpoints/step-6"),
        &nodes.join("checkpoints/step-6"),
    );
}

#[test]
fn a_node_that_never_arrives_is_named_and_several_nodes_need_the_token() {
    let port = free_port().to_string();
    let train = ["train", "--config", "never-read.yaml"];
    let t = Instant::now();
    let mut args = two_node_args(0, &port, &[], &train);
    let at = args.iter().position(|a| a == "--join-timeout-s").unwrap();
    args[at + 1] = "2".into();
    let (status, err) = spawn_node(&args).finish();
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("node(s) 1 did not join within 2 s") && err.contains("--node-rank"),
        "{err}"
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = upcycle(&[&["launch"], &args[..]].concat());
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--nnodes 2") && err.contains("UPCYCLE_RDZV_TOKEN"),
        "{err}"
    );
}

#[test]
fn ctrl_c_stops_every_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, config) = setup(tmp.path(), "");
    let out = tmp.path().join("interrupted");
    let mut args = vec!["--nproc-per-node", "2", "--max-restarts", "3", "--"];
    args.extend(train_args(
        config.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        "100000",
    ));
    let mut l = Launcher::spawn(&args);
    let pids = l.worker_pids();
    wait_for_step(&out, 2);
    assert_eq!(
        processes_mentioning(out.to_str().unwrap()).len(),
        4,
        "launcher, mpirun, 2 workers"
    );
    Command::new("kill")
        .args(["-INT", &l.child.id().to_string()])
        .status()
        .unwrap();
    let (status, err) = l.finish();
    assert_eq!(status.code(), Some(128 + 2), "{err}");
    assert!(err.contains("stopped by signal 2"), "{err}");
    assert!(
        !err.contains("restart 1"),
        "an interrupt is not a failure: {err}"
    );
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}/cmdline")).exists() || {
                // A zombie not yet reaped by init has an empty command line.
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .unwrap()
                    .is_empty()
            },
            "worker {pid} survived"
        );
    }
    let left = processes_mentioning(out.to_str().unwrap());
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_plan_upcycles_trains_frozen_then_full_on_other_worker_counts_and_is_not_rerun() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, config) = setup(tmp.path(), "upcycle_conf: {seed: 5, eval_interval: 2}\n");
    let dense = tmp.path().join("dense");
    train(&config, &data, &dense, 4, None);
    let p = |x: &Path| x.display().to_string();
    let t = tmp.path();
    // The frozen phase trains experts and routers only (the UME recipe); the full phase
    // (no freezing) starts from the frozen phase's weights. The upcycled model's own
    // train.yaml is the config of both.
    let moe_yaml = std::fs::read_to_string(&config).unwrap().replace(
        "encoder_conf:\n",
        "encoder_conf:\n  mlp_type: moe\n  n_expert: 4\n  n_expert_activated: 2\n",
    );
    std::fs::write(t.join("full.yaml"), &moe_yaml).unwrap();
    std::fs::write(
        t.join("frozen.yaml"),
        moe_yaml.replace(
            "upcycle_conf: {seed: 5, eval_interval: 2}",
            "upcycle_conf: {seed: 5, eval_interval: 2, freeze: [{from_step: 0, trainable: ['*.experts.*', '*.router.*']}]}",
        ),
    )
    .unwrap();
    let plan = format!(
        "out: {out}\nmax_restarts: 1\nstages:\n\
         - name: upcycle\n  command: [convert, upcycle, --from, {dense}/checkpoints, --out, {t}/moe, --experts, '4', --top-k, '2', --encoder-only]\n\
         - name: frozen\n  nproc: 2\n  command: [train, --config, {t}/frozen.yaml, --data, {data}, --init, {t}/moe, --out, {t}/frozen, --max-steps, '4', --device, cpu]\n\
         - name: full\n  nproc: 4\n  ep: 2\n  command: [train, --config, {t}/full.yaml, --data, {data}, --init, {t}/frozen, --out, {t}/full, --max-steps, '2', --device, cpu]\n\
         - name: eval\n  command: [eval, --checkpoint, {t}/full, --data, {data}/test, --out, {t}/eval, --mode, ctc-greedy, --chunk, '0', --device, cpu]\n\
         - name: export\n  command: [convert, export-wenet, --checkpoint, {t}/full, --out, {t}/wenet]\n",
        out = p(&t.join("plan")),
        dense = p(&dense),
        t = p(t),
        data = p(&data),
    );
    let plan_file = t.join("plan.yaml");
    std::fs::write(&plan_file, plan).unwrap();
    let o = upcycle(&["launch", "--plan", &p(&plan_file)]);
    ok(&o);

    // Through the frozen phase only experts and routers moved.
    let start = checkpoint::read_tensors(&checkpoint::resolve(&t.join("moe")).unwrap()).unwrap();
    let frozen = checkpoint::read_tensors(&t.join("frozen/checkpoints/step-4")).unwrap();
    let full = checkpoint::read_tensors(&t.join("full/checkpoints/step-2")).unwrap();
    let (mut trained, mut kept, mut released) = (0, 0, 0);
    for (name, t0) in &start {
        if name.contains("global_cmvn") {
            continue;
        }
        if name.contains(".experts.") || name.contains(".router.") {
            assert!(
                !frozen[name].equal(t0),
                "{name} did not train in the frozen phase"
            );
            trained += 1;
        } else {
            assert!(frozen[name].equal(t0), "{name} changed while frozen");
            kept += 1;
            released += usize::from(!full[name].equal(&frozen[name]));
        }
    }
    assert!(
        trained > 0 && kept > 10 && released > 10,
        "{trained} {kept} {released}"
    );
    let layout = checkpoint::read_manifest(&t.join("full/checkpoints/step-2"))
        .unwrap()
        .layout;
    assert_eq!((layout.world, layout.ep), (4, 2));
    assert!(t.join("eval/results.json").is_file());
    assert!(t.join("wenet/final.pt").is_file());
    assert!(t.join("plan/logs/frozen/rank-1.log").is_file());

    // Run again: every stage is skipped (a rerun of `convert upcycle` would be refused).
    let o = upcycle(&["launch", "--plan", &p(&plan_file)]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("finished earlier, skipped").count(), 5, "{err}");

    // A changed finished stage is refused by name.
    std::fs::write(
        &plan_file,
        std::fs::read_to_string(&plan_file)
            .unwrap()
            .replace("--max-steps, '2'", "--max-steps, '3'"),
    )
    .unwrap();
    let o = upcycle(&["launch", "--plan", &p(&plan_file)]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("stage full finished earlier with another command"),
        "{err}"
    );

    // A stage that did not finish runs again and continues from its own latest
    // checkpoint (not from --init): forget `full` (as if it had failed after step 2) and
    // ask for one more step.
    let state_file = t.join("plan/plan-state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    state["finished"]
        .as_array_mut()
        .unwrap()
        .retain(|s| s["name"] == "upcycle" || s["name"] == "frozen");
    std::fs::write(&state_file, state.to_string()).unwrap();
    let text = std::fs::read_to_string(&plan_file).unwrap();
    let three_stages = &text[..text.find("- name: eval").unwrap()];
    std::fs::write(&plan_file, three_stages).unwrap();
    let o = upcycle(&["launch", "--plan", &p(&plan_file)]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("finished earlier, skipped").count(), 2, "{err}");
    assert!(err.contains("resuming"), "{err}");
    let steps: Vec<u64> = metrics(&t.join("full"))
        .iter()
        .filter(|l| l.get("loss").is_some())
        .filter_map(|l| l["step"].as_u64())
        .collect();
    assert_eq!(steps, [1, 2, 3], "steps 1 and 2 were not trained again");
}

#[test]
fn the_emitted_slurm_script_starts_each_stage_on_its_workers_and_restarts_a_failed_one() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let rec = t.join("rec");
    let stubs = t.join("stubs");
    std::fs::create_dir_all(&rec).unwrap();
    std::fs::create_dir_all(&stubs).unwrap();
    let script = |name: &str, body: &str| {
        let path = stubs.join(name);
        std::fs::write(&path, format!("#!/bin/bash\n{body}\n")).unwrap();
        Command::new("chmod").arg("+x").arg(&path).status().unwrap();
    };
    let r = rec.display();
    // sbatch runs the job script at once; srun starts --ntasks copies with Slurm's
    // variables; the worker records its arguments and environment, and rank 1 of the
    // `full` stage fails on its first attempt.
    script(
        "sbatch",
        &format!("echo \"$@\" >> {r}/sbatch; SLURM_JOB_NODELIST=node1 bash \"${{@: -1}}\""),
    );
    script("scontrol", "echo node1");
    script(
        "srun",
        &format!(
            "echo \"$@\" >> {r}/srun; n=1; for a in \"$@\"; do case $a in --ntasks=*) n=${{a#--ntasks=}};; esac; done\n\
             while [[ $1 == -* ]]; do shift; done\n\
             s=0; for i in $(seq 0 $((n - 1))); do SLURM_PROCID=$i SLURM_NTASKS=$n SLURM_LOCALID=$i \"$@\" || s=$?; done; exit $s"
        ),
    );
    script(
        "worker",
        &format!(
            "f={r}/$2-$SLURM_PROCID-of-$SLURM_NTASKS-attempt-$UPCYCLE_RESTART_COUNT; echo \"$*\" > $f; \
             env | grep -E '^(MASTER_ADDR|MASTER_PORT|TORCHELASTIC_RESTART_COUNT)=' | sort >> $f\n\
             if [ \"$2\" = full ] && [ $SLURM_PROCID = 1 ] && [ $UPCYCLE_RESTART_COUNT = 0 ]; then exit 3; fi"
        ),
    );
    let plan = t.join("plan.yaml");
    std::fs::write(
        &plan,
        format!(
            "out: {}\nmax_restarts: 1\nstages:\n\
             - {{name: frozen, nproc: 2, command: [train, frozen, --config, 'a b.yaml']}}\n\
             - {{name: full, nproc: 4, ep: 2, command: [train, full]}}\n\
             - {{name: eval, command: [eval, eval]}}\n",
            t.join("run").display()
        ),
    )
    .unwrap();
    let job = t.join("job.sh");
    ok(&upcycle(&[
        "launch",
        "--emit",
        "slurm",
        "--plan",
        plan.to_str().unwrap(),
        "--nproc-per-node",
        "2",
        "--gpus-per-node",
        "2",
        "--script",
        job.to_str().unwrap(),
    ]));
    let text = std::fs::read_to_string(&job).unwrap();
    for want in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --gpus-per-node=2",
    ] {
        assert!(text.contains(want), "{want} in\n{text}");
    }
    let syntax = Command::new("bash").arg("-n").arg(&job).output().unwrap();
    assert!(
        syntax.status.success(),
        "{}",
        String::from_utf8_lossy(&syntax.stderr)
    );

    let path = format!("{}:{}", stubs.display(), std::env::var("PATH").unwrap());
    let submit = || {
        Command::new("sbatch")
            .arg(&job)
            .env("PATH", &path)
            .env("UPCYCLE", stubs.join("worker"))
            .current_dir(t)
            .output()
            .unwrap()
    };
    let o = submit();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let srun = std::fs::read_to_string(rec.join("srun")).unwrap();
    let ntasks: Vec<&str> = srun
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        ntasks,
        ["--ntasks=2", "--ntasks=4", "--ntasks=4", "--ntasks=1"],
        "{srun}"
    );
    let mut files: Vec<String> = std::fs::read_dir(&rec)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("-of-"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "eval-0-of-1-attempt-0",
            "frozen-0-of-2-attempt-0",
            "frozen-1-of-2-attempt-0",
            "full-0-of-4-attempt-0",
            "full-0-of-4-attempt-1",
            "full-1-of-4-attempt-0",
            "full-1-of-4-attempt-1",
            "full-2-of-4-attempt-0",
            "full-2-of-4-attempt-1",
            "full-3-of-4-attempt-0",
            "full-3-of-4-attempt-1",
        ]
    );
    let frozen = std::fs::read_to_string(rec.join("frozen-1-of-2-attempt-0")).unwrap();
    assert_eq!(
        frozen,
        "train frozen --config a b.yaml\nMASTER_ADDR=node1\nMASTER_PORT=29500\nTORCHELASTIC_RESTART_COUNT=0\n"
    );
    let full = std::fs::read_to_string(rec.join("full-3-of-4-attempt-1")).unwrap();
    assert!(
        full.starts_with("train full --ep 2\n") && full.contains("TORCHELASTIC_RESTART_COUNT=1"),
        "{full}"
    );

    // Submitted again: every stage finished, none runs.
    let o = submit();
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout)
            .matches("skipped")
            .count(),
        3
    );
    assert_eq!(std::fs::read_to_string(rec.join("srun")).unwrap(), srun);
}
