//! Data lists: WeNet's `data.list` (one JSON object per line with `key`, `wav`, `txt`),
//! read as a stream, and Kaldi's `wav.scp` + `text` pair.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// One utterance of a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    /// Unique utterance id.
    pub key: String,
    /// Path of the audio; relative paths are relative to the list's folder.
    pub wav: String,
    /// Transcript.
    pub txt: String,
    /// Language tag (`cs`, `en`, ...) of a multilingual corpus; scoring reports CER per
    /// language from it. Absent in plain WeNet lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
}

/// A list that cannot be read. Bad *audio* is not an error here: it is counted by the
/// loader; a list whose lines do not parse is.
#[derive(Debug, Error)]
pub enum ListError {
    /// I/O failure on the list itself.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The list.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line that is not a JSON object with string fields `key`, `wav`, `txt`.
    #[error("{path}:{line}: malformed list line ({message}); expected {{\"key\": ..., \"wav\": ..., \"txt\": ...}}")]
    Malformed {
        /// The list.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What the parser said.
        message: String,
    },
}

/// Streams the entries of a `data.list`, with their 0-based line index (blank lines are
/// skipped but still counted, so indices are stable). [`ListReader::last_offset`] says
/// where the entry just read starts, and [`ListReader::entry_at`] reads it again from
/// there: a loader reads its lines in a shuffled order without holding the list.
pub struct ListReader {
    path: PathBuf,
    base: PathBuf,
    reader: BufReader<File>,
    index: usize,
    /// Byte offset of the next line.
    offset: u64,
    /// Byte offset of the entry last returned.
    last: u64,
    line: String,
}

impl ListReader {
    /// Opens a list.
    pub fn open(path: &Path) -> Result<Self, ListError> {
        let file = File::open(path).map_err(|source| ListError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            base: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            reader: BufReader::new(file),
            index: 0,
            offset: 0,
            last: 0,
            line: String::new(),
        })
    }

    /// The entry whose line starts at byte `offset` (as the iterator gave it), numbered
    /// `index` in errors.
    pub fn entry_at(&mut self, offset: u64, index: usize) -> Result<ListEntry, ListError> {
        self.reader
            .seek(SeekFrom::Start(offset))
            .map_err(|source| self.io_error(source))?;
        self.offset = offset;
        self.index = index;
        match self.next() {
            Some(Ok((_, entry))) => Ok(entry),
            Some(Err(e)) => Err(e),
            None => Err(ListError::Malformed {
                path: self.path.clone(),
                line: index + 1,
                message: format!("no line at byte {offset} (the list changed while in use)"),
            }),
        }
    }

    /// Byte offset of the line of the entry the iterator returned last.
    pub fn last_offset(&self) -> u64 {
        self.last
    }

    fn io_error(&self, source: std::io::Error) -> ListError {
        ListError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Resolves an entry's audio path against the list's folder.
    pub fn resolve(&self, wav: &str) -> PathBuf {
        resolve(&self.base, wav)
    }
}

/// The policy for audio paths in a list (`data.list`, `wav.scp`): not confined. WeNet's
/// lists name audio anywhere (absolute paths; ours `../wav/` beside `train/`), and what
/// is read from such a path is only ever decoded as audio (a file that is not is counted
/// bad, never shown). An entry must still name something: an empty one, or one with a
/// control character (a NUL, a line break), is a malformed line.
fn check_audio_path(wav: &str) -> Result<(), String> {
    upcycle_files::confine::check_text(wav).map_err(|why| format!("audio path {wav:?}: {why}"))
}

/// Resolves `wav` against `base` unless it is absolute.
pub fn resolve(base: &Path, wav: &str) -> PathBuf {
    let p = Path::new(wav);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

impl Iterator for ListReader {
    type Item = Result<(usize, ListEntry), ListError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.line.clear();
            let read = match self.reader.read_line(&mut self.line) {
                Ok(0) => return None,
                Ok(n) => n,
                Err(source) => return Some(Err(self.io_error(source))),
            };
            let (index, offset) = (self.index, self.offset);
            self.index += 1;
            self.offset += read as u64;
            if self.line.trim().is_empty() {
                continue;
            }
            self.last = offset;
            return Some(
                serde_json::from_str::<ListEntry>(&self.line)
                    .map_err(|e| e.to_string())
                    .and_then(|e| check_audio_path(&e.wav).map(|()| (index, e)))
                    .map_err(|message| ListError::Malformed {
                        path: self.path.clone(),
                        line: index + 1,
                        message,
                    }),
            );
        }
    }
}

/// Writes entries as a `data.list`.
pub fn write_list(path: &Path, entries: &[ListEntry]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(File::create(path)?);
    for e in entries {
        serde_json::to_writer(&mut out, e)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Reads Kaldi's `wav.scp` (`<key> <path>`) and `text` (`<key> <transcript>`) from a
/// folder and joins them by key, in `wav.scp` order. Keys without a transcript are
/// errors naming the key; pipes (`cmd |`) in `wav.scp` are refused with the fix.
pub fn read_kaldi_dir(dir: &Path) -> Result<Vec<ListEntry>, ListError> {
    fn read_pairs(path: &Path) -> Result<Vec<(usize, String, String)>, ListError> {
        let text = std::fs::read_to_string(path).map_err(|source| ListError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let (k, v) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            out.push((i + 1, k.to_string(), v.trim().to_string()));
        }
        Ok(out)
    }
    let scp_path = dir.join("wav.scp");
    let text_path = dir.join("text");
    let texts: HashMap<String, String> = read_pairs(&text_path)?
        .into_iter()
        .map(|(_, k, v)| (k, v))
        .collect();
    let mut entries = Vec::new();
    for (line, key, wav) in read_pairs(&scp_path)? {
        let malformed = |message: String| ListError::Malformed {
            path: scp_path.clone(),
            line,
            message,
        };
        if wav.is_empty() {
            return Err(malformed(format!("no path for key {key:?}")));
        }
        if wav.ends_with('|') {
            return Err(malformed(format!(
                "{key:?} is a command pipe; convert the audio to files first"
            )));
        }
        check_audio_path(&wav).map_err(malformed)?;
        let txt = texts.get(&key).ok_or_else(|| {
            malformed(format!(
                "key {key:?} has no line in {}",
                text_path.display()
            ))
        })?;
        entries.push(ListEntry {
            key,
            wav: resolve(dir, &wav).display().to_string(),
            txt: txt.clone(),
            lang: None,
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_entries_and_names_malformed_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data.list");
        std::fs::write(
            &p,
            "{\"key\":\"a\",\"wav\":\"a.wav\",\"txt\":\"x\"}\n\n{\"key\":\"b\",\"wav\":\"/b.wav\"}\n",
        )
        .unwrap();
        let mut r = ListReader::open(&p).unwrap();
        let (i, e) = r.next().unwrap().unwrap();
        assert_eq!((i, e.key.as_str()), (0, "a"));
        assert_eq!(r.resolve(&e.wav), dir.path().join("a.wav"));
        let err = r.next().unwrap().unwrap_err().to_string();
        assert!(err.contains("data.list:3:") && err.contains("txt"), "{err}");
        assert!(r.next().is_none());
    }

    /// Fuzzing, seeded, a fixed number of inputs: `data.list` files and Kaldi folders
    /// (`tests/fuzz/list/`) mutated and read whole. No input may panic, hang (2 s each) or
    /// allocate above the test binary's bound.
    #[test]
    fn fuzz_lists() {
        let seeds = upcycle_files::fuzz::seeds(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fuzz/list"),
        );
        let dir = tempfile::tempdir().unwrap();
        let (list, limit) = (
            dir.path().join("data.list"),
            std::time::Duration::from_secs(2),
        );
        upcycle_files::fuzz::run("data.list", &seeds, 19_007, 2000, limit, |bytes| {
            std::fs::write(&list, bytes).unwrap();
            for entry in ListReader::open(&list).unwrap().flatten() {
                let _ = resolve(dir.path(), &entry.1.wav);
            }
        });
        std::fs::write(dir.path().join("text"), "u1 hi\nu2 there\n").unwrap();
        upcycle_files::fuzz::run("wav.scp", &seeds, 19_008, 1000, limit, |bytes| {
            std::fs::write(dir.path().join("wav.scp"), bytes).unwrap();
            let _ = read_kaldi_dir(dir.path());
        });
    }

    #[test]
    fn audio_paths_name_something() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data.list");
        let line = |wav: &str| {
            let wav = serde_json::to_string(wav).unwrap();
            format!("{{\"key\":\"k\",\"wav\":{wav},\"txt\":\"x\"}}\n")
        };
        let lines = [
            "/abs/a.wav",
            "wav/b.wav",
            "../wav/c.wav",
            "",
            "a\0.wav",
            "a\n.wav",
        ];
        std::fs::write(&p, lines.map(line).concat()).unwrap();
        let got: Vec<_> = ListReader::open(&p).unwrap().collect();
        for (line, r) in got.iter().enumerate().take(3) {
            assert_eq!(r.as_ref().unwrap().1.wav, lines[line]);
        }
        for (line, r) in got.iter().enumerate().skip(3) {
            let err = r.as_ref().unwrap_err().to_string();
            let want = if lines[line].is_empty() {
                "empty"
            } else {
                "control character"
            };
            assert!(
                err.contains(&format!("data.list:{}:", line + 1)) && err.contains(want),
                "{err}"
            );
        }
        std::fs::write(dir.path().join("wav.scp"), "u1 a\x01.wav\n").unwrap();
        std::fs::write(dir.path().join("text"), "u1 hi\n").unwrap();
        let err = read_kaldi_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("wav.scp:1") && err.contains("control character"),
            "{err}"
        );
    }

    #[test]
    fn kaldi_dir_joins_by_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("wav.scp"), "u1 a.wav\nu2 /x/b.wav\n").unwrap();
        std::fs::write(dir.path().join("text"), "u2 hello there\nu1 hi\n").unwrap();
        let e = read_kaldi_dir(dir.path()).unwrap();
        assert_eq!(e[0].txt, "hi");
        assert_eq!(e[1].wav, "/x/b.wav");
        assert_eq!(e[1].txt, "hello there");
        std::fs::write(dir.path().join("wav.scp"), "u1 a.wav\nu3 c.wav\n").unwrap();
        let err = read_kaldi_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("wav.scp:2") && err.contains("u3"), "{err}");
    }
}
