//! Data-parallel gradient synchronisation: after `loss.backward()` every rank holds the
//! gradient of its own batch's mean loss. Dense gradients are summed over the world and
//! expert gradients over the expert-data-parallel group, both in flat buckets (one
//! collective per bucket, not per tensor), then divided by the global data-parallel size.
//! Frozen parameters (`requires_grad` off) are skipped; every rank issues the same
//! collectives in the same order, so a parameter that got no gradient here (an expert
//! without tokens) takes part with zeros. Which parameters are experts is the model's
//! to say: each comes with its [`Placement`].

use tch::{Kind, Tensor};

use crate::collective::{CollectiveError, ReduceOp};
use crate::groups::ProcessGroups;

/// Where a parameter's copies live, as the model that owns it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On every rank (summed over the world).
    Replicated,
    /// A slice of an expert bank: on the ranks of one expert-data-parallel group (summed
    /// over `edp`).
    Expert,
}

/// Gradients grouped into buckets of at most `bucket_elements` (a tensor larger than
/// that is a bucket of its own).
#[derive(Debug)]
pub struct GradSync {
    bucket_elements: i64,
}

impl GradSync {
    /// Buckets of up to `bucket_mib` MiB of fp32.
    pub fn new(bucket_mib: f64) -> Self {
        Self {
            bucket_elements: ((bucket_mib * 1024.0 * 1024.0 / 4.0) as i64).max(1),
        }
    }

    /// All-reduces the gradients of `params` (the same list, in the same order, on every
    /// rank) and divides them by the global data-parallel size.
    pub fn sync(
        &self,
        params: &[(Tensor, Placement)],
        groups: &ProcessGroups,
    ) -> Result<(), CollectiveError> {
        let scale = 1.0 / groups.data_parallel_size() as f64;
        for placement in [Placement::Replicated, Placement::Expert] {
            let group = match placement {
                Placement::Replicated => &groups.world,
                Placement::Expert => &groups.edp,
            };
            let chosen: Vec<&Tensor> = params
                .iter()
                .filter(|(p, at)| *at == placement && p.requires_grad())
                .map(|(p, _)| p)
                .collect();
            for bucket in self.buckets(&chosen) {
                let grads: Vec<Tensor> = bucket.iter().map(|p| grad_or_zeros(p)).collect();
                let mut flat = Tensor::cat(
                    &grads.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(),
                    0,
                );
                if group.size() > 1 {
                    group.all_reduce(&mut flat, ReduceOp::Sum)?;
                }
                let _ = flat.g_mul_scalar_(scale);
                let mut offset = 0;
                tch::no_grad(|| {
                    for (p, g) in bucket.iter().zip(&grads) {
                        let n = g.numel() as i64;
                        let mut target = p.grad();
                        if !target.defined() {
                            // No gradient reached this parameter here (tch cannot assign
                            // one): a zero backward defines it, then it takes the sum.
                            tch::with_grad(|| (*p * 0.0).sum(Kind::Float).backward());
                            target = p.grad();
                        }
                        target.copy_(&flat.narrow(0, offset, n).view_as(g));
                        offset += n;
                    }
                });
            }
        }
        Ok(())
    }

    fn buckets<'a>(&self, params: &[&'a Tensor]) -> Vec<Vec<&'a Tensor>> {
        let mut out: Vec<Vec<&Tensor>> = Vec::new();
        let mut filled = 0;
        for &p in params {
            let n = p.numel() as i64;
            if out.is_empty() || filled + n > self.bucket_elements {
                out.push(Vec::new());
                filled = 0;
            }
            out.last_mut().expect("a bucket").push(p);
            filled += n;
        }
        out
    }
}

fn grad_or_zeros(p: &Tensor) -> Tensor {
    let g = p.grad();
    if g.defined() {
        g
    } else {
        Tensor::zeros(p.size().as_slice(), (Kind::Float, p.device())).to_kind(p.kind())
    }
}

/// The global L2 norm of the trainable gradients after [`GradSync::sync`]: dense ones
/// are equal on every rank and counted once; each expert lives on one rank of every
/// expert-parallel group, so their squares are summed over `ep`. A float64 scalar on the
/// gradients' device: nothing is read on the host (the squares are added one by one, in
/// parameter order, as a host sum would).
pub fn global_grad_norm(
    params: &[(Tensor, Placement)],
    groups: &ProcessGroups,
) -> Result<Tensor, CollectiveError> {
    let device = params.first().map_or(tch::Device::Cpu, |(p, _)| p.device());
    let square = |placement: Placement| -> Tensor {
        params
            .iter()
            .filter(|(p, at)| *at == placement && p.requires_grad())
            .map(|(p, _)| p.grad())
            .filter(|g| g.defined())
            .fold(Tensor::zeros([], (Kind::Double, device)), |sum, g| {
                sum + g.to_kind(Kind::Double).square().sum(Kind::Double)
            })
    };
    let mut experts = square(Placement::Expert).view([1]);
    if groups.ep.size() > 1 {
        groups.ep.all_reduce(&mut experts, ReduceOp::Sum)?;
    }
    Ok((square(Placement::Replicated) + experts.squeeze()).sqrt())
}
