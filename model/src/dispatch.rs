//! Expert-parallel dispatch (ARCHITECTURE.md, "Dispatch"): token copies sorted by global
//! expert go to the ranks of the expert-parallel group that hold their experts by a
//! differentiable all-to-all, are regrouped by local expert, and come back the same way.
//! Per-expert counts are exchanged first, so every rank knows its receive splits.

use std::sync::Arc;

use tch::Tensor;
use upcycle_parallel::alltoall::all_to_all;
use upcycle_parallel::collective::Collective;
use upcycle_parallel::failure;

use crate::moe::{Dispatched, ExpertDispatch};

/// Dispatch over an expert-parallel group: member `g` of `P` holds experts
/// `[g * E/P, (g+1) * E/P)`.
#[derive(Debug)]
pub struct EpDispatch {
    ep: Arc<dyn Collective>,
}

/// What `combine` needs: the splits of the forward exchange and the permutation that
/// grouped the received rows by local expert.
struct Plan {
    send: Vec<i64>,
    recv: Vec<i64>,
    by_expert: Tensor,
}

impl EpDispatch {
    /// Dispatch over `ep` (the expert-parallel group from `ProcessGroups`).
    pub fn new(ep: Arc<dyn Collective>) -> Self {
        Self { ep }
    }
}

impl ExpertDispatch for EpDispatch {
    fn local_experts(&self, n_expert: i64) -> std::ops::Range<i64> {
        let per = n_expert / self.ep.size() as i64;
        let g = self.ep.rank() as i64;
        g * per..(g + 1) * per
    }

    fn dispatch(&self, x: &Tensor, counts: &Tensor) -> Dispatched {
        // The all-to-all's splits are needed on the host: one read of the counts, one of
        // the peers' counts.
        let counts = &crate::host::to_vec_i64(counts).expect("int64 counts")[..];
        let peers = self.ep.size();
        let per = counts.len() / peers;
        // Row counts per peer, and each peer's per-expert counts for the receiver.
        let send: Vec<i64> = counts.chunks(per).map(|c| c.iter().sum()).collect();
        let ones = vec![per as i64; peers];
        // from[s][e]: rows source s sends to local expert e. When the exchange fails (or
        // an earlier one did: `failure` holds it for the caller), nothing is received.
        let from = if failure::failed() {
            vec![0; counts.len()]
        } else {
            match self
                .ep
                .all_to_all(&Tensor::from_slice(counts), &ones, &ones)
            {
                Ok(got) => crate::host::to_vec_i64(&got).expect("int64 counts"),
                Err(e) => {
                    failure::record("dispatch counts", &e);
                    vec![0; counts.len()]
                }
            }
        };
        let recv: Vec<i64> = from.chunks(per).map(|c| c.iter().sum()).collect();
        let rows = all_to_all(x, self.ep.clone(), &send, &recv);
        // Received rows are grouped by source, then expert; regroup by expert, then source.
        let mut starts = Vec::with_capacity(from.len());
        let mut at = 0;
        for &c in &from {
            starts.push(at);
            at += c;
        }
        let mut order = Vec::with_capacity(at as usize);
        let mut local_counts = vec![0i64; per];
        for (e, count) in local_counts.iter_mut().enumerate() {
            for s in 0..peers {
                let (start, n) = (starts[s * per + e], from[s * per + e]);
                order.extend(start..start + n);
                *count += n;
            }
        }
        let by_expert = Tensor::from_slice(&order).to_device(x.device());
        Dispatched {
            rows: rows.index_select(0, &by_expert),
            counts: Tensor::from_slice(&local_counts).to_device(x.device()),
            state: Some(Box::new(Plan {
                send,
                recv,
                by_expert,
            })),
        }
    }

    fn combine(&self, y: &Tensor, dispatched: &Dispatched) -> Tensor {
        let plan = dispatched
            .state
            .as_ref()
            .and_then(|s| s.downcast_ref::<Plan>())
            .expect("combine gets what dispatch returned");
        let rows = plan.by_expert.size()[0];
        let by_source = Tensor::zeros([rows, y.size()[1]], (y.kind(), y.device())).index_copy(
            0,
            &plan.by_expert,
            y,
        );
        all_to_all(&by_source, self.ep.clone(), &plan.recv, &plan.send)
    }
}
