//! The MPI backend as real processes: this test binary starts itself under
//! `mpirun -np 2` and `-np 4` (oversubscribed on a 2-core machine); each rank checks every
//! collective against the value it can compute alone, on float, double and int64
//! tensors, with uneven and zero all-to-all counts, on split subgroups, and the
//! expert-parallel process groups for ep = 2, gradient synchronisation, and the
//! differentiable all-to-all's backward against the transposed exchange.

use tch::{Kind, Tensor};
use upcycle_parallel::alltoall::all_to_all;
use upcycle_parallel::collective::{finalize_mpi, Collective, MpiCollective, ReduceOp};
use upcycle_parallel::env::WorldInfo;
use upcycle_parallel::grads::{global_grad_norm, GradSync, Placement};
use upcycle_parallel::groups::ProcessGroups;
use upcycle_parallel::testing::{check_collectives, mpirun_self, mpirun_self_with};

const WORKER: &str = "UPCYCLE_MPI_TEST_WORKER";

fn worker() {
    let world = MpiCollective::world().unwrap();
    let info = WorldInfo::from_env().unwrap();
    let (rank, size) = (world.rank(), world.size());
    assert_eq!(
        (info.rank, info.world),
        (rank, size),
        "environment and MPI agree"
    );

    check_collectives(&world, tch::Device::Cpu);

    // Process groups for ep = 2: blocks of consecutive ranks exchange tokens, ranks
    // with the same position in their block share experts.
    let groups = ProcessGroups::new(Box::new(MpiCollective::world().unwrap()), 2).unwrap();
    assert_eq!((groups.ep.size(), groups.edp.size()), (2, size / 2));
    assert_eq!(
        groups.local_experts(8),
        (rank % 2) as i64 * 4..(rank % 2) as i64 * 4 + 4
    );
    let mut members = Tensor::from_slice(&[rank as i64]);
    let ep_members = groups.ep.all_gather(&members).unwrap();
    assert_eq!(
        Vec::<i64>::try_from(&ep_members).unwrap(),
        [(rank - rank % 2) as i64, (rank - rank % 2 + 1) as i64]
    );
    groups.edp.all_reduce(&mut members, ReduceOp::Sum).unwrap();
    let want: i64 = (0..size)
        .filter(|r| r % 2 == rank % 2)
        .map(|r| r as i64)
        .sum();
    assert_eq!(members.int64_value(&[0]), want);

    // Gradient synchronisation: dense gradients averaged over the world, expert ones
    // summed over edp and divided by the world; frozen ones untouched; a gradient that
    // never appeared on rank 0 takes part as zeros.
    let param = |n: i64| Tensor::zeros([n], tch::kind::FLOAT_CPU).set_requires_grad(true);
    let params: Vec<(String, Tensor)> = vec![
        ("enc.norm.weight".into(), param(3)),
        ("enc.ff.experts.w_1".into(), param(5)),
        ("enc.ff.router.weight".into(), param(2)),
        ("enc.frozen.weight".into(), param(2)),
    ];
    let r = (rank + 1) as f64;
    for (name, p) in &params {
        let value = if name.contains("experts") {
            10.0 * r
        } else {
            r
        };
        if !(rank == 0 && name.contains("router")) {
            (p * value).sum(Kind::Float).backward();
        }
    }
    let _ = params[3].1.shallow_clone().requires_grad_(false);
    let placed: Vec<(Tensor, Placement)> = params
        .iter()
        .map(|(name, p)| {
            let at = if name.contains("experts") {
                Placement::Expert
            } else {
                Placement::Replicated
            };
            (p.shallow_clone(), at)
        })
        .collect();
    GradSync::new(1e-5).sync(&placed, &groups).unwrap();
    let got = |i: usize| params[i].1.grad().double_value(&[0]);
    let n = size as f64;
    assert!(
        (got(0) - (n + 1.0) / 2.0).abs() < 1e-6,
        "dense mean {}",
        got(0)
    );
    let edp_sum: f64 = (0..size)
        .filter(|q| q % 2 == rank % 2)
        .map(|q| 10.0 * (q + 1) as f64)
        .sum();
    assert!((got(1) - edp_sum / n).abs() < 1e-5, "expert {}", got(1));
    let without_rank_0: f64 = (1..size).map(|q| (q + 1) as f64).sum();
    assert!(
        (got(2) - without_rank_0 / n).abs() < 1e-6,
        "router {}",
        got(2)
    );
    assert_eq!(got(3), r, "frozen gradients are not communicated");
    // The global norm counts dense gradients once and every expert once.
    let norm = global_grad_norm(&placed, &groups)
        .unwrap()
        .double_value(&[]);
    let experts_sq: f64 = (0..2)
        .map(|pos| {
            let s: f64 = (0..size)
                .filter(|q| q % 2 == pos)
                .map(|q| 10.0 * (q + 1) as f64)
                .sum();
            5.0 * (s / n).powi(2)
        })
        .sum();
    let want =
        (3.0 * ((n + 1.0) / 2.0).powi(2) + 2.0 * (without_rank_0 / n).powi(2) + experts_sq).sqrt();
    assert!((norm - want).abs() < 1e-4 * want, "norm {norm} vs {want}");
    drop(groups);

    // The differentiable all-to-all: forward equals the plain exchange, and the
    // gradient of the input is the output's gradient exchanged back (splits swapped).
    // Counts (r*3 + q) % 4 include zeros; the last case sends nothing from rank 0.
    let world_arc: std::sync::Arc<dyn Collective> =
        std::sync::Arc::new(MpiCollective::world().unwrap());
    for case in 0..2 {
        let send: Vec<i64> = (0..size)
            .map(|q| {
                if case == 1 && rank == 0 {
                    0
                } else {
                    ((rank * 3 + q) % 4) as i64
                }
            })
            .collect();
        let recv = world_arc.exchange_counts(&send).unwrap();
        tch::manual_seed((rank * 10 + case) as i64);
        let x = Tensor::randn([send.iter().sum::<i64>(), 4], tch::kind::FLOAT_CPU)
            .set_requires_grad(true);
        let y = all_to_all(&x, world_arc.clone(), &send, &recv);
        assert!(y.equal(&world_arc.all_to_all(&x.detach(), &send, &recv).unwrap()));
        let g = Tensor::randn(y.size().as_slice(), tch::kind::FLOAT_CPU);
        (&y * &g).sum(Kind::Float).backward();
        let want = world_arc.all_to_all(&g, &recv, &send).unwrap();
        let got = x.grad();
        let got = if got.defined() { got } else { x.zeros_like() };
        assert!(
            got.equal(&want),
            "all_to_all backward, case {case}, rank {rank}"
        );
    }
    drop(world_arc);

    // Bad calls are refused by name, before any communication.
    let e = world
        .all_to_all(&Tensor::zeros([3, 2], tch::kind::FLOAT_CPU), &[1], &[1])
        .unwrap_err();
    assert!(e.to_string().starts_with("all_to_all:"), "{e}");
    println!("rank {rank}/{size}: all collectives correct");
    drop(world);
    finalize_mpi();
    assert!(MpiCollective::world().is_err(), "MPI cannot start again");
}

const TIMEOUT_WORKER: &str = "UPCYCLE_MPI_TIMEOUT_WORKER";
const SCENARIO: &str = "UPCYCLE_MPI_TIMEOUT_SCENARIO";

/// `world`: rank 1 never reaches a world barrier; ranks 0 and 2 time out together and
/// must each name rank 1 and each other. `split`: in the group of even world ranks, world
/// rank 2 never arrives; world rank 0 must name it by its world rank.
fn timeout_worker() {
    // What the `upcycle` binary does with an expired call.
    upcycle_parallel::watchdog::on_expiry(|expired| {
        eprintln!("error: {expired}");
        std::process::exit(upcycle_parallel::watchdog::TIMEOUT_EXIT);
    });
    let secs = |s| std::time::Duration::from_secs(s);
    let world = MpiCollective::world().unwrap().with_timeout(secs(2));
    let scenario = std::env::var(SCENARIO).unwrap();
    let rank = world.rank();
    if scenario == "world" {
        if rank == 1 {
            std::thread::sleep(secs(60));
        }
        world.barrier().unwrap();
    } else {
        let even = world.split(rank % 2, rank, "even").unwrap();
        match rank {
            0 => even.barrier().unwrap(),
            // Outlives rank 0's deadline and diagnosis: rank 0 reports first.
            1 => MpiCollective::world()
                .unwrap()
                .with_timeout(secs(30))
                .barrier()
                .unwrap(),
            _ => std::thread::sleep(secs(60)),
        }
    }
    unreachable!("the watchdog ends the job");
}

#[test]
fn timeout_worker_entry() {
    if std::env::var_os(TIMEOUT_WORKER).is_some() {
        timeout_worker();
    }
}

fn timeout_run(scenario: &str) -> String {
    let started = std::time::Instant::now();
    let out = mpirun_self_with(
        "timeout_worker_entry",
        3,
        TIMEOUT_WORKER,
        &[(SCENARIO, scenario)],
    );
    assert!(!out.status.success());
    assert!(
        started.elapsed().as_secs() < 50,
        "the hung rank was not waited for"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_collective_past_its_deadline_ends_the_job_naming_who_did_not_arrive() {
    let stderr = timeout_run("world");
    for (me, other) in [(0, 2), (2, 0)] {
        let line = stderr
            .lines()
            .find(|l| {
                l.contains(&format!(
                    "barrier on group world (rank {me} of 3) did not complete within 2 s"
                ))
            })
            .unwrap_or_else(|| panic!("no message from rank {me}:\n{stderr}"));
        assert!(
            line.contains("Ranks that did not arrive at this barrier (#1 of the group): rank 1 (world rank 1) is outside this group's collectives"),
            "{line}"
        );
        assert!(
            line.contains(&format!("Arrived: rank {other} (world rank {other})")),
            "{line}"
        );
    }

    let stderr = timeout_run("split");
    assert!(
        stderr.contains("barrier on group even (rank 0 of 2) did not complete within 2 s"),
        "{stderr}"
    );
    assert!(
        stderr.contains("rank 1 (world rank 2) is outside this group's collectives"),
        "{stderr}"
    );
}

#[test]
fn mpi_worker() {
    if std::env::var_os(WORKER).is_some() {
        worker();
    }
}

#[test]
fn collectives_under_mpirun() {
    for np in [2, 4] {
        let out = mpirun_self("mpi_worker", np, WORKER);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "mpirun -np {np} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ok = stdout.matches("all collectives correct").count();
        assert_eq!(ok, np, "{stdout}");
    }
}
