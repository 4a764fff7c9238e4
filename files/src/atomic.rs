//! Files and directories that appear whole or not at all: write beside, fsync, rename, fsync the parent.
//!
//! A reader (or a process started after a crash or a power cut) sees either the old
//! content of a path or the new one, never a part of the new one:
//! - [`write_file`] / [`write_with`]: a file is written under a hidden temporary name in
//!   its own directory (`.<name>.tmp-<pid>-<n>`), synced, renamed over the path, and the
//!   directory synced so that the rename itself survives a power cut. A writer that fails
//!   leaves the old file as it was and no temporary file behind.
//! - [`StagedDir`] / [`publish_dir`]: a directory is built under another name, then every
//!   file and directory in it is synced and it is renamed into place (what was at the
//!   destination is moved aside first and removed once the new one is in).
//!
//! A process killed between creating a temporary file and renaming it leaves the hidden
//! temporary behind; nothing reads it, and the next write of the same path does not need
//! it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A file-system step that failed, naming the path and what was being done to it.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct Error {
    /// What was being done (`writing`, `syncing`, `renaming to`, ...).
    pub action: &'static str,
    /// The path it was done to.
    pub path: PathBuf,
    /// What the operating system said.
    #[source]
    pub source: std::io::Error,
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        std::io::Error::new(e.source.kind(), e)
    }
}

fn fail(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error {
        action,
        path,
        source,
    }
}

/// Writes `bytes` to `path` so that it appears whole or not at all.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    write_with(path, |w| w.write_all(bytes).map_err(fail("writing", path)))
}

/// Writes `path` with `write` (given a buffered writer on a temporary file beside it) so
/// that it appears whole or not at all. When `write` fails the temporary file is removed,
/// `path` is untouched, and its error is returned.
pub fn write_with<E: From<Error>>(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<(), E>,
) -> Result<(), E> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // The pid keeps processes apart, the counter threads of one process.
    let tmp = temporary_name(path, NEXT.fetch_add(1, Ordering::Relaxed));
    let file = File::create(&tmp).map_err(fail("creating", &tmp))?;
    let mut w = BufWriter::new(file);
    let finish = |mut w: BufWriter<File>| -> Result<(), Error> {
        w.flush().map_err(fail("writing", &tmp))?;
        let file = w
            .into_inner()
            .map_err(|e| fail("writing", &tmp)(e.into_error()))?;
        file.sync_all().map_err(fail("syncing", &tmp))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(fail("renaming to", path))?;
        fsync_dir(&parent_of(path))
    };
    let result = write(&mut w).and_then(|()| finish(w).map_err(E::from));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn temporary_name(path: &Path, n: u64) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    parent_of(path).join(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// The directory `path` is in (`.` for a bare name).
fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Flushes a file that another writer (a safetensors or zip writer) wrote to `path`.
pub fn sync_file(path: &Path) -> Result<(), Error> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(fail("syncing", path))
}

/// Makes the entries of `dir` (files created, renamed or removed in it) durable.
pub fn fsync_dir(dir: &Path) -> Result<(), Error> {
    match File::open(dir).and_then(|f| f.sync_all()) {
        // Some network and FUSE file systems cannot sync a directory (EINVAL): there is
        // nothing more to do there.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
        r => r.map_err(fail("syncing", dir)),
    }
}

/// Syncs every file and directory under `dir`, the deepest first.
fn sync_tree(dir: &Path) -> Result<(), Error> {
    for entry in std::fs::read_dir(dir).map_err(fail("listing", dir))? {
        let entry = entry.map_err(fail("listing", dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(fail("reading", &path))?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            sync_file(&path)?;
        }
    }
    fsync_dir(dir)
}

/// Publishes the finished directory `staged` as `dest`: everything in it synced, then
/// renamed. What was at `dest` is first moved aside to `.<name>.old` beside it and
/// removed once the new one is in place, so a crash leaves the old or the new directory
/// (or, between the two renames, the old one under `.<name>.old`).
pub fn publish_dir(staged: &Path, dest: &Path) -> Result<(), Error> {
    sync_tree(staged)?;
    let parent = parent_of(dest);
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    let old = parent.join(format!(".{name}.old"));
    let replacing = dest.exists();
    if replacing {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(fail("removing", &old))?;
        }
        std::fs::rename(dest, &old).map_err(fail("moving aside", dest))?;
    }
    std::fs::rename(staged, dest).map_err(fail("renaming to", dest))?;
    if replacing {
        std::fs::remove_dir_all(&old).map_err(fail("removing", &old))?;
    }
    fsync_dir(&parent)
}

/// A directory built beside its destination (`.<name>.<purpose>-<pid>`) and published by
/// rename ([`publish_dir`]); dropped unpublished (the build failed), it is removed.
#[derive(Debug)]
pub struct StagedDir {
    path: PathBuf,
    dest: PathBuf,
    published: bool,
}

impl StagedDir {
    /// Creates the staging directory of `dest` (and `dest`'s parent), removing a leftover
    /// of an earlier run of this process id. `purpose` names it (`import`, `partial`).
    pub fn beside(dest: &Path, purpose: &str) -> Result<Self, Error> {
        let parent = parent_of(dest);
        let name = dest
            .file_name()
            .ok_or_else(|| {
                fail("staging", dest)(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a directory name",
                ))
            })?
            .to_string_lossy();
        let path = parent.join(format!(".{name}.{purpose}-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(fail("removing", &path))?;
        }
        std::fs::create_dir_all(&path).map_err(fail("creating", &path))?;
        Ok(Self {
            path,
            dest: dest.to_path_buf(),
            published: false,
        })
    }

    /// Where to build.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Syncs what was built and renames it to the destination; returns the destination.
    pub fn publish(mut self) -> Result<PathBuf, Error> {
        publish_dir(&self.path, &self.dest)?;
        self.published = true;
        Ok(self.dest.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_written_file_appears_whole_and_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latest");
        write_file(&path, b"step-1").unwrap();
        write_file(&path, b"step-20").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"step-20");
        assert_eq!(names(dir.path()), ["latest"], "no temporary left");
    }

    #[test]
    fn a_failing_writer_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_file(&path, b"old").unwrap();
        let err = write_with(&path, |w| {
            w.write_all(b"half of the new")?;
            Err(std::io::Error::other("the writer broke"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "the writer broke");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["state.json"]);
    }

    #[test]
    fn errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("f");
        let err = write_file(&path, b"x").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("creating "), "{text}");
        assert!(text.contains("missing-dir"), "{text}");
    }

    #[test]
    fn a_staged_directory_is_published_whole_and_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("stale"), b"old").unwrap();
        let staged = StagedDir::beside(&dest, "build").unwrap();
        std::fs::create_dir(staged.path().join("wav")).unwrap();
        std::fs::write(staged.path().join("wav/a.wav"), b"riff").unwrap();
        write_file(&staged.path().join("summary.json"), b"{}").unwrap();
        // Nothing shows at the destination until it is published.
        assert_eq!(names(&dest), ["stale"]);
        assert_eq!(staged.publish().unwrap(), dest);
        assert_eq!(names(&dest), ["summary.json", "wav"]);
        assert_eq!(std::fs::read(dest.join("wav/a.wav")).unwrap(), b"riff");
        assert_eq!(
            names(dir.path()),
            ["out"],
            "no staging or old directory left"
        );
    }

    #[test]
    fn a_staged_directory_dropped_unpublished_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        {
            let staged = StagedDir::beside(&dest, "build").unwrap();
            std::fs::write(staged.path().join("half"), b"x").unwrap();
        }
        assert!(names(dir.path()).is_empty());
    }
}
