//! The rendezvous store's wire protocol, in one place: the client ([`super::Store`]),
//! the server (`upcycle_launch::store_server`, hosted by node 0's launcher) and the TCP
//! collective's peer handshake (`crate::tcp`, which reuses [`hello`]) all read and write
//! through these functions.
//!
//! - **Handshake.** The client sends [`MAGIC`] then the job's token as a field
//!   ([`hello`]); the server checks both ([`check_hello`]) and answers one status byte
//!   ([`answer_hello`]): [`OK`], or [`ERROR`] and the reason as a field (then closes), or
//!   [`BUSY`] and a message when it has too many connections still presenting their token
//!   (the client tries again).
//! - **Requests.** One op byte ([`OP_SET`], [`OP_GET`], [`OP_ADD`], [`OP_CAS`]), the key
//!   as a field, then the op's arguments (see [`Request`]); the client encodes them with
//!   [`set_request`], [`get_request`], [`add_request`], [`compare_set_request`], the
//!   server decodes them whole with [`Request::read`] before it touches its map.
//! - **Replies.** A status byte: [`OK`] and the op's result (set: nothing; get: the value
//!   as a field; add: the new value as `i64`; compare-and-set: the value afterwards as a
//!   field, empty when absent), [`ABSENT`] (a get whose key did not appear in time), or
//!   [`ERROR`] and a message as a field.
//!
//! A field is a little-endian `u32` length (at most [`MAX_FIELD`]) and that many bytes;
//! numbers are little-endian `i64`/`u64`.

use std::io::{Read, Write};
use std::time::Duration;

/// The first bytes of every connection (store client or TCP collective peer).
pub const MAGIC: &[u8; 15] = b"UPCYCLE-RDZV/1\n";
/// Longest token, key or value accepted on the wire (values: NCCL ids, addresses).
pub const MAX_FIELD: usize = 1 << 20;
/// How long a new connection may take to present its token.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Op: set a key.
pub const OP_SET: u8 = 1;
/// Op: get a key, waiting for it at most a given time.
pub const OP_GET: u8 = 2;
/// Op: add to a counter.
pub const OP_ADD: u8 = 3;
/// Op: compare-and-set.
pub const OP_CAS: u8 = 4;

/// Status: done (the result follows).
pub const OK: u8 = 0;
/// Status: the key is absent.
pub const ABSENT: u8 = 1;
/// Status: refused (the reason follows as a field).
pub const ERROR: u8 = 2;
/// Status, in answer to a handshake only: the server is busy (a message follows as a
/// field); try again later.
pub const BUSY: u8 = 3;

/// Whether `a` and `b` are equal, in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Appends `field` with its length.
pub fn write_field(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_le_bytes());
    out.extend_from_slice(field);
}

/// Reads a little-endian `u32`.
pub fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Reads a little-endian `u64`.
pub fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads a field; a length above [`MAX_FIELD`] is refused (`InvalidData`) before
/// anything is allocated.
pub fn read_field(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
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
pub fn hello(token: &str) -> Vec<u8> {
    let mut m = MAGIC.to_vec();
    write_field(&mut m, token.as_bytes());
    m
}

/// Reads a client's handshake and checks its token: `Err(reason)` when it must be
/// rejected (the reason is what the log and the client are told).
pub fn check_hello(r: &mut impl Read, token: &str) -> Result<(), String> {
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
pub fn answer_hello(w: &mut impl Write, refusal: Option<&str>) -> std::io::Result<()> {
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

/// The answer a busy server gives instead of reading a handshake ([`BUSY`] and `why`).
pub fn busy_answer(why: &str) -> Vec<u8> {
    let mut m = vec![BUSY];
    write_field(&mut m, why.as_bytes());
    m
}

/// What a handshake was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloReply {
    /// [`OK`]: the connection is accepted.
    Accepted,
    /// [`ERROR`]: refused, with the reason.
    Refused(String),
    /// [`BUSY`]: not now, with the server's message; try again.
    Busy(String),
    /// The connection closed (or failed) before an answer.
    Closed,
}

/// Reads the answer to a handshake.
pub fn read_hello_reply(r: &mut impl Read) -> HelloReply {
    let mut status = [0; 1];
    if r.read_exact(&mut status).is_err() {
        return HelloReply::Closed;
    }
    let mut message = |default: &str| {
        read_field(r)
            .map(|m| String::from_utf8_lossy(&m).into_owned())
            .unwrap_or_else(|_| default.into())
    };
    match status[0] {
        OK => HelloReply::Accepted,
        BUSY => HelloReply::Busy(message("busy")),
        _ => HelloReply::Refused(message("refused")),
    }
}

/// Reads the answer to a handshake: `Err(Some(reason))` refused (or busy), `Err(None)`
/// closed.
pub fn read_hello_answer(r: &mut impl Read) -> Result<(), Option<String>> {
    match read_hello_reply(r) {
        HelloReply::Accepted => Ok(()),
        HelloReply::Refused(why) | HelloReply::Busy(why) => Err(Some(why)),
        HelloReply::Closed => Err(None),
    }
}

fn request(op: u8, key: &str) -> Vec<u8> {
    let mut r = vec![op];
    write_field(&mut r, key.as_bytes());
    r
}

/// A set request: `key` to `value`.
pub fn set_request(key: &str, value: &[u8]) -> Vec<u8> {
    let mut r = request(OP_SET, key);
    write_field(&mut r, value);
    r
}

/// A get request: `key`, waiting at most `wait` for it to appear.
pub fn get_request(key: &str, wait: Duration) -> Vec<u8> {
    let mut r = request(OP_GET, key);
    r.extend_from_slice(&(wait.as_millis().min(u64::MAX as u128) as u64).to_le_bytes());
    r
}

/// An add request: `n` to the counter `key`.
pub fn add_request(key: &str, n: i64) -> Vec<u8> {
    let mut r = request(OP_ADD, key);
    r.extend_from_slice(&n.to_le_bytes());
    r
}

/// A compare-and-set request: `key` to `desired` if its value is `expected` (`None`:
/// absent).
pub fn compare_set_request(key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Vec<u8> {
    let mut r = request(OP_CAS, key);
    write_field(&mut r, &[u8::from(expected.is_some())]);
    write_field(&mut r, expected.unwrap_or_default());
    write_field(&mut r, desired);
    r
}

/// One request, as the server reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// [`OP_SET`]: the value field.
    Set {
        /// The key.
        key: String,
        /// Its new value.
        value: Vec<u8>,
    },
    /// [`OP_GET`]: the wait in milliseconds (`u64`).
    Get {
        /// The key.
        key: String,
        /// How long to wait for it.
        wait: Duration,
    },
    /// [`OP_ADD`]: the amount (`i64`).
    Add {
        /// The counter.
        key: String,
        /// What to add.
        n: i64,
    },
    /// [`OP_CAS`]: three fields: `[1]` when a value is expected (else `[0]`), the
    /// expected value, the desired one.
    CompareSet {
        /// The key.
        key: String,
        /// Its value now for the set to happen (`None`: absent).
        expected: Option<Vec<u8>>,
        /// Its value after.
        desired: Vec<u8>,
    },
}

impl Request {
    /// Reads one request whole (an unknown op or an oversized field is `InvalidData`).
    pub fn read(r: &mut impl Read) -> std::io::Result<Self> {
        let mut op = [0; 1];
        r.read_exact(&mut op)?;
        let key = String::from_utf8_lossy(&read_field(r)?).into_owned();
        Ok(match op[0] {
            OP_SET => Request::Set {
                key,
                value: read_field(r)?,
            },
            OP_GET => Request::Get {
                key,
                wait: Duration::from_millis(read_u64(r)?),
            },
            OP_ADD => Request::Add {
                key,
                n: read_u64(r)? as i64,
            },
            OP_CAS => {
                let has_expected = read_field(r)?;
                let expected = read_field(r)?;
                let desired = read_field(r)?;
                Request::CompareSet {
                    key,
                    expected: (has_expected == [1]).then_some(expected),
                    desired,
                }
            }
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unknown store op {other}"),
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzzing, seeded, a fixed number of inputs: what a client sends (its handshake, then
    /// requests of every op) and what a server answers, as this module writes them,
    /// mutated and read as the server and the client read them. No input may panic, hang
    /// (2 s each) or allocate above the test binary's bound.
    #[test]
    fn fuzz_store_framing() {
        let session = |requests: &[Vec<u8>]| [&[hello("token")][..], requests].concat().concat();
        let seeds = [
            session(&[
                set_request("k", b"value"),
                get_request("k", Duration::from_secs(5)),
            ]),
            session(&[
                add_request("n", -3),
                compare_set_request("k", Some(b"a"), b"b"),
            ]),
            session(&[compare_set_request("k", None, b"")]),
            busy_answer("too many handshakes"),
            vec![OK],
        ];
        let limit = Duration::from_secs(2);
        upcycle_files::fuzz::run("store wire", &seeds, 19_009, 10_000, limit, |bytes| {
            let mut r = bytes;
            if check_hello(&mut r, "token").is_ok() {
                while Request::read(&mut r).is_ok() {}
            }
            let mut r = bytes;
            while Request::read(&mut r).is_ok() {}
            let _ = read_hello_reply(&mut &bytes[..]);
        });
    }

    #[test]
    fn requests_read_back_as_written_and_bad_ones_are_refused() {
        let read = |bytes: Vec<u8>| Request::read(&mut bytes.as_slice());
        assert_eq!(
            read(set_request("k", b"v")).unwrap(),
            Request::Set {
                key: "k".into(),
                value: b"v".to_vec()
            }
        );
        assert_eq!(
            read(get_request("k", Duration::from_millis(1500))).unwrap(),
            Request::Get {
                key: "k".into(),
                wait: Duration::from_millis(1500)
            }
        );
        assert_eq!(
            read(add_request("n", -3)).unwrap(),
            Request::Add {
                key: "n".into(),
                n: -3
            }
        );
        assert_eq!(
            read(compare_set_request("g", None, b"1")).unwrap(),
            Request::CompareSet {
                key: "g".into(),
                expected: None,
                desired: b"1".to_vec()
            }
        );
        assert_eq!(
            read(compare_set_request("g", Some(b""), b"1")).unwrap(),
            Request::CompareSet {
                key: "g".into(),
                expected: Some(Vec::new()),
                desired: b"1".to_vec()
            }
        );
        let e = read(vec![9, 0, 0, 0, 0]).unwrap_err();
        assert!(e.to_string().contains("unknown store op 9"), "{e}");
        // A claimed length over the bound is refused without reading (or allocating) it.
        let mut huge = vec![OP_SET];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        let e = read(huge).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        // A request cut short is an error, not a wait or a panic.
        let mut cut = set_request("k", b"value");
        cut.truncate(cut.len() - 2);
        assert!(read(cut).is_err());
    }

    #[test]
    fn handshakes_and_their_answers() {
        assert!(check_hello(&mut hello("tok").as_slice(), "tok").is_ok());
        assert_eq!(
            check_hello(&mut hello("bad").as_slice(), "tok").unwrap_err(),
            "wrong rendezvous token"
        );
        let mut a = Vec::new();
        answer_hello(&mut a, None).unwrap();
        assert_eq!(read_hello_reply(&mut a.as_slice()), HelloReply::Accepted);
        let mut a = Vec::new();
        answer_hello(&mut a, Some("no")).unwrap();
        assert_eq!(read_hello_answer(&mut a.as_slice()), Err(Some("no".into())));
        assert_eq!(
            read_hello_reply(&mut busy_answer("later").as_slice()),
            HelloReply::Busy("later".into())
        );
        assert_eq!(read_hello_reply(&mut &[][..]), HelloReply::Closed);
    }
}
