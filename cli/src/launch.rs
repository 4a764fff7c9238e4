//! `upcycle launch`: supervised workers, staged plans, cluster job scripts; the glue
//! between the command line and `upcycle-launch` (which knows nothing about training).

use std::path::PathBuf;

use clap::Args;

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum BackendArg {
    /// Workers under one `mpirun` job (CPU; on GPUs they still talk NCCL). One node.
    Mpi,
    /// Workers spawned directly, talking over TCP through the launcher's rendezvous (CPU;
    /// no MPI needed; one launcher per node).
    Tcp,
    /// Workers spawned directly, one GPU each, talking NCCL (its id through the
    /// launcher's rendezvous; one launcher per node).
    Nccl,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum EmitKind {
    /// An sbatch script whose workers `srun` starts.
    Slurm,
    /// A script that starts the workers with `mpirun --hostfile`.
    Mpirun,
}

#[derive(Args)]
pub(crate) struct LaunchArgs {
    /// Workers on this node (default 1; with --emit, the workers per node of the script).
    #[arg(long)]
    pub(crate) nproc_per_node: Option<usize>,
    /// Nodes, each with its own launcher (--backend tcp or nccl; give each --node-rank and
    /// the same UPCYCLE_RDZV_TOKEN); with --emit, the nodes of the job script.
    #[arg(long, default_value_t = 1)]
    pub(crate) nnodes: usize,
    /// This node's index, 0 to nnodes-1 (node 0's launcher hosts the rendezvous store).
    #[arg(long, default_value_t = 0)]
    pub(crate) node_rank: usize,
    /// Restarts of the whole group after a worker fails (each from the latest checkpoint).
    #[arg(long, default_value_t = 0)]
    pub(crate) max_restarts: u32,
    /// How workers talk.
    #[arg(long, value_enum, default_value = "mpi")]
    pub(crate) backend: BackendArg,
    /// MASTER_ADDR given to the workers: node 0, where the rendezvous store listens.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) master_addr: String,
    /// MASTER_PORT given to the workers: the rendezvous store's port (0: any free one, on
    /// one node).
    #[arg(long, default_value_t = 29500)]
    pub(crate) master_port: u16,
    /// Node 0: the address its rendezvous store listens on (default: --master-addr;
    /// 0.0.0.0 for every interface).
    #[arg(long)]
    pub(crate) store_bind: Option<String>,
    /// Seconds the launchers wait for each other (joining, restarting together).
    #[arg(long, default_value_t = 600.0)]
    pub(crate) join_timeout_s: f64,
    /// Also write each rank's output to DIR/rank-<r>.log.
    #[arg(long)]
    pub(crate) log_dir: Option<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when stopping workers.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) stop_grace_s: f64,
    /// Run the stages of this plan file (see launch/README.md) instead of one command.
    #[arg(long)]
    pub(crate) plan: Option<PathBuf>,
    /// Write a job script for the command or plan instead of running it.
    #[arg(long, value_enum)]
    pub(crate) emit: Option<EmitKind>,
    /// Where --emit writes the script (default: standard output).
    #[arg(long)]
    pub(crate) script: Option<PathBuf>,
    /// --emit slurm: GPUs per node.
    #[arg(long, default_value_t = 0)]
    pub(crate) gpus_per_node: usize,
    /// --emit: the job's name.
    #[arg(long, default_value = "upcycle")]
    pub(crate) job_name: String,
    /// --emit slurm: time limit (sbatch --time).
    #[arg(long)]
    pub(crate) time: Option<String>,
    /// --emit slurm: partition.
    #[arg(long)]
    pub(crate) partition: Option<String>,
    /// The upcycle subcommand the workers run, after `--` (e.g. `-- train --config ...`).
    #[arg(last = true)]
    pub(crate) command: Vec<String>,
}

/// Launches, and on failure ends the process with the launcher's exit status (the
/// failing worker's).
pub(crate) fn run(a: LaunchArgs) -> anyhow::Result<()> {
    if let Err(e) = launch(a) {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
    Ok(())
}

/// `upcycle launch`: its own exit statuses (the failing worker's), hence its own error type.
fn launch(a: LaunchArgs) -> std::result::Result<(), upcycle_launch::LaunchError> {
    use upcycle_launch::{plan::Plan, Backend, LaunchError, LaunchSpec};
    let invalid = |m: &str| Err(LaunchError::Invalid(m.into()));
    let program = std::env::current_exe().map_err(|source| LaunchError::Spawn {
        what: "the upcycle binary's own path".into(),
        source,
    })?;
    let plan =
        match (&a.plan, a.command.is_empty()) {
            (Some(_), false) => return invalid(
                "--plan and a command after `--` were both given: the plan names its commands; \
                 give one of them",
            ),
            (None, true) => {
                return invalid(
                    "nothing to launch: give a command after `--` (e.g. `upcycle launch \
                 --nproc-per-node 2 -- train --config C --data D --out O`) or --plan FILE",
                )
            }
            (Some(p), true) => Some(Plan::load(p)?),
            (None, false) => None,
        };
    if a.command
        .first()
        .is_some_and(|c| c == "launch" || c == "upcycle")
    {
        return invalid(
            "the command after `--` is an upcycle subcommand (train, eval, convert ...), \
             not `launch` or `upcycle`",
        );
    }
    let nproc = a.nproc_per_node.unwrap_or(1);
    let backend = match a.backend {
        BackendArg::Mpi => Backend::Mpi,
        BackendArg::Tcp => Backend::Tcp,
        BackendArg::Nccl => Backend::Nccl,
    };
    if let Some(kind) = a.emit {
        return write_job_script(kind, &a, plan.as_ref(), nproc, &program);
    }
    if a.nnodes > 1 && plan.is_some() {
        return invalid(&format!(
            "--nnodes {} with --plan: a plan runs on one node; run each stage as its own \
             `upcycle launch --nnodes ...` on every node, or write a job script (--emit slurm)",
            a.nnodes
        ));
    }
    if a.nnodes > 1 && matches!(a.backend, BackendArg::Mpi) {
        return invalid(&format!(
            "--nnodes {} with --backend mpi: mpirun starts every node's workers itself; use \
             --backend tcp (CPU) or --backend nccl (GPU) with one launcher per node, or write \
             a job script (--emit mpirun or --emit slurm)",
            a.nnodes
        ));
    }
    if !(a.stop_grace_s >= 0.0 && a.stop_grace_s.is_finite()) {
        return invalid("--stop-grace-s must be a number of seconds, 0 or more");
    }
    if !(a.join_timeout_s > 0.0 && a.join_timeout_s.is_finite()) {
        return invalid("--join-timeout-s must be a positive number of seconds");
    }
    upcycle_launch::install_signal_handlers();
    let mut spec = LaunchSpec::new(Vec::new(), nproc, backend.spawn(nproc)?);
    spec.max_restarts = a.max_restarts;
    spec.master_addr = a.master_addr;
    spec.master_port = a.master_port;
    spec.nnodes = a.nnodes;
    spec.node_rank = a.node_rank;
    spec.store_bind = a.store_bind;
    spec.join_timeout = std::time::Duration::from_secs_f64(a.join_timeout_s);
    spec.token = std::env::var(upcycle_parallel::store::TOKEN_VAR)
        .ok()
        .filter(|t| !t.is_empty());
    spec.log_dir = a.log_dir;
    spec.stop_grace = std::time::Duration::from_secs_f64(a.stop_grace_s);
    match plan {
        Some(p) => p.run(&program, &spec),
        None => {
            spec.command = std::iter::once(program.into_os_string())
                .chain(a.command.iter().map(Into::into))
                .collect();
            upcycle_launch::launch(&spec)
        }
    }
}

/// `--emit`: the SLURM or mpirun job script for the command or the plan, to `--script`
/// or stdout.
fn write_job_script(
    kind: EmitKind,
    a: &LaunchArgs,
    plan: Option<&upcycle_launch::plan::Plan>,
    nproc: usize,
    program: &std::path::Path,
) -> std::result::Result<(), upcycle_launch::LaunchError> {
    use upcycle_launch::{emit, LaunchError};
    let (stages, state_dir) = match plan {
        Some(p) => (
            emit::plan_stages(p),
            p.out.join("job-state").display().to_string(),
        ),
        None => (
            vec![emit::ScriptStage {
                name: a.command[0].clone(),
                nproc: nproc * a.nnodes,
                args: a.command.clone(),
            }],
            "upcycle-job-state".into(),
        ),
    };
    let script = emit::job_script(
        &stages,
        &emit::JobOptions {
            kind: match kind {
                EmitKind::Slurm => emit::ScriptKind::Slurm,
                EmitKind::Mpirun => emit::ScriptKind::Mpirun,
            },
            job_name: a.job_name.clone(),
            nproc_per_node: a.nproc_per_node,
            gpus_per_node: a.gpus_per_node,
            time: a.time.clone(),
            partition: a.partition.clone(),
            max_restarts: plan.map_or(a.max_restarts, |p| p.max_restarts),
            upcycle: program.display().to_string(),
            state_dir,
            master_port: a.master_port,
        },
    )?;
    match &a.script {
        Some(path) => {
            std::fs::write(path, script).map_err(|source| LaunchError::Io {
                path: path.clone(),
                source,
            })?;
            eprintln!("job script: {}", path.display());
        }
        None => print!("{script}"),
    }
    Ok(())
}
