//! Paths read from files, confined to the directory they are relative to: no absolute paths, no `..`, no symbolic link leaving it.
//!
//! A checkpoint's manifest names its slice files, a `latest` pointer names a checkpoint, a
//! data list names audio: each such entry comes from a file someone else may have written.
//! [`confined_join`] joins an entry to its directory only when the result stays inside it,
//! after every symbolic link is followed; [`check_relative`] is the lexical half alone, for
//! entries whose symbolic links may lead anywhere by design (a plan's stage names), and
//! [`check_text`] the least of all, for entries that may name any file (a data list's audio).

use std::path::{Component, Path, PathBuf};

use thiserror::Error;

/// Why an entry read from a file was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Escape {
    /// The entry is empty (or only `.`): it names the directory itself, not a file in it.
    Empty,
    /// The entry holds a NUL or another control character (a line break, a tab).
    OddCharacter,
    /// The entry is an absolute path (or has a drive or root prefix).
    Absolute,
    /// The entry has a `..` component.
    ParentComponent,
    /// A symbolic link on the way leads outside the directory (to `.0`).
    LinkLeaves(PathBuf),
    /// A symbolic link on the way leads nowhere.
    DanglingLink,
}

impl std::fmt::Display for Escape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Escape::Empty => write!(f, "it is empty: name a file inside the directory"),
            Escape::OddCharacter => write!(f, "it holds a control character"),
            Escape::Absolute => write!(
                f,
                "it is an absolute path: entries are relative to the directory"
            ),
            Escape::ParentComponent => {
                write!(f, "it has a `..` component and would leave the directory")
            }
            Escape::LinkLeaves(to) => write!(
                f,
                "a symbolic link on its way leads outside the directory, to {}",
                to.display()
            ),
            Escape::DanglingLink => write!(f, "a symbolic link on its way leads nowhere"),
        }
    }
}

/// An entry read from a file that would leave its directory.
#[derive(Debug, Error)]
#[error("{}: entry {entry:?} is refused: {why} (it must stay inside {})", file.display(), dir.display())]
pub struct ConfineError {
    /// The file the entry was read from.
    pub file: PathBuf,
    /// The entry as written.
    pub entry: String,
    /// The directory it must stay in.
    pub dir: PathBuf,
    /// Why it was refused.
    pub why: Escape,
}

/// Checks that an entry names something at all: not empty, no control characters (a
/// NUL, a line break). The least every path read from a file must pass.
pub fn check_text(entry: &str) -> Result<(), Escape> {
    if entry.chars().any(char::is_control) {
        return Err(Escape::OddCharacter);
    }
    if entry.trim().is_empty() {
        return Err(Escape::Empty);
    }
    Ok(())
}

/// Checks the entry's text alone: [`check_text`], relative, no `..`.
pub fn check_relative(entry: &str) -> Result<(), Escape> {
    check_text(entry)?;
    let path = Path::new(entry);
    let mut normal = false;
    for c in path.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => return Err(Escape::Absolute),
            Component::ParentDir => return Err(Escape::ParentComponent),
            Component::CurDir => {}
            Component::Normal(_) => normal = true,
        }
    }
    if !normal {
        return Err(Escape::Empty);
    }
    Ok(())
}

/// `dir` joined with `entry` (read from `file`), when it stays inside `dir`: the entry is
/// checked as by [`check_relative`], then the deepest part of the joined path that exists
/// is resolved (every symbolic link followed) and must still lie inside `dir` resolved.
/// A path that does not exist yet is returned as it is: opening it fails as it would.
pub fn confined_join(dir: &Path, entry: &str, file: &Path) -> Result<PathBuf, ConfineError> {
    let refuse = |why| ConfineError {
        file: file.to_path_buf(),
        entry: entry.to_string(),
        dir: dir.to_path_buf(),
        why,
    };
    check_relative(entry).map_err(refuse)?;
    let joined = dir.join(entry);
    let Ok(root) = dir.canonicalize() else {
        // No directory, so nothing inside it to reach either: the caller's open says so.
        return Ok(joined);
    };
    // The deepest existing ancestor of the joined path (itself included).
    let mut existing = joined.as_path();
    while existing.symlink_metadata().is_err() {
        match existing.parent() {
            Some(p) if p.starts_with(dir) && p != dir => existing = p,
            _ => return Ok(joined),
        }
    }
    let real = existing
        .canonicalize()
        .map_err(|_| refuse(Escape::DanglingLink))?;
    if !real.starts_with(&root) {
        return Err(refuse(Escape::LinkLeaves(real)));
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn why(dir: &Path, entry: &str) -> Escape {
        let e = confined_join(dir, entry, Path::new("/from/manifest.json")).unwrap_err();
        assert!(
            e.to_string().contains("/from/manifest.json")
                && e.to_string().contains(&format!("{entry:?}")),
            "{e}"
        );
        e.why
    }

    #[test]
    fn entries_inside_the_directory_are_joined() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/a.bin"), b"x").unwrap();
        for entry in [
            "sub/a.bin",
            "./sub/a.bin",
            "sub//a.bin",
            "not-yet",
            "sub/new/x",
        ] {
            let p = confined_join(d.path(), entry, Path::new("m")).unwrap();
            assert_eq!(p, d.path().join(entry));
        }
        // A link that stays inside is fine.
        std::os::unix::fs::symlink("sub", d.path().join("inner")).unwrap();
        confined_join(d.path(), "inner/a.bin", Path::new("m")).unwrap();
    }

    #[test]
    fn escapes_are_refused_with_file_entry_and_reason() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ckpt");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(d.path().join("secret"), b"x").unwrap();
        assert_eq!(why(&dir, ""), Escape::Empty);
        assert_eq!(why(&dir, "."), Escape::Empty);
        assert_eq!(why(&dir, "./"), Escape::Empty);
        assert_eq!(why(&dir, "a\0b"), Escape::OddCharacter);
        assert_eq!(why(&dir, "step-1\nstep-2"), Escape::OddCharacter);
        assert_eq!(why(&dir, "/etc/passwd"), Escape::Absolute);
        assert_eq!(why(&dir, "../secret"), Escape::ParentComponent);
        assert_eq!(why(&dir, "a/../../secret"), Escape::ParentComponent);
        assert_eq!(why(&dir, "a/.."), Escape::ParentComponent);
        // A link to a file outside, one to a folder outside, one with a path below it.
        std::os::unix::fs::symlink(d.path().join("secret"), dir.join("file")).unwrap();
        std::os::unix::fs::symlink(d.path(), dir.join("up")).unwrap();
        let outside = d.path().canonicalize().unwrap();
        assert_eq!(
            why(&dir, "file"),
            Escape::LinkLeaves(outside.join("secret"))
        );
        assert_eq!(
            why(&dir, "up/secret"),
            Escape::LinkLeaves(outside.join("secret"))
        );
        // Even a name that does not exist below the outside folder is refused.
        assert_eq!(why(&dir, "up/none/x"), Escape::LinkLeaves(outside.clone()));
        std::os::unix::fs::symlink("/nowhere/at/all", dir.join("dangling")).unwrap();
        assert_eq!(why(&dir, "dangling"), Escape::DanglingLink);
    }

    #[test]
    fn the_lexical_check_alone() {
        check_relative("wav/a.wav").unwrap();
        assert_eq!(check_relative("/abs/a.wav"), Err(Escape::Absolute));
        assert_eq!(check_relative("../a.wav"), Err(Escape::ParentComponent));
        assert_eq!(check_relative(""), Err(Escape::Empty));
    }
}
