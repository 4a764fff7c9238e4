//! Expert parallelism as real processes: this test binary starts itself under
//! `mpirun -np 2` and `-np 4`. Every rank holds E/P of the experts of one MoE layer and
//! routes its share of the tokens through the all-to-all dispatch; outputs, input
//! gradients, expert gradients and (all-reduced) router gradients must equal one process
//! computing the whole layer on all the tokens, with an expert that gets no token.

use std::collections::BTreeMap;
use std::sync::Arc;

use tch::{nn, Device, Kind, Tensor};
use upcycle_model::activation::Activation;
use upcycle_model::config::MoeConf;
use upcycle_model::dispatch::EpDispatch;
use upcycle_model::moe::{
    ExpertBank, ExpertDispatch, LocalDispatch, MoeFeedForward, MoeSpec, Routing,
};
use upcycle_parallel::collective::{finalize_mpi, Collective, MpiCollective, ReduceOp};
use upcycle_parallel::testing::mpirun_self;

const WORKER: &str = "UPCYCLE_EP_TEST_WORKER";
const E: i64 = 4;
const D: i64 = 8;
const F: i64 = 12;
const T: i64 = 9;

fn layer(vs: &nn::VarStore, dispatch: Arc<dyn ExpertDispatch>) -> MoeFeedForward {
    let local = dispatch.local_experts(E).count() as i64;
    let spec = MoeSpec {
        d: D,
        n_expert: E,
        k: 2,
        activation: Activation::Swish,
        dropout: 0.0,
        conf: MoeConf::default(),
        dispatch,
        balance: Arc::default(),
    };
    let p = vs.root() / "ffn";
    MoeFeedForward::new(&p, ExpertBank::new(&(&p / "experts"), local, D, F), &spec)
}

fn close(what: &str, a: &Tensor, b: &Tensor) {
    let d = (a - b).abs().max().double_value(&[]);
    assert!(d <= 1e-5, "{what}: differs by {d:e}");
}

fn worker() {
    let world: Arc<dyn Collective> = Arc::new(MpiCollective::world().unwrap());
    let (rank, size) = (world.rank() as i64, world.size() as i64);
    // The whole layer, on every rank, from the same seed.
    tch::manual_seed(0);
    let full_vs = nn::VarStore::new(Device::Cpu);
    let full = layer(&full_vs, Arc::new(LocalDispatch));
    tch::no_grad(|| {
        let router = full_vs.variables()["ffn.router.weight"].shallow_clone();
        let _ = router.get(E - 1).get(0).fill_(-50.0); // expert E-1 gets no token
    });
    let dispatch = Arc::new(EpDispatch::new(world.clone()));
    let mine = dispatch.local_experts(E);
    let ep_vs = nn::VarStore::new(Device::Cpu);
    let ep = layer(&ep_vs, dispatch);
    let full_vars: BTreeMap<String, Tensor> = full_vs.variables().into_iter().collect();
    tch::no_grad(|| {
        for (name, mut v) in ep_vs.variables() {
            let src = &full_vars[&name];
            let src = if name.contains(".experts.") {
                src.narrow(0, mine.start, mine.end - mine.start)
            } else {
                src.shallow_clone()
            };
            v.copy_(&src);
        }
    });
    tch::manual_seed(1);
    let x = Tensor::randn([size * T, 1, D], (Kind::Float, Device::Cpu));
    let _ = x.narrow(2, 0, 1).fill_(3.0);
    let g = Tensor::randn([size * T, 1, D], (Kind::Float, Device::Cpu));

    let xa = x.copy().set_requires_grad(true);
    let mut r = Routing::recording();
    let ya = full.forward(&xa, None, true, &mut r);
    assert_eq!(
        Vec::<i64>::try_from(&r.layers[0].tokens_per_expert).unwrap()[(E - 1) as usize],
        0
    );
    (&ya * &g).sum(Kind::Float).backward();

    let xb = x.narrow(0, rank * T, T).copy().set_requires_grad(true);
    let yb = ep.forward(&xb, None, true, &mut Routing::off());
    (&yb * g.narrow(0, rank * T, T)).sum(Kind::Float).backward();

    close("output", &yb, &ya.narrow(0, rank * T, T));
    close(
        "input gradient",
        &xb.grad(),
        &xa.grad().narrow(0, rank * T, T),
    );
    let ep_vars = ep_vs.variables();
    for part in ["w_1", "b_1", "w_2", "b_2"] {
        let name = format!("ffn.experts.{part}");
        let want = full_vars[&name]
            .grad()
            .narrow(0, mine.start, mine.end - mine.start);
        close(&name, &ep_vars[&name].grad(), &want);
    }
    let mut router = ep_vars["ffn.router.weight"].grad().copy();
    world.all_reduce(&mut router, ReduceOp::Sum).unwrap();
    close(
        "router gradient",
        &router,
        &full_vars["ffn.router.weight"].grad(),
    );
    println!("rank {rank}/{size}: expert-parallel layer matches");
    check_local_build(world.as_ref(), &mine);
    drop((ep, ep_vs, world));
    finalize_mpi();
}

/// A bank built from the seed as this rank's experts only, and a tensor drawn after it:
/// the ranks' rows gathered are bit for bit the bank one process builds from that seed,
/// and the generator ends where the whole bank leaves it (what follows is the same).
fn check_local_build(world: &dyn Collective, mine: &std::ops::Range<i64>) {
    let build = |local: std::ops::Range<i64>| {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let bank = vs.root() / "experts";
        ExpertBank::part(&bank, local, E, D, F);
        let _ = vs
            .root()
            .var("after", &[3, D], nn::Init::Uniform { lo: -1.0, up: 1.0 });
        // In name order: every rank gathers the same tensor at the same time.
        vs.variables().into_iter().collect::<BTreeMap<_, _>>()
    };
    let whole = build(0..E);
    let part = build(mine.clone());
    for (name, got) in part {
        let got = if name.starts_with("experts.") {
            assert_eq!(got.size()[0], mine.end - mine.start, "{name}: local rows");
            world.all_gather(&got).unwrap()
        } else {
            got
        };
        assert!(
            got.equal(&whole[&name]),
            "{name}: the ranks' local build differs from one process's"
        );
    }
    println!("rank {}: local build equals one process's", world.rank());
}

#[test]
fn ep_worker() {
    if std::env::var_os(WORKER).is_some() {
        worker();
    }
}

#[test]
fn expert_parallel_layer_equals_one_process() {
    for np in [2, 4] {
        let out = mpirun_self("ep_worker", np, WORKER);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "mpirun -np {np} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.matches("layer matches").count(), np, "{stdout}");
        assert_eq!(stdout.matches("local build equals").count(), np, "{stdout}");
    }
}
