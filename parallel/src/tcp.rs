//! The TCP backend ("gloo-like"): collectives on CPU tensors over plain TCP sockets, for
//! workers started without MPI (`upcycle launch --backend tcp`, one launcher per node).
//!
//! - **Bootstrap.** Each rank listens on an ephemeral port of the interface that reaches
//!   the rendezvous [`Store`], publishes `host:port` under its group's keys
//!   (`<prefix>addr/<rank>`), connects to every lower rank and accepts every higher one:
//!   a full mesh, one connection per pair. Every connection presents the job's token, the
//!   group's key prefix (which carries the restart attempt, so that a stale worker of an
//!   earlier attempt cannot join) and its rank; a wrong one is refused and logged.
//! - **Operations.** Each exchange sends to every peer and receives from every peer on
//!   their own threads at once, so that large uneven all-to-alls cannot deadlock. A
//!   message carries the group's exchange number, the operation and its length: a peer in
//!   another collective, or with another shape, is named at once. All-reduce is a
//!   reduce-scatter (rank r sums chunk r of every rank's tensor, **in rank order**) then
//!   an all-gather of the reduced chunks: 2 (N-1)/N of the tensor sent per rank, and the
//!   result is bit-identical on every rank (and, for two ranks, to MPI's `a + b`).
//!   `split` builds a new mesh for each subgroup, its keys under `split-<n>-<name>/<color>/`.
//! - **Failures.** Every call finishes within the group's timeout: a peer that delivers
//!   nothing by then is named ([`CollectiveError::Peers`]); a peer whose connection
//!   closes (its process died) is named at once. After a failure the group is unusable
//!   (its connections are shut down) and every later call says why.
//!
//! Tested in `tests/tests/tcp_collective.rs` (ranks as threads, meeting through the
//! launcher's store server, which lives in `upcycle-launch`).

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::collective::{
    check_counts, host_copy, host_view, invalid, row_len, Collective, CollectiveError, ReduceOp,
    OPS,
};
use crate::store::{wire, Store, StoreError};

/// Exchange number (u64), operation code (u32), payload length (u64).
const HEADER: usize = 20;

/// How long an accepted connection may take to say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong with one peer in one exchange.
enum Fault {
    /// The connection ended: the peer's process is gone (or closed the group).
    Closed,
    /// Another socket error.
    Io(std::io::Error),
    /// The peer's message belongs to another exchange or operation.
    OutOfStep { seq: u64, op: u32 },
    /// The peer sent another amount of data.
    Size { sent: u64, expected: usize },
}

impl From<std::io::Error> for Fault {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::NotConnected => Fault::Closed,
            _ => Fault::Io(e),
        }
    }
}

fn send_message(mut s: impl Write, seq: u64, op: u32, data: &[u8]) -> Result<(), Fault> {
    let mut header = [0u8; HEADER];
    header[..8].copy_from_slice(&seq.to_le_bytes());
    header[8..12].copy_from_slice(&op.to_le_bytes());
    header[12..].copy_from_slice(&(data.len() as u64).to_le_bytes());
    s.write_all(&header)?;
    s.write_all(data)?;
    Ok(())
}

fn receive_message(mut s: impl Read, seq: u64, op: u32, buf: &mut [u8]) -> Result<(), Fault> {
    let mut header = [0u8; HEADER];
    s.read_exact(&mut header)?;
    let their_seq = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
    let their_op = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(header[12..].try_into().expect("8 bytes"));
    if (their_seq, their_op) != (seq, op) {
        return Err(Fault::OutOfStep {
            seq: their_seq,
            op: their_op,
        });
    }
    if len != buf.len() as u64 {
        return Err(Fault::Size {
            sent: len,
            expected: buf.len(),
        });
    }
    s.read_exact(buf)?;
    Ok(())
}

/// Kinds whose bytes travel as they are and that all-reduce can add.
fn wire_kind(op: &'static str, t: &Tensor) -> Result<(), CollectiveError> {
    if !matches!(
        t.kind(),
        Kind::Float
            | Kind::Double
            | Kind::Half
            | Kind::BFloat16
            | Kind::Int64
            | Kind::Int
            | Kind::Int16
            | Kind::Int8
            | Kind::Uint8
    ) {
        return Err(invalid(
            op,
            format!(
                "{:?} tensors are not supported (float, double, half, bfloat16, int8/16/32/64, \
                 uint8)",
                t.kind()
            ),
        ));
    }
    Ok(())
}

/// The bytes of a contiguous CPU tensor.
///
/// # Safety
/// `t` must be contiguous and on the CPU; nothing writes it while the slice lives.
unsafe fn bytes(t: &Tensor) -> &[u8] {
    let n = t.numel() * t.kind().elt_size_in_bytes();
    match n {
        0 => &[],
        n => unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) },
    }
}

/// The bytes of a contiguous CPU tensor, to write.
///
/// # Safety
/// As [`bytes`]; and no other handle reads or writes the storage while the slice lives.
#[allow(clippy::mut_from_ref)]
unsafe fn bytes_mut(t: &Tensor) -> &mut [u8] {
    let n = t.numel() * t.kind().elt_size_in_bytes();
    match n {
        0 => &mut [],
        n => unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, n) },
    }
}

/// `buf` cut at `lens` (which sum to its length).
fn cut(mut buf: &mut [u8], lens: impl Iterator<Item = usize>) -> Vec<&mut [u8]> {
    let mut parts = Vec::new();
    for n in lens {
        let (head, rest) = std::mem::take(&mut buf).split_at_mut(n);
        parts.push(head);
        buf = rest;
    }
    parts
}

/// `n` elements split into `size` nearly equal chunks: the first element of chunk `r`.
fn chunk_start(n: usize, size: usize, r: usize) -> usize {
    n * r / size
}

#[derive(Debug, Default)]
struct State {
    /// Exchanges done on the group.
    seq: u64,
    /// Splits made from the group (names their keys).
    splits: u64,
    /// Why the group is unusable.
    broken: Option<String>,
}

/// A group of ranks exchanging CPU tensors over TCP connections (see the module docs).
pub struct TcpCollective {
    rank: usize,
    size: usize,
    name: String,
    timeout: Duration,
    /// This group's view of the store.
    store: Store,
    /// World rank of each rank of the group (for messages).
    world_ranks: Vec<usize>,
    /// The connection to each peer (`None` for this rank).
    peers: Vec<Option<TcpStream>>,
    state: Mutex<State>,
}

impl std::fmt::Debug for TcpCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TcpCollective({} rank {}/{})",
            self.name, self.rank, self.size
        )
    }
}

impl TcpCollective {
    /// The world of `size` ranks, this one `rank`, meeting through `store` (the view of
    /// this attempt's keys); every rank calls it. Waits at most `timeout` for the others
    /// (then names the ranks that did not arrive), which is also the deadline of every
    /// later call.
    pub fn new(
        store: &Store,
        rank: usize,
        size: usize,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        if size == 0 || rank >= size {
            return Err(invalid("init", format!("rank {rank} of a world of {size}")));
        }
        Self::join(
            store.scope("world/"),
            "world",
            rank,
            (0..size).collect(),
            timeout,
        )
    }

    /// Every blocking call of this group (and of groups split from it later) must finish
    /// within `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// `rank` (in the group) and its world rank, for messages.
    fn who(&self, rank: usize) -> String {
        who(&self.world_ranks, rank)
    }

    fn error(&self, op: &'static str, peers: Vec<usize>, message: String) -> CollectiveError {
        CollectiveError::Peers {
            op,
            group: self.name.clone(),
            rank: self.rank,
            size: self.size,
            peers,
            message,
        }
    }

    /// Builds the mesh of a group: `world_ranks` its members' world ranks, this one at
    /// `rank`.
    fn join(
        store: Store,
        name: &str,
        rank: usize,
        world_ranks: Vec<usize>,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let size = world_ranks.len();
        let peers = connect_mesh(&store, name, rank, &world_ranks, timeout)?;
        Ok(Self {
            rank,
            size,
            name: name.into(),
            timeout,
            store,
            world_ranks,
            peers,
            state: Mutex::new(State::default()),
        })
    }

    /// Starts a call: the group's lock, unless an earlier failure broke the group.
    fn begin(&self, op: &'static str) -> Result<MutexGuard<'_, State>, CollectiveError> {
        let st = self.state.lock().expect("TCP group state");
        if let Some(why) = &st.broken {
            return Err(self.error(
                op,
                Vec::new(),
                format!("the group is unusable after an earlier failure: {why}"),
            ));
        }
        Ok(st)
    }

    fn stream(&self, peer: usize) -> &TcpStream {
        self.peers[peer].as_ref().expect("a peer's connection")
    }

    /// Sends each `(peer, bytes)` of `sends` and fills each `(peer, buffer)` of `recvs`
    /// (exactly its length), all at once, by `deadline`.
    fn exchange(
        &self,
        st: &mut State,
        op: &'static str,
        sends: Vec<(usize, &[u8])>,
        recvs: Vec<(usize, &mut [u8])>,
        deadline: Instant,
    ) -> Result<(), CollectiveError> {
        st.seq += 1;
        let seq = st.seq;
        let code = OPS.iter().position(|o| *o == op).expect("a known op") as u32;
        let mut pending_send: BTreeSet<usize> = sends.iter().map(|s| s.0).collect();
        let mut pending_recv: BTreeSet<usize> = recvs.iter().map(|r| r.0).collect();
        let involved: BTreeSet<usize> = pending_send.union(&pending_recv).copied().collect();
        let result = std::thread::scope(|scope| {
            let (tx, rx) = mpsc::channel();
            for (peer, data) in sends {
                let (tx, s) = (tx.clone(), self.stream(peer));
                scope.spawn(move || {
                    let _ = tx.send((peer, true, send_message(s, seq, code, data)));
                });
            }
            for (peer, buf) in recvs {
                let (tx, s) = (tx.clone(), self.stream(peer));
                scope.spawn(move || {
                    let _ = tx.send((peer, false, receive_message(s, seq, code, buf)));
                });
            }
            let mut outcome = Ok(());
            while !pending_send.is_empty() || !pending_recv.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok((peer, sent, Ok(()))) => {
                        if sent {
                            pending_send.remove(&peer);
                        } else {
                            pending_recv.remove(&peer);
                        }
                    }
                    Ok((peer, sent, Err(fault))) => {
                        outcome = Err(self.fault(op, seq, peer, sent, fault));
                        break;
                    }
                    Err(_) => {
                        outcome = Err(self.silent(op, &pending_recv, &pending_send));
                        break;
                    }
                }
            }
            if outcome.is_err() {
                // Ends the threads still blocked on a socket (and the group).
                for &p in &involved {
                    let _ = self.stream(p).shutdown(Shutdown::Both);
                }
            }
            outcome
        });
        if let Err(e) = &result {
            st.broken = Some(e.to_string());
        }
        result
    }

    fn fault(
        &self,
        op: &'static str,
        seq: u64,
        peer: usize,
        sent: bool,
        fault: Fault,
    ) -> CollectiveError {
        let who = self.who(peer);
        let message = match fault {
            Fault::Closed => format!(
                "{who} closed its connection (its process ended or left the group) while this \
                 rank {} it",
                if sent { "was sending to" } else { "waited for" }
            ),
            Fault::Io(e) => format!("the connection to {who} failed: {e}"),
            Fault::OutOfStep { seq: s, op: o } => format!(
                "{who} is in {} (its exchange #{s} of the group) while this rank is in {op} \
                 (#{seq}): the ranks issued different collectives",
                OPS.get(o as usize).unwrap_or(&"an unknown operation")
            ),
            Fault::Size { sent, expected } => format!(
                "{who} sent {sent} bytes where this rank expects {expected}: the ranks disagree \
                 on shapes or counts"
            ),
        };
        self.error(op, vec![peer], message)
    }

    fn silent(
        &self,
        op: &'static str,
        recv: &BTreeSet<usize>,
        send: &BTreeSet<usize>,
    ) -> CollectiveError {
        let list = |s: &BTreeSet<usize>| {
            s.iter()
                .map(|&p| self.who(p))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let secs = self.timeout.as_secs_f64();
        if !recv.is_empty() {
            self.error(
                op,
                recv.iter().copied().collect(),
                format!(
                    "{} delivered nothing within {secs:.1} s: it hangs, is slower than the \
                     timeout (upcycle_conf.collective_timeout_s), or issued a different \
                     collective",
                    list(recv)
                ),
            )
        } else {
            self.error(
                op,
                send.iter().copied().collect(),
                format!(
                    "{} did not take this rank's data within {secs:.1} s: it hangs or issued a \
                     different collective",
                    list(send)
                ),
            )
        }
    }
}

fn who(world_ranks: &[usize], rank: usize) -> String {
    match world_ranks.get(rank) {
        Some(&w) if w != rank => format!("rank {rank} (world rank {w})"),
        _ => format!("rank {rank}"),
    }
}

/// Refuses a peer's connection, telling it and the log why.
fn refuse(mut s: TcpStream, from: SocketAddr, group: &str, rank: usize, why: &str) {
    eprintln!(
        "upcycle-parallel: group {group} rank {rank}: rejected a connection from {from}: {why}"
    );
    let _ = wire::answer_hello(&mut s, Some(why));
}

/// The handshake of a peer: magic and token (checked), group prefix, rank.
fn read_peer_hello(s: &mut impl Read, token: &str, mesh: &str) -> Result<usize, String> {
    wire::check_hello(s, token)?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 4096 {
        return Err("a group name longer than 4096 bytes".into());
    }
    let mut name = vec![0; len];
    s.read_exact(&mut name).map_err(|e| e.to_string())?;
    if name != mesh.as_bytes() {
        return Err(format!(
            "it belongs to group {:?}, this is {mesh:?} (a worker of another attempt or group)",
            String::from_utf8_lossy(&name)
        ));
    }
    let mut rank = [0u8; 4];
    s.read_exact(&mut rank).map_err(|e| e.to_string())?;
    Ok(u32::from_le_bytes(rank) as usize)
}

fn store_error(e: StoreError) -> CollectiveError {
    invalid("init", e.to_string())
}

/// Connects rank `rank` of a group (members' world ranks `world_ranks`) to every other
/// member; see the module docs.
fn connect_mesh(
    store: &Store,
    name: &str,
    rank: usize,
    world_ranks: &[usize],
    timeout: Duration,
) -> Result<Vec<Option<TcpStream>>, CollectiveError> {
    let size = world_ranks.len();
    let mut peers: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
    if size == 1 {
        return Ok(peers);
    }
    let join = MeshJoin {
        store,
        name,
        rank,
        world_ranks,
        timeout,
        deadline: Instant::now() + timeout,
        mesh: store.key(""),
        addr_keys: (0..size).map(|p| format!("addr/{p}")).collect(),
    };
    let listener = TcpListener::bind((store.local_ip(), 0))
        .map_err(|e| invalid("init", format!("listening on {}: {e}", store.local_ip())))?;
    let here = listener
        .local_addr()
        .map_err(|e| invalid("init", e.to_string()))?;
    store
        .set(&format!("addr/{rank}"), here.to_string().as_bytes())
        .map_err(store_error)?;
    // Lower ranks listen for this one; this one listens for the higher ones.
    for (p, peer) in peers.iter_mut().enumerate().take(rank) {
        *peer = Some(join.connect(p)?);
    }
    join.accept_higher(&listener, &mut peers)?;
    for s in peers.iter().flatten() {
        s.set_read_timeout(None)
            .and_then(|()| s.set_nodelay(true))
            .map_err(|e| invalid("init", e.to_string()))?;
    }
    Ok(peers)
}

/// One rank joining the full mesh of its group: who it is, where the addresses are
/// published, and until when it may wait.
struct MeshJoin<'a> {
    store: &'a Store,
    name: &'a str,
    rank: usize,
    world_ranks: &'a [usize],
    timeout: Duration,
    deadline: Instant,
    mesh: String,
    addr_keys: Vec<String>,
}

impl MeshJoin<'_> {
    fn fail(&self, peers: Vec<usize>, message: String) -> CollectiveError {
        CollectiveError::Peers {
            op: "init",
            group: self.name.into(),
            rank: self.rank,
            size: self.world_ranks.len(),
            peers,
            message,
        }
    }

    fn names(&self, ranks: &[usize]) -> String {
        ranks
            .iter()
            .map(|&p| who(self.world_ranks, p))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The error for ranks that never published their address.
    fn absent(&self, missing: &[usize]) -> CollectiveError {
        self.fail(
            missing.to_vec(),
            format!(
                "{} did not join within {:.1} s (no address under {}addr/): did it \
                 start, and does it use the same MASTER_ADDR, MASTER_PORT and attempt?",
                self.names(missing),
                self.timeout.as_secs_f64(),
                self.mesh
            ),
        )
    }

    /// Connects to lower rank `p` at the address it published and presents this rank.
    fn connect(&self, p: usize) -> Result<TcpStream, CollectiveError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let addr = match self.store.get(&self.addr_keys[p], left) {
            Ok(a) => String::from_utf8_lossy(&a).into_owned(),
            Err(StoreError::Timeout { .. }) => {
                let missing = self
                    .store
                    .missing(&self.addr_keys, Duration::ZERO)
                    .map_err(store_error)?;
                return Err(self.absent(&missing));
            }
            Err(e) => return Err(store_error(e)),
        };
        let refused = |m: String| {
            self.fail(
                vec![p],
                format!("connecting to {}: {m}", who(self.world_ranks, p)),
            )
        };
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| refused(format!("it published {addr:?}, not an address")))?;
        let mut s = TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(1)))
            .map_err(|e| refused(format!("{addr}: {e}")))?;
        let mut hello = wire::hello(self.store.token());
        hello.extend_from_slice(&(self.mesh.len() as u32).to_le_bytes());
        hello.extend_from_slice(self.mesh.as_bytes());
        hello.extend_from_slice(&(self.rank as u32).to_le_bytes());
        s.set_read_timeout(Some(
            self.deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .and_then(|()| s.write_all(&hello))
        .map_err(|e| refused(e.to_string()))?;
        match wire::read_hello_answer(&mut s) {
            Ok(()) => Ok(s),
            Err(Some(why)) => Err(refused(format!("it refused this rank: {why}"))),
            Err(None) => Err(refused(
                "it closed the connection without answering (it ended, or timed out)".into(),
            )),
        }
    }

    /// Accepts the higher ranks' connections on `listener` until each has one; strangers
    /// and duplicates are refused and reported.
    fn accept_higher(
        &self,
        listener: &TcpListener,
        peers: &mut [Option<TcpStream>],
    ) -> Result<(), CollectiveError> {
        let (rank, size, name) = (self.rank, self.world_ranks.len(), self.name);
        listener
            .set_nonblocking(true)
            .map_err(|e| invalid("init", e.to_string()))?;
        while peers.iter().skip(rank + 1).any(Option::is_none) {
            match listener.accept() {
                Ok((mut s, from)) => {
                    let hello = s
                        .set_nonblocking(false)
                        .and_then(|()| s.set_read_timeout(Some(HELLO_TIMEOUT)))
                        .map_err(|e| e.to_string())
                        .and_then(|()| read_peer_hello(&mut s, self.store.token(), &self.mesh));
                    match hello {
                        Err(why) => refuse(s, from, name, rank, &why),
                        Ok(p) if p <= rank || p >= size => refuse(
                            s,
                            from,
                            name,
                            rank,
                            &format!("rank {p} does not connect here"),
                        ),
                        Ok(p) if peers[p].is_some() => refuse(
                            s,
                            from,
                            name,
                            rank,
                            &format!("rank {p} is connected already"),
                        ),
                        Ok(p) => {
                            wire::answer_hello(&mut s, None).map_err(|e| {
                                self.fail(vec![p], format!("answering rank {p}: {e}"))
                            })?;
                            peers[p] = Some(s);
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= self.deadline {
                        return Err(self.late(peers)?);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(invalid("init", format!("accepting peers: {e}"))),
            }
        }
        Ok(())
    }

    /// The error once the deadline passed with higher ranks missing: those that never
    /// published an address, else those that did not connect.
    fn late(&self, peers: &[Option<TcpStream>]) -> Result<CollectiveError, CollectiveError> {
        let missing: Vec<usize> = (self.rank + 1..peers.len())
            .filter(|&p| peers[p].is_none())
            .collect();
        let unpublished = self
            .store
            .missing(&self.addr_keys, Duration::ZERO)
            .map_err(store_error)?;
        if !unpublished.is_empty() {
            return Ok(self.absent(&unpublished));
        }
        Ok(self.fail(
            missing.clone(),
            format!(
                "{} did not connect within {:.1} s",
                self.names(&missing),
                self.timeout.as_secs_f64()
            ),
        ))
    }
}

/// Each peer's part with its rank, leaving out this rank's own.
fn peers_of<T>(parts: Vec<T>, rank: usize) -> Vec<(usize, T)> {
    parts
        .into_iter()
        .enumerate()
        .filter(|(p, _)| *p != rank)
        .collect()
}

impl Collective for TcpCollective {
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
        wire_kind("all_reduce", t)?;
        let mut st = self.begin("all_reduce")?;
        let deadline = Instant::now() + self.timeout;
        let (rank, size) = (self.rank, self.size);
        let input = host_copy(t).view([-1]);
        let n = input.numel();
        let esz = input.kind().elt_size_in_bytes();
        let at = |r: usize| chunk_start(n, size, r);
        let own = (at(rank + 1) - at(rank)) as i64;
        // Reduce-scatter: chunk p of this rank's tensor to rank p; chunk `rank` of every
        // rank's here.
        let parts: Vec<Tensor> = (0..size)
            .map(|p| {
                if p == rank {
                    input.narrow(0, at(rank) as i64, own)
                } else {
                    Tensor::empty([own], (input.kind(), Device::Cpu))
                }
            })
            .collect();
        {
            // SAFETY: contiguous CPU tensors; `input` is only read while the slices live,
            // each receive buffer is written by one thread only.
            let whole = unsafe { bytes(&input) };
            let sends = (0..size)
                .filter(|&p| p != rank)
                .map(|p| (p, &whole[at(p) * esz..at(p + 1) * esz]))
                .collect();
            let recvs = (0..size)
                .filter(|&p| p != rank)
                .map(|p| (p, unsafe { bytes_mut(&parts[p]) }))
                .collect();
            self.exchange(&mut st, "all_reduce", sends, recvs, deadline)?;
        }
        // In rank order, on the rank that owns the chunk: the same bits everywhere.
        let mut acc = parts[0].copy();
        for part in &parts[1..] {
            match op {
                ReduceOp::Max => acc = acc.maximum(part),
                ReduceOp::Sum | ReduceOp::Avg => {
                    let _ = acc.g_add_(part);
                }
            }
        }
        drop(parts);
        tch::no_grad(|| input.narrow(0, at(rank) as i64, own).copy_(&acc));
        {
            // SAFETY: `acc` is only read; `input`'s chunks are written by one thread each
            // (this rank's own chunk is not touched).
            let reduced = unsafe { bytes(&acc) };
            let lens = (0..size).map(|p| (at(p + 1) - at(p)) * esz);
            let chunks = cut(unsafe { bytes_mut(&input) }, lens);
            let sends = (0..size)
                .filter(|&p| p != rank)
                .map(|p| (p, reduced))
                .collect();
            let recvs = chunks
                .into_iter()
                .enumerate()
                .filter(|(p, _)| *p != rank)
                .collect();
            self.exchange(&mut st, "all_reduce", sends, recvs, deadline)?;
        }
        let out = input.view(t.size().as_slice());
        let out = match op {
            ReduceOp::Avg => out / size as f64,
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
        wire_kind("all_to_all", send)?;
        let mut shape = send.size();
        let Some(&rows) = shape.first() else {
            return Err(invalid("all_to_all", "a 0-d tensor has no rows"));
        };
        check_counts("all_to_all", self.size, rows, send_counts, recv_counts)?;
        let mut st = self.begin("all_to_all")?;
        let deadline = Instant::now() + self.timeout;
        let row = row_len(send) as usize * send.kind().elt_size_in_bytes();
        let device = send.device();
        let send = host_view(send);
        shape[0] = recv_counts.iter().sum();
        let out = Tensor::empty(shape.as_slice(), (send.kind(), Device::Cpu));
        {
            // SAFETY: contiguous CPU tensors; `send` is only read, each chunk of `out` is
            // written by one thread.
            let whole = unsafe { bytes(&send) };
            let outgoing = cut_ref(whole, send_counts.iter().map(|&c| c as usize * row));
            let mut incoming = cut(
                unsafe { bytes_mut(&out) },
                recv_counts.iter().map(|&c| c as usize * row),
            );
            let mine = outgoing[self.rank];
            if mine.len() != incoming[self.rank].len() {
                return Err(invalid(
                    "all_to_all",
                    format!(
                        "this rank sends itself {} rows but expects {}",
                        send_counts[self.rank], recv_counts[self.rank]
                    ),
                ));
            }
            incoming[self.rank].copy_from_slice(mine);
            let sends = peers_of(outgoing, self.rank);
            let recvs = peers_of(incoming, self.rank);
            self.exchange(&mut st, "all_to_all", sends, recvs, deadline)?;
        }
        Ok(out.to_device(device))
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        wire_kind("all_gather", t)?;
        let mut st = self.begin("all_gather")?;
        let deadline = Instant::now() + self.timeout;
        let device = t.device();
        let t = host_view(t);
        let mut shape = t.size();
        if shape.is_empty() {
            shape = vec![1];
        }
        shape[0] *= self.size as i64;
        let out = Tensor::empty(shape.as_slice(), (t.kind(), Device::Cpu));
        {
            // SAFETY: as in all_to_all.
            let mine = unsafe { bytes(&t) };
            let mut chunks = cut(
                unsafe { bytes_mut(&out) },
                (0..self.size).map(|_| mine.len()),
            );
            chunks[self.rank].copy_from_slice(mine);
            let sends = (0..self.size)
                .filter(|&p| p != self.rank)
                .map(|p| (p, mine))
                .collect();
            let recvs = peers_of(chunks, self.rank);
            self.exchange(&mut st, "all_gather", sends, recvs, deadline)?;
        }
        Ok(out.to_device(device))
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        wire_kind("broadcast", t)?;
        if root >= self.size {
            return Err(invalid(
                "broadcast",
                format!("root {root} in a group of {}", self.size),
            ));
        }
        let mut st = self.begin("broadcast")?;
        let deadline = Instant::now() + self.timeout;
        let buf = host_copy(t);
        if self.rank == root {
            // SAFETY: a contiguous CPU tensor, only read.
            let data = unsafe { bytes(&buf) };
            let sends = (0..self.size)
                .filter(|&p| p != root)
                .map(|p| (p, data))
                .collect();
            self.exchange(&mut st, "broadcast", sends, Vec::new(), deadline)?;
        } else {
            // SAFETY: a contiguous CPU tensor owned here, written by one thread.
            let data = unsafe { bytes_mut(&buf) };
            self.exchange(
                &mut st,
                "broadcast",
                Vec::new(),
                vec![(root, data)],
                deadline,
            )?;
            tch::no_grad(|| t.copy_(&buf));
        }
        Ok(())
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        let mut st = self.begin("barrier")?;
        let deadline = Instant::now() + self.timeout;
        let others: Vec<usize> = (0..self.size).filter(|&p| p != self.rank).collect();
        let sends = others.iter().map(|&p| (p, &[][..])).collect();
        let recvs = others.iter().map(|&p| (p, &mut [][..])).collect();
        self.exchange(&mut st, "barrier", sends, recvs, deadline)
    }

    fn split(
        &self,
        color: usize,
        key: usize,
        name: &str,
    ) -> Result<Box<dyn Collective>, CollectiveError> {
        let mine = Tensor::from_slice(&[color as i64, key as i64]);
        let all = Vec::<i64>::try_from(&self.all_gather(&mine)?).expect("int64 colors");
        let mut members: Vec<(i64, usize)> = (0..self.size)
            .filter(|&p| all[2 * p] == color as i64)
            .map(|p| (all[2 * p + 1], p))
            .collect();
        members.sort();
        let rank = members
            .iter()
            .position(|&(_, p)| p == self.rank)
            .expect("this rank is in its own color");
        let world_ranks = members.iter().map(|&(_, p)| self.world_ranks[p]).collect();
        let n = {
            let mut st = self.begin("split")?;
            st.splits += 1;
            st.splits
        };
        let store = self.store.scope(&format!("split-{n}-{name}/{color}/"));
        Ok(Box::new(Self::join(
            store,
            name,
            rank,
            world_ranks,
            self.timeout,
        )?))
    }
}

/// `buf` cut at `lens` (which sum to its length), to read.
fn cut_ref(mut buf: &[u8], lens: impl Iterator<Item = usize>) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    for n in lens {
        let (head, rest) = buf.split_at(n);
        parts.push(head);
        buf = rest;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzzing, seeded, a fixed number of inputs: a peer's handshake (magic, token, group,
    /// rank) and the frames of a collective (sequence, op, length, data), as this module
    /// writes them, mutated and read back. No input may panic, hang (2 s each) or allocate
    /// above the test binary's bound; a frame is read only into the buffer the receiver
    /// sized, whatever length it claims.
    #[test]
    fn fuzz_peer_handshake_and_frames() {
        let limit = Duration::from_secs(2);
        let hello = |mesh: &str, rank: u32| {
            let mut m = wire::hello("token");
            m.extend_from_slice(&(mesh.len() as u32).to_le_bytes());
            m.extend_from_slice(mesh.as_bytes());
            m.extend_from_slice(&rank.to_le_bytes());
            m
        };
        let hellos = [hello("world", 1), hello("world/ep0", 3)];
        assert_eq!(
            read_peer_hello(&mut &hellos[0][..], "token", "world"),
            Ok(1)
        );
        upcycle_files::fuzz::run("tcp handshake", &hellos, 19_010, 5000, limit, |bytes| {
            let _ = read_peer_hello(&mut &bytes[..], "token", "world");
        });
        let frame = |seq: u64, op: u32, data: &[u8]| {
            let mut m = Vec::new();
            assert!(send_message(&mut m, seq, op, data).is_ok());
            m
        };
        let frames = [frame(7, 1, &[1, 2, 3, 4, 5, 6, 7, 8]), frame(8, 2, &[])];
        let mut buf = [0u8; 8];
        assert!(receive_message(&frames[0][..], 7, 1, &mut buf).is_ok());
        assert_eq!(buf, [1, 2, 3, 4, 5, 6, 7, 8]);
        upcycle_files::fuzz::run("tcp frames", &frames, 19_011, 5000, limit, |bytes| {
            let mut r = bytes;
            let _ = receive_message(&mut r, 7, 1, &mut [0u8; 8]);
            let _ = receive_message(&mut r, 8, 2, &mut []);
        });
    }
}
