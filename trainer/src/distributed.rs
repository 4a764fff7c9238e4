//! The training loop's view of the job: which worker this is (from the environment
//! `mpirun`, `srun` or the launcher left), how it reaches the others (MPI under
//! `mpirun`/`srun`; TCP through the launcher's rendezvous store when a torchrun-style
//! launcher started it without MPI; NCCL between GPUs), the process groups for data + expert
//! parallelism, and the agreements the loop needs: parameters equal at the start,
//! gradients synchronised, stop and skip decisions taken together, and which rows of
//! each tensor (its experts) a worker holds, builds and reads.
//!
//! A single process (no starter variables) needs none of it: every method is then the
//! identity and no collective runs.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tch::{nn, Device, Kind, Tensor};
use upcycle_dataset::loader::Shard;
use upcycle_model::balance::{is_expert_bias, BalanceStats};
use upcycle_model::config::MoeConf;
use upcycle_model::dispatch::EpDispatch;
use upcycle_model::moe::MoeContext;
use upcycle_model::moe::{placement, Placement};
use upcycle_parallel::collective::{Collective, MpiCollective, ReduceOp};
use upcycle_parallel::env::{mpi_started, Starter, WorldInfo};
use upcycle_parallel::grads::{global_grad_norm, GradSync};
use upcycle_parallel::groups::ProcessGroups;
use upcycle_parallel::store::RendezvousEnv;
use upcycle_parallel::tcp::TcpCollective;

/// Gradient buckets of this many MiB (one all-reduce each).
const BUCKET_MIB: f64 = 25.0;

/// The world as an NCCL communicator, its id sent over `bootstrap` (MPI, or TCP through
/// the rendezvous store).
#[cfg(feature = "nccl")]
fn nccl_world(
    bootstrap: &dyn Collective,
    device: Device,
    timeout: std::time::Duration,
) -> Result<Box<dyn Collective>> {
    let world = upcycle_parallel::nccl::NcclCollective::new(bootstrap, device, timeout)
        .context("joining the workers over NCCL")?;
    Ok(Box::new(world))
}

#[cfg(not(feature = "nccl"))]
fn nccl_world(
    _bootstrap: &dyn Collective,
    device: Device,
    _timeout: std::time::Duration,
) -> Result<Box<dyn Collective>> {
    bail!("--device {device:?} with several workers needs NCCL: build with the `nccl` feature")
}

/// This worker's place in the job and its communicators.
#[derive(Debug)]
pub struct Distributed {
    /// Rank, world, local rank, node.
    pub info: WorldInfo,
    /// The device this worker trains on.
    pub device: Device,
    groups: Option<ProcessGroups>,
}

impl Distributed {
    /// Reads the environment and, in a world of several workers, joins it and builds the
    /// process groups for expert-parallel size `ep`; every blocking collective must finish
    /// within `timeout`. Workers that a torchrun-style launcher started without MPI
    /// (`RANK`, `WORLD_SIZE`, ... and no MPI rank variables) join over TCP through the
    /// launcher's rendezvous store (`MASTER_ADDR`, `MASTER_PORT`, `UPCYCLE_RDZV_TOKEN`);
    /// the others over MPI. On `device` CUDA, each worker takes the GPU of its local rank
    /// and the groups communicate through NCCL (its id sent over TCP or MPI).
    pub fn new(ep: usize, timeout: std::time::Duration, device: Device) -> Result<Self> {
        let info = WorldInfo::from_env()?;
        let device = match device {
            Device::Cuda(_) => Device::Cuda(info.local_rank % tch::Cuda::device_count() as usize),
            other => other,
        };
        if info.world == 1 {
            if ep != 1 {
                bail!(
                    "--ep {ep}: this is a single process; start {ep} (or a multiple of {ep}) \
                     workers with `mpirun -np N upcycle train ...`"
                );
            }
            return Ok(Self {
                info,
                device,
                groups: None,
            });
        }
        let env = |k: &str| std::env::var(k).ok();
        if info.starter == Starter::Torchrun && !mpi_started(env) {
            let rdzv = RendezvousEnv::from_vars(env)
                .map_err(|m| anyhow::anyhow!("worker environment: {m}"))?;
            let store = rdzv.connect(timeout).with_context(|| {
                format!(
                    "rank {} of {}: joining the rendezvous store",
                    info.rank, info.world
                )
            })?;
            let tcp = TcpCollective::new(&store, info.rank, info.world, timeout)
                .context("joining the workers over TCP")?;
            let world: Box<dyn Collective> = match device {
                Device::Cuda(_) => nccl_world(&tcp, device, timeout)?,
                _ => Box::new(tcp),
            };
            return Ok(Self {
                info,
                device,
                groups: Some(ProcessGroups::new(world, ep)?),
            });
        }
        let world = MpiCollective::world()
            .context("joining the workers over MPI")?
            .with_timeout(timeout);
        if world.size() != info.world || world.rank() != info.rank {
            bail!(
                "the environment says rank {} of {} but MPI sees rank {} of {}: start the \
                 workers under mpirun (or `upcycle launch --backend mpi`)",
                info.rank,
                info.world,
                world.rank(),
                world.size()
            );
        }
        let world: Box<dyn Collective> = match device {
            Device::Cuda(_) => nccl_world(&world, device, timeout)?,
            _ => Box::new(world),
        };
        let groups = ProcessGroups::new(world, ep)?;
        Ok(Self {
            info,
            device,
            groups: Some(groups),
        })
    }

    /// Whether this worker writes files (rank 0).
    pub fn is_main(&self) -> bool {
        self.info.rank == 0
    }

    /// Workers in the job.
    pub fn world(&self) -> usize {
        self.info.world
    }

    /// Expert-parallel size.
    pub fn ep(&self) -> usize {
        self.groups.as_ref().map_or(1, |g| g.ep_size)
    }

    /// This worker's share of the training list.
    pub fn shard(&self) -> Shard {
        Shard {
            rank: self.info.rank,
            world: self.info.world,
        }
    }

    /// Where the model's experts are (all here, or spread over the expert-parallel group),
    /// and the workers the global load-balance statistics are summed over (all of them).
    pub fn moe_context(&self, conf: MoeConf) -> MoeContext {
        let Some(g) = &self.groups else {
            return MoeContext::local(conf);
        };
        let balance = Arc::new(BalanceStats::new(Some(g.world.clone())));
        match g.ep_size {
            1 => MoeContext {
                balance,
                ..MoeContext::local(conf)
            },
            _ => MoeContext {
                conf,
                dispatch: Arc::new(EpDispatch::new(g.ep.clone())),
                balance,
            },
        }
    }

    /// The rows of a tensor (parameter or optimizer moment, by name, `rows` in its first
    /// dimension) this worker holds: of an expert bank, its local experts (by global
    /// expert id); of the rest, all.
    pub fn local_range(&self, name: &str, rows: i64) -> Result<std::ops::Range<i64>> {
        match &self.groups {
            Some(g) if g.ep_size > 1 && placement(name) == Placement::Expert => {
                if rows % g.ep_size as i64 != 0 {
                    bail!(
                        "tensor {name}: {rows} experts do not split over ep {}",
                        g.ep_size
                    );
                }
                let local = rows / g.ep_size as i64;
                let first = g.ep.rank() as i64 * local;
                Ok(first..first + local)
            }
            _ => Ok(0..rows),
        }
    }

    /// Copies this worker's rows of the model (`local`, as [`Distributed::local_range`]
    /// says, read from a checkpoint) into its variables; a missing tensor or a shape that
    /// differs is named.
    pub fn load_local(&self, local: &BTreeMap<String, Tensor>, vs: &nn::VarStore) -> Result<()> {
        tch::no_grad(|| {
            for (name, mut var) in vs.variables() {
                let Some(t) = local.get(&name) else {
                    // A model that never had expert biases (a parent, an upcycled
                    // checkpoint) starts them at zero.
                    if is_expert_bias(&name) {
                        tracing::info!(
                            name,
                            "no expert bias in the weights loaded; it starts at 0"
                        );
                        continue;
                    }
                    bail!("tensor {name} is missing");
                };
                if t.size() != var.size() {
                    bail!(
                        "tensor {name} has shape {:?}, the model expects {:?}",
                        t.size(),
                        var.size()
                    );
                }
                var.copy_(t);
            }
            Ok(())
        })
    }

    /// Every worker's `text`, in rank order (one in a single process).
    pub fn gather_strings(&self, text: &str) -> Result<Vec<String>> {
        let Some(g) = &self.groups else {
            return Ok(vec![text.to_string()]);
        };
        let bytes: Vec<i32> = text.bytes().map(i32::from).collect();
        let lens = g
            .world
            .all_gather(&Tensor::from_slice(&[bytes.len() as i64]))?;
        let lens = Vec::<i64>::try_from(&lens)?;
        let longest = lens.iter().copied().max().unwrap_or(0) as usize;
        let mut padded = bytes;
        padded.resize(longest, 0);
        let all = g.world.all_gather(&Tensor::from_slice(&padded))?;
        let all = Vec::<i32>::try_from(&all)?;
        lens.iter()
            .enumerate()
            .map(|(r, &n)| {
                let b: Vec<u8> = all[r * longest..r * longest + n as usize]
                    .iter()
                    .map(|&c| c as u8)
                    .collect();
                String::from_utf8(b).context("a worker sent text that is not UTF-8")
            })
            .collect()
    }

    /// This worker's rank.
    pub fn rank(&self) -> usize {
        self.info.rank
    }

    /// Makes every worker's parameters rank 0's: dense ones over the world, expert banks
    /// over their expert-data-parallel group.
    pub fn broadcast_parameters(&self, vs: &nn::VarStore) -> Result<()> {
        let Some(g) = &self.groups else {
            return Ok(());
        };
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        for (name, var) in vars {
            let group = match placement(&name) {
                Placement::Expert => &g.edp,
                Placement::Replicated => &g.world,
            };
            let mut t = var.detach();
            group.broadcast(&mut t, 0)?;
        }
        Ok(())
    }

    /// After `backward`: gradients all-reduced and divided by the data-parallel size.
    pub fn sync_gradients(&self, params: &[(String, Tensor)]) -> Result<()> {
        if let Some(g) = &self.groups {
            GradSync::new(BUCKET_MIB).sync(&placed(params), g)?;
        }
        Ok(())
    }

    /// The gradient norm over the whole model (every expert once; a float64 scalar on the
    /// device), or `None` in a single process (the optimizer computes it).
    pub fn grad_norm(&self, params: &[(String, Tensor)]) -> Result<Option<Tensor>> {
        match &self.groups {
            Some(g) => Ok(Some(global_grad_norm(&placed(params), g)?)),
            None => Ok(None),
        }
    }

    /// True on every worker when `flag` is true on any (so that all skip or stop together).
    pub fn any(&self, flag: bool) -> Result<bool> {
        let Some(g) = &self.groups else {
            return Ok(flag);
        };
        let mut t = Tensor::from_slice(&[i64::from(flag)]);
        g.world.all_reduce(&mut t, ReduceOp::Max)?;
        Ok(t.int64_value(&[0]) > 0)
    }

    /// Elementwise maximum of `t` over the workers, on the device (nothing is read on the
    /// host): a flag raised on any worker is raised on all.
    pub fn max_on_device(&self, t: &Tensor) -> Result<Tensor> {
        let mut t = t.copy();
        if let Some(g) = &self.groups {
            g.world.all_reduce(&mut t, ReduceOp::Max)?;
        }
        Ok(t)
    }

    /// Elementwise sums of `t` over the workers, on the device (nothing is read on the
    /// host).
    pub fn sum_on_device(&self, t: &Tensor) -> Result<Tensor> {
        let mut t = t.copy();
        if let Some(g) = &self.groups {
            g.world.all_reduce(&mut t, ReduceOp::Sum)?;
        }
        Ok(t)
    }

    /// Elementwise sums of `values` over the workers (losses and frames of a log window).
    pub fn sum(&self, values: &[f64]) -> Result<Vec<f64>> {
        let Some(g) = &self.groups else {
            return Ok(values.to_vec());
        };
        let mut t = Tensor::from_slice(values).to_kind(Kind::Double);
        g.world.all_reduce(&mut t, ReduceOp::Sum)?;
        Ok(Vec::<f64>::try_from(&t)?)
    }
}

/// The model's parameters with where each lives (experts or replicated), for the
/// gradient collectives.
fn placed(params: &[(String, Tensor)]) -> Vec<(Tensor, Placement)> {
    params
        .iter()
        .map(|(name, p)| (p.shallow_clone(), placement(name)))
        .collect()
}
