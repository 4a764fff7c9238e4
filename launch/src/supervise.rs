//! Spawning a group of workers, watching it, stopping it, restarting it.
//!
//! One attempt: the group starts (each process in its own process group, so that the
//! terminal's Ctrl-C reaches only the launcher, which then stops everything in order);
//! output lines are prefixed with the worker's rank as they come; the launcher waits
//! until every worker has ended well (success), one has failed, `mpirun` stays up after
//! a worker left (a hang), or it is asked to stop. Whatever still runs is then sent
//! SIGTERM and, after the grace period, SIGKILL. A failed attempt is followed by the next
//! one until `max_restarts` restarts are spent.
//!
//! Workers spawned directly in a world of several (`--backend tcp`/`nccl`) meet through
//! the rendezvous store ([`crate::rendezvous`]): node 0's launcher hosts it, every node's
//! launcher joins it, and the launchers agree there on each attempt: a failure on any node
//! moves the job's generation, every node stops its workers, and all start the next
//! attempt together.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::procs::{self, Tree};
use crate::rendezvous::{News, Rendezvous};
use crate::spec::{LaunchSpec, Spawn};
use crate::worker_env::{self, JobEnv};
use crate::{io_error, LaunchError};

/// How a worker (or the `mpirun` job) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerStatus {
    /// Exited with this status.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// `mpirun` did not end its job after a worker had left.
    Hung,
}

impl WorkerStatus {
    fn from_wait(status: i32) -> Self {
        if libc::WIFSIGNALED(status) {
            WorkerStatus::Signal(libc::WTERMSIG(status))
        } else {
            WorkerStatus::Code(libc::WEXITSTATUS(status))
        }
    }

    fn ok(self) -> bool {
        self == WorkerStatus::Code(0)
    }

    /// The launcher's exit status for it: the code, 128 + the signal, or 1.
    pub fn exit_code(self) -> i32 {
        match self {
            WorkerStatus::Code(c) => c,
            WorkerStatus::Signal(s) => 128 + s,
            WorkerStatus::Hung => 1,
        }
    }
}

impl std::fmt::Display for WorkerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerStatus::Code(c) => write!(f, "exited with status {c}"),
            WorkerStatus::Signal(s) => write!(f, "was killed by signal {s}"),
            WorkerStatus::Hung => write!(f, "hung"),
        }
    }
}

/// The group failed and no restart was left.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The rank that failed first, when known.
    pub rank: Option<usize>,
    /// How it ended.
    pub status: WorkerStatus,
    /// What the launcher saw (e.g. mpirun's own report).
    pub reason: String,
    /// Restarts used.
    pub restarts: u32,
    /// The last lines of the failing worker's output (or of everything, rank unknown).
    pub tail: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let who = self
            .rank
            .map_or("a worker".to_string(), |r| format!("rank {r}"));
        write!(
            f,
            "{who} {}{}; no restart left ({} used; --max-restarts raises the limit)",
            self.status,
            if self.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.reason)
            },
            self.restarts
        )?;
        if !self.tail.is_empty() {
            write!(f, "\nlast lines of its output:")?;
            for l in &self.tail {
                write!(f, "\n  {l}")?;
            }
        }
        Ok(())
    }
}

static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Makes SIGINT, SIGTERM and SIGHUP ask [`launch`] to stop every worker and return
/// [`LaunchError::Interrupted`] (instead of ending the launcher and orphaning them).
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores into an atomic.
        unsafe {
            libc::signal(
                sig,
                on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

fn stop_requested() -> Option<i32> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Who wrote a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Rank(usize),
    Mpirun,
}

/// Prefixes, prints, logs and remembers the tail of every line of the group.
struct Output {
    log_dir: Option<PathBuf>,
    tail_lines: usize,
    state: Mutex<OutputState>,
}

#[derive(Default)]
struct OutputState {
    attempt: u32,
    tails: BTreeMap<Source, VecDeque<String>>,
    logs: BTreeMap<Source, File>,
    /// mpirun's own lines of this attempt (its failure report is parsed from them).
    mpirun_lines: Vec<String>,
}

impl Output {
    fn begin_attempt(&self, attempt: u32) {
        let mut s = self.state.lock().unwrap();
        s.attempt = attempt;
        s.tails.clear();
        s.logs.clear();
        s.mpirun_lines.clear();
    }

    fn line(&self, source: Source, stderr: bool, text: &str) {
        let mut s = self.state.lock().unwrap();
        let prefix = match source {
            Source::Rank(r) => format!("[rank {r}] "),
            Source::Mpirun => "[mpirun] ".into(),
        };
        // A closed terminal must not stop the supervision: print errors are ignored.
        if stderr || source == Source::Mpirun {
            let _ = writeln!(std::io::stderr().lock(), "{prefix}{text}");
        } else {
            let _ = writeln!(std::io::stdout().lock(), "{prefix}{text}");
        }
        let tail = s.tails.entry(source).or_default();
        tail.push_back(text.to_string());
        if tail.len() > self.tail_lines {
            tail.pop_front();
        }
        if source == Source::Mpirun {
            s.mpirun_lines.push(text.to_string());
        }
        if let Some(dir) = &self.log_dir {
            let attempt = s.attempt;
            if let std::collections::btree_map::Entry::Vacant(slot) = s.logs.entry(source) {
                let name = match source {
                    Source::Rank(r) => format!("rank-{r}.log"),
                    Source::Mpirun => "mpirun.log".into(),
                };
                // A log that cannot be opened costs only the log, not the run.
                if let Ok(mut f) = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join(name))
                {
                    let _ = writeln!(f, "--- attempt {attempt} ---");
                    slot.insert(f);
                }
            }
            if let Some(f) = s.logs.get_mut(&source) {
                let _ = writeln!(f, "{text}");
            }
        }
    }

    fn tail(&self, rank: Option<usize>) -> Vec<String> {
        let s = self.state.lock().unwrap();
        match rank {
            Some(r) => s
                .tails
                .get(&Source::Rank(r))
                .map_or(Vec::new(), |t| t.iter().cloned().collect()),
            None => s
                .tails
                .iter()
                .flat_map(|(src, t)| {
                    let name = match src {
                        Source::Rank(r) => format!("[rank {r}] "),
                        Source::Mpirun => "[mpirun] ".into(),
                    };
                    t.iter().map(move |l| format!("{name}{l}"))
                })
                .collect(),
        }
    }
}

/// `[1,3]<stdout>:text` (Open MPI's `--tag-output`) -> (3, stderr?, text).
fn untag(line: &str) -> Option<(usize, bool, &str)> {
    let rest = line.strip_prefix('[')?;
    let (ids, rest) = rest.split_once(']')?;
    let rank = ids.split_once(',')?.1.parse().ok()?;
    if let Some(text) = rest.strip_prefix("<stdout>:") {
        Some((rank, false, text))
    } else {
        Some((rank, true, rest.strip_prefix("<stderr>:")?))
    }
}

/// The first failing rank and its status, from mpirun's report.
fn mpirun_failure(lines: &[String]) -> Option<(usize, WorkerStatus)> {
    // "mpirun noticed that process rank 1 with PID 0 on node vm exited on signal 9 (Killed)."
    for l in lines {
        if let Some(rest) = l.split("process rank ").nth(1) {
            let rank = rest.split_whitespace().next()?.parse().ok()?;
            if let Some(sig) = rest.split("exited on signal ").nth(1) {
                let sig = sig.split_whitespace().next()?.parse().ok()?;
                return Some((rank, WorkerStatus::Signal(sig)));
            }
        }
    }
    // "Process name: [[29412,1],1]" then "Exit code:    3".
    let at = lines
        .iter()
        .position(|l| l.trim().starts_with("Process name: [["))?;
    let name = lines[at].trim();
    let rank = name
        .rsplit(',')
        .next()?
        .trim_end_matches(']')
        .parse()
        .ok()?;
    let code = lines[at..]
        .iter()
        .find_map(|l| l.trim().strip_prefix("Exit code:"))?
        .trim()
        .parse()
        .ok()?;
    Some((rank, WorkerStatus::Code(code)))
}

fn read_lines(
    stream: impl Read + Send + 'static,
    output: Arc<Output>,
    source: Option<Source>,
    stderr: bool,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&buf);
            let text = text.trim_end_matches(['\n', '\r']);
            match source {
                Some(s) => output.line(s, stderr, text),
                None => match untag(text) {
                    Some((rank, err, t)) => output.line(Source::Rank(rank), err, t),
                    None => output.line(Source::Mpirun, true, text),
                },
            }
        }
    })
}

/// Whether the effective user is root (Open MPI then needs `--allow-run-as-root`).
fn is_root() -> bool {
    // SAFETY: plain system call.
    unsafe { libc::geteuid() == 0 }
}

/// Refuses anything but Open MPI's `mpirun` (the flags below are Open MPI's).
fn check_mpirun(mpirun: &OsString) -> Result<(), LaunchError> {
    let out = Command::new(mpirun)
        .arg("--version")
        .output()
        .map_err(|e| {
            LaunchError::Invalid(format!(
                "{} cannot be run ({e}): the MPI backend needs Open MPI's mpirun on PATH \
             (Debian: apt-get install openmpi-bin); on GPUs use --backend nccl",
                mpirun.to_string_lossy()
            ))
        })?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !text.contains("Open MPI") && !text.contains("OpenRTE") {
        return Err(LaunchError::Invalid(format!(
            "{} is not Open MPI's ({}): the launcher drives Open MPI only; with another MPI \
             start the workers yourself (`mpiexec -n N upcycle train ...`: they read PMI_*)",
            mpirun.to_string_lossy(),
            text.lines().next().unwrap_or("").trim()
        )));
    }
    Ok(())
}

/// The `mpirun` command line that starts `spec.command` on `spec.nproc` workers of this
/// node, passing the job-wide variables `env` (`-x`, which multi-node runs need).
pub fn mpirun_command(spec: &LaunchSpec, env: &[(String, String)], root: bool) -> Vec<OsString> {
    let mut cmd: Vec<OsString> = vec![
        spec.mpirun.clone(),
        "-np".into(),
        spec.nproc.to_string().into(),
    ];
    // One node, possibly more workers than cores: no slot limit.
    cmd.push("--oversubscribe".into());
    if root {
        cmd.push("--allow-run-as-root".into());
    }
    // Each line tagged with its rank ([job,rank]<stdout>:), which the launcher rewrites.
    cmd.push("--tag-output".into());
    for (k, _) in env {
        cmd.push("-x".into());
        cmd.push(k.into());
    }
    cmd.extend(spec.command.iter().cloned());
    cmd
}

/// One attempt's processes.
struct Group {
    /// (pid, rank for a direct worker, status once ended).
    roots: Vec<(i32, Option<usize>, Option<WorkerStatus>)>,
    tree: Tree,
    readers: Vec<JoinHandle<()>>,
}

enum End {
    Success,
    Failed(Option<usize>, WorkerStatus, String),
    Interrupted(i32),
    /// Another node failed, or the job stops everywhere.
    Remote(News),
}

fn spawn_one(
    argv: &[OsString],
    vars: &[(String, String)],
    remove: &[&str],
    output: &Arc<Output>,
    rank: Option<usize>,
    readers: &mut Vec<JoinHandle<()>>,
) -> Result<i32, LaunchError> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for k in remove {
        cmd.env_remove(k);
    }
    cmd.envs(vars.iter().map(|(k, v)| (k, v)));
    // SAFETY: prctl is async-signal-safe. A launcher killed outright (SIGKILL) then takes
    // its workers (or mpirun, which ends its ranks on SIGTERM) with it.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| LaunchError::Spawn {
        what: argv[0].to_string_lossy().to_string(),
        source,
    })?;
    let source = rank.map(Source::Rank);
    readers.push(read_lines(
        child.stdout.take().unwrap(),
        output.clone(),
        source,
        false,
    ));
    readers.push(read_lines(
        child.stderr.take().unwrap(),
        output.clone(),
        source,
        true,
    ));
    // Reaped by waitpid in `watch` (dropping a Child neither waits nor kills).
    Ok(child.id() as i32)
}

/// `OMP_NUM_THREADS` for each of `nproc` workers spawned directly on this node, unless
/// the launcher's environment sets it: the cores this launcher may use divided among
/// them (at least 1), as torchrun does. Otherwise each worker's libtorch would start a
/// thread per core and the workers would oversubscribe the machine (`mpirun` binds its
/// ranks to cores instead).
fn threads_per_worker(nproc: usize) -> Option<(String, String)> {
    if nproc == 1 || std::env::var_os("OMP_NUM_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some(("OMP_NUM_THREADS".into(), (cores / nproc).max(1).to_string()))
}

impl Group {
    fn start(spec: &LaunchSpec, job: &JobEnv, output: &Arc<Output>) -> Result<Self, LaunchError> {
        let mut roots = Vec::new();
        let mut readers = Vec::new();
        match spec.spawn {
            Spawn::Direct => {
                let threads = threads_per_worker(spec.nproc);
                for local in 0..spec.nproc {
                    let rank = job.node * spec.nproc + local;
                    let mut vars = job.worker_vars(Spawn::Direct, local, spec.nproc);
                    vars.extend(threads.clone());
                    let pid = spawn_one(
                        &spec.command,
                        &vars,
                        &worker_env::MPI_IDENTITY,
                        output,
                        Some(rank),
                        &mut readers,
                    )?;
                    roots.push((pid, Some(rank), None));
                }
                let pids: Vec<String> = roots
                    .iter()
                    .map(|(pid, r, _)| format!("rank {} pid {pid}", r.unwrap()))
                    .collect();
                eprintln!("upcycle launch: workers started: {}", pids.join(", "));
            }
            Spawn::Mpirun => {
                let vars = job.job_vars();
                let argv = mpirun_command(spec, &vars, is_root());
                let pid = spawn_one(
                    &argv,
                    &vars,
                    &worker_env::PER_WORKER,
                    output,
                    None,
                    &mut readers,
                )?;
                roots.push((pid, None, None));
                eprintln!(
                    "upcycle launch: mpirun started: pid {pid}, {} workers",
                    spec.nproc
                );
            }
        }
        let tree = Tree::new(roots.iter().map(|r| r.0).collect());
        Ok(Group {
            roots,
            tree,
            readers,
        })
    }

    /// Reaps the roots that ended.
    fn reap(&mut self) {
        for (pid, _, status) in &mut self.roots {
            if status.is_none() {
                let mut s = 0;
                // SAFETY: waiting on our own child without blocking.
                if unsafe { libc::waitpid(*pid, &mut s, libc::WNOHANG) } == *pid {
                    *status = Some(WorkerStatus::from_wait(s));
                }
            }
        }
    }

    /// Watches the group until it ends; `news` is asked every few tenths of a second
    /// whether something elsewhere ends the attempt.
    fn watch(
        &mut self,
        spec: &LaunchSpec,
        output: &Output,
        news: &mut dyn FnMut() -> Option<News>,
    ) -> End {
        let mut last_scan = Instant::now();
        let mut last_news = Instant::now();
        let (mut peak, mut left_at, mut announced) = (0, None::<Instant>, false);
        loop {
            if let Some(sig) = stop_requested() {
                return End::Interrupted(sig);
            }
            if last_news.elapsed() >= Duration::from_millis(250) {
                last_news = Instant::now();
                if let Some(n) = news() {
                    return End::Remote(n);
                }
            }
            self.reap();
            match spec.spawn {
                Spawn::Direct => {
                    if let Some((_, rank, status)) =
                        self.roots.iter().find(|r| r.2.is_some_and(|s| !s.ok()))
                    {
                        return End::Failed(*rank, status.unwrap(), String::new());
                    }
                    if self.roots.iter().all(|r| r.2.is_some()) {
                        return End::Success;
                    }
                }
                Spawn::Mpirun => match self.roots[0].2 {
                    Some(s) if s.ok() => return End::Success,
                    Some(s) => {
                        // mpirun's report may still be on its way through the pipe.
                        self.wait_readers(Duration::from_secs(2));
                        let lines = output.state.lock().unwrap().mpirun_lines.clone();
                        return match mpirun_failure(&lines) {
                            Some((rank, status)) => End::Failed(Some(rank), status, String::new()),
                            None => End::Failed(None, s, "mpirun's status".into()),
                        };
                    }
                    None if last_scan.elapsed() >= Duration::from_millis(200) => {
                        last_scan = Instant::now();
                        let mpirun = self.roots[0].0;
                        let ranks = self.tree.children_of(mpirun);
                        if !announced && ranks.len() == spec.nproc {
                            announced = true;
                            let mut named: Vec<(usize, i32)> = ranks
                                .iter()
                                .filter_map(|&p| {
                                    Some((
                                        procs::environ_var(p, "OMPI_COMM_WORLD_RANK")?
                                            .parse()
                                            .ok()?,
                                        p,
                                    ))
                                })
                                .collect();
                            named.sort();
                            let pids: Vec<String> = named
                                .iter()
                                .map(|(r, p)| format!("rank {r} pid {p}"))
                                .collect();
                            eprintln!("upcycle launch: workers started: {}", pids.join(", "));
                        }
                        peak = peak.max(ranks.len());
                        if ranks.len() < peak {
                            let since = *left_at.get_or_insert_with(Instant::now);
                            if since.elapsed() >= spec.hang_grace {
                                return End::Failed(
                                    None,
                                    WorkerStatus::Hung,
                                    format!(
                                        "a worker ended but mpirun kept the job up for {} s",
                                        spec.hang_grace.as_secs()
                                    ),
                                );
                            }
                        }
                    }
                    None => {}
                },
            }
            if last_scan.elapsed() >= Duration::from_millis(200) {
                last_scan = Instant::now();
                self.tree.refresh();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM to everything of the group still running, SIGKILL after `grace`.
    fn stop(&mut self, grace: Duration) {
        for (signal, wait) in [
            (libc::SIGTERM, grace),
            (libc::SIGKILL, Duration::from_secs(10)),
        ] {
            self.reap();
            if self.tree.alive().is_empty() {
                return;
            }
            self.tree.signal(signal);
            let t = Instant::now();
            while t.elapsed() < wait {
                self.reap();
                if self.tree.alive().is_empty() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Waits (at most `limit`) for the output of the ended processes to be read.
    fn wait_readers(&mut self, limit: Duration) {
        let t = Instant::now();
        while t.elapsed() < limit && !self.readers.iter().all(|r| r.is_finished()) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `spec` to the end: `Ok` when every worker of one attempt succeeded.
pub fn launch(spec: &LaunchSpec) -> Result<(), LaunchError> {
    if spec.command.is_empty() {
        return Err(LaunchError::Invalid(
            "no command to launch: give it after `--`, e.g. `upcycle launch --nproc-per-node 2 -- train ...`".into(),
        ));
    }
    if spec.nproc == 0 {
        return Err(LaunchError::Invalid(
            "--nproc-per-node 0: at least one worker is needed".into(),
        ));
    }
    if spec.nnodes == 0 || spec.node_rank >= spec.nnodes {
        return Err(LaunchError::Invalid(format!(
            "--node-rank {} with --nnodes {}: the node rank must be below the node count",
            spec.node_rank, spec.nnodes
        )));
    }
    if spec.spawn == Spawn::Mpirun {
        if spec.nnodes > 1 {
            return Err(LaunchError::Invalid(format!(
                "--nnodes {} with the MPI backend: mpirun starts every node's workers itself; \
                 write a job script (--emit mpirun or --emit slurm), or run one launcher per \
                 node with --backend tcp (CPU) or --backend nccl (GPU)",
                spec.nnodes
            )));
        }
        check_mpirun(&spec.mpirun)?;
    }
    if let Some(dir) = &spec.log_dir {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    }
    let output = Arc::new(Output {
        log_dir: spec.log_dir.clone(),
        tail_lines: spec.tail_lines,
        state: Mutex::new(OutputState::default()),
    });
    // Workers spawned directly in a world of several meet through the store.
    let rdzv = if spec.spawn == Spawn::Direct && spec.nproc * spec.nnodes > 1 {
        Some(Rendezvous::join(spec)?)
    } else {
        None
    };
    let result = attempts(spec, &output, rdzv.as_ref());
    if let Some(r) = rdzv {
        match &result {
            // Every node sees the restarts run out by itself.
            Ok(()) | Err(LaunchError::Failed(_)) => {}
            Err(e) => r.abort(&e.to_string()),
        }
        r.leave(spec.stop_grace + Duration::from_secs(15));
    }
    result
}

/// The attempts of a launch, until one succeeds or the restarts run out.
fn attempts(
    spec: &LaunchSpec,
    output: &Arc<Output>,
    rdzv: Option<&Rendezvous>,
) -> Result<(), LaunchError> {
    for attempt in 0..=spec.max_restarts {
        if let Some(r) = rdzv {
            r.start_attempt(attempt)?;
            if attempt > 0 {
                // Every node is past the failed attempt: its failures are all reported.
                eprintln!(
                    "upcycle launch: {}; all workers stopped; restart {attempt} of {}",
                    r.failures(attempt - 1),
                    spec.max_restarts
                );
            }
        }
        let job = JobEnv {
            master_addr: spec.master_addr.clone(),
            master_port: rdzv.map_or(spec.master_port, |r| r.master_port),
            restart_count: attempt,
            max_restarts: spec.max_restarts,
            node: spec.node_rank,
            nnodes: spec.nnodes,
            token: rdzv.map(|r| r.token.clone()),
        };
        output.begin_attempt(attempt);
        let mut group = Group::start(spec, &job, output)?;
        let mut news = || {
            let r = rdzv?;
            match r.news(attempt) {
                Ok(n) => n,
                Err(e) => Some(News::Abort(e.to_string())),
            }
        };
        let end = group.watch(spec, output, &mut news);
        group.stop(spec.stop_grace);
        group.wait_readers(Duration::from_secs(2));
        let end = match (end, rdzv) {
            // Every node's workers must have succeeded.
            (End::Success, Some(r)) => r.finish(attempt)?.map_or(End::Success, End::Remote),
            (end, _) => end,
        };
        match end {
            End::Success => return Ok(()),
            End::Interrupted(sig) => return Err(LaunchError::Interrupted(sig)),
            End::Remote(News::Abort(why)) => {
                return Err(LaunchError::Rendezvous(format!(
                    "the job stopped: {why}; every worker of this node was stopped"
                )))
            }
            End::Remote(News::Restart) => {
                let r = rdzv.expect("news come from the rendezvous");
                if attempt < spec.max_restarts {
                    continue;
                }
                return Err(LaunchError::Rendezvous(format!(
                    "{}; every worker of this node was stopped; no restart left ({attempt} \
                     used; --max-restarts raises the limit)",
                    r.failures(attempt)
                )));
            }
            End::Failed(rank, status, reason) => {
                let who = rank.map_or("a worker".into(), |r| format!("rank {r}"));
                if let Some(r) = rdzv {
                    r.fail(attempt, &format!("{who} {status}"))?;
                    if attempt < spec.max_restarts {
                        // Announced once every node is back (with every node's failure).
                        continue;
                    }
                }
                if attempt < spec.max_restarts {
                    eprintln!(
                        "upcycle launch: {who} {status}; all workers stopped; restart {} of {}",
                        attempt + 1,
                        spec.max_restarts
                    );
                    continue;
                }
                return Err(LaunchError::Failed(Box::new(Failure {
                    rank,
                    status,
                    reason,
                    restarts: attempt,
                    tail: output.tail(rank),
                })));
            }
        }
    }
    unreachable!("the last attempt returns")
}

#[cfg(test)]
mod tests {
    use super::*;
    use upcycle_parallel::testing::free_port;

    fn sh(script: &str, nproc: usize) -> LaunchSpec {
        let mut spec = LaunchSpec::new(
            vec!["sh".into(), "-c".into(), script.into()],
            nproc,
            Spawn::Direct,
        );
        spec.stop_grace = Duration::from_secs(2);
        // Several direct workers get a rendezvous store: any free port.
        spec.master_port = 0;
        spec
    }

    #[test]
    fn mpirun_output_and_reports_are_parsed() {
        assert_eq!(untag("[1,3]<stdout>:loss 2"), Some((3, false, "loss 2")));
        assert_eq!(untag("[7,0]<stderr>:"), Some((0, true, "")));
        assert_eq!(untag("plain"), None);
        let killed = [
            "mpirun noticed that process rank 1 with PID 0 on node vm exited on signal 9 (Killed)."
                .to_string(),
        ];
        assert_eq!(mpirun_failure(&killed), Some((1, WorkerStatus::Signal(9))));
        let code: Vec<String> = [
            "the job to be terminated. The first process to do so was:",
            "",
            "  Process name: [[29412,1],1]",
            "  Exit code:    3",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(mpirun_failure(&code), Some((1, WorkerStatus::Code(3))));
        assert_eq!(mpirun_failure(&[]), None);
        let spec = LaunchSpec::new(vec!["upcycle".into(), "train".into()], 2, Spawn::Mpirun);
        let argv = mpirun_command(&spec, &[("MASTER_PORT".into(), "1".into())], true);
        let argv: Vec<String> = argv
            .iter()
            .map(|a| a.to_string_lossy().to_string())
            .collect();
        assert_eq!(
            argv.join(" "),
            "mpirun -np 2 --oversubscribe --allow-run-as-root --tag-output -x MASTER_PORT upcycle train"
        );
    }

    #[test]
    fn direct_workers_get_their_identity_and_their_output_is_logged_by_rank() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = sh(
            "echo \"rank=$RANK local=$LOCAL_RANK world=$WORLD_SIZE restart=$UPCYCLE_RESTART_COUNT \
             threads=$OMP_NUM_THREADS\"",
            3,
        );
        spec.log_dir = Some(dir.path().into());
        launch(&spec).unwrap();
        for r in 0..3 {
            let log = std::fs::read_to_string(dir.path().join(format!("rank-{r}.log"))).unwrap();
            assert_eq!(
                log,
                format!(
                    "--- attempt 0 ---\nrank={r} local={r} world=3 restart=0 threads={}\n",
                    std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| {
                        let cores = std::thread::available_parallelism().unwrap().get();
                        (cores / 3).max(1).to_string()
                    })
                )
            );
        }
    }

    #[test]
    fn a_failing_group_is_restarted_then_reported_with_its_status_and_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let marks = dir.path().display();
        // Rank 1 fails on the first attempt only; rank 0 would run for a minute if it were
        // not stopped.
        let mut spec = sh(
            &format!(
                "touch {marks}/$RANK-$UPCYCLE_RESTART_COUNT; \
                 if [ $RANK = 1 ] && [ $UPCYCLE_RESTART_COUNT = 0 ]; then exit 3; fi; \
                 if [ $RANK = 0 ] && [ $UPCYCLE_RESTART_COUNT = 0 ]; then sleep 60; fi"
            ),
            2,
        );
        spec.max_restarts = 1;
        let t = Instant::now();
        launch(&spec).unwrap();
        assert!(t.elapsed() < Duration::from_secs(20), "rank 0 was stopped");
        for m in ["0-0", "1-0", "0-1", "1-1"] {
            assert!(dir.path().join(m).exists(), "{m}");
        }

        // Always failing: the restarts run out; the error names rank, status and output.
        let mut spec = sh(
            "echo step 1; echo \"fatal on $RANK\" >&2; if [ $RANK = 1 ]; then exit 4; fi; sleep 60",
            2,
        );
        spec.max_restarts = 2;
        let e = launch(&spec).unwrap_err();
        assert_eq!(e.exit_code(), 4);
        let LaunchError::Failed(f) = &e else {
            panic!("{e}")
        };
        assert_eq!(
            (f.rank, f.status, f.restarts),
            (Some(1), WorkerStatus::Code(4), 2)
        );
        assert!(f.tail.contains(&"fatal on 1".to_string()), "{:?}", f.tail);
        let text = e.to_string();
        assert!(
            text.contains("rank 1 exited with status 4") && text.contains("--max-restarts"),
            "{text}"
        );

        // Killed by a signal: 128 + the signal.
        let e = launch(&sh("kill -9 $$", 1)).unwrap_err();
        assert_eq!(e.exit_code(), 137);
    }

    /// Runs `spec` as node `node` of `nnodes` (on a thread: the launchers of one job).
    fn node(
        spec: &LaunchSpec,
        node: usize,
        nnodes: usize,
        port: u16,
    ) -> std::thread::JoinHandle<Result<(), LaunchError>> {
        let mut spec = spec.clone();
        spec.nnodes = nnodes;
        spec.node_rank = node;
        spec.master_port = port;
        spec.token = Some("a-test-token-of-this-job".into());
        std::thread::spawn(move || launch(&spec))
    }

    #[test]
    fn launchers_of_several_nodes_form_one_world_and_restart_together() {
        let dir = tempfile::tempdir().unwrap();
        let marks = dir.path().display();
        // Rank 3 (node 1) fails on the first attempt only; the others would run for a
        // minute if they were not stopped: node 0's workers must be stopped too.
        let mut spec = sh(
            &format!(
                "echo \"$RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $GROUP_RANK $MASTER_PORT\" \
                 > {marks}/$RANK-$UPCYCLE_RESTART_COUNT; \
                 test -n \"$UPCYCLE_RDZV_TOKEN\" || exit 9; \
                 if [ $RANK = 3 ] && [ $UPCYCLE_RESTART_COUNT = 0 ]; then sleep 1; exit 3; fi; \
                 if [ $UPCYCLE_RESTART_COUNT = 0 ]; then sleep 60; fi"
            ),
            2,
        );
        spec.max_restarts = 1;
        let port = free_port();
        let t = Instant::now();
        let nodes = [node(&spec, 0, 2, port), node(&spec, 1, 2, port)];
        for n in nodes {
            n.join().unwrap().unwrap();
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        for rank in 0..4 {
            for attempt in 0..2 {
                let m = std::fs::read_to_string(dir.path().join(format!("{rank}-{attempt}")))
                    .unwrap_or_else(|_| panic!("rank {rank} attempt {attempt} did not run"));
                assert_eq!(
                    m.trim(),
                    format!("{rank} {} 4 2 {} {port}", rank % 2, rank / 2)
                );
            }
        }

        // Always failing on node 1: both launchers stop when the restarts run out, node 1
        // with its worker's status, node 0 naming node 1's failure.
        let mut spec = sh("if [ $GROUP_RANK = 1 ]; then exit 5; fi; sleep 60", 1);
        spec.max_restarts = 1;
        let port = free_port();
        let nodes = [node(&spec, 0, 2, port), node(&spec, 1, 2, port)];
        let [zero, one] = nodes.map(|n| n.join().unwrap().unwrap_err());
        assert_eq!(one.exit_code(), 5, "{one}");
        let zero = zero.to_string();
        assert!(
            zero.contains("node 1: rank 1 exited with status 5")
                && zero.contains("no restart left"),
            "{zero}"
        );
    }

    #[test]
    fn a_node_that_never_joins_is_named_and_bad_node_settings_are_refused() {
        let mut spec = sh("true", 1);
        spec.join_timeout = Duration::from_secs(1);
        let t = Instant::now();
        let e = node(&spec, 0, 3, free_port()).join().unwrap().unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(10));
        let text = e.to_string();
        assert!(
            text.contains("node(s) 1, 2 did not join within 1 s") && text.contains("joined: 0"),
            "{text}"
        );
        let e = node(&spec, 2, 2, free_port()).join().unwrap().unwrap_err();
        assert!(e.to_string().contains("--node-rank 2"), "{e}");
        let e = node(&spec, 0, 2, 0).join().unwrap().unwrap_err();
        assert!(e.to_string().contains("--master-port 0"), "{e}");
        let mut unsafe_token = spec.clone();
        unsafe_token.nnodes = 2;
        let e = launch(&unsafe_token).unwrap_err().to_string();
        assert!(e.contains("UPCYCLE_RDZV_TOKEN"), "{e}");
    }

    #[test]
    fn an_mpirun_that_keeps_its_job_up_after_a_worker_ended_is_stopped_as_hung() {
        // A stand-in for mpirun: passes the version check, starts two "ranks", one of
        // which ends at once while mpirun waits for the other forever.
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("mpirun");
        std::fs::write(
            &fake,
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'mpirun (Open MPI) 4.1.4'; exit 0; fi\n\
             sleep 60 &\nsleep 0.5 &\nwait\n",
        )
        .unwrap();
        Command::new("chmod").arg("+x").arg(&fake).status().unwrap();
        let mut spec = LaunchSpec::new(vec!["true".into()], 2, Spawn::Mpirun);
        spec.mpirun = fake.into_os_string();
        spec.hang_grace = Duration::from_secs(1);
        spec.stop_grace = Duration::from_millis(200);
        let t = Instant::now();
        let e = launch(&spec).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(20));
        let LaunchError::Failed(f) = &e else {
            panic!("{e}")
        };
        assert_eq!(f.status, WorkerStatus::Hung);
        assert!(e.to_string().contains("mpirun kept the job up"), "{e}");
    }

    #[test]
    fn stopping_leaves_no_process_of_the_group() {
        // A worker that ignores SIGTERM and starts a child of its own: both are killed.
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        let mut spec = sh(
            &format!(
                "trap '' TERM; sleep 60 & echo $! >> {p}; echo $$ >> {p}; \
                 if [ $RANK = 1 ]; then sleep 1; exit 2; fi; wait",
                p = pids.display()
            ),
            2,
        );
        spec.stop_grace = Duration::from_millis(500);
        assert!(launch(&spec).is_err());
        let pids: Vec<i32> = std::fs::read_to_string(&pids)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        assert_eq!(pids.len(), 4);
        for pid in pids {
            assert!(
                !std::path::Path::new(&format!("/proc/{pid}")).exists()
                    || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .unwrap()
                        .contains(") Z"),
                "{pid} is still running"
            );
        }
    }
}
