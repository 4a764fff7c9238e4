//! Error rates: Levenshtein distance over characters (CER, spaces excluded) and words
//! (WER) of normalised text, accumulated over a data set.

use serde::Serialize;
use upcycle_dataset::text::normalize;

/// Edit distance between two sequences.
pub fn edit_distance<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, x) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(x != y))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Character and word errors accumulated over utterances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ErrorRate {
    /// Character edits.
    pub char_errors: usize,
    /// Reference characters (spaces excluded).
    pub chars: usize,
    /// Word edits.
    pub word_errors: usize,
    /// Reference words.
    pub words: usize,
    /// Utterances.
    pub utterances: usize,
}

impl ErrorRate {
    /// Adds one utterance; both texts are normalised first. Returns its (char errors,
    /// chars).
    pub fn add(&mut self, reference: &str, hypothesis: &str) -> (usize, usize) {
        let r = normalize(reference);
        let h = normalize(hypothesis);
        let rc: Vec<char> = r.chars().filter(|c| *c != ' ').collect();
        let hc: Vec<char> = h.chars().filter(|c| *c != ' ').collect();
        let rw: Vec<&str> = r.split_whitespace().collect();
        let hw: Vec<&str> = h.split_whitespace().collect();
        let ce = edit_distance(&rc, &hc);
        self.char_errors += ce;
        self.chars += rc.len();
        self.word_errors += edit_distance(&rw, &hw);
        self.words += rw.len();
        self.utterances += 1;
        (ce, rc.len())
    }

    /// Character error rate in percent.
    pub fn cer(&self) -> f64 {
        100.0 * self.char_errors as f64 / self.chars.max(1) as f64
    }

    /// Word error rate in percent.
    pub fn wer(&self) -> f64 {
        100.0 * self.word_errors as f64 / self.words.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_and_rates() {
        assert_eq!(edit_distance(&['a', 'b', 'c'], &['a', 'x', 'c', 'd']), 2);
        assert_eq!(edit_distance::<char>(&[], &['a']), 1);
        let mut e = ErrorRate::default();
        e.add("Ahoj, světe!", "ahoj svete");
        assert_eq!(
            (e.char_errors, e.chars, e.word_errors, e.words),
            (1, 9, 1, 2)
        );
        assert!((e.cer() - 100.0 / 9.0).abs() < 1e-9);
        assert!((e.wer() - 50.0).abs() < 1e-9);
    }
}
