//! `--device` values.

use anyhow::Result;

/// `cpu`, `cuda` (refused when libtorch sees no GPU) or `auto` (a GPU when there is one).
pub(crate) fn device(name: &str) -> Result<tch::Device> {
    match name {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => {
            anyhow::ensure!(
                tch::Cuda::is_available(),
                "--device cuda: no CUDA device is visible to libtorch"
            );
            Ok(tch::Device::Cuda(0))
        }
        "auto" => Ok(tch::Device::cuda_if_available()),
        other => anyhow::bail!("--device {other:?}: expected cpu, cuda or auto"),
    }
}
