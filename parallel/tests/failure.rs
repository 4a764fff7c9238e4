//! A collective that fails inside the all-to-all's autograd node (forward or backward,
//! called by libtorch) comes back to the caller as an error from `failure::check`; the
//! process goes on (it used to exit with status 3 from inside the library).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tch::{Kind, Tensor};
use upcycle_parallel::alltoall::all_to_all;
use upcycle_parallel::collective::{Collective, CollectiveError, ReduceOp, Single};
use upcycle_parallel::failure::{self, CollectiveFailed};

/// A world of one whose all-to-all works `good` times, then finds its peer gone.
#[derive(Debug)]
struct BreaksAfter {
    good: AtomicUsize,
}

impl BreaksAfter {
    fn new(good: usize) -> Arc<Self> {
        Arc::new(Self {
            good: AtomicUsize::new(good),
        })
    }
}

impl Collective for BreaksAfter {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn name(&self) -> &str {
        "ep"
    }
    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<(), CollectiveError> {
        Single.all_reduce(t, op)
    }
    fn all_to_all(&self, send: &Tensor, s: &[i64], r: &[i64]) -> Result<Tensor, CollectiveError> {
        if self.good.fetch_sub(1, Ordering::SeqCst) == 0 {
            return Err(CollectiveError::Peers {
                op: "all_to_all",
                group: "ep".into(),
                rank: 0,
                size: 1,
                peers: vec![0],
                message: "the connection to rank 0 was reset".into(),
            });
        }
        Single.all_to_all(send, s, r)
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        Single.all_gather(t)
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        Single.broadcast(t, root)
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        Single.barrier()
    }
    fn split(&self, c: usize, k: usize, n: &str) -> Result<Box<dyn Collective>, CollectiveError> {
        Single.split(c, k, n)
    }
}

/// One test: the failure slot is the process's.
#[test]
fn a_failed_exchange_is_an_error_the_caller_gets_not_an_exit() {
    let x = Tensor::randn([6, 4], tch::kind::FLOAT_CPU).set_requires_grad(true);

    // Forward fails: zeros of the shape the peers would have sent, and the error.
    let y = all_to_all(&x, BreaksAfter::new(0), &[6], &[6]);
    assert_eq!(y.size(), [6, 4]);
    assert_eq!(y.abs().sum(Kind::Float).double_value(&[]), 0.0);
    let err = failure::check().unwrap_err();
    assert_eq!(err.what, "all-to-all (forward)");
    assert!(
        err.to_string().contains("connection to rank 0 was reset"),
        "{err}"
    );
    assert_eq!(CollectiveFailed::EXIT_CODE, 3);
    assert_eq!(failure::check(), Ok(()), "checked once");

    // Forward works, backward (run by libtorch's engine) fails: backward returns, the
    // gradient is zeros, and the error waits for the caller.
    let y = all_to_all(&x, BreaksAfter::new(1), &[6], &[6]);
    assert!(y.equal(&x.detach()));
    (&y * 2.0).sum(Kind::Float).backward();
    let err = failure::check().unwrap_err();
    assert_eq!(err.what, "all-to-all (backward)");
    assert_eq!(x.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);

    // While a failure is recorded, later exchanges are skipped (no waiting on peers).
    failure::record("dispatch counts", &"peer gone");
    let calls = BreaksAfter::new(5);
    let z = all_to_all(&x, calls.clone(), &[6], &[6]);
    assert_eq!(
        calls.good.load(Ordering::SeqCst),
        5,
        "the group was not called"
    );
    assert_eq!(z.size(), [6, 4]);
    assert_eq!(failure::check().unwrap_err().what, "dispatch counts");
}
