//! The rendezvous store's server, which node 0's launcher hosts at
//! `MASTER_ADDR:MASTER_PORT` ([`crate::rendezvous`]): a small TCP key-value store (as
//! torch's `TCPStore`) for the job's workers and launchers, which are
//! [`upcycle_parallel::store::Store`] clients. The wire protocol is
//! [`upcycle_parallel::store::wire`], shared with the client.
//!
//! One thread accepts connections, one thread serves each connection. A connection first
//! presents the job's token, whole within [`Limits::handshake_timeout`]; a wrong or
//! missing one, a stranger speaking another protocol, or one too slow is answered with
//! the reason, closed, and reported to `on_reject`. At most [`Limits::handshakes`]
//! connections present their token at once (a flood cannot take threads without bound);
//! more are refused at once, answered busy (a client tries again) and reported at most
//! once a second. (Connections that have presented the token are the job's own: not
//! limited.) Each request is read whole before the store's map is locked, so a
//! connection that stalls mid-request holds only its own thread; a malformed request
//! (unknown op, field over [`wire::MAX_FIELD`]) is answered with an error, dropped and
//! reported.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use upcycle_parallel::store::wire::{
    self, answer_hello, check_hello, write_field, Request, ABSENT, ERROR, HANDSHAKE_TIMEOUT, OK,
};

/// The store's contents, shared by its connection threads.
#[derive(Default)]
struct State {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

/// Who may be told about a refused connection, and how.
pub type OnReject = Arc<dyn Fn(SocketAddr, &str) + Send + Sync>;

/// What connections that have not presented the token yet may take of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections presenting their token at once (each holds a thread until it has, or
    /// its time is up); more are refused at once, answered [`wire::BUSY`] (clients try
    /// again), and reported (at most once a second, with a count).
    pub handshakes: usize,
    /// How long a connection may take to present its token: the whole handshake, not
    /// each read.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshakes: 128,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

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
    /// `token`; `on_reject(peer, reason)` is called for every refused connection (and
    /// every connection dropped for a malformed request). The default [`Limits`].
    pub fn bind(addr: &str, token: &str, on_reject: OnReject) -> std::io::Result<Self> {
        Self::bind_with(addr, token, on_reject, Limits::default())
    }

    /// As [`StoreServer::bind`], with `limits`.
    pub fn bind_with(
        addr: &str,
        token: &str,
        on_reject: OnReject,
        limits: Limits,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(State::default());
        let token: Arc<str> = token.into();
        let stopping = stop.clone();
        let pending = Arc::new(AtomicUsize::new(0));
        let mut busy = Busy::default();
        std::thread::Builder::new()
            .name("rdzv-store".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else {
                        // Out of descriptors, say: not a busy loop.
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let peer = peer_of(&conn);
                    if pending.load(Ordering::SeqCst) >= limits.handshakes {
                        busy.refuse(conn, peer, limits.handshakes, &on_reject);
                        continue;
                    }
                    let slot = Slot::take(&pending);
                    let (state, token, reject) = (state.clone(), token.clone(), on_reject.clone());
                    let spawned = std::thread::Builder::new()
                        .name("rdzv-conn".into())
                        .spawn(move || serve(conn, slot, &state, &token, &reject, limits));
                    if let Err(e) = spawned {
                        on_reject(peer, &format!("no thread to serve it ({e})"));
                    }
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

fn peer_of(conn: &TcpStream) -> SocketAddr {
    conn.peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// One connection presenting its token: counted while it lives.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(pending: &Arc<AtomicUsize>) -> Self {
        pending.fetch_add(1, Ordering::SeqCst);
        Slot(pending.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Connections refused for want of a slot, reported at most once a second.
#[derive(Default)]
struct Busy {
    /// Refused since the last report.
    unreported: u64,
    last_report: Option<Instant>,
}

impl Busy {
    fn refuse(
        &mut self,
        mut conn: TcpStream,
        peer: SocketAddr,
        limit: usize,
        on_reject: &OnReject,
    ) {
        let why = format!(
            "{limit} connections are presenting their token already (the limit); try again"
        );
        // Never blocks the accept loop. What the client sent is read first when it is
        // there already, so that closing does not reset the connection before the answer.
        let _ = conn.set_nonblocking(true);
        let _ = conn.read(&mut [0; 4096]);
        let _ = conn.write_all(&wire::busy_answer(&why));
        let _ = conn.shutdown(Shutdown::Both);
        self.unreported += 1;
        if self
            .last_report
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            let others = match self.unreported - 1 {
                0 => String::new(),
                n => format!(" ({n} more refused since the last report)"),
            };
            on_reject(peer, &format!("refused: {why}{others}"));
            self.unreported = 0;
            self.last_report = Some(Instant::now());
        }
    }
}

/// Reads from a connection until a deadline: a whole message, not each read.
struct Until<'a> {
    conn: &'a TcpStream,
    until: Instant,
    limit: Duration,
}

impl Read for Until<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let timed_out = || {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("timed out after {:.1} s", self.limit.as_secs_f64()),
            )
        };
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        self.conn.set_read_timeout(Some(left))?;
        match (&mut &*self.conn).read(buf) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(timed_out())
            }
            r => r,
        }
    }
}

fn serve(
    mut conn: TcpStream,
    slot: Slot,
    state: &State,
    token: &str,
    on_reject: &OnReject,
    limits: Limits,
) {
    let peer = peer_of(&conn);
    let _ = conn.set_nodelay(true);
    let mut within = Until {
        conn: &conn,
        until: Instant::now() + limits.handshake_timeout,
        limit: limits.handshake_timeout,
    };
    if let Err(reason) = check_hello(&mut within, token) {
        drop(slot);
        on_reject(peer, &reason);
        let _ = answer_hello(&mut conn, Some(&reason));
        let _ = conn.shutdown(Shutdown::Both);
        return;
    }
    drop(slot);
    if answer_hello(&mut conn, None).is_err() || conn.set_read_timeout(None).is_err() {
        return;
    }
    // Each request is read whole before the store is locked: a connection that stalls
    // mid-request holds only this thread.
    loop {
        match Request::read(&mut conn) {
            Ok(req) => {
                if conn.write_all(&answer(req, state)).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::InvalidData => {
                // Where the next request would start is lost: answered, dropped, reported.
                let why = format!("a malformed request ({e}); connection dropped");
                on_reject(peer, &why);
                let mut reply = vec![ERROR];
                write_field(&mut reply, why.as_bytes());
                let _ = conn.write_all(&reply);
                let _ = conn.shutdown(Shutdown::Both);
                return;
            }
            // Closed (or broken) by the client.
            Err(_) => return,
        }
    }
}

/// Answers one request (read whole before the store is locked).
fn answer(req: Request, state: &State) -> Vec<u8> {
    let mut reply = Vec::new();
    let mut map = state.map.lock().expect("store");
    match req {
        Request::Set { key, value } => {
            map.insert(key, value);
            state.changed.notify_all();
            reply.push(OK);
        }
        Request::Get { key, wait } => {
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
        Request::Add { key, n } => {
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
        Request::CompareSet {
            key,
            expected,
            desired,
        } => {
            if map.get(&key).cloned() == expected {
                map.insert(key.clone(), desired);
                state.changed.notify_all();
            }
            reply.push(OK);
            write_field(&mut reply, map.get(&key).map_or(&[][..], |v| v));
        }
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use upcycle_parallel::store::{Store, StoreError, TOKEN_VAR};

    fn server(token: &str) -> (StoreServer, Arc<Mutex<Vec<String>>>) {
        server_with(token, Limits::default())
    }

    fn server_with(token: &str, limits: Limits) -> (StoreServer, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let s = StoreServer::bind_with(
            "127.0.0.1:0",
            token,
            Arc::new(move |peer, why| l.lock().unwrap().push(format!("{peer}: {why}"))),
            limits,
        )
        .unwrap();
        (s, log)
    }

    /// A connection that has presented `token`.
    fn raw_client(addr: &str, token: &str) -> TcpStream {
        let mut raw = TcpStream::connect(addr).unwrap();
        raw.write_all(&wire::hello(token)).unwrap();
        assert_eq!(wire::read_hello_reply(&mut raw), wire::HelloReply::Accepted);
        raw
    }

    /// What the server answered before closing `raw`: the error's message.
    fn error_answer(raw: &mut TcpStream) -> String {
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut status = [0; 1];
        raw.read_exact(&mut status).unwrap();
        assert_eq!(status[0], ERROR);
        let why = String::from_utf8(wire::read_field(raw).unwrap()).unwrap();
        assert_eq!(raw.read(&mut [0; 1]).unwrap(), 0, "closed after the answer");
        why
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
    fn a_flood_of_connections_is_refused_beyond_the_limit_and_clients_try_again() {
        let limits = Limits {
            handshakes: 2,
            handshake_timeout: Duration::from_millis(1500),
        };
        let (s, log) = server_with("flood-token", limits);
        let addr = s.local_addr().to_string();
        let good = Store::connect(&addr, "flood-token", Duration::from_secs(5)).unwrap();
        // Two strangers take both handshake slots and say nothing.
        let stalled: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(&addr).unwrap()).collect();
        // Every further connection is answered busy at once and closed.
        let t = Instant::now();
        for _ in 0..20 {
            let mut raw = TcpStream::connect(&addr).unwrap();
            raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            match wire::read_hello_reply(&mut raw) {
                wire::HelloReply::Busy(why) => assert!(why.contains("the limit"), "{why}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        // A client already in is not disturbed.
        good.set("k", b"v").unwrap();
        assert_eq!(good.get("k", Duration::from_secs(1)).unwrap(), b"v");
        // A new client waits for a slot (the strangers' time runs out) instead of failing.
        let t = Instant::now();
        let late = Store::connect(&addr, "flood-token", Duration::from_secs(10)).unwrap();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(late.try_get("k").unwrap().unwrap(), b"v");
        drop(stalled);
        let log = log.lock().unwrap().clone();
        // The refusals are reported, but not one line each.
        let busy: Vec<&String> = log.iter().filter(|l| l.contains("the limit")).collect();
        assert!(!busy.is_empty() && busy.len() < 5, "{log:?}");
        assert!(
            busy[0].starts_with("127.0.0.1:") && busy[0].contains("refused: 2 connections"),
            "{log:?}"
        );
        let timed_out = log
            .iter()
            .filter(|l| l.contains("no handshake (timed out after 1.5 s)"));
        assert_eq!(timed_out.count(), 2, "{log:?}");
    }

    #[test]
    fn stalls_slow_handshakes_and_garbage_are_dropped_and_reported_without_blocking_others() {
        let limits = Limits {
            handshake_timeout: Duration::from_millis(500),
            ..Limits::default()
        };
        let (s, log) = server_with("stall-token", limits);
        let addr = s.local_addr().to_string();
        // Stalls mid-request (a key of 10 bytes, 3 sent), after a good handshake.
        let mut mid_request = raw_client(&addr, "stall-token");
        mid_request
            .write_all(&[wire::OP_SET, 10, 0, 0, 0, b'a', b'b', b'c'])
            .unwrap();
        // Stalls mid-handshake.
        let mut mid_hello = TcpStream::connect(&addr).unwrap();
        mid_hello.write_all(&wire::MAGIC[..7]).unwrap();
        // Others go on meanwhile, blocking gets included.
        let a = Store::connect(&addr, "stall-token", Duration::from_secs(5)).unwrap();
        let b = Store::connect(&addr, "stall-token", Duration::from_secs(5)).unwrap();
        let t = Instant::now();
        let waiter = std::thread::spawn(move || b.get("late", Duration::from_secs(10)).unwrap());
        a.set("late", b"here").unwrap();
        assert_eq!(waiter.join().unwrap(), b"here");
        assert_eq!(a.add("n", 1).unwrap(), 1);
        // (Quick: the stalled request would hold them for good.)
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        // The stalled handshake is dropped at its deadline.
        assert!(error_answer(&mut mid_hello).contains("no handshake (timed out after 0.5 s)"));
        // A handshake sent a byte at a time, each within the timeout, is dropped at the
        // deadline of the whole.
        let mut slow = TcpStream::connect(&addr).unwrap();
        let t = Instant::now();
        for byte in wire::hello("stall-token") {
            if slow.write_all(&[byte]).is_err() || t.elapsed() > Duration::from_secs(2) {
                break;
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        assert!(error_answer(&mut slow).contains("timed out after 0.5 s"));
        // An unknown op, and a field longer than the bound, are answered, dropped and
        // reported (the bound refused before anything is allocated).
        let mut garbage = raw_client(&addr, "stall-token");
        garbage.write_all(&[77, 0, 0, 0, 0]).unwrap();
        assert!(error_answer(&mut garbage).contains("unknown store op 77"));
        let mut huge = raw_client(&addr, "stall-token");
        huge.write_all(&[wire::OP_GET]).unwrap();
        huge.write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(error_answer(&mut huge).contains("at most 1048576"));
        // The stall mid-request still holds only its own connection.
        a.set("after", b"all").unwrap();
        assert_eq!(a.try_get("after").unwrap().unwrap(), b"all");
        drop(mid_request);
        let log = log.lock().unwrap().clone();
        let has = |s: &str| log.iter().filter(|l| l.contains(s)).count();
        assert_eq!(has("no handshake (timed out after 0.5 s)"), 2, "{log:?}");
        assert_eq!(has("malformed request"), 2, "{log:?}");
        assert_eq!(has("unknown store op 77"), 1, "{log:?}");
        assert_eq!(log.len(), 4, "{log:?}");
    }
}
