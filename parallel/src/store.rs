//! The rendezvous store's client: a small TCP key-value store (as torch's `TCPStore`)
//! through which the workers of a job started without MPI find each other, and through
//! which the launchers of several nodes agree on each attempt. Node 0's launcher hosts
//! the server (`upcycle_launch::store_server::StoreServer`) at
//! `MASTER_ADDR:MASTER_PORT`; workers and every launcher are [`Store`] clients.
//!
//! - Operations: [`Store::set`], blocking [`Store::get`] with a deadline,
//!   [`Store::add`] (counters, kept as decimal text), [`Store::compare_set`] (monotonic
//!   keys such as the restart generation) and [`Store::missing`] (which of some keys do
//!   not exist yet: who did not arrive).
//! - Every connection presents the job's token ([`TOKEN_VAR`]) first; a connection with
//!   a wrong or missing token is answered with an error (the client turns it into
//!   [`StoreError::Rejected`]), closed, and reported by the server.
//! - Keys are plain strings; [`Store::scope`] gives a view with a prefix (workers use
//!   `attempt-N/`, so that a stale worker of an earlier attempt cannot meet a new one).
//!
//! The wire format (handshake, requests, replies), shared with the server and the TCP
//! collective's peer handshake, is [`wire`].

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod wire;

use wire::{read_field, read_u64, HelloReply, ERROR, HANDSHAKE_TIMEOUT, OK};

/// The environment variable that carries the job's rendezvous token.
pub const TOKEN_VAR: &str = "UPCYCLE_RDZV_TOKEN";

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

struct Conn {
    stream: TcpStream,
}

/// How a handshake ended, when the store did not refuse the client.
enum Handshake {
    /// Accepted.
    Done(Store),
    /// Worth trying again (the server was busy, or closed the connection before an
    /// answer); the error to give when the time is up.
    Again(StoreError),
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
    /// `timeout` while nothing listens there yet (the host's launcher may start later) or
    /// the server is too busy to read the handshake.
    pub fn connect(addr: &str, token: &str, timeout: Duration) -> Result<Self, StoreError> {
        let start = Instant::now();
        loop {
            let tried = addr.to_socket_addrs().and_then(|mut a| {
                let a = a.next().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address")
                })?;
                TcpStream::connect_timeout(&a, Duration::from_secs(5))
            });
            let again = match tried {
                Ok(stream) => match Self::handshake(stream, addr, token)? {
                    Handshake::Done(store) => return Ok(store),
                    Handshake::Again(e) => Some(e),
                },
                Err(e) if start.elapsed() >= timeout => {
                    return Err(StoreError::Unreachable {
                        addr: addr.into(),
                        waited: start.elapsed().as_secs_f64(),
                        source: e,
                    })
                }
                Err(_) => None,
            };
            if let Some(e) = again.filter(|_| start.elapsed() >= timeout) {
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Presents the token on a new connection.
    fn handshake(mut stream: TcpStream, addr: &str, token: &str) -> Result<Handshake, StoreError> {
        let lost = |source| StoreError::Lost {
            addr: addr.into(),
            source,
        };
        let refused = |message: String| StoreError::Rejected {
            addr: addr.into(),
            message,
        };
        stream.set_nodelay(true).map_err(lost)?;
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(lost)?;
        // A busy server answers without reading, and may reset the connection first.
        let _ = stream.write_all(&wire::hello(token));
        match wire::read_hello_reply(&mut stream) {
            HelloReply::Accepted => {}
            HelloReply::Refused(why) => return Err(refused(why)),
            HelloReply::Busy(why) => return Ok(Handshake::Again(refused(why))),
            HelloReply::Closed => {
                return Ok(Handshake::Again(refused(
                    "closed during the handshake".into(),
                )))
            }
        }
        stream.set_read_timeout(None).map_err(lost)?;
        let local_ip = stream.local_addr().map_err(lost)?.ip();
        Ok(Handshake::Done(Store {
            conn: Arc::new(Mutex::new(Conn { stream })),
            addr: addr.into(),
            token: token.into(),
            prefix: String::new(),
            local_ip,
        }))
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

    /// Sets `key` to `value` (waking every `get` waiting for it).
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let r = wire::set_request(&self.key(key), value);
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
        let r = wire::get_request(&self.key(key), wait);
        self.call(&r, wait, |status, s| match status {
            OK => read_field(s).map(Some),
            _ => Ok(None),
        })
    }

    /// Adds `n` to the counter `key` (0 when absent) and returns its new value.
    pub fn add(&self, key: &str, n: i64) -> Result<i64, StoreError> {
        let r = wire::add_request(&self.key(key), n);
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
        let r = wire::compare_set_request(&self.key(key), expected, desired);
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
    use std::collections::HashMap;

    #[test]
    fn nothing_listening_is_reported_after_the_timeout() {
        let port = crate::testing::free_port();
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
