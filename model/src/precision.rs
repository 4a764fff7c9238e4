//! Mixed precision: the forward pass under bfloat16 autocast with fp32 master weights
//! (libtorch casts each matrix product's and convolution's operands, PyTorch's
//! `torch.autocast`), and the islands that must stay fp32 inside it (the MoE router, the
//! losses). Backward follows the casts autograd recorded; gradients and optimizer state
//! stay fp32.

use serde::{Deserialize, Serialize};
use tch::Device;

/// The arithmetic of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in fp32.
    #[default]
    Fp32,
    /// Matrix products and convolutions in bfloat16 (autocast), the rest as autocast
    /// leaves it; router and losses in fp32.
    Bf16,
}

extern "C" {
    fn upcycle_autocast_enabled(cuda: std::ffi::c_int) -> std::ffi::c_int;
    fn upcycle_autocast_set(cuda: std::ffi::c_int, enabled: std::ffi::c_int) -> std::ffi::c_int;
    fn upcycle_autocast_enter();
    fn upcycle_autocast_exit();
}

/// Restores both device types' autocast switches and leaves the region when dropped
/// (also on a panic).
struct Region {
    was: [bool; 2],
}

impl Region {
    /// Sets autocast on the CPU and CUDA to `on` (`None`: leave as is).
    fn enter(on: [Option<bool>; 2]) -> Self {
        let mut was = [false; 2];
        // SAFETY: the calls only read and write libtorch's thread-local autocast state.
        unsafe {
            upcycle_autocast_enter();
            for (cuda, setting) in on.into_iter().enumerate() {
                was[cuda] = upcycle_autocast_enabled(cuda as _) != 0;
                if let Some(on) = setting {
                    upcycle_autocast_set(cuda as _, on as _);
                }
            }
        }
        Self { was }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: as in `enter`.
        unsafe {
            for (cuda, was) in self.was.into_iter().enumerate() {
                upcycle_autocast_set(cuda as _, was as _);
            }
            upcycle_autocast_exit();
        }
    }
}

/// Runs `f` with `precision` on `device` (fp32: `f` as it is).
pub fn autocast<T>(precision: Precision, device: Device, f: impl FnOnce() -> T) -> T {
    match precision {
        Precision::Fp32 => f(),
        Precision::Bf16 => {
            let on = if device.is_cuda() {
                [None, Some(true)]
            } else {
                [Some(true), None]
            };
            let _region = Region::enter(on);
            f()
        }
    }
}

/// Whether autocast is on for `device` on this thread.
pub fn is_autocast(device: Device) -> bool {
    // SAFETY: reads thread-local state.
    unsafe { upcycle_autocast_enabled(device.is_cuda() as _) != 0 }
}

/// Runs `f` in fp32 arithmetic even inside [`autocast`] (its inputs must be fp32).
pub fn full_precision<T>(f: impl FnOnce() -> T) -> T {
    if !is_autocast(Device::Cpu) && !is_autocast(Device::Cuda(0)) {
        return f();
    }
    let _region = Region::enter([Some(false), Some(false)]);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn products_run_in_bf16_inside_and_fp32_in_the_islands() {
        let _rng = crate::test_rng::lock();
        let a = Tensor::randn([8, 16], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([16, 4], (Kind::Float, Device::Cpu));
        assert_eq!(a.matmul(&b).kind(), Kind::Float);
        let (inside, island) = autocast(Precision::Bf16, Device::Cpu, || {
            assert!(is_autocast(Device::Cpu));
            (a.matmul(&b).kind(), full_precision(|| a.matmul(&b).kind()))
        });
        assert_eq!((inside, island), (Kind::BFloat16, Kind::Float));
        assert!(
            !is_autocast(Device::Cpu),
            "autocast left on after the region"
        );
        let fp32 = autocast(Precision::Fp32, Device::Cpu, || a.matmul(&b).kind());
        assert_eq!(fp32, Kind::Float);
    }

    #[test]
    fn a_panic_inside_restores_the_switch() {
        let _rng = crate::test_rng::lock();
        let r = std::panic::catch_unwind(|| autocast(Precision::Bf16, Device::Cpu, || panic!("x")));
        assert!(r.is_err());
        assert!(!is_autocast(Device::Cpu));
    }

    #[test]
    fn the_config_names_are_lowercase() {
        let _rng = crate::test_rng::lock();
        let p: Precision = serde_yaml::from_str("bf16").unwrap();
        assert_eq!(p, Precision::Bf16);
    }
}
