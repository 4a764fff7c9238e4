//! The rendezvous store: a small TCP key-value store (as torch's `TCPStore`) through
//! which the workers of a job started without MPI find each other, and through which the
//! launchers of several nodes agree on each attempt. Node 0's launcher hosts the
//! [`StoreServer`] at `MASTER_ADDR:MASTER_PORT`; workers and the other launchers are
//! [`Store`] clients.
//!
//! - Operations: [`Store::set`], blocking [`Store::get`] with a deadline,
//!   [`Store::add`] (counters, kept as decimal text), [`Store::compare_set`] (monotonic
//!   keys such as the restart generation) and [`Store::missing`] (which of some keys do
//!   not exist yet: who did not arrive).
//! - Every connection presents the job's token ([`TOKEN_VAR`]) first; a connection with
//!   a wrong or missing token is answered with an error (the client turns it into
//!   [`StoreError::Rejected`]), closed, and reported to the server's `on_reject`.
//! - Keys are plain strings; [`Store::scope`] gives a view with a prefix (workers use
//!   `attempt-N/`, so that a stale worker of an earlier attempt cannot meet a new one).
//!
//! Wire format: a handshake (`UPCYCLE-RDZV/1\n`, the token as a length-prefixed string,
//! then one reply), then requests of one op byte and length-prefixed fields, each
//! answered by a status byte (0 ok + value, 1 absent, 2 error + message). Lengths are
//! little-endian `u32`, numbers little-endian `i64`/`u64`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The environment variable that carries the job's rendezvous token.
pub const TOKEN_VAR: &str = "UPCYCLE_RDZV_TOKEN";

const MAGIC: &[u8; 15] = b"UPCYCLE-RDZV/1\n";
/// Longest token, key or value accepted on the wire (values: NCCL ids, addresses).
const MAX_FIELD: usize = 1 << 20;
/// How long a new connection may take to present its token.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_ADD: u8 = 3;
const OP_CAS: u8 = 4;

const OK: u8 = 0;
const ABSENT: u8 = 1;
const ERROR: u8 = 2;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Nothing answered at the address before the deadline.
    #[error(
        "rendezvous store at {addr}: no connection within {waited:.0} s ({source}); is node \
         0's launcher running, and are MASTER_ADDR and MASTER_PORT (--master-addr, \
         --master-port) the same on every node?"
    )]
    Unreachable {
        /// `host:port`.
        addr: String,
        /// Seconds tried.
        waited: f64,
        /// The last error.
        source: std::io::Error,
    },
    /// The store refused this client (wrong or missing token).
    #[error(
        "rendezvous store at {addr} refused the connection: {message} (every launcher and \
         worker of a job needs the same {TOKEN_VAR})"
    )]
    Rejected {
        /// `host:port`.
        addr: String,
        /// The store's reason.
        message: String,
    },
    /// A blocking `get` reached its deadline.
    #[error("rendezvous: key {key:?} did not appear within {waited:.1} s")]
    Timeout {
        /// The key (with its prefix).
        key: String,
        /// Seconds waited.
        waited: f64,
    },
    /// The connection broke (the store's host ended?).
    #[error("rendezvous store at {addr}: connection lost ({source}); did node 0's launcher end?")]
    Lost {
        /// `host:port`.
        addr: String,
        /// What the socket said.
        source: std::io::Error,
    },
    /// The store refused a request (e.g. `add` on a key that is not a number).
    #[error("rendezvous store: {0}")]
    Invalid(String),
}

/// Whether `a` and `b` are equal, in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn write_field(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_le_bytes());
    out.extend_from_slice(field);
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_field(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let n = read_u32(r)? as usize;
    if n > MAX_FIELD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a field of {n} bytes (at most {MAX_FIELD})"),
        ));
    }
    let mut v = vec![0; n];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// The handshake a client sends: magic and token.
pub(crate) fn hello(token: &str) -> Vec<u8> {
    let mut m = MAGIC.to_vec();
    write_field(&mut m, token.as_bytes());
    m
}

/// Reads a client's handshake and checks its token: `Err(reason)` when it must be
/// rejected (the reason is what the log and the client are told).
pub(crate) fn check_hello(r: &mut impl Read, token: &str) -> Result<(), String> {
    let mut magic = [0; MAGIC.len()];
    r.read_exact(&mut magic)
        .map_err(|e| format!("no handshake ({e})"))?;
    if &magic != MAGIC {
        return Err("not a rendezvous client (unknown protocol)".into());
    }
    let got = read_field(r).map_err(|e| format!("no token ({e})"))?;
    if got.is_empty() {
        return Err("no rendezvous token".into());
    }
    if !same_secret(&got, token.as_bytes()) {
        return Err("wrong rendezvous token".into());
    }
    Ok(())
}

/// Writes the one-byte answer to a handshake (and the reason of a refusal).
pub(crate) fn answer_hello(w: &mut impl Write, refusal: Option<&str>) -> std::io::Result<()> {
    let mut m = Vec::new();
    match refusal {
        None => m.push(OK),
        Some(reason) => {
            m.push(ERROR);
            write_field(&mut m, reason.as_bytes());
        }
    }
    w.write_all(&m)
}

/// Reads the answer to a handshake: `Err(Some(reason))` refused, `Err(None)` closed.
pub(crate) fn read_hello_answer(r: &mut impl Read) -> Result<(), Option<String>> {
    let mut status = [0; 1];
    r.read_exact(&mut status).map_err(|_| None)?;
    match status[0] {
        OK => Ok(()),
        _ => Err(Some(
            read_field(r)
                .map(|m| String::from_utf8_lossy(&m).into_owned())
                .unwrap_or_else(|_| "refused".into()),
        )),
    }
}

/// The store's contents, shared by its connection threads.
#[derive(Default)]
struct State {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

/// Who may be told about a refused connection, and how.
pub type OnReject = Arc<dyn Fn(SocketAddr, &str) + Send + Sync>;

/// The store's server: a thread accepting connections, one thread per connection.
/// Dropping it stops accepting new connections.
pub struct StoreServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for StoreServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreServer({})", self.addr)
    }
}

impl StoreServer {
    /// Listens at `addr` (`host:port`; port 0 picks a free one) for clients presenting
    /// `token`; `on_reject(peer, reason)` is called for every refused connection.
    pub fn bind(addr: &str, token: &str, on_reject: OnReject) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(State::default());
        let token: Arc<str> = token.into();
        let stopping = stop.clone();
        std::thread::Builder::new()
            .name("rdzv-store".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let (state, token, on_reject) =
                        (state.clone(), token.clone(), on_reject.clone());
                    let _ = std::thread::Builder::new()
                        .name("rdzv-conn".into())
                        .spawn(move || serve(conn, &state, &token, &on_reject));
                }
            })?;
        Ok(StoreServer { addr: local, stop })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
    }
}

fn serve(mut conn: TcpStream, state: &State, token: &str, on_reject: &OnReject) {
    let peer = conn
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let _ = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = conn.set_nodelay(true);
    if let Err(reason) = check_hello(&mut conn, token) {
        on_reject(peer, &reason);
        let _ = answer_hello(&mut conn, Some(&reason));
        let _ = conn.shutdown(Shutdown::Both);
        return;
    }
    if answer_hello(&mut conn, None).is_err() || conn.set_read_timeout(None).is_err() {
        return;
    }
    while let Ok(reply) = request(&mut conn, state) {
        if conn.write_all(&reply).is_err() {
            return;
        }
    }
}

/// One request, read whole before the store is locked.
enum Request {
    Set(Vec<u8>),
    Get(Duration),
    Add(i64),
    CompareSet(Option<Vec<u8>>, Vec<u8>),
}

/// Reads and answers one request.
fn request(conn: &mut TcpStream, state: &State) -> std::io::Result<Vec<u8>> {
    let mut op = [0; 1];
    conn.read_exact(&mut op)?;
    let key = String::from_utf8_lossy(&read_field(conn)?).into_owned();
    let req = match op[0] {
        OP_SET => Request::Set(read_field(conn)?),
        OP_GET => Request::Get(Duration::from_millis(read_u64(conn)?)),
        OP_ADD => Request::Add(read_u64(conn)? as i64),
        OP_CAS => {
            let has_expected = read_field(conn)?;
            let expected = read_field(conn)?;
            let desired = read_field(conn)?;
            Request::CompareSet((has_expected == [1]).then_some(expected), desired)
        }
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unknown store op {other}"),
            ))
        }
    };
    let mut reply = Vec::new();
    let mut map = state.map.lock().expect("store");
    match req {
        Request::Set(value) => {
            map.insert(key, value);
            state.changed.notify_all();
            reply.push(OK);
        }
        Request::Get(wait) => {
            let start = Instant::now();
            while !map.contains_key(&key) && start.elapsed() < wait {
                map = state
                    .changed
                    .wait_timeout(map, wait - start.elapsed())
                    .expect("store")
                    .0;
            }
            match map.get(&key) {
                Some(v) => {
                    reply.push(OK);
                    write_field(&mut reply, v);
                }
                None => reply.push(ABSENT),
            }
        }
        Request::Add(n) => {
            let now = match map.get(&key) {
                None => Some(0),
                Some(v) => std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok()),
            };
            match now.and_then(|v| v.checked_add(n)) {
                Some(v) => {
                    map.insert(key, v.to_string().into_bytes());
                    state.changed.notify_all();
                    reply.push(OK);
                    reply.extend_from_slice(&v.to_le_bytes());
                }
                None => {
                    reply.push(ERROR);
                    write_field(
                        &mut reply,
                        format!("add on key {key:?}, which does not hold an integer").as_bytes(),
                    );
                }
            }
        }
        Request::CompareSet(expected, desired) => {
            if map.get(&key).cloned() == expected {
                map.insert(key.clone(), desired);
                state.changed.notify_all();
            }
            reply.push(OK);
            write_field(&mut reply, map.get(&key).map_or(&[][..], |v| v));
        }
    }
    Ok(reply)
}

struct Conn {
    stream: TcpStream,
}

/// A client of the store, with a key prefix. Cheap to clone; clones share one connection
/// and take turns (a blocking `get` holds it until it returns): threads that wait on
/// the store at the same time need their own [`Store::connect`].
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Conn>>,
    addr: Arc<str>,
    token: Arc<str>,
    prefix: String,
    local_ip: std::net::IpAddr,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({} {:?})", self.addr, self.prefix)
    }
}

impl Store {
    /// Connects to the store at `addr` (`host:port`) with `token`, trying again until
    /// `timeout` while nothing listens there yet (the host's launcher may start later).
    pub fn connect(addr: &str, token: &str, timeout: Duration) -> Result<Self, StoreError> {
        let start = Instant::now();
        let mut stream = loop {
            let tried = addr.to_socket_addrs().and_then(|mut a| {
                let a = a.next().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address")
                })?;
                TcpStream::connect_timeout(&a, Duration::from_secs(5))
            });
            match tried {
                Ok(s) => break s,
                Err(e) if start.elapsed() >= timeout => {
                    return Err(StoreError::Unreachable {
                        addr: addr.into(),
                        waited: start.elapsed().as_secs_f64(),
                        source: e,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let lost = |source| StoreError::Lost {
            addr: addr.into(),
            source,
        };
        stream.set_nodelay(true).map_err(lost)?;
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(lost)?;
        stream.write_all(&hello(token)).map_err(lost)?;
        match read_hello_answer(&mut stream) {
            Ok(()) => {}
            Err(reason) => {
                return Err(StoreError::Rejected {
                    addr: addr.into(),
                    message: reason.unwrap_or_else(|| "closed during the handshake".into()),
                })
            }
        }
        stream.set_read_timeout(None).map_err(lost)?;
        let local_ip = stream.local_addr().map_err(lost)?.ip();
        Ok(Store {
            conn: Arc::new(Mutex::new(Conn { stream })),
            addr: addr.into(),
            token: token.into(),
            prefix: String::new(),
            local_ip,
        })
    }

    /// The same store with `prefix` added to every key.
    pub fn scope(&self, prefix: &str) -> Store {
        let mut s = self.clone();
        s.prefix.push_str(prefix);
        s
    }

    /// The prefix of this view's keys.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The store's address (`host:port`).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The job's token (peers of a TCP collective check it too).
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// This machine's address on the way to the store: where peers can reach it.
    pub fn local_ip(&self) -> std::net::IpAddr {
        self.local_ip
    }

    /// The full key of `key` in this view.
    pub fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Sends one request and reads the status byte (and the rest with `rest`).
    fn call<R>(
        &self,
        request: &[u8],
        wait: Duration,
        rest: impl FnOnce(u8, &mut TcpStream) -> std::io::Result<R>,
    ) -> Result<R, StoreError> {
        let mut conn = self.conn.lock().expect("store connection");
        let lost = |source| StoreError::Lost {
            addr: self.addr.to_string(),
            source,
        };
        let s = &mut conn.stream;
        // The server answers a blocking get at its deadline; more than that is a lost
        // server.
        s.set_read_timeout(Some(wait + Duration::from_secs(30)))
            .map_err(lost)?;
        s.write_all(request).map_err(lost)?;
        let mut status = [0; 1];
        s.read_exact(&mut status).map_err(lost)?;
        if status[0] == ERROR {
            let m = read_field(s).map_err(lost)?;
            return Err(StoreError::Invalid(
                String::from_utf8_lossy(&m).into_owned(),
            ));
        }
        rest(status[0], s).map_err(lost)
    }

    fn request(&self, op: u8, key: &str) -> Vec<u8> {
        let mut r = vec![op];
        write_field(&mut r, self.key(key).as_bytes());
        r
    }

    /// Sets `key` to `value` (waking every `get` waiting for it).
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut r = self.request(OP_SET, key);
        write_field(&mut r, value);
        self.call(&r, Duration::ZERO, |_, _| Ok(()))
    }

    /// `key`'s value, waiting until it is set, at most `timeout`.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        let start = Instant::now();
        self.get_within(key, timeout)?
            .ok_or_else(|| StoreError::Timeout {
                key: self.key(key),
                waited: start.elapsed().as_secs_f64(),
            })
    }

    /// `key`'s value now, if it is set.
    pub fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get_within(key, Duration::ZERO)
    }

    fn get_within(&self, key: &str, wait: Duration) -> Result<Option<Vec<u8>>, StoreError> {
        let mut r = self.request(OP_GET, key);
        r.extend_from_slice(&(wait.as_millis().min(u64::MAX as u128) as u64).to_le_bytes());
        self.call(&r, wait, |status, s| match status {
            OK => read_field(s).map(Some),
            _ => Ok(None),
        })
    }

    /// Adds `n` to the counter `key` (0 when absent) and returns its new value.
    pub fn add(&self, key: &str, n: i64) -> Result<i64, StoreError> {
        let mut r = self.request(OP_ADD, key);
        r.extend_from_slice(&n.to_le_bytes());
        self.call(&r, Duration::ZERO, |_, s| read_u64(s).map(|v| v as i64))
    }

    /// Sets `key` to `desired` if its value is `expected` (`None`: the key is absent);
    /// returns the value it has afterwards (absent: empty).
    pub fn compare_set(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        desired: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let mut r = self.request(OP_CAS, key);
        write_field(&mut r, &[u8::from(expected.is_some())]);
        write_field(&mut r, expected.unwrap_or_default());
        write_field(&mut r, desired);
        self.call(&r, Duration::ZERO, |_, s| read_field(s))
    }

    /// Waits (at most `timeout`) until every key of `keys` is set; returns the indices
    /// of those still missing at the deadline (empty: all arrived).
    pub fn missing(&self, keys: &[String], timeout: Duration) -> Result<Vec<usize>, StoreError> {
        let deadline = Instant::now() + timeout;
        for (i, k) in keys.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.get_within(k, left)?.is_none() {
                let mut missing = vec![i];
                for (j, k) in keys.iter().enumerate().skip(i + 1) {
                    if self.try_get(k)?.is_none() {
                        missing.push(j);
                    }
                }
                return Ok(missing);
            }
        }
        Ok(Vec::new())
    }
}

/// Where the rendezvous of a worker started by `upcycle launch` (or another
/// torchrun-style launcher hosting this store) is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousEnv {
    /// `MASTER_ADDR:MASTER_PORT`.
    pub addr: String,
    /// The job's token.
    pub token: String,
    /// The restart count (`UPCYCLE_RESTART_COUNT`, else `TORCHELASTIC_RESTART_COUNT`, else
    /// 0): keys of this attempt live under `attempt-N/`.
    pub attempt: u32,
}

impl RendezvousEnv {
    /// Reads `MASTER_ADDR`, `MASTER_PORT`, [`TOKEN_VAR`] and the restart count from the
    /// variables `get` returns; names what is missing or wrong.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let missing: Vec<&str> = ["MASTER_ADDR", "MASTER_PORT", TOKEN_VAR]
            .into_iter()
            .filter(|k| get(k).is_none_or(|v| v.trim().is_empty()))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "{} not set: a worker started without MPI finds the others through the \
                 launcher's rendezvous store (start it with `upcycle launch --backend tcp` \
                 or `--backend nccl`, or start the workers under mpirun or srun)",
                missing.join(", ")
            ));
        }
        let port = get("MASTER_PORT").unwrap_or_default();
        let port: u16 = port
            .trim()
            .parse()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("MASTER_PORT={port:?} is not a port number (1-65535)"))?;
        let host = get("MASTER_ADDR").unwrap_or_default();
        let host = host.trim();
        // An IPv6 address needs brackets before the port.
        let addr = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let attempt =
            match get("UPCYCLE_RESTART_COUNT").or_else(|| get("TORCHELASTIC_RESTART_COUNT")) {
                None => 0,
                Some(v) => v.trim().parse().map_err(|_| {
                    format!("the restart count {v:?} is not a non-negative integer")
                })?,
            };
        Ok(RendezvousEnv {
            addr,
            token: get(TOKEN_VAR).unwrap_or_default(),
            attempt,
        })
    }

    /// Connects to the store (trying until `timeout`) and returns the view of this
    /// attempt's keys.
    pub fn connect(&self, timeout: Duration) -> Result<Store, StoreError> {
        Ok(Store::connect(&self.addr, &self.token, timeout)?
            .scope(&format!("attempt-{}/", self.attempt)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(token: &str) -> (StoreServer, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let s = StoreServer::bind(
            "127.0.0.1:0",
            token,
            Arc::new(move |peer, why| l.lock().unwrap().push(format!("{peer}: {why}"))),
        )
        .unwrap();
        (s, log)
    }

    #[test]
    fn set_get_add_compare_set_and_scopes() {
        let (s, _) = server("secret-token");
        let addr = s.local_addr().to_string();
        let a = Store::connect(&addr, "secret-token", Duration::from_secs(5)).unwrap();
        let b = Store::connect(&addr, "secret-token", Duration::from_secs(5)).unwrap();
        a.set("k", b"v1").unwrap();
        assert_eq!(b.get("k", Duration::from_secs(1)).unwrap(), b"v1");
        assert_eq!(b.try_get("nothing").unwrap(), None);
        // A blocking get is woken by the set of another client.
        let waiter = std::thread::spawn(move || b.get("late", Duration::from_secs(10)).unwrap());
        std::thread::sleep(Duration::from_millis(200));
        a.set("late", b"here").unwrap();
        assert_eq!(waiter.join().unwrap(), b"here");
        assert_eq!(a.add("n", 2).unwrap(), 2);
        assert_eq!(a.add("n", -5).unwrap(), -3);
        assert_eq!(a.try_get("n").unwrap().unwrap(), b"-3");
        let e = a.add("k", 1).unwrap_err().to_string();
        assert!(e.contains("\"k\"") && e.contains("integer"), "{e}");
        assert_eq!(a.compare_set("g", None, b"1").unwrap(), b"1");
        assert_eq!(a.compare_set("g", None, b"2").unwrap(), b"1");
        assert_eq!(a.compare_set("g", Some(b"1"), b"2").unwrap(), b"2");
        let scoped = a.scope("attempt-1/");
        scoped.set("k", b"v2").unwrap();
        assert_eq!(a.try_get("k").unwrap().unwrap(), b"v1");
        assert_eq!(a.try_get("attempt-1/k").unwrap().unwrap(), b"v2");
        let keys: Vec<String> = ["k", "x", "late", "y"].map(String::from).to_vec();
        assert_eq!(
            a.missing(&keys, Duration::from_millis(300)).unwrap(),
            [1, 3]
        );
    }

    #[test]
    fn a_get_that_times_out_names_its_key() {
        let (s, _) = server("t0ken-t0ken");
        let a = Store::connect(
            &s.local_addr().to_string(),
            "t0ken-t0ken",
            Duration::from_secs(5),
        )
        .unwrap()
        .scope("attempt-0/");
        let t = Instant::now();
        let e = a.get("addr/1", Duration::from_millis(500)).unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(500));
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(
            e.to_string()
                .contains("\"attempt-0/addr/1\" did not appear within 0.5 s"),
            "{e}"
        );
    }

    #[test]
    fn wrong_or_missing_tokens_and_strangers_are_rejected_and_reported() {
        let (s, log) = server("the-right-token");
        let addr = s.local_addr().to_string();
        let e = Store::connect(&addr, "a-wrong-token", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, StoreError::Rejected { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("wrong rendezvous token") && text.contains(TOKEN_VAR),
            "{text}"
        );
        let e = Store::connect(&addr, "", Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("no rendezvous token"), "{e}");
        let mut raw = TcpStream::connect(&addr).unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut answer = Vec::new();
        let _ = raw.read_to_end(&mut answer);
        assert!(String::from_utf8_lossy(&answer).contains("not a rendezvous client"));
        let log = log.lock().unwrap().clone();
        assert_eq!(log.len(), 3, "{log:?}");
        assert!(log[0].starts_with("127.0.0.1:") && log[0].ends_with(": wrong rendezvous token"));
        // The store still serves the right token.
        let ok = Store::connect(&addr, "the-right-token", Duration::from_secs(5)).unwrap();
        ok.set("a", b"b").unwrap();
    }

    #[test]
    fn nothing_listening_is_reported_after_the_timeout() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = Store::connect(
            &format!("127.0.0.1:{port}"),
            "x",
            Duration::from_millis(300),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("no connection within") && e.contains("MASTER_PORT"),
            "{e}"
        );
    }

    #[test]
    fn the_worker_environment_is_read_and_checked() {
        let vars = |v: &[(&str, &str)]| {
            let m: HashMap<String, String> = v
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            RendezvousEnv::from_vars(|k| m.get(k).cloned())
        };
        let r = vars(&[
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            (TOKEN_VAR, "abc"),
            ("UPCYCLE_RESTART_COUNT", "2"),
        ])
        .unwrap();
        assert_eq!((r.addr.as_str(), r.attempt), ("10.0.0.1:29500", 2));
        let e = vars(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(e.contains(TOKEN_VAR) && e.contains("--backend tcp"), "{e}");
        let e = vars(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "x"), (TOKEN_VAR, "t")]).unwrap_err();
        assert!(e.contains("MASTER_PORT=\"x\""), "{e}");
        let r = vars(&[
            ("MASTER_ADDR", "::1"),
            ("MASTER_PORT", "5"),
            (TOKEN_VAR, "t"),
        ])
        .unwrap();
        assert_eq!(r.addr, "[::1]:5");
    }
}
