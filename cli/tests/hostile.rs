//! Hostile checkpoints: a real checkpoint (WeNet's golden dense model, imported by the
//! binary) and crafted copies of it beside it: a manifest naming a file outside (by `..`,
//! by an absolute path, by a symbolic link), a pointer leaving its folder, oversized size
//! claims (a safetensors header, a manifest shape) and truncated files. Each is refused
//! with a message naming the file and the problem, quickly and without the memory, and the
//! real checkpoint still loads.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{ok, upcycle};
use tch::Device;
use upcycle_trainer::checkpoint;

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/wenet");
    p.join(name).to_str().unwrap().to_string()
}

/// `upcycle convert import-wenet` of the dense golden model into `out`; its step folder.
fn real_checkpoint(out: &Path) -> PathBuf {
    ok(&upcycle(&[
        "convert",
        "import-wenet",
        "--checkpoint",
        &fixture("dense/final.pt"),
        "--config",
        &fixture("dense/train.yaml"),
        "--units",
        &fixture("dense/lang_char.txt"),
        "--cmvn",
        &fixture("global_cmvn"),
        "--out",
        out.to_str().unwrap(),
    ]));
    checkpoint::resolve(out).unwrap()
}

/// A copy of the checkpoint `real` named `name` beside it, changed by `craft`.
fn crafted(real: &Path, name: &str, craft: impl FnOnce(&Path)) -> PathBuf {
    let dir = real.with_file_name(name);
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(real).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    craft(&dir);
    dir
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// The manifest's first slice file (the tensor named first).
fn first_slice_file(dir: &Path) -> String {
    let m = manifest(dir);
    let (_, entry) = m["tensors"].as_object().unwrap().iter().next().unwrap();
    entry["slices"][0]["file"].as_str().unwrap().to_string()
}

/// Rewrites every slice file name of the manifest in `dir` with `rename`.
fn rename_slices(dir: &Path, rename: impl Fn(&str) -> String) {
    let mut m = manifest(dir);
    for entry in m["tensors"].as_object_mut().unwrap().values_mut() {
        for slice in entry["slices"].as_array_mut().unwrap() {
            let file = rename(slice["file"].as_str().unwrap());
            slice["file"] = file.into();
        }
    }
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
}

/// Loading `path` fails quickly with a message holding every one of `want`.
fn refused(path: &Path, want: &[&str]) {
    let start = Instant::now();
    let e = match checkpoint::load_model(path, Device::Cpu) {
        Ok(_) => panic!("{} loaded; it should be refused", path.display()),
        Err(e) => format!("{e:#}"),
    };
    for w in want {
        assert!(
            e.contains(w),
            "{}: {e:?} does not say {w:?}",
            path.display()
        );
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{e}: took {:?}",
        start.elapsed()
    );
}

#[test]
fn crafted_checkpoints_are_refused_and_the_real_one_beside_them_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let real = real_checkpoint(&tmp.path().join("run"));
    let file = first_slice_file(&real);
    let real_name = real.file_name().unwrap().to_str().unwrap().to_string();

    // The manifest names a file outside the checkpoint: by `..`, absolutely, by a link.
    let up = crafted(&real, "up", |d| {
        rename_slices(d, |f| format!("../{real_name}/{f}"))
    });
    refused(
        &up,
        &["manifest.json", "`..`", &format!("../{real_name}/{file}")],
    );
    let abs = crafted(&real, "abs", |d| {
        rename_slices(d, |f| real.join(f).to_str().unwrap().to_string())
    });
    refused(&abs, &["manifest.json", "absolute path"]);
    let linked = crafted(&real, "linked", |d| {
        std::fs::remove_file(d.join(&file)).unwrap();
        std::os::unix::fs::symlink(real.join(&file), d.join(&file)).unwrap();
    });
    refused(
        &linked,
        &["manifest.json", &file, "symbolic link", "outside"],
    );

    // A pointer that leaves its folder, by `..` and by a linked checkpoint.
    let pointers = tmp.path().join("pointers");
    std::fs::create_dir(&pointers).unwrap();
    std::fs::write(pointers.join("latest"), format!("../run/{real_name}\n")).unwrap();
    refused(&pointers.join("latest"), &["pointers/latest", "`..`"]);
    refused(&pointers, &["pointers/latest", "`..`"]);
    std::fs::write(pointers.join("latest"), "step-9").unwrap();
    std::os::unix::fs::symlink(&real, pointers.join("step-9")).unwrap();
    refused(&pointers.join("latest"), &["symbolic link", "outside"]);

    // Size claims beyond the file: a safetensors header length, a manifest shape.
    let header = crafted(&real, "header", |d| {
        let mut bytes = std::fs::read(d.join(&file)).unwrap();
        bytes[..8].copy_from_slice(&(1u64 << 62).to_le_bytes());
        std::fs::write(d.join(&file), bytes).unwrap();
    });
    refused(
        &header,
        &[
            &file,
            "header claims 4611686018427387904 bytes",
            "truncated or damaged",
        ],
    );
    let shape = crafted(&real, "shape", |d| {
        let mut m = manifest(d);
        for entry in m["tensors"].as_object_mut().unwrap().values_mut() {
            entry["shape"] = serde_json::json!([1i64 << 40, 1i64 << 20]);
            entry["slices"][0]["end"] = (1i64 << 40).into();
        }
        std::fs::write(d.join("manifest.json"), m.to_string()).unwrap();
    });
    refused(
        &shape,
        &[
            "the manifest claims rows 0..1099511627776",
            "the manifest is damaged",
        ],
    );

    // Truncated files: a slice file cut in half, a manifest cut short, a slice file empty.
    let cut = crafted(&real, "cut", |d| {
        let bytes = std::fs::read(d.join(&file)).unwrap();
        std::fs::write(d.join(&file), &bytes[..bytes.len() / 2]).unwrap();
    });
    refused(&cut, &[&file]);
    let short = crafted(&real, "short", |d| {
        let bytes = std::fs::read(d.join("manifest.json")).unwrap();
        std::fs::write(d.join("manifest.json"), &bytes[..bytes.len() / 2]).unwrap();
    });
    refused(&short, &["manifest.json", "not a valid manifest"]);
    let empty = crafted(&real, "empty", |d| {
        std::fs::write(d.join(&file), b"").unwrap()
    });
    refused(&empty, &[&file, "too short for a safetensors file"]);

    // The real checkpoint beside them, and its run folder's pointer, still load.
    checkpoint::load_model(&real, Device::Cpu).unwrap();
    checkpoint::load_model(&tmp.path().join("run"), Device::Cpu).unwrap();
}
