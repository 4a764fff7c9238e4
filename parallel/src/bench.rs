//! Collectives through this crate against the same MPI calls made directly (rsmpi on
//! plain buffers, a communicator of their own), in the same processes and the same run,
//! repetitions interleaved; and the cost of the autograd all-to-all over the plain one.
//! Run by `mpirun -np 2 upcycle bench collectives`.

use std::sync::Arc;
use std::time::Instant;

use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::alltoall::all_to_all;
use crate::collective::{Collective, ReduceOp};

/// One operation at one size: seconds per call of each repetition, both ways.
#[derive(Debug, Serialize)]
pub struct CollectiveTiming {
    /// `all_reduce` or `all_to_all` (uneven splits).
    pub op: String,
    /// Bytes each rank sends.
    pub bytes: usize,
    /// Seconds per call, raw MPI, one entry per repetition.
    pub raw_s: Vec<f64>,
    /// Seconds per call through [`Collective`].
    pub ours_s: Vec<f64>,
    /// Median raw time over median ours: bandwidth of ours relative to raw MPI.
    pub ratio: f64,
    /// Algorithmic bandwidth of ours at its median, GB/s.
    pub ours_gb_s: f64,
}

/// The autograd all-to-all against two plain exchanges (forward and transposed), per
/// forward + backward.
#[derive(Debug, Serialize)]
pub struct AutogradTiming {
    /// Bytes each rank sends.
    pub bytes: usize,
    /// Seconds per forward + backward through two plain [`Collective::all_to_all`] calls.
    pub plain_s: f64,
    /// Seconds per forward + backward through [`all_to_all`] (an autograd node), with a
    /// product and sum on top to give it a gradient.
    pub autograd_s: f64,
    /// Seconds of that product and sum, forward and backward, without any exchange.
    pub compute_s: f64,
    /// What the autograd node adds per forward + backward:
    /// `autograd_s - plain_s - compute_s`.
    pub wrapper_s: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// Calls per timing: enough that small messages are not timer noise.
fn calls(bytes: usize) -> usize {
    ((64 << 20) / bytes.max(1)).clamp(2, 200)
}

/// Rows this rank sends to each peer: uneven (peer p gets a share p + 1), all of `rows`.
fn uneven(rows: i64, size: usize) -> Vec<i64> {
    let total: i64 = (1..=size as i64).sum();
    let mut counts: Vec<i64> = (1..=size as i64).map(|w| rows * w / total).collect();
    counts[size - 1] += rows - counts.iter().sum::<i64>();
    counts
}

fn time(world: &dyn Collective, calls: usize, mut f: impl FnMut()) -> f64 {
    world.barrier().expect("barrier");
    let start = Instant::now();
    for _ in 0..calls {
        f();
    }
    start.elapsed().as_secs_f64() / calls as f64
}

/// Times all-reduce (sum) and uneven all-to-all of `sizes` bytes of f32 per rank,
/// `repeat` times each way, through `world` and through raw MPI on `MPI_COMM_WORLD`'s
/// duplicate. Every rank of the world calls it; MPI must be started (by `world`).
pub fn collectives(
    world: &dyn Collective,
    sizes: &[usize],
    repeat: usize,
) -> Vec<CollectiveTiming> {
    let raw = SimpleCommunicator::world().duplicate();
    let size = world.size();
    let mut out = Vec::new();
    for &bytes in sizes {
        let n = (bytes / 4).max(size);
        let calls = calls(bytes);
        let send: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut recv = vec![0f32; n];
        let mut t = Tensor::from_slice(&send);
        let (mut raw_s, mut ours_s) = (Vec::new(), Vec::new());
        for _ in 0..repeat {
            raw_s.push(time(world, calls, || {
                raw.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum())
            }));
            ours_s.push(time(world, calls, || {
                world.all_reduce(&mut t, ReduceOp::Sum).expect("all_reduce")
            }));
        }
        out.push(timing("all_reduce", bytes, raw_s, ours_s));

        // Uneven all-to-all: every rank sends the same split, so rank r receives
        // `counts[r]` rows from each.
        let counts = uneven(n as i64, size);
        let me = world.rank();
        let recv_counts = vec![counts[me]; size];
        let as_i32 = |c: &[i64]| c.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        let displs = |c: &[i32]| {
            c.iter()
                .scan(0, |s, &x| {
                    *s += x;
                    Some(*s - x)
                })
                .collect::<Vec<i32>>()
        };
        let (sc, rc) = (as_i32(&counts), as_i32(&recv_counts));
        let (sd, rd) = (displs(&sc), displs(&rc));
        let mut recv = vec![0f32; (counts[me] * size as i64) as usize];
        let x = Tensor::from_slice(&send);
        let (mut raw_s, mut ours_s) = (Vec::new(), Vec::new());
        for _ in 0..repeat {
            raw_s.push(time(world, calls, || {
                let s = Partition::new(&send[..], &sc[..], &sd[..]);
                let mut r = PartitionMut::new(&mut recv[..], &rc[..], &rd[..]);
                raw.all_to_all_varcount_into(&s, &mut r)
            }));
            ours_s.push(time(world, calls, || {
                let got = world
                    .all_to_all(&x, &counts, &recv_counts)
                    .expect("all_to_all");
                drop(got);
            }));
        }
        out.push(timing("all_to_all", bytes, raw_s, ours_s));
    }
    out
}

fn timing(op: &str, bytes: usize, raw_s: Vec<f64>, ours_s: Vec<f64>) -> CollectiveTiming {
    let ours = median(&ours_s);
    CollectiveTiming {
        op: op.into(),
        bytes,
        ratio: median(&raw_s) / ours,
        ours_gb_s: bytes as f64 / ours / 1e9,
        raw_s,
        ours_s,
    }
}

/// Times forward + backward of the autograd all-to-all against the same two exchanges
/// made plainly, for `bytes` per rank (rows of 256 floats, uneven splits), median of
/// `repeat`.
pub fn autograd_cost(world: Arc<dyn Collective>, bytes: usize, repeat: usize) -> AutogradTiming {
    let size = world.size();
    let rows = ((bytes / 4 / 256).max(size)) as i64;
    let counts = uneven(rows, size);
    let recv_counts = world.exchange_counts(&counts).expect("counts");
    let x = Tensor::randn([rows, 256], (Kind::Float, tch::Device::Cpu));
    let g = Tensor::randn(
        [recv_counts.iter().sum::<i64>(), 256],
        (Kind::Float, tch::Device::Cpu),
    );
    let calls = calls(bytes);
    let gx = Tensor::randn([rows, 256], (Kind::Float, tch::Device::Cpu));
    let (mut plain, mut autograd, mut compute) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeat {
        plain.push(time(world.as_ref(), calls, || {
            let y = world
                .all_to_all(&x, &counts, &recv_counts)
                .expect("forward");
            let dx = world
                .all_to_all(&g, &recv_counts, &counts)
                .expect("backward");
            drop((y, dx));
        }));
        autograd.push(time(world.as_ref(), calls, || {
            let xg = x.detach().set_requires_grad(true);
            let y = all_to_all(&xg, world.clone(), &counts, &recv_counts);
            (&y * &g).sum(Kind::Float).backward();
        }));
        compute.push(time(world.as_ref(), calls, || {
            let xg = x.detach().set_requires_grad(true);
            (&xg * &gx).sum(Kind::Float).backward();
        }));
    }
    let (plain_s, autograd_s, compute_s) = (median(&plain), median(&autograd), median(&compute));
    AutogradTiming {
        bytes,
        plain_s,
        autograd_s,
        compute_s,
        wrapper_s: autograd_s - plain_s - compute_s,
    }
}
