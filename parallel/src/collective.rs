//! Collective communication on tch tensors, behind one trait with a backend per
//! transport: [`Single`] (a world of one: every operation is the identity),
//! [`crate::tcp::TcpCollective`] (CPU tensors over TCP sockets, bootstrapped through the
//! launcher's rendezvous [`crate::store`]: no MPI needed) and, with the `mpi` feature,
//! [`MpiCollective`] (CPU tensors through MPI; GPU tensors staged through host memory);
//! with the `nccl` feature, [`crate::nccl::NcclCollective`] (GPU tensors).
//!
//! Every rank of a group must issue the same collectives in the same order (as in MPI and
//! NCCL); tensors are contiguous and on the backend's device. Rows: all-to-all and
//! all-gather work on the first dimension, every row the same size.

use std::fmt::Debug;

use tch::Tensor;

/// How [`Collective::all_reduce`] combines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Elementwise sum.
    Sum,
    /// Elementwise mean over the ranks.
    Avg,
    /// Elementwise maximum.
    Max,
}

/// Deadline of a blocking call unless the backend's `with_timeout` says otherwise (as
/// NCCL's default in PyTorch: a first step or a checkpoint write can be long).
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1800);

/// A collective operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// The call's arguments cannot work (shapes, counts, kinds); names the operation.
    #[error("{op}: {message}")]
    Invalid {
        /// The operation.
        op: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Peers did not deliver (silent past the deadline, gone, or out of step); names
    /// them. The group cannot be used after this.
    #[error("{op} on group {group} (rank {rank} of {size}): {message}")]
    Peers {
        /// The operation.
        op: &'static str,
        /// The group's name.
        group: String,
        /// This rank in the group.
        rank: usize,
        /// Ranks in the group.
        size: usize,
        /// The ranks (in the group) at fault.
        peers: Vec<usize>,
        /// What happened, naming them.
        message: String,
    },
}

pub(crate) fn invalid(op: &'static str, message: impl Into<String>) -> CollectiveError {
    CollectiveError::Invalid {
        op,
        message: message.into(),
    }
}

/// A group of ranks that communicate.
pub trait Collective: Debug + Send + Sync {
    /// This rank in the group.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// A name for messages (`world`, `ep`, ...).
    fn name(&self) -> &str;

    /// Combines `t` over the group, in place.
    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<(), CollectiveError>;

    /// Sends `send_counts[r]` rows of `send` (in rank order) to rank `r` and returns the
    /// rows received, `recv_counts[r]` from rank `r`, in rank order.
    fn all_to_all(
        &self,
        send: &Tensor,
        send_counts: &[i64],
        recv_counts: &[i64],
    ) -> Result<Tensor, CollectiveError>;

    /// Every rank's `t`, concatenated along the first dimension in rank order (shapes
    /// equal on every rank).
    fn all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError>;

    /// Copies `root`'s `t` into every rank's `t`.
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError>;

    /// Waits until every rank of the group is here.
    fn barrier(&self) -> Result<(), CollectiveError>;

    /// The subgroup of the ranks that pass the same `color`, ordered by `key` then rank.
    fn split(
        &self,
        color: usize,
        key: usize,
        name: &str,
    ) -> Result<Box<dyn Collective>, CollectiveError>;

    /// Exchanges per-peer counts (one `i64` to each rank) and returns what each rank sent
    /// here: the split sizes an uneven all-to-all needs.
    fn exchange_counts(&self, counts: &[i64]) -> Result<Vec<i64>, CollectiveError> {
        let ones = vec![1; self.size()];
        let got = self.all_to_all(&Tensor::from_slice(counts), &ones, &ones)?;
        Ok(Vec::<i64>::try_from(&got).expect("int64 counts"))
    }
}

pub(crate) fn check_counts(
    op: &'static str,
    size: usize,
    rows: i64,
    send: &[i64],
    recv: &[i64],
) -> Result<(), CollectiveError> {
    if send.len() != size || recv.len() != size {
        return Err(invalid(
            op,
            format!(
                "{} send and {} receive counts for a group of {size}",
                send.len(),
                recv.len()
            ),
        ));
    }
    if send.iter().chain(recv).any(|&c| c < 0) || send.iter().sum::<i64>() != rows {
        return Err(invalid(
            op,
            format!("send counts {send:?} do not split {rows} rows (or a count is negative)"),
        ));
    }
    Ok(())
}

/// A world of one: every collective is the identity.
#[derive(Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn name(&self) -> &str {
        "single"
    }
    fn all_reduce(&self, _t: &mut Tensor, _op: ReduceOp) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_to_all(
        &self,
        send: &Tensor,
        send_counts: &[i64],
        recv_counts: &[i64],
    ) -> Result<Tensor, CollectiveError> {
        let rows = send.size().first().copied().unwrap_or(0);
        check_counts("all_to_all", 1, rows, send_counts, recv_counts)?;
        if send_counts != recv_counts {
            return Err(invalid(
                "all_to_all",
                "a world of one receives what it sends",
            ));
        }
        Ok(send.shallow_clone())
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        Ok(t.shallow_clone())
    }
    fn broadcast(&self, _t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        if root != 0 {
            return Err(invalid(
                "broadcast",
                format!("root {root} in a world of one"),
            ));
        }
        Ok(())
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn split(
        &self,
        _color: usize,
        _key: usize,
        _name: &str,
    ) -> Result<Box<dyn Collective>, CollectiveError> {
        Ok(Box::new(Single))
    }
}

/// The blocking operations, by the code that messages about them carry (the MPI
/// backend's probes, the TCP backend's headers).
pub(crate) const OPS: [&str; 6] = [
    "all_reduce",
    "all_to_all",
    "all_gather",
    "broadcast",
    "barrier",
    "split",
];

/// Elements per row of a tensor (1 for a vector).
pub(crate) fn row_len(t: &Tensor) -> i64 {
    t.size().iter().skip(1).product()
}

/// Refuses what a host-memory transport cannot carry. Operations that only move data
/// (`reduces` false) also carry 16-bit floats, as raw 16-bit words.
#[cfg(feature = "mpi")]
fn host_kind(op: &'static str, t: &Tensor, reduces: bool) -> Result<(), CollectiveError> {
    use tch::Kind::*;
    let moved_as_bits = !reduces && matches!(t.kind(), BFloat16 | Half);
    if !moved_as_bits && !matches!(t.kind(), Float | Double | Int64 | Int) {
        let carried = if reduces {
            "float, double, int, int64"
        } else {
            "float, double, int, int64, bfloat16, half"
        };
        return Err(invalid(
            op,
            format!("{:?} tensors are not supported ({carried})", t.kind()),
        ));
    }
    Ok(())
}

/// `t`'s elements, contiguous in host memory, for MPI to read: `t` itself when it is a
/// contiguous CPU tensor (no copy), else a copy (GPU tensors are staged through host
/// memory: MPI here is not assumed CUDA-aware).
pub(crate) fn host_view(t: &Tensor) -> Tensor {
    t.to_device(tch::Device::Cpu).contiguous()
}

/// A contiguous host copy of `t` that MPI may write into (the caller's tensor is then
/// updated by `copy_`, which autograd's version counter sees).
pub(crate) fn host_copy(t: &Tensor) -> Tensor {
    if t.device() == tch::Device::Cpu {
        t.contiguous().copy()
    } else {
        t.to_device(tch::Device::Cpu).contiguous()
    }
}

#[cfg(feature = "mpi")]
mod mpi_backend {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use mpi::collective::SystemOperation;
    use mpi::datatype::{Partition, PartitionMut};
    use mpi::topology::{Color, SimpleCommunicator};
    use mpi::traits::*;
    use tch::{Kind, Tensor};

    use std::time::Duration;

    use super::*;
    use crate::watchdog::{set_responder, watch_diagnosed};

    /// The MPI environment: initialised by the first [`MpiCollective::world`], finalised
    /// by [`finalize_mpi`] (MPI cannot start again after that).
    static UNIVERSE: Mutex<Option<mpi::environment::Universe>> = Mutex::new(None);
    static STARTED: AtomicBool = AtomicBool::new(false);

    /// Finalises MPI (every rank must call it before exiting, after its last collective);
    /// nothing when MPI was not started.
    pub fn finalize_mpi() {
        OBSERVERS.lock().expect("observers").clear();
        drop(UNIVERSE.lock().expect("MPI universe").take());
    }

    struct Comm(SimpleCommunicator);
    // SAFETY: MPI is initialised with MPI_THREAD_MULTIPLE (checked in `world`), and every
    // use of the communicator goes through the Mutex around it.
    unsafe impl Send for Comm {}

    /// A group of MPI ranks exchanging CPU tensors.
    pub struct MpiCollective {
        comm: Arc<Mutex<Comm>>,
        rank: usize,
        size: usize,
        name: String,
        timeout: Duration,
        /// World rank of each rank of the group (for messages).
        world_ranks: Arc<Vec<usize>>,
        /// This group's entry in [`OBSERVERS`].
        observer: usize,
        progress: Arc<Mutex<Progress>>,
        /// The receive buffer of all-reduce, kept between calls (fresh large buffers
        /// cost page faults every time).
        scratch: Mutex<Option<Tensor>>,
    }

    impl std::fmt::Debug for MpiCollective {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "MpiCollective({} rank {}/{})",
                self.name, self.rank, self.size
            )
        }
    }

    impl MpiCollective {
        /// `MPI_COMM_WORLD`, initialising MPI on first use. Fails when MPI cannot start or
        /// does not give `MPI_THREAD_MULTIPLE`.
        pub fn world() -> Result<Self, CollectiveError> {
            let mut universe = UNIVERSE.lock().expect("MPI universe");
            if universe.is_none() && !STARTED.swap(true, Ordering::SeqCst) {
                *universe = mpi::initialize_with_threading(mpi::Threading::Multiple)
                    .filter(|(_, t)| *t == mpi::Threading::Multiple)
                    .map(|(u, _)| u);
            }
            let universe = universe.as_ref().ok_or_else(|| {
                invalid(
                    "init",
                    "MPI is finalised, or did not initialise with MPI_THREAD_MULTIPLE",
                )
            })?;
            let world = universe.world();
            let world_ranks = (0..world.size() as usize).collect();
            set_responder(answer_probes);
            Ok(Self::wrap(world, world_ranks, "world", DEFAULT_TIMEOUT))
        }

        /// `world_ranks`: the world rank of each rank of `comm`. Collective over `comm`
        /// (duplicates it for the watchdog's probes).
        fn wrap(
            comm: SimpleCommunicator,
            world_ranks: Vec<usize>,
            name: &str,
            timeout: Duration,
        ) -> Self {
            let progress = Arc::new(Mutex::new(Progress::default()));
            let mut observers = OBSERVERS.lock().expect("observers");
            observers.push(Observer {
                side: Comm(comm.duplicate()),
                progress: progress.clone(),
            });
            Self {
                rank: comm.rank() as usize,
                size: comm.size() as usize,
                comm: Arc::new(Mutex::new(Comm(comm))),
                name: name.to_string(),
                timeout,
                world_ranks: Arc::new(world_ranks),
                observer: observers.len() - 1,
                progress,
                scratch: Mutex::new(None),
            }
        }

        /// Every blocking call of this group (and of groups split from it) must finish
        /// within `timeout`, or the process ends with a message (see [`crate::watchdog`]).
        pub fn with_timeout(mut self, timeout: Duration) -> Self {
            self.timeout = timeout;
            self
        }

        /// Runs one blocking MPI call under the group's deadline; on expiry the other
        /// ranks of the group are asked where they are (see [`diagnose`]).
        fn with<R>(&self, op: &'static str, f: impl FnOnce(&SimpleCommunicator) -> R) -> R {
            let (op_code, seq) = self.progress.lock().expect("progress").enter(op);
            let probe = Probe {
                observer: self.observer,
                rank: self.rank,
                world_ranks: self.world_ranks.clone(),
                op_code,
                seq,
            };
            let _deadline = watch_diagnosed(
                format!(
                    "{op} on group {} (rank {} of {})",
                    self.name, self.rank, self.size
                ),
                self.timeout,
                Some(Box::new(move || diagnose(&probe))),
            );
            let result = f(&self.comm.lock().expect("MPI communicator").0);
            self.progress.lock().expect("progress").in_flight = None;
            result
        }
    }

    use super::OPS;
    const PROBE_TAG: i32 = 0x7570;
    const ANSWER_TAG: i32 = 0x7571;
    /// How long a rank whose call expired collects the others' answers.
    const PROBE_GRACE: Duration = Duration::from_secs(3);

    /// Where a rank is in a group's sequence of collectives.
    #[derive(Debug, Default)]
    struct Progress {
        /// Collectives started on the group.
        started: u64,
        /// The one running now: (index in [`OPS`], its number).
        in_flight: Option<(usize, u64)>,
    }

    impl Progress {
        /// Starts `op`; returns its code and number.
        fn enter(&mut self, op: &str) -> (usize, u64) {
            self.started += 1;
            let code = OPS.iter().position(|o| *o == op).expect("a known op");
            self.in_flight = Some((code, self.started));
            (code, self.started)
        }

        /// The answer to a probe: `[op code or -1, its number or -1, started]`.
        fn answer(&self) -> [i64; 3] {
            let (op, seq) = self
                .in_flight
                .map_or((-1, -1), |(op, seq)| (op as i64, seq as i64));
            [op, seq, self.started as i64]
        }
    }

    /// A group as the watchdog thread sees it: a duplicate communicator for probes (so
    /// they never match the group's own traffic) and the group's progress.
    struct Observer {
        side: Comm,
        progress: Arc<Mutex<Progress>>,
    }

    /// Every group made by this process, until [`finalize_mpi`].
    static OBSERVERS: Mutex<Vec<Observer>> = Mutex::new(Vec::new());

    /// What an expired call needs to ask the others about.
    struct Probe {
        observer: usize,
        rank: usize,
        world_ranks: Arc<Vec<usize>>,
        /// Index in [`OPS`].
        op_code: usize,
        seq: u64,
    }

    /// Answers the probes waiting on one group.
    fn answer_on(observer: &Observer) {
        let side = &observer.side.0;
        while let Some((msg, status)) = side
            .any_process()
            .immediate_matched_probe_with_tag(PROBE_TAG)
        {
            let mut asked = [0i64; 1];
            msg.matched_receive_into(&mut asked[..]);
            let answer = observer.progress.lock().expect("progress").answer();
            side.process_at_rank(status.source_rank())
                .send_with_tag(&answer[..], ANSWER_TAG);
        }
    }

    /// Run by the watchdog thread on every tick: tells the ranks whose calls expired
    /// where this one is.
    fn answer_probes() {
        for observer in OBSERVERS.lock().expect("observers").iter() {
            answer_on(observer);
        }
    }

    /// Asks every other rank of the group where it is and says who did not arrive at
    /// `probe`'s call: ranks busy elsewhere, ranks waiting in another collective of the
    /// group, and ranks that do not answer (dead, or their watchdog cannot run).
    fn diagnose(probe: &Probe) -> String {
        let observers = OBSERVERS.lock().expect("observers");
        let Some(observer) = observers.get(probe.observer) else {
            return String::new();
        };
        let side = &observer.side.0;
        let size = probe.world_ranks.len();
        for r in (0..size).filter(|&r| r != probe.rank) {
            side.process_at_rank(r as i32)
                .send_with_tag(&[probe.seq as i64][..], PROBE_TAG);
        }
        let mut answers: Vec<Option<[i64; 3]>> = vec![None; size];
        let deadline = std::time::Instant::now() + PROBE_GRACE;
        let waiting = |a: &[Option<[i64; 3]>]| (0..size).any(|r| r != probe.rank && a[r].is_none());
        while waiting(&answers) && std::time::Instant::now() < deadline {
            // Ranks whose calls expired at the same time ask us too.
            answer_on(observer);
            match side
                .any_process()
                .immediate_matched_probe_with_tag(ANSWER_TAG)
            {
                Some((msg, status)) => {
                    let mut answer = [0i64; 3];
                    msg.matched_receive_into(&mut answer[..]);
                    answers[status.source_rank() as usize] = Some(answer);
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let op = OPS[probe.op_code];
        let who = |r: usize| format!("rank {r} (world rank {})", probe.world_ranks[r]);
        let mut missing = Vec::new();
        let mut arrived = Vec::new();
        for (r, answer) in answers.iter().enumerate() {
            if r == probe.rank {
                continue;
            }
            match answer {
                None => missing.push(format!(
                    "{} did not answer within {} s (dead, or stuck outside MPI)",
                    who(r),
                    PROBE_GRACE.as_secs()
                )),
                Some([-1, _, started]) => missing.push(format!(
                    "{} is outside this group's collectives (it has entered {started} of \
                     them; this is #{})",
                    who(r),
                    probe.seq
                )),
                Some([op, seq, _]) if (*op as usize, *seq as u64) != (probe.op_code, probe.seq) => {
                    missing.push(format!(
                        "{} waits in {} #{seq} instead",
                        who(r),
                        OPS.get(*op as usize).unwrap_or(&"?")
                    ))
                }
                Some(_) => arrived.push(who(r)),
            }
        }
        if missing.is_empty() {
            return format!("Every rank of the group is in this {op} (#{}).", probe.seq);
        }
        format!(
            "Ranks that did not arrive at this {op} (#{} of the group): {}.{}",
            probe.seq,
            missing.join("; "),
            if arrived.is_empty() {
                String::new()
            } else {
                format!(" Arrived: {}.", arrived.join(", "))
            }
        )
    }

    /// Runs `$body` with `$T` the element type of `$kind`.
    macro_rules! with_kind {
        ($kind:expr, $T:ident, $body:block) => {
            match $kind {
                Kind::Float => {
                    type $T = f32;
                    $body
                }
                Kind::Double => {
                    type $T = f64;
                    $body
                }
                Kind::Int64 => {
                    type $T = i64;
                    $body
                }
                // Moved, never combined (host_kind refuses them for reductions).
                Kind::BFloat16 | Kind::Half => {
                    type $T = u16;
                    $body
                }
                _ => {
                    type $T = i32;
                    $body
                }
            }
        };
    }

    /// The elements of a contiguous CPU tensor.
    ///
    /// # Safety
    /// `t` must be contiguous, on the CPU and of element type `T`.
    unsafe fn slice<T>(t: &Tensor) -> &[T] {
        match t.numel() {
            0 => &[],
            n => unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, n) },
        }
    }

    /// The elements of a contiguous CPU tensor, to write.
    ///
    /// # Safety
    /// As [`slice`]; and no other handle reads the storage while the slice lives.
    unsafe fn slice_mut<T>(t: &mut Tensor) -> &mut [T] {
        match t.numel() {
            0 => &mut [],
            n => unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, n) },
        }
    }

    impl Collective for MpiCollective {
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
            host_kind("all_reduce", t, true)?;
            let input = host_view(t);
            let mut scratch = self.scratch.lock().expect("all_reduce scratch");
            let n = input.numel() as i64;
            let buffer = match scratch.take() {
                Some(b) if b.kind() == input.kind() && b.numel() >= n as usize => b,
                _ => Tensor::empty([n], (input.kind(), tch::Device::Cpu)),
            };
            let mut out = buffer.narrow(0, 0, n);
            *scratch = Some(buffer);
            let mpi_op = match op {
                ReduceOp::Max => SystemOperation::max(),
                _ => SystemOperation::sum(),
            };
            self.with("all_reduce", |c| {
                with_kind!(out.kind(), T, {
                    // SAFETY: both contiguous CPU tensors of kind T; MPI only reads the
                    // first (alive for the call), the second is owned here.
                    let (send, recv) = unsafe { (slice::<T>(&input), slice_mut::<T>(&mut out)) };
                    c.all_reduce_into(send, recv, mpi_op)
                })
            });
            let out = out.view(input.size().as_slice());
            let out = match op {
                ReduceOp::Avg => out / self.size as f64,
                _ => out,
            };
            tch::no_grad(|| t.copy_(&out));
            Ok(())
        }

        fn all_to_all(
            &self,
            send: &Tensor,
            send_counts: &[i64],
            recv_counts: &[i64],
        ) -> Result<Tensor, CollectiveError> {
            host_kind("all_to_all", send, false)?;
            let size = send.size();
            let rows = size.first().copied().unwrap_or(0);
            check_counts("all_to_all", self.size, rows, send_counts, recv_counts)?;
            let width = row_len(send);
            let scale = |c: &[i64]| -> Vec<i32> { c.iter().map(|&r| (r * width) as i32).collect() };
            let displs = |c: &[i32]| -> Vec<i32> {
                c.iter()
                    .scan(0, |s, &n| {
                        let d = *s;
                        *s += n;
                        Some(d)
                    })
                    .collect()
            };
            let (sc, rc) = (scale(send_counts), scale(recv_counts));
            let (sd, rd) = (displs(&sc), displs(&rc));
            let device = send.device();
            let send = host_view(send);
            let mut shape = size.clone();
            if shape.is_empty() {
                return Err(invalid("all_to_all", "a 0-d tensor has no rows"));
            }
            shape[0] = recv_counts.iter().sum();
            let mut out = Tensor::empty(shape.as_slice(), (send.kind(), send.device()));
            self.with("all_to_all", |c| {
                with_kind!(out.kind(), T, {
                    // SAFETY: both contiguous CPU tensors of kind T; MPI only reads the
                    // first (alive for the call), the second is owned here.
                    let (s, recv) = unsafe { (slice::<T>(&send), slice_mut::<T>(&mut out)) };
                    let sp = Partition::new(s, &sc[..], &sd[..]);
                    let mut rp = PartitionMut::new(recv, &rc[..], &rd[..]);
                    c.all_to_all_varcount_into(&sp, &mut rp)
                })
            });
            Ok(out.to_device(device))
        }

        fn all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
            host_kind("all_gather", t, false)?;
            let device = t.device();
            let t = host_view(t);
            let mut shape = t.size();
            if shape.is_empty() {
                shape = vec![1];
            }
            shape[0] *= self.size as i64;
            let mut out = Tensor::empty(shape.as_slice(), (t.kind(), t.device()));
            self.with("all_gather", |c| {
                with_kind!(out.kind(), T, {
                    // SAFETY: both contiguous CPU tensors of kind T; MPI only reads the
                    // first (alive for the call), the second is owned here.
                    let (s, recv) = unsafe { (slice::<T>(&t), slice_mut::<T>(&mut out)) };
                    c.all_gather_into(s, recv)
                })
            });
            Ok(out.to_device(device))
        }

        fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
            host_kind("broadcast", t, false)?;
            if root >= self.size {
                return Err(invalid(
                    "broadcast",
                    format!("root {root} in a group of {}", self.size),
                ));
            }
            let mut buf = host_copy(t);
            self.with("broadcast", |c| {
                with_kind!(buf.kind(), T, {
                    // SAFETY: a contiguous CPU tensor of kind T, owned here.
                    let b = unsafe { slice_mut::<T>(&mut buf) };
                    c.process_at_rank(root as i32).broadcast_into(b)
                })
            });
            tch::no_grad(|| t.copy_(&buf));
            Ok(())
        }

        fn barrier(&self) -> Result<(), CollectiveError> {
            self.with("barrier", |c| c.barrier());
            Ok(())
        }

        fn split(
            &self,
            color: usize,
            key: usize,
            name: &str,
        ) -> Result<Box<dyn Collective>, CollectiveError> {
            let my_world_rank = self.world_ranks[self.rank];
            let (sub, world_ranks) = self
                .with("split", |c| {
                    let sub =
                        c.split_by_color_with_key(Color::with_value(color as i32), key as i32)?;
                    let mut world_ranks = vec![0u64; sub.size() as usize];
                    sub.all_gather_into(&(my_world_rank as u64), &mut world_ranks[..]);
                    Some((sub, world_ranks))
                })
                .ok_or_else(|| invalid("split", format!("no communicator for color {color}")))?;
            let world_ranks = world_ranks.into_iter().map(|r| r as usize).collect();
            Ok(Box::new(Self::wrap(sub, world_ranks, name, self.timeout)))
        }
    }
}

#[cfg(feature = "mpi")]
pub use mpi_backend::{finalize_mpi, MpiCollective};
