//! `upcycle inspect` (routing tables, checkpoint contents, run comparisons) and
//! `upcycle report` (plots and a Markdown summary of runs).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use upcycle_trainer::{inspect, report};

#[derive(Args)]
pub(crate) struct ReportArgs {
    /// Run directories (the --out of `upcycle train`), as RUN_DIR or NAME=RUN_DIR; with
    /// several, OUT gets a comparison plot and one folder per run.
    #[arg(required = true)]
    pub(crate) runs: Vec<String>,
    /// Output folder.
    #[arg(long, default_value = "report")]
    pub(crate) out: PathBuf,
    /// CHILD=PARENT: run CHILD started from PARENT's last checkpoint; draw it after
    /// PARENT (steps and wall time), as the UME comparison counts the parent's cost.
    #[arg(long)]
    pub(crate) after: Vec<String>,
}

/// `NAME=RUN_DIR` or `RUN_DIR` (named after its last component).
pub(crate) fn run_row(arg: &str) -> inspect::RunRow {
    match arg.split_once('=') {
        Some((name, dir)) => inspect::RunRow {
            name: name.into(),
            dir: dir.into(),
        },
        None => {
            let dir = PathBuf::from(arg);
            let name = dir.components().next_back().map_or(arg.to_string(), |c| {
                c.as_os_str().to_string_lossy().to_string()
            });
            inspect::RunRow { name, dir }
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum InspectCommand {
    /// The load table of every MoE layer of a checkpoint on a data set.
    Routing {
        /// Checkpoint (a run's checkpoints/ directory or a step-N directory).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Data set directory or data.list.
        #[arg(long)]
        data: PathBuf,
        /// Utterances to route (0: all).
        #[arg(long, default_value_t = 0)]
        utterances: usize,
        /// Chunk size (0: full context).
        #[arg(long, default_value_t = 0)]
        chunk: i64,
    },
    /// What a checkpoint holds: step, layout, files, parameters, per-expert norms (every
    /// checksum is verified on the way).
    Checkpoint {
        /// A checkpoint, a run's checkpoints/ directory or a run directory (its latest).
        checkpoint: PathBuf,
        /// Print JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// A Markdown table comparing finished runs (NAME=RUN_DIR, each evaluated into
    /// RUN_DIR/eval-test): parameters, training time, test CER (per language when the
    /// test list is tagged) and RTF.
    Runs {
        /// NAME=RUN_DIR pairs.
        runs: Vec<String>,
        /// NAME=METHOD: the method a run stands for in --json (parent, dense, scratch,
        /// copy, noise, drop, granular, ...); default: its NAME.
        #[arg(long)]
        method: Vec<String>,
        /// Also write the numbers as JSON ({"command", "runs": [...]}) to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// The command recorded in --json: what reproduces the table.
        #[arg(long, default_value = "./run main")]
        command: String,
    },
}

/// Runs one `upcycle inspect` subcommand.
pub(crate) fn run(command: InspectCommand) -> Result<()> {
    match command {
        InspectCommand::Routing {
            checkpoint,
            data,
            utterances,
            chunk,
        } => {
            print!(
                "{}",
                inspect::routing_table(&checkpoint, &data, utterances, chunk)?
            );
        }
        InspectCommand::Checkpoint { checkpoint, json } => {
            let s = inspect::checkpoint_summary(&checkpoint)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", inspect::checkpoint_text(&s));
            }
        }
        InspectCommand::Runs {
            runs,
            method,
            json,
            command,
        } => runs_command(&runs, &method, json.as_deref(), &command)?,
    }
    Ok(())
}

/// `NAME=VALUE`, or an error naming the flag and an example.
fn pair<'a>(arg: &'a str, what: &str, example: &str) -> Result<(&'a str, &'a str)> {
    arg.split_once('=')
        .with_context(|| format!("{arg:?}: expected {what}, e.g. {example}"))
}

/// `inspect runs`: prints the comparison table and, with `json`, writes its numbers.
fn runs_command(
    runs: &[String],
    methods: &[String],
    json: Option<&Path>,
    command: &str,
) -> Result<()> {
    let methods = methods
        .iter()
        .map(|m| pair(m, "NAME=METHOD", "b-copy=copy"))
        .collect::<Result<std::collections::BTreeMap<_, _>>>()?;
    let numbers = runs
        .iter()
        .map(|r| {
            let (name, dir) = pair(r, "NAME=RUN_DIR", "upcycled=runs/ume/b-upcycled")?;
            let row = inspect::RunRow {
                name: name.into(),
                dir: dir.into(),
            };
            inspect::run_numbers(&row, methods.get(name).copied().unwrap_or(name))
        })
        .collect::<Result<Vec<_>>>()?;
    print!("{}", inspect::runs_table(&numbers));
    if let Some(path) = json {
        let doc = serde_json::json!({"command": command, "runs": numbers});
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Writes the plots and summary of runs; prints the files written.
pub(crate) fn run_report(a: ReportArgs) -> Result<()> {
    let after = a
        .after
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(c, p)| (c.to_string(), p.to_string()))
                .with_context(|| {
                    format!("--after {p:?}: expected CHILD=PARENT, e.g. upcycled=parent")
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let files = report::report(&report::ReportOptions {
        runs: a.runs.iter().map(|r| run_row(r)).collect(),
        out: a.out,
        after,
    })?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}
