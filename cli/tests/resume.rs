//! Sharded checkpoints end to end: a run stopped and resumed equals the uninterrupted run
//! bit for bit (one process with dropout, SpecAugment, dither and dynamic chunks on; and
//! two MPI workers with experts spread over them); a checkpoint written by 2 workers
//! (ep 2) resumes on 1, and on 4 with ep 2 and ep 4, optimizer state included, with the
//! losses of an unresharded resume; damaged, incomplete or incompatible checkpoints are
//! refused by name. Real recordings (pocketsphinx's LibriVox clips).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use upcycle_trainer::checkpoint;

mod common;
use common::*;

/// (step, loss) of every logged training step.
fn losses(out: &Path) -> Vec<(u64, f64)> {
    metrics(out)
        .iter()
        .filter_map(|l| Some((l.get("step")?.as_u64()?, l.get("loss")?.as_f64()?)))
        .collect()
}

fn assert_same_tensors(a: &Path, b: &Path) {
    for group in ["model", "optim"] {
        let x = checkpoint::read_group(a, group).unwrap();
        let y = checkpoint::read_group(b, group).unwrap();
        assert_eq!(
            x.keys().collect::<Vec<_>>(),
            y.keys().collect::<Vec<_>>(),
            "{group}"
        );
        for (name, t) in &x {
            assert!(t.equal(&y[name]), "{group}/{name} differs");
        }
    }
}

/// Worker `rank` of expert parallelism `ep` reading its rows of checkpoint `dir`: each
/// tensor equals the rows of the whole one, and the bytes read are those of the dense
/// tensors plus the expert slices (whole) that hold its experts, counted here from the
/// manifest's shapes. Returns (bytes read, bytes of the dense tensors, of the experts).
fn read_as_worker(dir: &Path, ep: i64, rank: i64) -> (u64, u64, u64) {
    let manifest = checkpoint::read_manifest(dir).unwrap();
    let is_expert = |name: &str| name.contains(".experts.");
    let mine = |name: &str, rows: i64| match is_expert(name) {
        true => rank * rows / ep..(rank + 1) * rows / ep,
        false => 0..rows,
    };
    let (mut read, mut dense, mut experts) = (0, 0, 0);
    for group in ["model", "optim"] {
        let whole = checkpoint::read_group(dir, group).unwrap();
        let (got, bytes) =
            checkpoint::read_group_rows(dir, group, &|n, rows| Ok(mine(n, rows))).unwrap();
        assert_eq!(got.len(), whole.len(), "{group}");
        for (name, t) in &whole {
            let want = mine(name, t.size().first().copied().unwrap_or(1));
            let want = match t.dim() {
                0 => t.shallow_clone(),
                _ => t.narrow(0, want.start, want.end - want.start),
            };
            assert!(got[name].equal(&want), "{group}/{name}: not rows {want:?}");
        }
        let mut expect = 0;
        for (tagged, entry) in manifest.tensors.iter() {
            let Some(name) = tagged.strip_prefix(&format!("{group}/")) else {
                continue;
            };
            let elt = match entry.dtype.as_str() {
                "float32" | "int32" => 4,
                "float64" | "int64" => 8,
                _ => 2,
            };
            let row: i64 = entry.shape.iter().skip(1).product::<i64>() * elt;
            let want = mine(name, entry.shape.first().copied().unwrap_or(1));
            for s in &entry.slices {
                let bytes = ((s.end - s.start) * row) as u64;
                match is_expert(name) {
                    true => experts += bytes,
                    false => dense += bytes,
                }
                if s.start < want.end && s.end > want.start {
                    expect += bytes;
                }
            }
        }
        assert_eq!(bytes.read, expect, "{group}: bytes read");
        read += bytes.read;
    }
    (read, dense, experts)
}

#[test]
fn a_resumed_run_equals_the_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    // Everything random left on: dropout, SpecAugment, dither, dynamic chunks, shuffling.
    let (data, config) = setup(tmp.path(), "upcycle_conf: {seed: 3, eval_interval: 3}\n");
    let straight = tmp.path().join("straight");
    run_workers(1, &config, &data, &straight, 9, &[]);
    let split = tmp.path().join("split");
    run_workers(1, &config, &data, &split, 3, &[]);
    // Continues from --out's latest checkpoint by itself.
    run_workers(1, &config, &data, &split, 9, &[]);
    let want = losses(&straight);
    assert_eq!(want.len(), 9);
    assert_eq!(losses(&split), want, "the loss curve");
    assert_same_tensors(
        &straight.join("checkpoints/step-9"),
        &split.join("checkpoints/step-9"),
    );
    let state = checkpoint::read_state(&split.join("checkpoints/step-9")).unwrap();
    assert_eq!(state.step, 9);

    // Saving in the background writes the same checkpoints, and resumes the same.
    let background = tmp.path().join("background.yaml");
    std::fs::write(
        &background,
        std::fs::read_to_string(&config).unwrap().replace(
            "eval_interval: 3}",
            "eval_interval: 3, async_checkpoint: true}",
        ),
    )
    .unwrap();
    let bg = tmp.path().join("bg");
    run_workers(1, &background, &data, &bg, 6, &[]);
    run_workers(1, &background, &data, &bg, 9, &[]);
    assert_eq!(losses(&bg), want);
    for step in [3, 6, 9] {
        let name = format!("checkpoints/step-{step}");
        assert_same_tensors(&split.join(&name), &bg.join(&name));
    }
    let stalls = metrics(&bg)
        .iter()
        .filter(|l| l.get("checkpoint_stall_s").is_some())
        .count();
    assert_eq!(stalls, 3);

    // Refusals, each naming what is wrong; the checkpoint itself stays as it was.
    let ckpt = split.join("checkpoints/step-9");
    let resumed = tmp.path().join("resumed");
    let resume = |config: &Path| {
        let args = train_args(
            config,
            &data,
            &resumed,
            10,
            &["--resume", ckpt.to_str().unwrap()],
        );
        train_workers(1, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let err = |o: Output| {
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let other = tmp.path().join("other.yaml");
    std::fs::write(
        &other,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("output_size: 32", "output_size: 48"),
    )
    .unwrap();
    let e = err(resume(&other));
    assert!(e.contains("encoder_conf.output_size differs"), "{e}");

    let file = ckpt.join("rank-0.safetensors");
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    let at = bad.len() - 3;
    bad[at] ^= 0x55;
    std::fs::write(&file, &bad).unwrap();
    let e = err(resume(&config));
    assert!(e.contains("does not match its checksum"), "{e}");
    std::fs::remove_file(&file).unwrap();
    let e = err(resume(&config));
    assert!(e.contains("rank-0.safetensors is missing"), "{e}");
    std::fs::write(&file, &good).unwrap();
    ok(&resume(&config));
}

#[test]
fn sharded_checkpoints_resume_exactly_and_on_other_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, _) = setup(tmp.path(), "");
    let two = deterministic_moe_config(tmp.path(), 2, 4);
    let straight = tmp.path().join("straight");
    run_workers(2, &two, &data, &straight, 8, &["--ep", "2"]);
    let split = tmp.path().join("split");
    run_workers(2, &two, &data, &split, 4, &["--ep", "2"]);
    let saved = split.join("checkpoints/step-4");
    let manifest = checkpoint::read_manifest(&saved).unwrap();
    assert_eq!((manifest.layout.world, manifest.layout.ep), (2, 2));
    let expert = manifest
        .tensors
        .iter()
        .find(|(n, _)| n.starts_with("model/") && n.ends_with(".experts.w_1"))
        .unwrap()
        .1;
    // Each worker wrote its own experts, by global expert id.
    let files: Vec<(&str, i64, i64)> = expert
        .slices
        .iter()
        .map(|s| (s.file.as_str(), s.start, s.end))
        .collect();
    assert_eq!(
        files,
        [("rank-0.safetensors", 0, 2), ("rank-1.safetensors", 2, 4)]
    );
    run_workers(2, &two, &data, &split, 8, &["--ep", "2"]);
    assert_eq!(losses(&split), losses(&straight), "the loss curve");
    assert_same_tensors(
        &straight.join("checkpoints/step-8"),
        &split.join("checkpoints/step-8"),
    );

    // The same global batches on other layouts, from the 2-worker checkpoint.
    let want: Vec<(u64, f64)> = losses(&straight)[4..6].to_vec();
    for (np, ep, batch) in [(1, 1, 4), (4, 2, 1), (4, 4, 1)] {
        let out = tmp.path().join(format!("np{np}-ep{ep}"));
        let ep = ep.to_string();
        run_workers(
            np,
            &deterministic_moe_config(tmp.path(), batch, 4),
            &data,
            &out,
            6,
            &["--ep", &ep, "--resume", saved.to_str().unwrap()],
        );
        let got = losses(&out);
        assert_eq!(got.len(), 2, "np {np} ep {ep}: {got:?}");
        for ((s, a), (t, b)) in got.iter().zip(&want) {
            assert_eq!(s, t);
            // The first step depends on the resharded weights, the second also on the
            // resharded optimizer moments.
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "np {np} ep {ep}: step {s} loss {a} vs {b} without resharding"
            );
        }
    }
}

/// A process killed (SIGKILL) at random moments of its saves: the latest checkpoint is
/// always whole (checksums pass) and the run resumes from it.
#[test]
fn a_save_killed_at_any_moment_leaves_a_whole_checkpoint() {
    use rand::{Rng, SeedableRng};
    let tmp = tempfile::tempdir().unwrap();
    let (data, config) = setup(tmp.path(), "upcycle_conf: {seed: 5, eval_interval: 1}\n");
    let out = tmp.path().join("run");
    let ckpts = out.join("checkpoints");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut steps_seen = Vec::new();
    let mut killed_saving = 0;
    let staging = |ckpts: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(ckpts).map_or(Vec::new(), |d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    name.starts_with(".step-") && name.ends_with(".tmp")
                })
                .map(|e| e.path())
                .collect()
        })
    };
    for _ in 0..8 {
        // What the killed save left (the next save would remove it too).
        for dir in staging(&ckpts) {
            std::fs::remove_dir_all(dir).unwrap();
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_upcycle"))
            .args(["train", "--config", config.to_str().unwrap(), "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .args(["--max-steps", "1000", "--device", "cpu"])
            // Each of the five stages of a save takes 150 ms more.
            .env("UPCYCLE_FAULT_SAVE_PAUSE_MS", "150")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait until a save has begun (its staging directory exists), then kill at a
        // random moment of it: before the parts, mid-write, before the manifest, before
        // the rename, before the pointer moves, or just after.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let saving = || !staging(&ckpts).is_empty();
        while !saving() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        killed_saving += usize::from(saving());
        std::thread::sleep(std::time::Duration::from_millis(rng.random_range(0..900)));
        child.kill().unwrap();
        child.wait().unwrap();
        let Ok(dir) = checkpoint::resolve_latest(&out) else {
            continue; // killed during the first save
        };
        checkpoint::read_group(&dir, "model").unwrap();
        checkpoint::read_group(&dir, "optim").unwrap();
        steps_seen.push(checkpoint::read_state(&dir).unwrap().step);
    }
    assert!(killed_saving >= 6, "{killed_saving} kills inside a save");
    assert!(
        steps_seen.windows(2).all(|w| w[0] <= w[1]),
        "{steps_seen:?}"
    );
    let last = *steps_seen.last().expect("some checkpoint was completed");
    // And the run goes on from there.
    run_workers(1, &config, &data, &out, last + 1, &[]);
    let dir = checkpoint::resolve_latest(&out).unwrap();
    assert_eq!(checkpoint::read_state(&dir).unwrap().step, last + 1);
}

/// The conversion tool's layouts: reshard (optimizer included), consolidate, shard back,
/// and inspect; the whole tensors never change; bad layouts and existing outputs are
/// refused.
#[test]
fn convert_reshard_consolidate_shard_and_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, _) = setup(tmp.path(), "");
    let out = tmp.path().join("run");
    run_workers(
        1,
        &deterministic_moe_config(tmp.path(), 4, 4),
        &data,
        &out,
        4,
        &[],
    );
    let source = out.join("checkpoints/step-4");
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let four = tmp.path().join("four");
    ok(&upcycle(&[
        "convert",
        "reshard",
        "--from",
        &p(&source),
        "--world",
        "4",
        "--ep",
        "4",
        "--out",
        &p(&four),
    ]));
    let resharded = four.join("step-4");
    let m = checkpoint::read_manifest(&resharded).unwrap();
    assert_eq!((m.layout.world, m.layout.ep), (4, 4));
    assert!((0..4).all(|r| resharded.join(format!("rank-{r}.safetensors")).is_file()));
    assert_same_tensors(&source, &resharded);
    // Slices of ep 4 read by a worker of ep 2: the dense tensors and half the experts,
    // exactly; of ep 1 (one slice per bank, partly wanted, read whole to check it): all.
    for rank in 0..2 {
        let (read, dense, experts) = read_as_worker(&resharded, 2, rank);
        assert!(
            experts > 0 && dense > 0,
            "{experts} expert bytes, {dense} dense"
        );
        assert_eq!(read, dense + experts / 2, "rank {rank} of ep 2 from ep 4");
        let (read, dense, experts) = read_as_worker(&source, 2, rank);
        assert_eq!(read, dense + experts, "rank {rank} of ep 2 from ep 1");
    }
    let (read, dense, experts) = read_as_worker(&resharded, 4, 3);
    assert_eq!(read, dense + experts / 4, "rank 3 of ep 4 from ep 4");

    let single = tmp.path().join("single");
    ok(&upcycle(&[
        "convert",
        "consolidate",
        "--from",
        &p(&four),
        "--out",
        &p(&single),
    ]));
    assert!(single.join("model.safetensors").is_file());
    let want = checkpoint::read_tensors(&source).unwrap();
    let got = checkpoint::read_tensors(&single).unwrap();
    assert!(want.iter().all(|(n, t)| t.equal(&got[n])));
    let back = tmp.path().join("back");
    ok(&upcycle(&[
        "convert",
        "shard",
        "--from",
        &p(&single),
        "--world",
        "2",
        "--ep",
        "2",
        "--out",
        &p(&back),
    ]));
    let got = checkpoint::read_tensors(&back.join("step-4")).unwrap();
    assert!(want.iter().all(|(n, t)| t.equal(&got[n])));

    let json = ok(&upcycle(&["inspect", "checkpoint", &p(&four), "--json"]));
    let s: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(s["step"], 4);
    assert_eq!(s["layout"]["world"], 4);
    let norms = s["expert_norms"].as_array().unwrap();
    assert!(!norms.is_empty());
    assert_eq!(norms[0][1].as_array().unwrap().len(), 4);
    let text = ok(&upcycle(&["inspect", "checkpoint", &p(&four)]));
    assert!(text.contains("layout world 4 ep 4 dp 4"), "{text}");

    let refused = |args: &[&str], why: &str| {
        let o = upcycle(args);
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(why), "{e}");
    };
    refused(
        &[
            "convert",
            "reshard",
            "--from",
            &p(&source),
            "--world",
            "3",
            "--ep",
            "3",
            "--out",
            &p(&tmp.path().join("x")),
        ],
        "ep",
    );
    refused(
        &[
            "convert",
            "consolidate",
            "--from",
            &p(&source),
            "--out",
            &p(&single),
        ],
        "already exists",
    );
}

/// Parameters released by the freezing schedule keep their own optimizer step (their
/// bias correction) through a checkpoint and a reshard: the resumed run equals the
/// uninterrupted one. A checkpoint without per-tensor steps (earlier versions) resumes
/// with the global step for every tensor, as it was trained: another continuation.
#[test]
fn per_tensor_optimizer_steps_survive_a_checkpoint_and_a_reshard() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, _) = setup(tmp.path(), "");
    let config = tmp.path().join("freeze.yaml");
    let text = std::fs::read_to_string(deterministic_moe_config(tmp.path(), 4, 4))
        .unwrap()
        .replace(
            "eval_interval: 4}",
            "eval_interval: 4, freeze: [{from_step: 0, trainable: ['*.experts.*', '*.router.*']}, \
             {from_step: 2, trainable: ['*']}]}",
        );
    assert!(text.contains("from_step: 2"), "{text}");
    std::fs::write(&config, text).unwrap();
    let straight = tmp.path().join("straight");
    run_workers(1, &config, &data, &straight, 8, &[]);
    let split = tmp.path().join("split");
    run_workers(1, &config, &data, &split, 4, &[]);
    let saved = split.join("checkpoints/step-4");
    let m = checkpoint::read_manifest(&saved).unwrap();
    assert_eq!(m.optimizer_step, 4);
    let moments = checkpoint::read_group(&saved, "optim").unwrap();
    assert_eq!(moments.len(), 2 * m.optimizer_tensor_steps.len());
    let first_phase = |n: &str| n.contains(".experts.") || n.contains(".router.");
    assert!(m.optimizer_tensor_steps.keys().any(|n| first_phase(n)));
    assert!(m.optimizer_tensor_steps.keys().any(|n| !first_phase(n)));
    for (name, &step) in &m.optimizer_tensor_steps {
        assert_eq!(step, if first_phase(name) { 4 } else { 2 }, "{name}");
    }
    run_workers(1, &config, &data, &split, 8, &[]);
    assert_eq!(losses(&split), losses(&straight), "the loss curve");
    assert_same_tensors(
        &straight.join("checkpoints/step-8"),
        &split.join("checkpoints/step-8"),
    );

    // Resharded for 2 workers with ep 2 (experts split by global id): the same steps,
    // and resumed in one process, the same continuation.
    let two = tmp.path().join("two");
    ok(&upcycle(&[
        "convert",
        "reshard",
        "--from",
        saved.to_str().unwrap(),
        "--world",
        "2",
        "--ep",
        "2",
        "--out",
        two.to_str().unwrap(),
    ]));
    let resharded = two.join("step-4");
    let m2 = checkpoint::read_manifest(&resharded).unwrap();
    assert_eq!(m2.optimizer_tensor_steps, m.optimizer_tensor_steps);
    let from_two = tmp.path().join("from-two");
    run_workers(
        1,
        &config,
        &data,
        &from_two,
        8,
        &["--resume", resharded.to_str().unwrap()],
    );
    assert_eq!(losses(&from_two), losses(&straight)[4..]);

    // The same checkpoint as an earlier version wrote it: no per-tensor steps.
    let old = tmp.path().join("old/step-4");
    std::fs::create_dir_all(&old).unwrap();
    for f in std::fs::read_dir(&saved).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, old.join(f.file_name().unwrap())).unwrap();
    }
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(old.join("manifest.json")).unwrap()).unwrap();
    manifest
        .as_object_mut()
        .unwrap()
        .remove("optimizer_tensor_steps")
        .unwrap();
    std::fs::write(old.join("manifest.json"), manifest.to_string()).unwrap();
    let from_old = tmp.path().join("from-old");
    run_workers(
        1,
        &config,
        &data,
        &from_old,
        6,
        &["--resume", old.to_str().unwrap()],
    );
    let (got, want) = (losses(&from_old), &losses(&straight)[4..6]);
    // Step 5's loss is taken before the first update from the checkpoint.
    assert_eq!(got[0], want[0]);
    assert_ne!(
        got[1], want[1],
        "the released tensors' steps made no difference"
    );
}
