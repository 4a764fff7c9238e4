//! Cluster job scripts for the same stages the launcher runs: a SLURM `sbatch` script
//! (workers started by `srun`, which read `SLURM_*`) or a plain `mpirun` script with a
//! hostfile. Both come from `launch/templates/job.sh`: restarts and skipped finished
//! stages are done by the script itself, since on a cluster `srun`/`mpirun` start the
//! workers, not the launcher.

use crate::plan::Plan;
use crate::LaunchError;

const TEMPLATE: &str = include_str!("../templates/job.sh");

/// Which script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptKind {
    /// `sbatch` header and `srun` lines.
    Slurm,
    /// `mpirun --hostfile` lines.
    Mpirun,
}

/// One group of workers in the script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptStage {
    /// Name (the finished-stage marker's).
    pub name: String,
    /// Workers in all.
    pub nproc: usize,
    /// The `upcycle` arguments.
    pub args: Vec<String>,
}

/// The script's settings.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Which script.
    pub kind: ScriptKind,
    /// `#SBATCH --job-name`.
    pub job_name: String,
    /// Workers per node (default: the largest stage's, on one node).
    pub nproc_per_node: Option<usize>,
    /// GPUs per node (`#SBATCH --gpus-per-node`; 0: none).
    pub gpus_per_node: usize,
    /// `#SBATCH --time`, if given.
    pub time: Option<String>,
    /// `#SBATCH --partition`, if given.
    pub partition: Option<String>,
    /// Restarts of a failing stage.
    pub max_restarts: u32,
    /// The `upcycle` binary on the cluster (the script's `UPCYCLE`, overridable).
    pub upcycle: String,
    /// Where finished-stage markers go.
    pub state_dir: String,
    /// `MASTER_PORT`.
    pub master_port: u16,
}

/// The stages of a plan, as the script runs them.
pub fn plan_stages(plan: &Plan) -> Vec<ScriptStage> {
    plan.stages
        .iter()
        .map(|s| ScriptStage {
            name: s.name.clone(),
            nproc: s.nproc,
            args: s.args(),
        })
        .collect()
}

/// `s` as one shell word.
pub fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_./=:,+-@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The job script running `stages` in order.
pub fn job_script(stages: &[ScriptStage], o: &JobOptions) -> Result<String, LaunchError> {
    let largest =
        stages.iter().map(|s| s.nproc).max().ok_or_else(|| {
            LaunchError::Invalid("nothing to put in the job script: no stage".into())
        })?;
    let per_node = o.nproc_per_node.unwrap_or(largest);
    if per_node == 0 {
        return Err(LaunchError::Invalid(
            "--nproc-per-node 0: a node needs at least one worker".into(),
        ));
    }
    let nodes = largest.div_ceil(per_node);
    let (kind, launcher, header, setup, run) = match o.kind {
        ScriptKind::Slurm => {
            let mut h = vec![
                format!("#SBATCH --job-name={}", shell_quote(&o.job_name)),
                format!("#SBATCH --nodes={nodes}"),
                format!("#SBATCH --ntasks-per-node={per_node}"),
            ];
            if o.gpus_per_node > 0 {
                h.push(format!("#SBATCH --gpus-per-node={}", o.gpus_per_node));
            }
            if let Some(t) = &o.time {
                h.push(format!("#SBATCH --time={}", shell_quote(t)));
            }
            if let Some(p) = &o.partition {
                h.push(format!("#SBATCH --partition={}", shell_quote(p)));
            }
            h.push("#SBATCH --output=upcycle-%j.out".into());
            (
                "slurm",
                "srun; workers read SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID",
                h.join("\n"),
                "export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)}\n\
                 # srun's MPI plugin (Open MPI built with Slurm support: pmix).\n\
                 SRUN_MPI=${SRUN_MPI:-pmix}"
                    .to_string(),
                "srun --ntasks=\"$nproc\" --mpi=\"$SRUN_MPI\" --kill-on-bad-exit=1 --export=ALL",
            )
        }
        ScriptKind::Mpirun => (
            "mpirun",
            "mpirun over HOSTFILE; workers read OMPI_COMM_WORLD_*",
            format!(
                "# Run: HOSTFILE=hosts bash {}.sh ({nodes} node(s), {per_node} worker(s) each: \
                 one line `HOST slots={per_node}` per node).",
                o.job_name
            ),
            "HOSTFILE=${HOSTFILE:-hostfile}\n\
             # More mpirun flags, e.g. --allow-run-as-root or --oversubscribe.\n\
             MPIRUN_FLAGS=${MPIRUN_FLAGS:-}\n\
             export MASTER_ADDR=${MASTER_ADDR:-$(hostname)}"
                .to_string(),
            "mpirun -np \"$nproc\" --hostfile \"$HOSTFILE\" $MPIRUN_FLAGS --tag-output \
             -x MASTER_ADDR -x MASTER_PORT -x UPCYCLE_RESTART_COUNT -x TORCHELASTIC_RESTART_COUNT \
             -x TORCHELASTIC_MAX_RESTARTS",
        ),
    };
    let lines: Vec<String> = stages
        .iter()
        .map(|s| {
            let args: Vec<String> = s.args.iter().map(|a| shell_quote(a)).collect();
            format!(
                "run_stage {} {} {}",
                shell_quote(&s.name),
                s.nproc,
                args.join(" ")
            )
        })
        .collect();
    Ok(TEMPLATE
        .replace("{{KIND}}", kind)
        .replace("{{LAUNCHER}}", launcher)
        .replace("{{HEADER}}", &header)
        .replace("{{SETUP}}", &setup)
        .replace("{{RUN_WORKERS}}", run)
        .replace("{{UPCYCLE}}", &shell_quote(&o.upcycle))
        .replace("{{STATE_DIR}}", &shell_quote(&o.state_dir))
        .replace("{{MAX_RESTARTS}}", &o.max_restarts.to_string())
        .replace("{{MASTER_PORT}}", &o.master_port.to_string())
        .replace("{{STAGES}}", &lines.join("\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_words_whole() {
        assert_eq!(shell_quote("runs/a-1"), "runs/a-1");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn slurm_header_counts_nodes_and_gpus() {
        let stages = [
            ScriptStage {
                name: "frozen".into(),
                nproc: 2,
                args: vec!["train".into(), "--out".into(), "runs/x y".into()],
            },
            ScriptStage {
                name: "full".into(),
                nproc: 8,
                args: vec!["train".into()],
            },
        ];
        let o = JobOptions {
            kind: ScriptKind::Slurm,
            job_name: "ume".into(),
            nproc_per_node: Some(4),
            gpus_per_node: 4,
            time: Some("04:00:00".into()),
            partition: None,
            max_restarts: 2,
            upcycle: "/opt/upcycle".into(),
            state_dir: "runs/state".into(),
            master_port: 29500,
        };
        let s = job_script(&stages, &o).unwrap();
        for want in [
            "#SBATCH --nodes=2\n",
            "#SBATCH --ntasks-per-node=4\n",
            "#SBATCH --gpus-per-node=4\n",
            "#SBATCH --time=04:00:00\n",
            "run_stage frozen 2 train --out 'runs/x y'\n",
            "run_stage full 8 train",
            "MAX_RESTARTS=${MAX_RESTARTS:-2}",
        ] {
            assert!(s.contains(want), "{want:?} in\n{s}");
        }
        assert!(!s.contains("{{"), "{s}");
    }
}
