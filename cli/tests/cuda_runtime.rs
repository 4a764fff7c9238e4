//! The `upcycle` binary loads libtorch's CUDA libraries only where an NVIDIA driver is
//! installed (or `UPCYCLE_CUDA=1` asks), so that a CPU process does not carry them
//! (cli/src/cuda.rs). Which libraries a run loaded is read from the dynamic loader's own
//! trace (`LD_DEBUG=files`), and the loaded case must still compute.

use std::process::{Command, Output};

/// Runs the binary with `UPCYCLE_CUDA` set to `cuda` (or unset) and the loader's trace on.
fn run(cuda: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_upcycle"));
    c.args(args).env("LD_DEBUG", "files");
    match cuda {
        Some(v) => c.env("UPCYCLE_CUDA", v),
        None => c.env_remove("UPCYCLE_CUDA"),
    };
    c.output().unwrap()
}

/// Whether the loader trace shows libtorch_cuda.so being initialised.
fn loaded_torch_cuda(o: &Output) -> bool {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .any(|l| l.contains("calling init:") && l.ends_with("/libtorch_cuda.so"))
}

fn driver_installed() -> bool {
    // SAFETY: dlopen of a system library by name, closed again.
    let h = unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_LAZY) };
    if h.is_null() {
        return false;
    }
    // SAFETY: h came from dlopen above.
    unsafe { libc::dlclose(h) };
    true
}

#[test]
fn libtorch_cuda_is_loaded_only_where_a_driver_is() {
    let o = run(None, &["--help"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        loaded_torch_cuda(&o),
        driver_installed(),
        "by default libtorch_cuda is loaded exactly where libcuda.so.1 opens"
    );
    let o = run(Some("0"), &["--help"]);
    assert!(o.status.success());
    assert!(!loaded_torch_cuda(&o), "UPCYCLE_CUDA=0 must not load it");
}

#[test]
fn forced_load_computes_and_a_bad_value_is_refused() {
    // Loaded on purpose (also where there is no GPU): libtorch still computes, on the CPU
    // when no device is seen.
    let args = [
        "bench",
        "moe-layer",
        "--tokens",
        "64",
        "--d",
        "16",
        "--hidden",
        "32",
        "--experts",
        "4",
        "--steps",
        "1",
        "--warmup",
        "0",
    ];
    let o = run(Some("1"), &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(loaded_torch_cuda(&o), "UPCYCLE_CUDA=1 must load it");
    let o = run(Some("yes"), &["--help"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("UPCYCLE_CUDA=\"yes\": expected 1"), "{err}");
}

#[test]
fn device_cuda_without_a_gpu_says_why() {
    let configs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.yaml");
    let tmp = tempfile::tempdir().unwrap();
    let o = run(
        None,
        &[
            "train",
            "--config",
            configs.to_str().unwrap(),
            "--data",
            tmp.path().join("no-data").to_str().unwrap(),
            "--out",
            tmp.path().join("out").to_str().unwrap(),
            "--device",
            "cuda",
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    if driver_installed() {
        // A GPU machine gets past the device check (and fails on the missing data).
        assert!(!err.contains("no CUDA device is visible"), "{err}");
    } else {
        assert!(
            err.contains("no CUDA device is visible")
                && err.contains("no NVIDIA driver here")
                && err.contains("UPCYCLE_CUDA=1 forces them"),
            "{err}"
        );
    }
}
