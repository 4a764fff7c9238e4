//! Text: the one normaliser that training and scoring share, the character units file
//! (WeNet's `lang_char.txt` form) and the character tokenizer over it.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use thiserror::Error;

/// The unit that stands for a space between words (WeNet's `CharTokenizer` choice).
pub const SPACE: &str = "▁";
/// CTC blank, always id 0.
pub const BLANK: &str = "<blank>";
/// Unknown character, always id 1.
pub const UNK: &str = "<unk>";
/// Start/end of sentence, always the last id.
pub const SOS_EOS: &str = "<sos/eos>";

/// Normalises a transcript for training and scoring alike: lower case, punctuation and
/// symbols dropped (apostrophes inside words kept), hyphens and other separators turned
/// into spaces, runs of spaces collapsed.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
        } else if c == '\'' || c == '’' {
            let inside = i > 0
                && chars[i - 1].is_alphanumeric()
                && chars.get(i + 1).is_some_and(|n| n.is_alphanumeric());
            if inside {
                out.push('\'');
            }
        } else if c.is_whitespace() || c == '-' || c == '/' || c == '_' || c == '–' || c == '—'
        {
            out.push(' ');
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Splits normalised text into character units, spaces becoming [`SPACE`].
pub fn to_units(normalized: &str) -> impl Iterator<Item = String> + '_ {
    normalized.chars().map(|c| {
        if c == ' ' {
            SPACE.to_string()
        } else {
            c.to_string()
        }
    })
}

/// Errors reading a units file.
#[derive(Debug, Error)]
pub enum UnitsError {
    /// I/O failure.
    #[error("cannot read units file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A line is not `<unit> <id>` or ids are not 0..n in order.
    #[error("{path}:{line}: {message}")]
    Malformed {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// The character vocabulary: `<blank> 0`, `<unk> 1`, characters and `<sos/eos>` (last in
/// the vocabularies upcycle builds; anywhere in one it loads, e.g. 2 in WeNet's char
/// recipes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Units {
    symbols: Vec<String>,
    ids: HashMap<String, usize>,
}

impl Units {
    /// Builds the vocabulary from the characters of normalised transcripts, sorted so
    /// that the same corpus always gives the same ids.
    pub fn from_texts<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut chars = BTreeSet::new();
        for t in texts {
            chars.extend(to_units(t));
        }
        let mut symbols = vec![BLANK.to_string(), UNK.to_string()];
        symbols.extend(chars);
        symbols.push(SOS_EOS.to_string());
        Self::from_symbols(symbols)
    }

    fn from_symbols(symbols: Vec<String>) -> Self {
        let ids = symbols
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i))
            .collect();
        Self { symbols, ids }
    }

    /// Reads a `lang_char.txt`-style file (`<unit> <id>` per line, ids 0..n in order).
    pub fn load(path: &Path) -> Result<Self, UnitsError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| UnitsError::Io {
            path: p.clone(),
            source,
        })?;
        let mut symbols = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let malformed = |message: String| UnitsError::Malformed {
                path: p.clone(),
                line: i + 1,
                message,
            };
            let (sym, id) = line
                .rsplit_once(' ')
                .ok_or_else(|| malformed(format!("expected `<unit> <id>`, got {line:?}")))?;
            let id: usize = id
                .parse()
                .map_err(|_| malformed(format!("id {id:?} is not a number")))?;
            if id != symbols.len() {
                return Err(malformed(format!(
                    "id {id} out of order (expected {})",
                    symbols.len()
                )));
            }
            symbols.push(sym.to_string());
        }
        for (i, want) in [(0, BLANK), (1, UNK)] {
            if symbols.get(i).map(String::as_str) != Some(want) {
                return Err(UnitsError::Malformed {
                    path: p,
                    line: i + 1,
                    message: format!("unit {i} must be {want}"),
                });
            }
        }
        // WeNet's char recipes put it at 2, its BPE recipes and upcycle last.
        let sos_eos: Vec<usize> = (0..symbols.len())
            .filter(|&i| symbols[i] == SOS_EOS)
            .collect();
        if sos_eos.len() != 1 {
            return Err(UnitsError::Malformed {
                path: p,
                line: sos_eos.get(1).map_or(symbols.len(), |i| i + 1),
                message: format!("{SOS_EOS} must be there exactly once"),
            });
        }
        Ok(Self::from_symbols(symbols))
    }

    /// Writes the vocabulary in `lang_char.txt` form.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut s = String::new();
        for (i, sym) in self.symbols.iter().enumerate() {
            s.push_str(&format!("{sym} {i}\n"));
        }
        std::fs::write(path, s)
    }

    /// Number of units including the special ones.
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// Never true for a loaded or built vocabulary (the special units are always there).
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// The id of `<sos/eos>`.
    pub fn sos_eos(&self) -> usize {
        self.ids[SOS_EOS]
    }

    /// Units of a normalised transcript as ids; unknown characters become `<unk>`.
    /// Also returns how many were unknown.
    pub fn encode(&self, normalized: &str) -> (Vec<i64>, usize) {
        let mut unknown = 0;
        let ids = to_units(normalized)
            .map(|u| match self.ids.get(&u) {
                Some(&id) => id as i64,
                None => {
                    unknown += 1;
                    1
                }
            })
            .collect();
        (ids, unknown)
    }

    /// Text of a sequence of ids (special units dropped, [`SPACE`] back to a space).
    pub fn decode(&self, ids: &[i64]) -> String {
        let mut s = String::new();
        for &id in ids {
            match self.symbols.get(id as usize).map(String::as_str) {
                Some(BLANK) | Some(UNK) | Some(SOS_EOS) | None => {}
                Some(SPACE) => s.push(' '),
                Some(u) => s.push_str(u),
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_case_punctuation_and_spaces() {
        assert_eq!(
            normalize("Vidíš to oko?  Němý svědek..."),
            "vidíš to oko němý svědek"
        );
        assert_eq!(normalize("Don't press 'one'-two!"), "don't press one two");
        assert_eq!(normalize("LC-10 Lemura."), "lc 10 lemura");
        assert_eq!(normalize(" ?! "), "");
    }

    #[test]
    fn units_are_stable_and_roundtrip() {
        let u = Units::from_texts(["ba ab", "c"]);
        assert_eq!(u.len(), 2 + 4 + 1);
        assert_eq!(u.symbols[2], "a");
        assert_eq!(u.sos_eos(), 6);
        let (ids, unk) = u.encode("ab cz");
        assert_eq!(unk, 1);
        assert_eq!(ids, vec![2, 3, 6 - 1, 4, 1]);
        assert_eq!(u.decode(&ids), "ab c");

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("units.txt");
        u.save(&p).unwrap();
        assert_eq!(Units::load(&p).unwrap(), u);
    }

    #[test]
    fn malformed_units_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("units.txt");
        std::fs::write(&p, "<blank> 0\n<unk> 1\na 3\n<sos/eos> 4\n").unwrap();
        let e = Units::load(&p).unwrap_err().to_string();
        assert!(e.contains(":3:") && e.contains("out of order"), "{e}");
        std::fs::write(&p, "<blank> 0\n<unk> 1\na 2\n").unwrap();
        assert!(Units::load(&p)
            .unwrap_err()
            .to_string()
            .contains("<sos/eos>"));
        std::fs::write(&p, "<blank> 0\n<unk> 1\n<sos/eos> 2\na 3\n<sos/eos> 4\n").unwrap();
        let e = Units::load(&p).unwrap_err().to_string();
        assert!(e.contains(":5:") && e.contains("exactly once"), "{e}");
    }

    #[test]
    fn wenet_char_recipes_put_sos_eos_at_2() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lang_char.txt");
        std::fs::write(&p, "<blank> 0\n<unk> 1\n<sos/eos> 2\na 3\nb 4\n").unwrap();
        let u = Units::load(&p).unwrap();
        assert_eq!((u.len(), u.sos_eos()), (5, 2));
        let (ids, unk) = u.encode("ba");
        assert_eq!((ids.clone(), unk), (vec![4, 3], 0));
        assert_eq!(u.decode(&[4, 2, 3]), "ba");
    }
}
