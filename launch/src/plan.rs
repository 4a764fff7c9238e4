//! Staged plans: a YAML file of stages run in order, each an `upcycle` command on its own
//! number of workers (see `launch/README.md` for the format and
//! `launch/examples/ume-plan.yaml`).
//!
//! A stage refers to an earlier stage's output by plain paths (`--init` of a train stage
//! is the previous stage's `--out`). Finished stages are recorded in `<out>/plan-state.json`
//! (written atomically) and skipped when the plan is run again; a stage that failed is
//! simply run again, and a train stage then continues from its own `--out`'s latest
//! checkpoint (the trainer prefers it over `--init`).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use upcycle_files::atomic;

use crate::{io_error, launch, Backend, LaunchError, LaunchSpec};

/// A plan file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The plan's folder: `plan-state.json` and `logs/<stage>/rank-<r>.log` go here.
    pub out: PathBuf,
    /// Restarts of a failing stage (a stage's own `max_restarts` overrides it).
    #[serde(default)]
    pub max_restarts: u32,
    /// The stages, run in this order.
    pub stages: Vec<Stage>,
}

/// One stage: an `upcycle` command on `nproc` workers.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// Unique name (letters, digits, `-`, `_`, `.`): the state file and log folder use it.
    pub name: String,
    /// Workers (default 1).
    #[serde(default = "one")]
    pub nproc: usize,
    /// Expert-parallel size of a `train` stage (adds `--ep N`).
    #[serde(default)]
    pub ep: Option<usize>,
    /// How workers talk (default mpi).
    #[serde(default)]
    pub backend: Option<Backend>,
    /// Restarts of this stage (default: the plan's).
    #[serde(default)]
    pub max_restarts: Option<u32>,
    /// The `upcycle` subcommand and its arguments, e.g. `[train, --config, c.yaml, ...]`.
    pub command: Vec<String>,
}

fn one() -> usize {
    1
}

impl Stage {
    /// The arguments after the `upcycle` program: the command, then `--ep N` if set.
    pub fn args(&self) -> Vec<String> {
        let mut args = self.command.clone();
        if let Some(ep) = self.ep {
            args.extend(["--ep".to_string(), ep.to_string()]);
        }
        args
    }
}

/// A finished stage as recorded: what ran, so a changed stage is noticed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
struct Finished {
    name: String,
    nproc: usize,
    args: Vec<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
struct State {
    finished: Vec<Finished>,
}

impl Plan {
    /// Reads and checks a plan file.
    pub fn load(path: &Path) -> Result<Plan, LaunchError> {
        let text = std::fs::read_to_string(path).map_err(io_error(path))?;
        let plan: Plan = serde_yaml::from_str(&text).map_err(|e| {
            LaunchError::Invalid(format!(
                "{}: {e} (a plan has `out`, optional `max_restarts` and `stages`, each with \
                 `name`, `command` and optional `nproc`, `ep`, `backend`, `max_restarts`; see \
                 launch/README.md)",
                path.display()
            ))
        })?;
        plan.check()
            .map_err(|e| LaunchError::Invalid(format!("{}: {e}", path.display())))?;
        Ok(plan)
    }

    /// Refuses a plan that cannot run, before any stage starts.
    pub fn check(&self) -> Result<(), String> {
        if self.stages.is_empty() {
            return Err("no stages: add at least one under `stages:`".into());
        }
        let mut names = BTreeSet::new();
        for s in &self.stages {
            let n = &s.name;
            // It names a folder under `logs/`: `.` or `..` would put the logs elsewhere.
            if let Err(why) = upcycle_files::confine::check_relative(n) {
                return Err(format!(
                    "stage name {n:?}: {why}; name the stage with letters or digits"
                ));
            }
            if !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(format!(
                    "stage name {n:?}: use letters, digits, '-', '_' or '.' (it names a log folder)"
                ));
            }
            if !names.insert(n) {
                return Err(format!(
                    "stage name {n:?} is used twice: give each stage its own"
                ));
            }
            let Some(sub) = s.command.first() else {
                return Err(format!(
                    "stage {n}: empty command; give the upcycle subcommand and its arguments, \
                     e.g. [train, --config, ...]"
                ));
            };
            if sub == "launch" || sub == "upcycle" {
                return Err(format!(
                    "stage {n}: the command starts with {sub:?}; give the upcycle subcommand \
                     itself (train, eval, convert ...), the launcher runs the program"
                ));
            }
            if s.nproc == 0 {
                return Err(format!(
                    "stage {n}: nproc 0; a stage needs at least one worker"
                ));
            }
            if let Some(ep) = s.ep {
                if sub != "train" {
                    return Err(format!(
                        "stage {n}: ep is for train stages, this one runs {sub}"
                    ));
                }
                if ep == 0 || s.nproc % ep != 0 {
                    return Err(format!(
                        "stage {n}: ep {ep} does not divide nproc {}; pick a divisor",
                        s.nproc
                    ));
                }
                if s.command
                    .iter()
                    .any(|a| a == "--ep" || a.starts_with("--ep="))
                {
                    return Err(format!(
                        "stage {n}: --ep is both in the command and the stage's `ep`; keep one"
                    ));
                }
            }
            s.backend
                .unwrap_or(Backend::Mpi)
                .spawn(s.nproc)
                .map_err(|e| format!("stage {n}: {e}"))?;
        }
        Ok(())
    }

    /// `<out>/plan-state.json`.
    pub fn state_path(&self) -> PathBuf {
        self.out.join("plan-state.json")
    }

    fn read_state(&self) -> Result<State, LaunchError> {
        let path = self.state_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                LaunchError::Invalid(format!(
                    "{}: {e}; it is the plan's record of finished stages: fix or remove it \
                     (removing reruns every stage)",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(io_error(&path)(e)),
        }
    }

    /// Writes the state beside itself and renames it in place, so a crash leaves the old
    /// or the new record, never half of one.
    fn write_state(&self, state: &State) -> Result<(), LaunchError> {
        let text = serde_json::to_string_pretty(state).expect("plain data");
        atomic::write_file(&self.state_path(), text.as_bytes()).map_err(|e| LaunchError::Io {
            path: e.path,
            source: e.source,
        })
    }

    /// Runs the stages not finished before, in order, with `program` (the `upcycle`
    /// binary); `template` gives the supervision settings (grace periods, master, tail).
    /// Each stage's workers log to `<out>/logs/<stage>/`.
    pub fn run(&self, program: &Path, template: &LaunchSpec) -> Result<(), LaunchError> {
        std::fs::create_dir_all(&self.out).map_err(io_error(&self.out))?;
        let mut state = self.read_state()?;
        for stage in &self.stages {
            let record = Finished {
                name: stage.name.clone(),
                nproc: stage.nproc,
                args: stage.args(),
            };
            if let Some(done) = state.finished.iter().find(|f| f.name == stage.name) {
                if *done != record {
                    return Err(LaunchError::Invalid(format!(
                        "stage {} finished earlier with another command or worker count \
                         (recorded in {}: {} workers, {:?}); restore the stage, or remove its \
                         entry there (and its outputs) to run the new one",
                        stage.name,
                        self.state_path().display(),
                        done.nproc,
                        done.args
                    )));
                }
                eprintln!(
                    "upcycle launch: stage {}: finished earlier, skipped",
                    stage.name
                );
                continue;
            }
            eprintln!(
                "upcycle launch: stage {}: {} worker(s): upcycle {}",
                stage.name,
                stage.nproc,
                record.args.join(" ")
            );
            let mut spec = template.clone();
            spec.command = std::iter::once(OsString::from(program))
                .chain(record.args.iter().map(OsString::from))
                .collect();
            spec.nproc = stage.nproc;
            spec.spawn = stage.backend.unwrap_or(Backend::Mpi).spawn(stage.nproc)?;
            spec.max_restarts = stage.max_restarts.unwrap_or(self.max_restarts);
            spec.log_dir = Some(self.out.join("logs").join(&stage.name));
            launch(&spec).map_err(|e| LaunchError::Stage {
                stage: stage.name.clone(),
                source: Box::new(e),
            })?;
            state.finished.push(record);
            self.write_state(&state)?;
            eprintln!("upcycle launch: stage {}: finished", stage.name);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(stages: &str) -> Result<(), String> {
        let p: Plan = serde_yaml::from_str(&format!("out: x\nstages:\n{stages}")).unwrap();
        p.check()
    }

    #[test]
    fn the_example_plan_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ume-plan.yaml");
        let p = Plan::load(&path).unwrap();
        let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["upcycle", "frozen", "full", "eval", "export"]);
        assert_eq!(p.stages[2].args().last().unwrap(), "2");
    }

    #[test]
    fn plans_that_cannot_run_are_refused_by_stage() {
        let e = plan("- {name: a, command: [train]}\n- {name: a, command: [eval]}").unwrap_err();
        assert!(e.contains("used twice"), "{e}");
        let e = plan("- {name: a, nproc: 4, ep: 3, command: [train]}").unwrap_err();
        assert!(e.contains("ep 3 does not divide nproc 4"), "{e}");
        let e = plan("- {name: a, ep: 1, command: [eval]}").unwrap_err();
        assert!(e.contains("ep is for train stages"), "{e}");
        let e = plan("- {name: a, nproc: 2, ep: 2, command: [train, --ep, '2']}").unwrap_err();
        assert!(e.contains("keep one"), "{e}");
        let e = plan("- {name: a, command: [launch]}").unwrap_err();
        assert!(e.contains("upcycle subcommand"), "{e}");
        let e = plan("- {name: 'a b', command: [eval]}").unwrap_err();
        assert!(e.contains("letters, digits"), "{e}");
        // `..` would put a stage's logs beside `logs/`, not in it.
        let e = plan("- {name: '..', command: [eval]}").unwrap_err();
        assert!(e.contains("stage name \"..\"") && e.contains("`..`"), "{e}");
        let e = plan("- {name: '.', command: [eval]}").unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = plan("- {name: a, nproc: 2, backend: nccl, command: [train]}").unwrap_err();
        assert!(e.contains("--backend mpi"), "{e}");
        let bad: Result<Plan, _> = serde_yaml::from_str("out: x\nstages:\n- {name: a, cmd: [x]}");
        assert!(bad.unwrap_err().to_string().contains("unknown field `cmd`"));
    }
}
