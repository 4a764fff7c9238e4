//! The launchers' side of the rendezvous: node 0's launcher hosts the store
//! ([`StoreServer`]) that its workers and every other node meet through; every launcher
//! joins it as a client (`upcycle_parallel::store::Store`) and they agree on each attempt
//! there.
//!
//! Keys (under `launcher/`; the workers' keys are under `attempt-N/`):
//!
//! | key | what |
//! |---|---|
//! | `node/<i>` | node i joined (its worker count); `node/<i>/joins` counts launchers claiming i |
//! | `ready/<a>/<i>` | node i is about to start the workers of attempt a |
//! | `generation` | the attempt every node must run; moved (compare-and-set) by the first node whose worker fails |
//! | `failure/<a>/<i>` | how attempt a failed on node i (its first failing worker), if it did |
//! | `done/<a>/<i>` | node i's workers of attempt a all succeeded |
//! | `abort` | why the job stops everywhere (a launcher was interrupted or hit an error) |
//! | `left/<i>` | node i's launcher is leaving (node 0 waits for these before its store goes) |

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use upcycle_parallel::store::{Store, StoreError, TOKEN_VAR};

use crate::spec::LaunchSpec;
use crate::store_server::StoreServer;
use crate::LaunchError;

/// Shortest token accepted from [`TOKEN_VAR`].
const MIN_TOKEN: usize = 16;

fn rdzv_error(e: StoreError) -> LaunchError {
    LaunchError::Rendezvous(e.to_string())
}

/// A fresh random token (32 hex digits from /dev/urandom).
pub fn generate_token() -> Result<String, LaunchError> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| {
            LaunchError::Invalid(format!(
                "reading /dev/urandom for the rendezvous token: {e}; set {TOKEN_VAR} yourself"
            ))
        })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The job's token: `given` (from [`TOKEN_VAR`]) checked, or, on one node, a new one.
pub fn job_token(given: Option<&str>, nnodes: usize) -> Result<String, LaunchError> {
    match given {
        Some(t) if t.len() < MIN_TOKEN || t.chars().any(char::is_whitespace) => {
            Err(LaunchError::Invalid(format!(
                "{TOKEN_VAR} must be at least {MIN_TOKEN} characters without spaces (it is \
                 {} long); e.g. `export {TOKEN_VAR}=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \
                 \\n')`",
                t.len()
            )))
        }
        Some(t) => Ok(t.to_string()),
        None if nnodes > 1 => Err(LaunchError::Invalid(format!(
            "--nnodes {nnodes}: every node's launcher needs the job's rendezvous token in \
             {TOKEN_VAR}, the same on each node (it guards the store on node 0): e.g. `export \
             {TOKEN_VAR}=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \\n')` on one node, then \
             the same value on the others"
        ))),
        None => generate_token(),
    }
}

/// What a launcher learns while its workers run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum News {
    /// Another node's worker failed: every node restarts.
    Restart,
    /// The job stops everywhere (why).
    Abort(String),
}

/// One launcher's membership in the job's rendezvous.
pub struct Rendezvous {
    /// The store, on node 0 only (kept alive as long as the launcher).
    server: Option<StoreServer>,
    /// The launchers' keys.
    store: Store,
    node: usize,
    nnodes: usize,
    join_timeout: Duration,
    /// Where the workers find the store.
    pub master_addr: String,
    /// Its port (the one chosen when the spec asked for 0).
    pub master_port: u16,
    /// The job's token, for the workers.
    pub token: String,
}

impl std::fmt::Debug for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Rendezvous(node {} of {} at {}:{})",
            self.node, self.nnodes, self.master_addr, self.master_port
        )
    }
}

/// `host:port`, with brackets around an IPv6 host.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn nodes(list: &[usize]) -> String {
    list.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Rendezvous {
    /// Hosts the store (node 0), joins it, and waits until every node has joined (at most
    /// `spec.join_timeout`, then names the nodes that did not).
    pub fn join(spec: &LaunchSpec) -> Result<Self, LaunchError> {
        let token = job_token(spec.token.as_deref(), spec.nnodes)?;
        let (node, nnodes) = (spec.node_rank, spec.nnodes);
        if spec.master_port == 0 && nnodes > 1 {
            return Err(LaunchError::Invalid(
                "--master-port 0 (any free port) works on one node only: with --nnodes above \
                 1 every node must be told the port; pick one (e.g. 29500)"
                    .into(),
            ));
        }
        let (server, connect_to) = if node == 0 {
            let bind = host_port(
                spec.store_bind.as_deref().unwrap_or(&spec.master_addr),
                spec.master_port,
            );
            let on_reject = Arc::new(|peer: SocketAddr, why: &str| {
                eprintln!("upcycle launch: rejected a connection from {peer}: {why}")
            });
            let server = StoreServer::bind(&bind, &token, on_reject).map_err(|e| {
                LaunchError::Invalid(format!(
                    "cannot host the rendezvous store at {bind}: {e}; choose another \
                     --master-port{} (or --store-bind, the address it listens on)",
                    if nnodes == 1 {
                        " (0: any free one)"
                    } else {
                        ""
                    }
                ))
            })?;
            let mut local = server.local_addr();
            if local.ip().is_unspecified() {
                local.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            (Some(server), local.to_string())
        } else {
            (None, host_port(&spec.master_addr, spec.master_port))
        };
        let master_port = server
            .as_ref()
            .map_or(spec.master_port, |s| s.local_addr().port());
        let store = Store::connect(&connect_to, &token, spec.join_timeout)
            .map_err(rdzv_error)?
            .scope("launcher/");
        let me = Rendezvous {
            server,
            store,
            node,
            nnodes,
            join_timeout: spec.join_timeout,
            master_addr: spec.master_addr.clone(),
            master_port,
            token,
        };
        if node == 0 {
            me.store.set("generation", b"0").map_err(rdzv_error)?;
        }
        let claims = me
            .store
            .add(&format!("node/{node}/joins"), 1)
            .map_err(rdzv_error)?;
        if claims > 1 {
            return Err(LaunchError::Rendezvous(format!(
                "another launcher joined this job as node {node} already: give each node's \
                 launcher its own --node-rank (0 to {})",
                nnodes - 1
            )));
        }
        me.store
            .set(&format!("node/{node}"), spec.nproc.to_string().as_bytes())
            .map_err(rdzv_error)?;
        if nnodes > 1 {
            eprintln!(
                "upcycle launch: node {node} of {nnodes}: waiting for the other nodes at {} \
                 (at most {:.0} s)",
                host_port(&me.master_addr, master_port),
                spec.join_timeout.as_secs_f64()
            );
        }
        let keys: Vec<String> = (0..nnodes).map(|i| format!("node/{i}")).collect();
        let missing = me.wait_for(&keys, spec.join_timeout)?;
        if !missing.is_empty() {
            let joined: Vec<usize> = (0..nnodes).filter(|i| !missing.contains(i)).collect();
            return Err(LaunchError::Rendezvous(format!(
                "rendezvous: node(s) {} did not join within {:.0} s (--nnodes {nnodes}; joined: \
                 {}): start `upcycle launch --nnodes {nnodes} --node-rank N ...` on each, with \
                 the same --master-addr, --master-port and {TOKEN_VAR}, or raise \
                 --join-timeout-s",
                nodes(&missing),
                spec.join_timeout.as_secs_f64(),
                nodes(&joined)
            )));
        }
        for (i, key) in keys.iter().enumerate() {
            let theirs = me
                .store
                .try_get(key)
                .map_err(rdzv_error)?
                .unwrap_or_default();
            let theirs = String::from_utf8_lossy(&theirs);
            if theirs != spec.nproc.to_string() {
                return Err(LaunchError::Rendezvous(format!(
                    "node {i} runs {theirs} workers and this node {}: every node needs the same \
                     --nproc-per-node",
                    spec.nproc
                )));
            }
        }
        if nnodes > 1 {
            eprintln!(
                "upcycle launch: node {node} of {nnodes}: every node joined; this node runs ranks \
                 {} to {}",
                node * spec.nproc,
                (node + 1) * spec.nproc - 1
            );
        }
        Ok(me)
    }

    /// Waits (at most `timeout`, checking for an abort every second) for `keys`; returns
    /// the indices of those still missing.
    fn wait_for(&self, keys: &[String], timeout: Duration) -> Result<Vec<usize>, LaunchError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let missing = self
                .store
                .missing(keys, left.min(Duration::from_secs(1)))
                .map_err(rdzv_error)?;
            if missing.is_empty() || left.is_zero() {
                return Ok(missing);
            }
            if let Some(why) = self.store.try_get("abort").map_err(rdzv_error)? {
                return Err(LaunchError::Rendezvous(
                    String::from_utf8_lossy(&why).into_owned(),
                ));
            }
        }
    }

    /// Waits until every node is ready to start attempt `attempt` (all stopped the
    /// workers of the attempt before).
    pub fn start_attempt(&self, attempt: u32) -> Result<(), LaunchError> {
        self.store
            .set(&format!("ready/{attempt}/{}", self.node), b"1")
            .map_err(rdzv_error)?;
        let keys: Vec<String> = (0..self.nnodes)
            .map(|i| format!("ready/{attempt}/{i}"))
            .collect();
        let missing = self.wait_for(&keys, self.join_timeout)?;
        if !missing.is_empty() {
            return Err(LaunchError::Rendezvous(format!(
                "rendezvous: node(s) {} did not come back for attempt {attempt} within {:.0} s",
                nodes(&missing),
                self.join_timeout.as_secs_f64()
            )));
        }
        Ok(())
    }

    /// What happened elsewhere during attempt `attempt`, if anything.
    pub fn news(&self, attempt: u32) -> Result<Option<News>, LaunchError> {
        if let Some(why) = self.store.try_get("abort").map_err(rdzv_error)? {
            return Ok(Some(News::Abort(
                String::from_utf8_lossy(&why).into_owned(),
            )));
        }
        let generation = self
            .store
            .try_get("generation")
            .map_err(rdzv_error)?
            .and_then(|g| String::from_utf8_lossy(&g).parse::<u32>().ok())
            .unwrap_or(0);
        if generation > attempt {
            return Ok(Some(News::Restart));
        }
        Ok(None)
    }

    /// How attempt `attempt` failed, on every node that reported a failure (`node i:
    /// rank r ...; node j: ...`; without the node on one node). Complete once every node
    /// is past the attempt (each reports before it starts the next).
    pub fn failures(&self, attempt: u32) -> String {
        let found: Vec<String> = (0..self.nnodes)
            .filter_map(|i| {
                let what = self
                    .store
                    .try_get(&format!("failure/{attempt}/{i}"))
                    .ok()??;
                let what = String::from_utf8_lossy(&what).into_owned();
                Some(if self.nnodes > 1 {
                    format!("node {i}: {what}")
                } else {
                    what
                })
            })
            .collect();
        if found.is_empty() {
            "another node's worker failed".into()
        } else {
            found.join("; ")
        }
    }

    /// Tells every node that attempt `attempt` failed here (`what`: which worker and
    /// how): all of them stop their workers and start the next attempt.
    pub fn fail(&self, attempt: u32, what: &str) -> Result<(), LaunchError> {
        self.store
            .set(&format!("failure/{attempt}/{}", self.node), what.as_bytes())
            .map_err(rdzv_error)?;
        self.store
            .compare_set(
                "generation",
                Some(attempt.to_string().as_bytes()),
                (attempt + 1).to_string().as_bytes(),
            )
            .map_err(rdzv_error)?;
        Ok(())
    }

    /// This node's workers of attempt `attempt` all succeeded: waits until every node's
    /// did (`Ok(None)`), or returns what happened elsewhere instead.
    pub fn finish(&self, attempt: u32) -> Result<Option<News>, LaunchError> {
        self.store
            .set(&format!("done/{attempt}/{}", self.node), b"1")
            .map_err(rdzv_error)?;
        let keys: Vec<String> = (0..self.nnodes)
            .map(|i| format!("done/{attempt}/{i}"))
            .collect();
        let deadline = Instant::now() + self.join_timeout;
        loop {
            let missing = self
                .store
                .missing(&keys, Duration::from_millis(500))
                .map_err(rdzv_error)?;
            if missing.is_empty() {
                return Ok(None);
            }
            if let Some(news) = self.news(attempt)? {
                return Ok(Some(news));
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::Rendezvous(format!(
                    "this node's workers finished, but node(s) {}'s did not within {:.0} s",
                    nodes(&missing),
                    self.join_timeout.as_secs_f64()
                )));
            }
        }
    }

    /// Stops the job on every node (first reason wins).
    pub fn abort(&self, why: &str) {
        let why = format!("node {}: {why}", self.node);
        let _ = self.store.compare_set("abort", None, why.as_bytes());
    }

    /// This launcher leaves: node 0 waits (at most `linger`) for the others to leave
    /// first, so that none loses the store while it still reads the outcome.
    pub fn leave(self, linger: Duration) {
        let _ = self.store.set(&format!("left/{}", self.node), b"1");
        if self.server.is_some() && self.nnodes > 1 {
            let keys: Vec<String> = (0..self.nnodes).map(|i| format!("left/{i}")).collect();
            let _ = self.store.missing(&keys, linger);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_generated_or_required() {
        let a = job_token(None, 1).unwrap();
        let b = job_token(None, 1).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        let e = job_token(None, 2).unwrap_err().to_string();
        assert!(e.contains("--nnodes 2") && e.contains(TOKEN_VAR), "{e}");
        let e = job_token(Some("short"), 1).unwrap_err().to_string();
        assert!(e.contains("at least 16"), "{e}");
        assert_eq!(
            job_token(Some("0123456789abcdef"), 2).unwrap(),
            "0123456789abcdef"
        );
    }
}
