//! `--device` values.

use anyhow::Result;

use crate::cuda::{self, CudaRuntime, CUDA_VAR};

/// `cpu`, `cuda` (refused when libtorch sees no GPU) or `auto` (a GPU when there is one).
pub(crate) fn device(name: &str) -> Result<tch::Device> {
    match name {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => {
            if !tch::Cuda::is_available() {
                let why = match cuda::state() {
                    CudaRuntime::Loaded => "libtorch's CUDA libraries are loaded".into(),
                    CudaRuntime::Skipped(why) => format!(
                        "libtorch's CUDA libraries were not loaded: {why}; {CUDA_VAR}=1 \
                         forces them"
                    ),
                };
                anyhow::bail!("--device cuda: no CUDA device is visible to libtorch ({why})");
            }
            Ok(tch::Device::Cuda(0))
        }
        "auto" => Ok(tch::Device::cuda_if_available()),
        other => anyhow::bail!("--device {other:?}: expected cpu, cuda or auto"),
    }
}
