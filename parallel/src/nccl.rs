//! The NCCL backend: collectives on tch CUDA tensors through `cudarc::nccl`'s raw layer.
//!
//! NCCL and the CUDA driver are loaded at run time (cudarc's `dynamic-loading`), so this
//! compiles and links on machines without CUDA; [`NcclCollective::new`] fails with a
//! message when there is no GPU or no `libnccl`. Tensors are handed to NCCL as device
//! pointers (`data_ptr`) on the legacy default stream, the one libtorch uses unless told
//! otherwise; libtorch keeps owning the memory. CPU tensors (counts, metrics, agreements)
//! are staged through the GPU, so every [`Collective`] call works with either.
//!
//! Calls wait for the GPU before returning (as PyTorch's blocking wait): a rank that
//! never arrives then blocks a host thread inside a watched call, and the
//! [`crate::watchdog`] ends the process with the operation and the group named.
//! Overlapping communication with computation is left to the performance work.
//!
//! The communicator's unique id is made by rank 0 and broadcast over a bootstrap
//! [`Collective`]: MPI under `mpirun`, or the TCP mesh of [`crate::tcp`] (bootstrapped
//! through the launcher's rendezvous store) for workers spawned directly.

use std::ffi::CStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::nccl::sys;
use tch::{Device, Kind, Tensor};

use crate::collective::{check_counts, row_len, Collective, CollectiveError, ReduceOp};
use crate::watchdog::watch;

/// Where the launcher's Python environment keeps NCCL (the PyPI wheel ships it as
/// `libnccl.so.2`; `scripts/setup.sh` links it as `libnccl.so` beside libtorch, where the
/// binaries' run path looks).
const NCCL_HINT: &str = "NCCL comes with the CUDA build of torch from PyPI \
     (nvidia-nccl-cu13); scripts/setup.sh links it as .venv/libtorch/lib/libnccl.so";

fn error(op: &'static str, message: impl Into<String>) -> CollectiveError {
    CollectiveError::Invalid {
        op,
        message: message.into(),
    }
}

/// NCCL's own words for a failed call.
fn nccl_error(op: &'static str, result: sys::ncclResult_t) -> CollectiveError {
    // SAFETY: NCCL returns a static, NUL-terminated string for every result code.
    let text = unsafe { CStr::from_ptr(sys::ncclGetErrorString(result)) };
    error(op, format!("NCCL: {}", text.to_string_lossy()))
}

fn check(op: &'static str, result: sys::ncclResult_t) -> Result<(), CollectiveError> {
    match result {
        sys::ncclResult_t::ncclSuccess => Ok(()),
        other => Err(nccl_error(op, other)),
    }
}

/// Whether NCCL can run here: a CUDA GPU visible to libtorch and `libnccl` loadable. The
/// error says which is missing and what to do.
pub fn nccl_available() -> Result<(), CollectiveError> {
    if !tch::Cuda::is_available() {
        return Err(error(
            "init",
            "NCCL needs a CUDA GPU and libtorch sees none: train on CPUs with the MPI \
             backend (`--device cpu` under mpirun), or check the driver (nvidia-smi)",
        ));
    }
    // SAFETY: only tries to open the library.
    if !unsafe { sys::is_culib_present() } {
        return Err(error(
            "init",
            format!("libnccl.so cannot be loaded: {NCCL_HINT}"),
        ));
    }
    Ok(())
}

struct Comm(sys::ncclComm_t);
// SAFETY: an NCCL communicator may be used from any thread, one call at a time; every
// use goes through the Mutex around it.
unsafe impl Send for Comm {}

impl Drop for Comm {
    fn drop(&mut self) {
        // SAFETY: the communicator was initialised and is not used after this.
        unsafe {
            sys::ncclCommDestroy(self.0);
        }
    }
}

/// A group of ranks exchanging tensors on their GPUs through NCCL.
pub struct NcclCollective {
    comm: Arc<Mutex<Comm>>,
    rank: usize,
    size: usize,
    name: String,
    /// The CUDA device of this rank.
    device: Device,
    timeout: Duration,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclCollective({} rank {}/{} on {:?})",
            self.name, self.rank, self.size, self.device
        )
    }
}

/// NCCL's element type for a tensor kind.
fn data_type(op: &'static str, kind: Kind) -> Result<sys::ncclDataType_t, CollectiveError> {
    use sys::ncclDataType_t::*;
    Ok(match kind {
        Kind::Float => ncclFloat32,
        Kind::Double => ncclFloat64,
        Kind::Half => ncclFloat16,
        Kind::BFloat16 => ncclBfloat16,
        Kind::Int => ncclInt32,
        Kind::Int64 => ncclInt64,
        Kind::Int8 => ncclInt8,
        Kind::Uint8 | Kind::Bool => ncclUint8,
        other => return Err(error(op, format!("{other:?} tensors are not supported"))),
    })
}

impl NcclCollective {
    /// The communicator of every rank of `bootstrap`, each on its CUDA device `device`
    /// (`Device::Cuda(i)`). Collective over `bootstrap`: rank 0 makes the unique id and
    /// sends it to the others.
    pub fn new(
        bootstrap: &dyn Collective,
        device: Device,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        nccl_available()?;
        let Device::Cuda(index) = device else {
            return Err(error(
                "init",
                format!("NCCL runs on a CUDA device, not {device:?}"),
            ));
        };
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        if bootstrap.rank() == 0 {
            // SAFETY: writes the id into `id`.
            check("init", unsafe { sys::ncclGetUniqueId(&mut id) })?;
        }
        let mut bytes = Tensor::from_slice(&id.internal.map(|b| b as i32));
        bootstrap.broadcast(&mut bytes, 0)?;
        let got = Vec::<i32>::try_from(&bytes).expect("int32 id");
        for (dst, src) in id.internal.iter_mut().zip(got) {
            *dst = src as std::ffi::c_char;
        }
        set_device(index)?;
        let mut comm = std::ptr::null_mut();
        let _deadline = watch(
            format!(
                "NCCL init on group world (rank {} of {})",
                bootstrap.rank(),
                bootstrap.size()
            ),
            timeout,
        );
        // SAFETY: `comm` receives the new communicator; id and ranks are agreed.
        check("init", unsafe {
            sys::ncclCommInitRank(
                &mut comm,
                bootstrap.size() as i32,
                id,
                bootstrap.rank() as i32,
            )
        })?;
        Ok(Self {
            comm: Arc::new(Mutex::new(Comm(comm))),
            rank: bootstrap.rank(),
            size: bootstrap.size(),
            name: "world".into(),
            device,
            timeout,
        })
    }

    /// Runs one NCCL call (or group of calls) under the group's deadline and waits for
    /// the GPU to finish it.
    fn run(
        &self,
        op: &'static str,
        f: impl FnOnce(sys::ncclComm_t) -> sys::ncclResult_t,
    ) -> Result<(), CollectiveError> {
        let _deadline = watch(
            format!(
                "{op} on group {} (rank {} of {}, NCCL)",
                self.name, self.rank, self.size
            ),
            self.timeout,
        );
        let comm = self.comm.lock().expect("NCCL communicator");
        check(op, f(comm.0))?;
        let Device::Cuda(index) = self.device else {
            unreachable!("an NCCL group lives on a CUDA device")
        };
        tch::Cuda::synchronize(index as i64);
        let mut async_error = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator; writes one result code.
        check(op, unsafe {
            sys::ncclCommGetAsyncError(comm.0, &mut async_error)
        })?;
        check(op, async_error)
    }

    /// `t` as a contiguous tensor on this rank's GPU (a copy if it was not one).
    fn on_device(&self, t: &Tensor) -> Tensor {
        t.to_device(self.device).contiguous()
    }
}

/// Makes CUDA device `index` current for this thread (NCCL creates its communicator on
/// the current device).
fn set_device(index: usize) -> Result<(), CollectiveError> {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(error(
            "init",
            "the CUDA driver library (libcuda.so) cannot be loaded",
        ));
    }
    let context = cudarc::driver::CudaContext::new(index)
        .map_err(|e| error("init", format!("CUDA device {index}: {e:?}")))?;
    context
        .bind_to_thread()
        .map_err(|e| error("init", format!("CUDA device {index}: {e:?}")))
}

/// The stream libtorch computes on: the legacy default stream.
const STREAM: sys::cudaStream_t = std::ptr::null_mut();

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn name(&self) -> &str {
        &self.name
    }

    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<(), CollectiveError> {
        let dtype = data_type("all_reduce", t.kind())?;
        let buf = self.on_device(t);
        let red = match op {
            ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
            ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
            ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
        };
        let n = buf.numel();
        // SAFETY: `buf` is a contiguous device tensor of `n` elements of `dtype`, owned
        // here for the whole call (which waits for the GPU).
        self.run("all_reduce", |c| unsafe {
            sys::ncclAllReduce(buf.data_ptr(), buf.data_ptr(), n, dtype, red, c, STREAM)
        })?;
        tch::no_grad(|| t.copy_(&buf));
        Ok(())
    }

    fn all_to_all(
        &self,
        send: &Tensor,
        send_counts: &[i64],
        recv_counts: &[i64],
    ) -> Result<Tensor, CollectiveError> {
        let dtype = data_type("all_to_all", send.kind())?;
        let mut shape = send.size();
        let Some(&rows) = shape.first() else {
            return Err(error("all_to_all", "a 0-d tensor has no rows"));
        };
        check_counts("all_to_all", self.size, rows, send_counts, recv_counts)?;
        let width = row_len(send);
        let origin = send.device();
        let send = self.on_device(send);
        shape[0] = recv_counts.iter().sum();
        let out = Tensor::empty(shape.as_slice(), (send.kind(), self.device));
        let elem = send.kind().elt_size_in_bytes() as i64 * width;
        self.run("all_to_all", |c| {
            // SAFETY: offsets stay inside the two contiguous device tensors (the counts
            // were checked against their rows); both live until the GPU is done.
            unsafe {
                let group = sys::ncclGroupStart();
                if group != sys::ncclResult_t::ncclSuccess {
                    return group;
                }
                let (mut so, mut ro) = (0i64, 0i64);
                for peer in 0..self.size {
                    let (s, r) = (send_counts[peer], recv_counts[peer]);
                    let at = |t: &Tensor, rows: i64| {
                        (t.data_ptr() as *mut u8).offset((rows * elem) as isize)
                    };
                    // Zero-row exchanges are skipped (on both sides, as the counts agree).
                    let ok = sys::ncclResult_t::ncclSuccess;
                    let mut res = ok;
                    if s > 0 {
                        let p = at(&send, so) as *const _;
                        res = sys::ncclSend(p, (s * width) as usize, dtype, peer as i32, c, STREAM);
                    }
                    if res == ok && r > 0 {
                        let p = at(&out, ro) as *mut _;
                        res = sys::ncclRecv(p, (r * width) as usize, dtype, peer as i32, c, STREAM);
                    }
                    if res != sys::ncclResult_t::ncclSuccess {
                        sys::ncclGroupEnd();
                        return res;
                    }
                    so += s;
                    ro += r;
                }
                sys::ncclGroupEnd()
            }
        })?;
        Ok(out.to_device(origin))
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        let dtype = data_type("all_gather", t.kind())?;
        let origin = t.device();
        let t = self.on_device(t);
        let mut shape = t.size();
        if shape.is_empty() {
            shape = vec![1];
        }
        shape[0] *= self.size as i64;
        let out = Tensor::empty(shape.as_slice(), (t.kind(), self.device));
        let n = t.numel();
        // SAFETY: `t` holds n elements, `out` size * n, both contiguous on the device.
        self.run("all_gather", |c| unsafe {
            sys::ncclAllGather(t.data_ptr(), out.data_ptr(), n, dtype, c, STREAM)
        })?;
        Ok(out.to_device(origin))
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        let dtype = data_type("broadcast", t.kind())?;
        if root >= self.size {
            return Err(error(
                "broadcast",
                format!("root {root} in a group of {}", self.size),
            ));
        }
        let buf = self.on_device(t).copy();
        let n = buf.numel();
        // SAFETY: a contiguous device tensor of n elements, owned here.
        self.run("broadcast", |c| unsafe {
            sys::ncclBroadcast(
                buf.data_ptr(),
                buf.data_ptr(),
                n,
                dtype,
                root as i32,
                c,
                STREAM,
            )
        })?;
        tch::no_grad(|| t.copy_(&buf));
        Ok(())
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        // NCCL has no barrier: a one-element all-reduce that everyone waits for.
        let mut one = Tensor::ones([1], (Kind::Float, self.device));
        self.all_reduce(&mut one, ReduceOp::Sum)
    }

    fn split(
        &self,
        color: usize,
        key: usize,
        name: &str,
    ) -> Result<Box<dyn Collective>, CollectiveError> {
        let mut sub = std::ptr::null_mut();
        self.run("split", |c| {
            // SAFETY: a live communicator; `sub` receives the new one (default config).
            unsafe {
                sys::ncclCommSplit(c, color as i32, key as i32, &mut sub, std::ptr::null_mut())
            }
        })?;
        if sub.is_null() {
            return Err(error("split", format!("no communicator for color {color}")));
        }
        let (mut rank, mut size) = (0, 0);
        // SAFETY: `sub` is a live communicator.
        unsafe {
            check("split", sys::ncclCommUserRank(sub, &mut rank))?;
            check("split", sys::ncclCommCount(sub, &mut size))?;
        }
        Ok(Box::new(Self {
            comm: Arc::new(Mutex::new(Comm(sub))),
            rank: rank as usize,
            size: size as usize,
            name: name.into(),
            device: self.device,
            timeout: self.timeout,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Single;

    /// Without a GPU (CI), asking for NCCL is refused with the reason, not a panic.
    #[test]
    fn refuses_clearly_without_a_gpu() {
        if tch::Cuda::is_available() {
            return;
        }
        let err = NcclCollective::new(&Single, Device::Cuda(0), Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(err.contains("NCCL needs a CUDA GPU"), "{err}");
        assert!(err.contains("MPI backend"), "{err}");
    }

    /// The NCCL of the torch wheel is found through the binaries' run path (the link
    /// scripts/setup.sh makes), so a GPU machine with this environment needs nothing else.
    #[test]
    fn libnccl_from_the_torch_wheel_loads() {
        // SAFETY: only tries to open the library.
        assert!(unsafe { sys::is_culib_present() }, "{NCCL_HINT}");
    }
}
