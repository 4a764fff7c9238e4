//! `upcycle data prepare`: turns a corpus into a dataset directory.
//!
//! ```text
//! OUT/train/data.list  OUT/dev/data.list  OUT/test/data.list   WeNet lists
//! OUT/wav/<key>.wav                                            16 kHz mono 16-bit
//! OUT/units.txt        WeNet lang_char.txt form, from the training transcripts
//! OUT/global_cmvn      WeNet global CMVN JSON, from the training features
//! OUT/summary.json     utterances, hours, speakers, characters per split
//! ```
//!
//! The split is deterministic and by *group* (a Fillets level, or a sentence), so no
//! test sentence is seen in training; training utterances whose normalised text also
//! occurs in dev or test are removed as well. The directory is built under a temporary
//! name and renamed when complete, so an interrupted run never leaves a half dataset
//! (and never touches a complete one).

mod sources;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use upcycle_files::atomic::StagedDir;

use super::audio::{self, SAMPLE_RATE};
use super::cmvn::CmvnStats;
use super::fbank::{Fbank, FbankOptions};
use super::list::{write_list, ListEntry};
use super::text::{self, Units};

/// The corpora `data prepare` knows (named on the command line by [`CorpusName::label`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CorpusName {
    /// Fish Fillets NG Czech dialogue.
    FilletsCs,
    /// Asterisk English telephone prompts.
    AsteriskEn,
    /// Six languages of real speech: Fillets NG Czech (split by level) plus the Asterisk
    /// prompts in English, Spanish, French, Italian and Russian (split by prompt file);
    /// every utterance tagged with its language, one character vocabulary.
    Multilingual,
    /// pocketsphinx's LibriVox and cards clips.
    Librivox,
    /// Synthetic English from espeak-ng.
    EspeakEn,
    /// Your own data.
    Dir,
}

impl CorpusName {
    /// Every corpus, in the order `--help` lists them.
    pub const ALL: [CorpusName; 6] = [
        CorpusName::FilletsCs,
        CorpusName::AsteriskEn,
        CorpusName::Multilingual,
        CorpusName::Librivox,
        CorpusName::EspeakEn,
        CorpusName::Dir,
    ];

    /// What the corpus is, in a line.
    pub fn about(self) -> &'static str {
        match self {
            CorpusName::FilletsCs => {
                "Fish Fillets NG Czech dialogue (real, ~1,750 utterances, 1.6 h), split by level"
            }
            CorpusName::AsteriskEn => {
                "Asterisk English telephone prompts (real, one speaker, 8 kHz upsampled)"
            }
            CorpusName::Multilingual => {
                "Fillets NG Czech + Asterisk prompts in en/es/fr/it/ru (real, ~4,100 \
                 utterances, 3 h), language-tagged, no test sentence trained on"
            }
            CorpusName::Librivox => {
                "pocketsphinx's LibriVox and cards clips (real, 10 utterances; for tests)"
            }
            CorpusName::EspeakEn => {
                "Synthetic English from espeak-ng with varied voices, speeds and pitches"
            }
            CorpusName::Dir => "Your own data: `--src` with wav.scp + text, or a data.list",
        }
    }

    /// Debian packages the corpus needs.
    pub fn packages(self) -> &'static [&'static str] {
        match self {
            CorpusName::FilletsCs => &[
                "fillets-ng-data",
                "fillets-ng-data-cs",
                "sox",
                "libsox-fmt-base",
            ],
            CorpusName::AsteriskEn => &["asterisk-core-sounds-en-wav", "asterisk-core-sounds-en"],
            CorpusName::Multilingual => &[
                "fillets-ng-data",
                "fillets-ng-data-cs",
                "sox",
                "libsox-fmt-base",
                "asterisk-core-sounds-en-wav",
                "asterisk-core-sounds-en",
                "asterisk-core-sounds-es-wav",
                "asterisk-core-sounds-es",
                "asterisk-core-sounds-fr-wav",
                "asterisk-core-sounds-fr",
                "asterisk-core-sounds-it-wav",
                "asterisk-core-sounds-it",
                "asterisk-core-sounds-ru-wav",
                "asterisk-core-sounds-ru",
            ],
            CorpusName::Librivox => &["pocketsphinx-testdata"],
            CorpusName::EspeakEn => &["espeak-ng", "fortunes-min"],
            CorpusName::Dir => &["sox", "libsox-fmt-base"],
        }
    }

    /// Its name (on the command line, in `summary.json`).
    pub fn label(self) -> &'static str {
        match self {
            CorpusName::FilletsCs => "fillets-cs",
            CorpusName::AsteriskEn => "asterisk-en",
            CorpusName::Multilingual => "multilingual",
            CorpusName::Librivox => "librivox",
            CorpusName::EspeakEn => "espeak-en",
            CorpusName::Dir => "dir",
        }
    }
}

/// Options of `data prepare`.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Which corpus.
    pub corpus: CorpusName,
    /// Output dataset directory.
    pub out: PathBuf,
    /// Utterances to synthesise (`espeak-en`).
    pub count: usize,
    /// espeak-ng utterances per language added to the training split (`multilingual`).
    pub synth_per_language: usize,
    /// Source folder or list (`dir`).
    pub src: Option<PathBuf>,
    /// Seed of synthesis choices.
    pub seed: u64,
    /// Rebuild even if a complete dataset is already there.
    pub force: bool,
    /// Install missing Debian packages with apt-get (else say which command to run).
    pub install: bool,
    /// Refuse when more than this fraction of recordings cannot be converted.
    pub max_bad_fraction: f64,
}

/// An utterance as found in a corpus, before conversion.
#[derive(Debug, Clone)]
pub(crate) struct RawUtterance {
    pub(crate) key: String,
    pub(crate) audio: PathBuf,
    pub(crate) text: String,
    pub(crate) speaker: String,
    /// Utterances of one group always land in the same split.
    pub(crate) group: String,
    /// Language tag, written to the lists for per-language scoring.
    pub(crate) lang: Option<String>,
    /// A split the source already fixed.
    pub(crate) split: Option<&'static str>,
}

/// Statistics of one split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitStats {
    /// Utterances.
    pub utterances: usize,
    /// Hours of audio.
    pub hours: f64,
    /// Distinct speakers.
    pub speakers: usize,
    /// Characters of the normalised transcripts (spaces included).
    pub characters: usize,
    /// Distinct groups (levels, sentences) in the split.
    pub groups: usize,
    /// Utterances with characters outside the units (dev/test only; scored as `<unk>`).
    pub with_unknown_characters: usize,
}

/// Statistics per language, then per split.
pub type LanguageStats = BTreeMap<String, BTreeMap<String, SplitStats>>;

/// What `summary.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The corpus.
    pub corpus: CorpusName,
    /// Per split: train, dev, test.
    pub splits: BTreeMap<String, SplitStats>,
    /// Per language tag, per split (utterances without a tag are not counted here).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub languages: LanguageStats,
    /// Size of the units file.
    pub units: usize,
    /// Recordings that could not be used, by reason.
    pub skipped: BTreeMap<String, usize>,
    /// Training utterances removed because their text occurs in dev or test.
    pub removed_overlap: usize,
    /// Frames in the CMVN statistics.
    pub cmvn_frames: u64,
    /// espeak-ng utterances per language asked for the training split (`multilingual`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub synth_per_language: usize,
    /// The synthetic training utterances that were kept, and their hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic_train: Option<(usize, f64)>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Summary {
    /// A table for the terminal.
    pub fn table(&self) -> String {
        let mut s = format!("corpus {}  ({} units)\n", self.corpus.label(), self.units);
        s.push_str("split   utterances    hours  speakers  characters  groups\n");
        for name in ["train", "dev", "test"] {
            if let Some(st) = self.splits.get(name) {
                s.push_str(&format!(
                    "{name:<6} {:>11} {:>8.3} {:>9} {:>11} {:>7}\n",
                    st.utterances, st.hours, st.speakers, st.characters, st.groups
                ));
            }
        }
        let total: usize = self.splits.values().map(|s| s.utterances).sum();
        let hours: f64 = self.splits.values().map(|s| s.hours).sum();
        s.push_str(&format!("total  {total:>11} {hours:>8.3}\n"));
        if self.languages.len() > 1 {
            s.push_str("lang  split   utterances    hours  speakers  groups\n");
            for (lang, splits) in &self.languages {
                for name in ["train", "dev", "test"] {
                    let Some(st) = splits.get(name) else {
                        continue;
                    };
                    s.push_str(&format!(
                        "{lang:<5} {name:<6} {:>11} {:>8.3} {:>9} {:>7}\n",
                        st.utterances, st.hours, st.speakers, st.groups
                    ));
                }
            }
        }
        if let Some((n, hours)) = self.synthetic_train {
            s.push_str(&format!(
                "of train: {n} utterances, {hours:.3} h synthesised by espeak-ng\n"
            ));
        }
        if self.removed_overlap > 0 {
            s.push_str(&format!(
                "removed from train: {} utterances whose sentence is in dev/test\n",
                self.removed_overlap
            ));
        }
        for (why, n) in &self.skipped {
            s.push_str(&format!("skipped: {n} ({why})\n"));
        }
        s
    }
}

/// Runs `f` over `items` on all cores, keeping order, with a progress bar labelled
/// `what` for the person at the terminal (hidden when stderr is not one).
pub(crate) fn parallel_map<T: Sync, R: Send>(
    what: &str,
    items: &[T],
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let bar = indicatif::ProgressBar::new(items.len() as u64).with_message(what.to_string());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>12} [{bar:40}] {pos}/{len} {elapsed_precise} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(items.len().max(1));
    let next = AtomicUsize::new(0);
    let mut results: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    let slots: Vec<std::sync::Mutex<&mut Option<R>>> =
        results.iter_mut().map(std::sync::Mutex::new).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items.len() {
                    break;
                }
                let r = f(&items[i]);
                **slots[i].lock().expect("no panics while holding") = Some(r);
                bar.inc(1);
            });
        }
    });
    bar.finish_and_clear();
    drop(slots);
    results
        .into_iter()
        .map(|r| r.expect("every item mapped"))
        .collect()
}

impl PrepareOptions {
    /// The Debian packages this preparation needs.
    fn packages(&self) -> Vec<&'static str> {
        let mut p = self.corpus.packages().to_vec();
        if self.synth_per_language > 0 {
            p.push("espeak-ng");
        }
        p
    }
}

/// The packages that `dpkg-query` does not report as installed.
fn missing_packages(packages: &[&'static str]) -> Vec<&'static str> {
    packages
        .iter()
        .copied()
        .filter(|p| {
            let out = std::process::Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

/// Makes sure the corpus's Debian packages are present: installs them with apt-get
/// when allowed, else fails with the exact command to run.
fn ensure_packages(opts: &PrepareOptions) -> Result<()> {
    let (corpus, packages) = (opts.corpus, opts.packages());
    let missing = missing_packages(&packages);
    if missing.is_empty() {
        return Ok(());
    }
    let cmd = format!(
        "apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !opts.install {
        bail!(
            "corpus {} needs Debian packages that are not installed; run: {cmd}",
            corpus.label()
        );
    }
    tracing::info!("installing {}", missing.join(" "));
    let ok = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive {cmd} -qq"
        ))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok || !missing_packages(&packages).is_empty() {
        bail!(
            "installing the packages of corpus {} failed; run as root: {cmd}",
            corpus.label()
        );
    }
    Ok(())
}

/// Deterministic split by group: groups are ordered by a hash of their name and dealt
/// out to test, then dev, until each holds about 10% of the utterances.
fn assign_splits(utts: &[RawUtterance]) -> HashMap<String, &'static str> {
    let mut sizes: BTreeMap<&str, usize> = BTreeMap::new();
    for u in utts.iter().filter(|u| u.split.is_none()) {
        *sizes.entry(u.group.as_str()).or_default() += 1;
    }
    let total: usize = sizes.values().sum();
    let fnv = |s: &str| {
        s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        })
    };
    let mut groups: Vec<(&str, usize)> = sizes.into_iter().collect();
    groups.sort_by_key(|(g, _)| (fnv(g), *g));
    let target = (total as f64 * 0.1).round().max(1.0) as usize;
    let (mut test, mut dev) = (0, 0);
    let mut out = HashMap::new();
    for (g, n) in groups {
        let split = if test < target && total >= 3 {
            test += n;
            "test"
        } else if dev < target && total >= 3 {
            dev += n;
            "dev"
        } else {
            "train"
        };
        out.insert(g.to_string(), split);
    }
    out
}

/// Converts one recording to a 16 kHz mono 16-bit WAV: WAV is read and resampled in
/// Rust; other formats are decoded by sox first. Returns the duration in seconds.
fn convert(src: &Path, dst: &Path, tmp: &Path) -> Result<f64, String> {
    let is_wav = src
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("wav"));
    let decoded;
    let wav_path = if is_wav {
        src
    } else {
        if !src.exists() {
            return Err("missing file".into());
        }
        decoded = tmp.join(format!(
            "{}.wav",
            dst.file_stem().unwrap().to_string_lossy()
        ));
        // -D: no dither, -R: repeatable; the same input always gives the same WAV.
        let st = std::process::Command::new("sox")
            .args(["-D", "-R"])
            .arg(src)
            .args(["-b", "16", "-e", "signed-integer"])
            .arg(&decoded)
            .stderr(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("cannot run sox ({e}); apt-get install sox libsox-fmt-base"))?;
        if !st.success() {
            return Err("not audio".into());
        }
        &decoded
    };
    let a = audio::read_wav(wav_path).map_err(|e| e.kind().to_string())?;
    let rate = a.sample_rate;
    let samples = audio::resample(&a.into_mono(), rate, SAMPLE_RATE);
    if !is_wav {
        let _ = std::fs::remove_file(wav_path);
    }
    if samples.len() < 400 {
        return Err("shorter than one frame".into());
    }
    audio::write_wav_i16(dst, &samples, SAMPLE_RATE).map_err(|e| format!("cannot write: {e}"))?;
    Ok(samples.len() as f64 / SAMPLE_RATE as f64)
}

/// Prepares a dataset directory; returns its summary (also printed by the CLI).
pub fn prepare(opts: &PrepareOptions) -> Result<Summary> {
    if opts.synth_per_language > 0 && opts.corpus != CorpusName::Multilingual {
        bail!(
            "--synth adds speech to the multilingual corpus only; for synthetic English \
             alone use --corpus espeak-en --count N"
        );
    }
    let summary_path = opts.out.join("summary.json");
    if summary_path.exists() && !opts.force {
        let s: Summary = serde_json::from_str(&std::fs::read_to_string(&summary_path)?)
            .with_context(|| {
                format!(
                    "{} is not a dataset summary; use --force to rebuild",
                    summary_path.display()
                )
            })?;
        if s.corpus != opts.corpus {
            bail!(
                "{} already holds corpus {}; choose another --out or pass --force to replace it",
                opts.out.display(),
                s.corpus.label()
            );
        }
        if s.synth_per_language != opts.synth_per_language {
            bail!(
                "{} was prepared with --synth {} (not {}); choose another --out or pass \
                 --force to replace it",
                opts.out.display(),
                s.synth_per_language,
                opts.synth_per_language
            );
        }
        tracing::info!(
            "{} is complete; pass --force to rebuild",
            opts.out.display()
        );
        return Ok(s);
    }
    ensure_packages(opts)?;

    let staged = StagedDir::beside(&opts.out, "partial")?;
    std::fs::create_dir_all(staged.path().join("wav"))?;
    let summary = build(opts, staged.path())?;
    // The lists point into wav/ by relative path, so the rename keeps them valid.
    staged.publish()?;
    Ok(summary)
}

/// Builds the dataset in `work`: gather, convert, split, units, CMVN, lists, summary.
fn build(opts: &PrepareOptions, work: &Path) -> Result<Summary> {
    let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
    let utts = gather(opts, work, &mut skipped)?;
    let kept = convert_all(opts, work, utts, &mut skipped)?;
    let (mut splits, removed_overlap) = split(&kept);
    let train = splits
        .get("train")
        .filter(|t| !t.is_empty())
        .context("no training utterances left after the split")?;

    let synthetic_train = (opts.synth_per_language > 0).then(|| {
        let synth: Vec<&SplitItem> = train
            .iter()
            .filter(|i| i.entry.key.starts_with("espeak-"))
            .collect();
        (
            synth.len(),
            synth.iter().map(|i| i.secs).sum::<f64>() / 3600.0,
        )
    });
    let units = Units::from_texts(train.iter().map(|i| i.entry.txt.as_str()));
    units.save(&work.join("units.txt"))?;
    let cmvn = global_cmvn(work, train)?;
    let (stats, languages) = write_splits(work, &mut splits, &units)?;
    let summary = Summary {
        corpus: opts.corpus,
        splits: stats,
        languages,
        units: units.len(),
        skipped,
        removed_overlap,
        cmvn_frames: cmvn.frame_num,
        synth_per_language: opts.synth_per_language,
        synthetic_train,
    };
    std::fs::write(
        work.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    Ok(summary)
}

/// A recording converted to `wav/`, with its path relative to the dataset and seconds.
struct Converted {
    utt: RawUtterance,
    wav: String,
    secs: f64,
}

/// A list entry of a split, with what its statistics need.
struct SplitItem {
    entry: ListEntry,
    speaker: String,
    secs: f64,
    group: String,
}

/// The corpus's utterances, without duplicate keys or empty transcripts (counted in
/// `skipped`).
fn gather(
    opts: &PrepareOptions,
    work: &Path,
    skipped: &mut BTreeMap<String, usize>,
) -> Result<Vec<RawUtterance>> {
    let mut utts = match opts.corpus {
        CorpusName::FilletsCs => sources::fillets_cs()?,
        CorpusName::AsteriskEn => sources::asterisk("en")?,
        CorpusName::Multilingual => multilingual(opts.synth_per_language, opts.seed, work)?,
        CorpusName::Librivox => sources::librivox()?,
        CorpusName::EspeakEn => sources::espeak_en(opts.count, opts.seed, &work.join("synth"))?,
        CorpusName::Dir => {
            let src = opts
                .src
                .as_deref()
                .context("--corpus dir needs --src FOLDER_OR_LIST")?;
            sources::user_dir(src)?
        }
    };
    let mut seen_keys = HashSet::new();
    utts.retain(|u| {
        let fresh = seen_keys.insert(u.key.clone());
        if !fresh {
            *skipped.entry("duplicate key".into()).or_default() += 1;
        }
        fresh
    });
    utts.retain(|u| {
        let ok = !text::normalize(&u.text).is_empty();
        if !ok {
            *skipped.entry("empty transcript".into()).or_default() += 1;
        }
        ok
    });
    if utts.is_empty() {
        bail!(
            "corpus {} has no utterances with a transcript",
            opts.corpus.label()
        );
    }
    Ok(utts)
}

/// Fillets Czech and the five Asterisk languages, each source split on its own (by
/// level; by prompt file) so that every language gets its ~10% dev and test. Every
/// transcript goes through [`sources::spoken_text`] of its language. With
/// `synth_per_language` > 0, that many espeak-ng utterances of each language join the
/// training split ([`synthetic_training_speech`]).
fn multilingual(synth_per_language: usize, seed: u64, work: &Path) -> Result<Vec<RawUtterance>> {
    // Czech text normalised as every language is (its lines with digits left out).
    let fillets: Vec<RawUtterance> = sources::fillets_cs()?
        .into_iter()
        .filter_map(|mut u| {
            u.text = sources::spoken_text("cs", &u.text)?;
            Some(u)
        })
        .collect();
    let mut prompts = Vec::new();
    for (lang, _) in sources::ASTERISK_VOICES {
        prompts.extend(sources::asterisk(lang)?);
    }
    let mut out = Vec::new();
    for mut part in [fillets, prompts] {
        let by_group = assign_splits(&part);
        part.iter_mut()
            .for_each(|u| u.split = Some(by_group[&u.group]));
        out.extend(part);
    }
    if synth_per_language > 0 {
        let synth = synthetic_training_speech(&out, synth_per_language, seed, work)?;
        out.extend(synth);
    }
    Ok(out)
}

/// Words in a synthesised line: long lines would make batches of one.
const SYNTH_WORDS: std::ops::RangeInclusive<usize> = 2..=30;

/// espeak-ng speech in each language of `real`, for the training split only. Its text is
/// the language's training transcripts plus the game's dialogue in that language
/// (Fillets NG ships translations of every line) from levels that are not held out, so
/// no dev or test sentence is spoken (and [`split`] drops any that still matches one).
/// Voices, variants, speeds and pitches are drawn at random; the Asterisk languages are
/// band-limited to 8 kHz, as their prompts are.
fn synthetic_training_speech(
    real: &[RawUtterance],
    per_language: usize,
    seed: u64,
    work: &Path,
) -> Result<Vec<RawUtterance>> {
    let held_out_levels: HashSet<&str> = real
        .iter()
        .filter(|u| u.key.starts_with("fillets-") && u.split != Some("train"))
        .map(|u| u.group.as_str())
        .collect();
    let mut out = Vec::new();
    for (i, (lang, voices)) in sources::ESPEAK_LANGUAGES.iter().enumerate() {
        let mut texts: BTreeSet<String> = real
            .iter()
            .filter(|u| u.lang.as_deref() == Some(lang) && u.split == Some("train"))
            .map(|u| u.text.clone())
            .collect();
        for (level, line) in sources::fillets_lines(lang)? {
            if !held_out_levels.contains(level.as_str()) {
                texts.extend(sources::spoken_text(lang, &line));
            }
        }
        texts.retain(|t| SYNTH_WORDS.contains(&t.split_whitespace().count()));
        let texts: Vec<String> = texts.into_iter().collect();
        tracing::info!(
            "synthesising {per_language} utterances of {lang} from {} training sentences",
            texts.len()
        );
        let how = sources::Synthesis {
            lang,
            voices,
            telephone: *lang != "cs",
            key_prefix: &format!("espeak-{lang}"),
        };
        let mut part = sources::espeak(
            &how,
            &texts,
            per_language,
            seed.wrapping_add(i as u64),
            &work.join("synth"),
        )?;
        part.iter_mut().for_each(|u| u.split = Some("train"));
        out.extend(part);
    }
    Ok(out)
}

/// Converts every recording to 16 kHz mono under `work/wav`; recordings that fail are
/// counted in `skipped`, and refused when more than `max_bad_fraction` of them fail.
fn convert_all(
    opts: &PrepareOptions,
    work: &Path,
    utts: Vec<RawUtterance>,
    skipped: &mut BTreeMap<String, usize>,
) -> Result<Vec<Converted>> {
    tracing::info!("converting {} recordings to 16 kHz mono", utts.len());
    let tmp = work.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    let converted = parallel_map("converting", &utts, |u| {
        let safe: String = u
            .key
            .chars()
            .map(|c| {
                if c.is_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let dst = work.join("wav").join(format!("{safe}.wav"));
        convert(&u.audio, &dst, &tmp).map(|secs| (format!("wav/{safe}.wav"), secs))
    });
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(work.join("synth"));
    let mut kept = Vec::new();
    let mut bad = 0;
    for (u, c) in utts.into_iter().zip(converted) {
        match c {
            Ok((wav, secs)) => kept.push(Converted { utt: u, wav, secs }),
            Err(why) => {
                bad += 1;
                tracing::debug!(key = %u.key, audio = %u.audio.display(), "skipped: {why}");
                *skipped.entry(why).or_default() += 1;
            }
        }
    }
    let total = kept.len() + bad;
    if bad as f64 > opts.max_bad_fraction * total as f64 {
        bail!("{bad} of {total} recordings could not be converted ({skipped:?}); see the log with RUST_LOG=debug");
    }
    if bad > 0 {
        tracing::warn!("skipped {bad} of {total} recordings: {skipped:?}");
    }
    Ok(kept)
}

/// Splits by group, then keeps train free of dev/test sentences: the items of each
/// split, and how many training utterances were removed for it.
fn split(kept: &[Converted]) -> (BTreeMap<&'static str, Vec<SplitItem>>, usize) {
    let raw: Vec<RawUtterance> = kept.iter().map(|c| c.utt.clone()).collect();
    let by_group = assign_splits(&raw);
    let split_of = |u: &RawUtterance| u.split.unwrap_or_else(|| by_group[&u.group]);
    let held_out: HashSet<String> = kept
        .iter()
        .filter(|c| split_of(&c.utt) != "train")
        .map(|c| text::normalize(&c.utt.text))
        .collect();
    let mut removed_overlap = 0;
    let mut splits: BTreeMap<&'static str, Vec<SplitItem>> = BTreeMap::new();
    for Converted { utt: u, wav, secs } in kept {
        let split = split_of(u);
        let norm = text::normalize(&u.text);
        if split == "train" && held_out.contains(&norm) {
            removed_overlap += 1;
            continue;
        }
        let entry = ListEntry {
            key: u.key.clone(),
            wav: format!("../{wav}"),
            txt: norm,
            lang: u.lang.clone(),
        };
        splits.entry(split).or_default().push(SplitItem {
            entry,
            speaker: u.speaker.clone(),
            secs: *secs,
            group: u.group.clone(),
        });
    }
    (splits, removed_overlap)
}

/// Global CMVN over the training features, written to `work/global_cmvn`.
fn global_cmvn(work: &Path, train: &[SplitItem]) -> Result<CmvnStats> {
    tracing::info!(
        "computing global CMVN over {} training utterances",
        train.len()
    );
    let fbank = Fbank::new(FbankOptions::default());
    let partial = parallel_map("CMVN", train, |item| {
        let mut st = CmvnStats::new(fbank.dim());
        if let Ok(samples) = audio::read_model_input(
            &work
                .join("wav")
                .join(item.entry.wav.trim_start_matches("../wav/")),
        ) {
            st.accumulate(&fbank.compute(&samples, &mut rand::rng()));
        }
        st
    });
    let mut cmvn = CmvnStats::new(fbank.dim());
    partial.iter().for_each(|p| cmvn.merge(p));
    cmvn.save(&work.join("global_cmvn"))?;
    Ok(cmvn)
}

/// Writes `work/<split>/data.list` for train, dev and test (empty when a split has no
/// items) and returns their statistics.
fn write_splits(
    work: &Path,
    splits: &mut BTreeMap<&'static str, Vec<SplitItem>>,
    units: &Units,
) -> Result<(BTreeMap<String, SplitStats>, LanguageStats)> {
    let mut stats = BTreeMap::new();
    let mut languages = LanguageStats::new();
    for name in ["train", "dev", "test"] {
        let items = splits.remove(name).unwrap_or_default();
        let dir = work.join(name);
        std::fs::create_dir_all(&dir)?;
        let entries: Vec<ListEntry> = items.iter().map(|i| i.entry.clone()).collect();
        write_list(&dir.join("data.list"), &entries)?;
        stats.insert(name.to_string(), split_stats(&items, units));
        let mut by_lang: BTreeMap<&str, Vec<&SplitItem>> = BTreeMap::new();
        for i in &items {
            if let Some(lang) = &i.entry.lang {
                by_lang.entry(lang).or_default().push(i);
            }
        }
        for (lang, part) in by_lang {
            languages
                .entry(lang.to_string())
                .or_default()
                .insert(name.to_string(), split_stats(&part, units));
        }
    }
    Ok((stats, languages))
}

/// The statistics of some items of one split.
fn split_stats<I: std::borrow::Borrow<SplitItem>>(items: &[I], units: &Units) -> SplitStats {
    let items: Vec<&SplitItem> = items.iter().map(|i| i.borrow()).collect();
    let speakers: BTreeSet<&str> = items.iter().map(|i| i.speaker.as_str()).collect();
    let groups: BTreeSet<&str> = items.iter().map(|i| i.group.as_str()).collect();
    SplitStats {
        utterances: items.len(),
        hours: items.iter().map(|i| i.secs).sum::<f64>() / 3600.0,
        speakers: speakers.len(),
        characters: items.iter().map(|i| i.entry.txt.chars().count()).sum(),
        groups: groups.len(),
        with_unknown_characters: items
            .iter()
            .filter(|i| units.encode(&i.entry.txt).1 > 0)
            .count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utt(key: &str, group: &str) -> RawUtterance {
        RawUtterance {
            key: key.into(),
            audio: PathBuf::new(),
            text: key.into(),
            speaker: "s".into(),
            group: group.into(),
            lang: None,
            split: None,
        }
    }

    #[test]
    fn split_is_by_group_deterministic_and_about_80_10_10() {
        let utts: Vec<RawUtterance> = (0..1000)
            .map(|i| utt(&format!("u{i}"), &format!("g{}", i % 50)))
            .collect();
        let a = assign_splits(&utts);
        let b = assign_splits(&utts);
        assert_eq!(a, b);
        let count = |s: &str| utts.iter().filter(|u| a[&u.group] == s).count();
        assert!((80..=140).contains(&count("test")), "{}", count("test"));
        assert!((80..=140).contains(&count("dev")), "{}", count("dev"));
        assert_eq!(count("train") + count("dev") + count("test"), 1000);
    }
}
