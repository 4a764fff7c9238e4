//! The differentiable all-to-all: [`all_to_all`] exchanges rows like
//! [`Collective::all_to_all`] and records an autograd node (C++, `csrc/all_to_all.cpp`)
//! whose backward runs the exchange with the splits swapped. One `loss.backward()` then
//! carries gradients across ranks; every rank's backward issues the same collectives in
//! the same order because every rank's graph has the same layers.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::collective::Collective;
use crate::failure;

/// What one exchange needs in forward and backward.
struct Exchange {
    group: Arc<dyn Collective>,
    send: Vec<i64>,
    recv: Vec<i64>,
}

extern "C" {
    fn upcycle_all_to_all(
        x: *mut C_tensor,
        handle: *mut c_void,
        exchange: extern "C" fn(*mut c_void, *mut C_tensor, c_int) -> *mut C_tensor,
        drop: extern "C" fn(*mut c_void),
    ) -> *mut C_tensor;
}

extern "C" fn exchange(handle: *mut c_void, t: *mut C_tensor, backward: c_int) -> *mut C_tensor {
    let what = if backward != 0 {
        "all-to-all (backward)"
    } else {
        "all-to-all (forward)"
    };
    // Unwinding into C++ is undefined, and libtorch gives the node no way to fail: a
    // failed (or skipped) exchange is recorded in `failure` and answered with zeros of
    // the shape the peers would have sent, so that forward and backward finish and the
    // caller's `failure::check` returns the error.
    // SAFETY: the handle is the Box<Exchange> `all_to_all` leaked, alive until `drop`;
    // `t` is a new at::Tensor* handed to us.
    let ex = unsafe { &*(handle as *const Exchange) };
    let t = unsafe { Tensor::from_ptr(t) };
    let (send, recv) = if backward != 0 {
        (&ex.recv, &ex.send)
    } else {
        (&ex.send, &ex.recv)
    };
    let exchanged = if failure::failed() {
        None
    } else {
        let call =
            std::panic::AssertUnwindSafe(|| ex.group.all_to_all(&t.contiguous(), send, recv));
        match std::panic::catch_unwind(call) {
            Ok(Ok(out)) => Some(out),
            Ok(Err(e)) => {
                failure::record(what, &e);
                None
            }
            Err(_) => {
                failure::record(what, &"the backend panicked");
                None
            }
        }
    };
    let mut out = exchanged.unwrap_or_else(|| zeros_received(&t, recv));
    let ptr = out.as_mut_ptr();
    std::mem::forget(out); // C++ owns it now
    ptr
}

/// What an exchange that did not happen hands back: zeros, `recv` rows of `t`'s width.
fn zeros_received(t: &Tensor, recv: &[i64]) -> Tensor {
    let mut shape = t.size();
    if let Some(rows) = shape.first_mut() {
        *rows = recv.iter().sum();
    }
    Tensor::zeros(shape, (t.kind(), t.device()))
}

extern "C" fn drop_exchange(handle: *mut c_void) {
    // SAFETY: called once by C++ for the Box leaked in `all_to_all`.
    drop(unsafe { Box::from_raw(handle as *mut Exchange) });
}

/// Sends `send_counts[r]` rows of `x` to rank `r` of `group` and returns the rows
/// received (`recv_counts[r]` from rank `r`), differentiably: the gradient of `x` is the
/// exchange of the output's gradient with the counts swapped.
pub fn all_to_all(
    x: &Tensor,
    group: Arc<dyn Collective>,
    send_counts: &[i64],
    recv_counts: &[i64],
) -> Tensor {
    let handle = Box::into_raw(Box::new(Exchange {
        group,
        send: send_counts.to_vec(),
        recv: recv_counts.to_vec(),
    }));
    let mut x = x.shallow_clone();
    // SAFETY: `x` outlives the call (C++ copies the handle); the returned pointer is a
    // new at::Tensor we own.
    unsafe {
        Tensor::from_ptr(upcycle_all_to_all(
            x.as_mut_ptr(),
            handle as *mut c_void,
            exchange,
            drop_exchange,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Single;
    use tch::Kind;

    /// In a world of one the exchange is the identity, forward and backward.
    #[test]
    fn single_rank_round_trip_keeps_values_and_gradients() {
        let x = Tensor::randn([5, 3], tch::kind::FLOAT_CPU).set_requires_grad(true);
        let y = all_to_all(&x, Arc::new(Single), &[5], &[5]);
        assert!(y.equal(&x.detach()));
        let g = Tensor::randn([5, 3], tch::kind::FLOAT_CPU);
        (&y * &g).sum(Kind::Float).backward();
        assert!(x.grad().equal(&g));
        // Without a gradient no node is recorded (and the exchange is released).
        let z = tch::no_grad(|| all_to_all(&x, Arc::new(Single), &[5], &[5]));
        assert!(!z.requires_grad());
    }
}
