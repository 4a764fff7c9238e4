//! The process groups of data + expert parallelism (ARCHITECTURE.md, "Parallelism"):
//!
//! - `world`: all N ranks; dense parameters are replicated and all-reduced here.
//! - `ep` (expert-parallel): blocks of `ep` consecutive ranks; rank r is member
//!   `r % ep` of block `r / ep` and holds experts `[g * E/ep, (g+1) * E/ep)` with
//!   `g = r % ep`. Tokens travel inside this group.
//! - `edp` (expert-data-parallel): the N/ep ranks holding the same experts (same
//!   `r % ep`); expert gradients are all-reduced here, divided by the **global**
//!   data-parallel size N.

use std::sync::Arc;

use crate::collective::{Collective, CollectiveError};

/// A layout that cannot work, named before any work starts.
#[derive(Debug, thiserror::Error)]
#[error("parallel layout: {0}")]
pub struct LayoutError(pub String);

/// Checks that `ep` divides the world and every MoE layer's expert count.
pub fn validate_layout(world: usize, ep: usize, expert_counts: &[i64]) -> Result<(), LayoutError> {
    if ep == 0 || world % ep != 0 {
        return Err(LayoutError(format!(
            "--ep {ep} must divide the number of workers ({world})"
        )));
    }
    if let Some(e) = expert_counts.iter().find(|&&e| e % ep as i64 != 0) {
        return Err(LayoutError(format!(
            "--ep {ep} must divide the expert count of every MoE layer (n_expert: {e})"
        )));
    }
    Ok(())
}

/// The communicators one rank uses.
#[derive(Debug)]
pub struct ProcessGroups {
    /// All ranks.
    pub world: Arc<dyn Collective>,
    /// The ranks exchanging tokens with this one.
    pub ep: Arc<dyn Collective>,
    /// The ranks holding the same experts.
    pub edp: Arc<dyn Collective>,
    /// Expert-parallel size.
    pub ep_size: usize,
}

impl ProcessGroups {
    /// Splits `world` for expert-parallel size `ep` (every rank calls this together).
    pub fn new(world: Box<dyn Collective>, ep: usize) -> Result<Self, GroupsError> {
        let (rank, size) = (world.rank(), world.size());
        validate_layout(size, ep, &[])?;
        let ep_group = world.split(rank / ep, rank, "ep")?;
        let edp_group = world.split(rank % ep, rank, "edp")?;
        Ok(Self {
            world: Arc::from(world),
            ep: Arc::from(ep_group),
            edp: Arc::from(edp_group),
            ep_size: ep,
        })
    }

    /// The global expert ids this rank holds out of `n_expert`.
    pub fn local_experts(&self, n_expert: i64) -> std::ops::Range<i64> {
        let per = n_expert / self.ep_size as i64;
        let g = self.ep.rank() as i64;
        g * per..(g + 1) * per
    }

    /// The global data-parallel size gradients are divided by.
    pub fn data_parallel_size(&self) -> usize {
        self.world.size()
    }
}

/// Building the groups failed.
#[derive(Debug, thiserror::Error)]
pub enum GroupsError {
    /// The layout is invalid.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A communicator split failed.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Single;

    #[test]
    fn layouts_are_checked_by_name() {
        assert!(validate_layout(4, 2, &[8, 8]).is_ok());
        let e = validate_layout(4, 3, &[]).unwrap_err().to_string();
        assert!(e.contains("--ep 3") && e.contains("(4)"), "{e}");
        let e = validate_layout(4, 4, &[8, 6]).unwrap_err().to_string();
        assert!(e.contains("n_expert: 6"), "{e}");
    }

    #[test]
    fn a_single_process_holds_every_expert() {
        let g = ProcessGroups::new(Box::new(Single), 1).unwrap();
        assert_eq!(g.local_experts(8), 0..8);
        assert_eq!(
            (g.ep.size(), g.edp.size(), g.data_parallel_size()),
            (1, 1, 1)
        );
    }
}
