//! The rendezvous store's server, which node 0's launcher hosts at
//! `MASTER_ADDR:MASTER_PORT` ([`crate::rendezvous`]): a small TCP key-value store (as
//! torch's `TCPStore`) for the job's workers and launchers, which are
//! [`upcycle_parallel::store::Store`] clients. The wire protocol is
//! [`upcycle_parallel::store::wire`], shared with the client.
//!
//! One thread accepts connections, one thread serves each connection. A connection first
//! presents the job's token; a wrong or missing one (or a stranger speaking another
//! protocol) is answered with the reason, closed, and reported to `on_reject`. Each
//! request is read whole before the store's map is locked, so a connection that stalls
//! mid-request holds only its own thread.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use upcycle_parallel::store::wire::{
    answer_hello, check_hello, write_field, Request, ABSENT, ERROR, HANDSHAKE_TIMEOUT, OK,
};

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
    while let Ok(req) = Request::read(&mut conn) {
        if conn.write_all(&answer(req, state)).is_err() {
            return;
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
    use std::io::Read;
    use upcycle_parallel::store::{Store, StoreError, TOKEN_VAR};

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
}
