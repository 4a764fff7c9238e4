//! libtorch's CUDA half, opened at start-up only where it can be used.
//!
//! The `upcycle` binary is linked against libtorch_cpu alone. Linking libtorch_cuda as
//! well (as tch's build does by default) makes every process load it and the CUDA
//! libraries it needs (cuDNN, cuBLAS, NCCL, ...) and run their static initialisers: about
//! 350 MiB of resident memory and a second of start-up per process, on machines without a
//! GPU too, where each MPI worker pays it again. So `main` opens libtorch_cuda itself,
//! from the folder libtorch_cpu was loaded from, before anything asks libtorch about CUDA
//! (libtorch decides once, at its first question, whether CUDA exists), and only where an
//! NVIDIA driver is installed. `UPCYCLE_CUDA` overrides the choice: `1` always loads it
//! (and fails if it cannot), `0` never does (a CPU run on a GPU node, without the memory).

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The variable that overrides the driver check: `1` load, `0` do not.
pub(crate) const CUDA_VAR: &str = "UPCYCLE_CUDA";

/// What start-up did about CUDA, for messages that explain why no GPU is seen.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CudaRuntime {
    /// libtorch_cuda is loaded: libtorch sees the GPUs the driver shows.
    Loaded,
    /// Not loaded, and why.
    Skipped(String),
}

static STATE: OnceLock<CudaRuntime> = OnceLock::new();

/// Loads libtorch_cuda where it can be used; call first thing in `main`. Fails only when
/// `UPCYCLE_CUDA=1` asked for it and it could not be loaded.
pub(crate) fn load() -> Result<(), String> {
    let wanted = std::env::var(CUDA_VAR).ok();
    let state = match wanted.as_deref() {
        Some("0") => CudaRuntime::Skipped(format!("{CUDA_VAR}=0")),
        Some("1") => {
            open_torch_cuda().map_err(|e| format!("{CUDA_VAR}=1 but libtorch_cuda: {e}"))?;
            CudaRuntime::Loaded
        }
        None | Some("") => {
            if !driver_installed() {
                CudaRuntime::Skipped("no NVIDIA driver here (libcuda.so.1 cannot be opened)".into())
            } else {
                match open_torch_cuda() {
                    Ok(()) => CudaRuntime::Loaded,
                    Err(e) => {
                        // Said at once: `--device auto` would quietly train on the CPU.
                        eprintln!(
                            "warning: an NVIDIA driver is installed but libtorch's CUDA \
                             libraries could not be loaded ({e}); no GPU will be used"
                        );
                        CudaRuntime::Skipped(format!("libtorch_cuda: {e}"))
                    }
                }
            }
        }
        Some(other) => {
            return Err(format!(
                "{CUDA_VAR}={other:?}: expected 1 (load libtorch's CUDA libraries) or 0 (CPU only)"
            ))
        }
    };
    let _ = STATE.set(state);
    Ok(())
}

/// What [`load`] did (`Skipped` if it was never called).
pub(crate) fn state() -> CudaRuntime {
    STATE
        .get()
        .cloned()
        .unwrap_or_else(|| CudaRuntime::Skipped("never asked for".into()))
}

/// Whether the NVIDIA driver's user-space library can be opened: without it there is no
/// GPU to use, and no reason to load libtorch's CUDA half.
fn driver_installed() -> bool {
    // SAFETY: dlopen of a system library by name; the handle is kept (never closed).
    !unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) }.is_null()
}

/// Opens libtorch_cuda.so beside the libtorch_cpu.so this process runs with, with its
/// symbols global, as a link-time dependency would be.
fn open_torch_cuda() -> Result<(), String> {
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| format!("cannot read /proc/self/maps: {e}"))?;
    let cpu = torch_cpu_path(&maps).ok_or("libtorch_cpu.so is not loaded in this process")?;
    let cuda = cpu.with_file_name("libtorch_cuda.so");
    if !cuda.exists() {
        return Err(format!(
            "{} does not exist (a CPU-only libtorch)",
            cuda.display()
        ));
    }
    let name = CString::new(cuda.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: a NUL byte in the path", cuda.display()))?;
    // SAFETY: dlopen of libtorch's own library; its static initialisers register CUDA
    // with the libtorch already loaded. The handle is kept for the process's life.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns the thread's last dlopen error or null.
        let why = unsafe { libc::dlerror() };
        let why = if why.is_null() {
            "unknown error".into()
        } else {
            // SAFETY: non-null dlerror strings are NUL-terminated.
            unsafe { CStr::from_ptr(why) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(format!("{}: {why}", cuda.display()));
    }
    Ok(())
}

/// The path of the libtorch_cpu.so mapped in a `/proc/<pid>/maps` text.
fn torch_cpu_path(maps: &str) -> Option<PathBuf> {
    // The path is the rest of the line from its first '/' (the fields before it have
    // none), so a folder with spaces in its name is kept whole.
    maps.lines()
        .filter_map(|l| l.find('/').map(|i| Path::new(&l[i..])))
        .find(|p| p.file_name().is_some_and(|f| f == "libtorch_cpu.so"))
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_libtorch_cpu_in_a_maps_text() {
        let maps = "\
7f40 r--p 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6
7f41 r-xp 00001000 08:01 2 /opt/my torch/lib/libtorch_cpu.so
7f42 rw-p 00000000 00:00 0
7f43 r--p 00000000 08:01 3 /opt/torch/lib/libtorch_cuda_linalg.so
";
        assert_eq!(
            torch_cpu_path(maps),
            Some(PathBuf::from("/opt/my torch/lib/libtorch_cpu.so"))
        );
        assert_eq!(torch_cpu_path("7f42 rw-p 00000000 00:00 0\n"), None);
    }
}
