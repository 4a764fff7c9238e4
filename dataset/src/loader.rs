//! The training data loader: a streamed `data.list` is checked, sharded over ranks,
//! shuffled and sorted within windows, grouped into batches, and turned into padded
//! feature tensors by background threads.
//!
//! Two promises hold for every epoch:
//! - each rank reads a disjoint shard of the list (line `i` belongs to rank
//!   `i % world`), and
//! - **every rank yields the same number of batches**, so no collective ever waits on a
//!   rank that ran out. Before an epoch each rank plans all ranks' batching from the
//!   list alone (headers and transcripts, no audio decoding), which is deterministic, so
//!   all ranks agree without communicating; ranks with fewer batches repeat their own
//!   first batches (flagged [`Batch::repeated`]).
//!
//! The audio headers of the whole list are read once per loader (a run), not per rank per
//! epoch: the first plan surveys the list (the frames of each usable line,
//! 4 bytes a line, and the input report, whose warning is logged once), and every epoch's
//! plan replays the batching from that. Otherwise memory does not grow with the corpus: the
//! list is streamed and only the shuffle and sort windows are held (per simulated rank while
//! planning).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::Tensor;
use thiserror::Error;

use super::audio;
use super::augment;
use super::config::{BatchType, DatasetConf};
use super::fbank::{Fbank, FbankOptions};
use super::list::{ListError, ListReader};
use super::text::{self, Units};

/// Errors that stop the loader (bad *utterances* are counted, not errors).
#[derive(Debug, Error)]
pub enum DataError {
    /// The list cannot be read or has a malformed line.
    #[error(transparent)]
    List(#[from] ListError),
    /// A configuration value that cannot work.
    #[error("invalid data configuration: {0}")]
    Config(String),
    /// Too much of the list is unusable.
    #[error("{list}: {bad} of {lines} utterances are bad input ({fraction:.1}%, above dataset_conf.max_bad_fraction = {max:.1}%): {summary}")]
    TooManyBad {
        /// The list.
        list: PathBuf,
        /// Bad utterances.
        bad: usize,
        /// Lines read.
        lines: usize,
        /// Percentage bad.
        fraction: f64,
        /// The allowed percentage.
        max: f64,
        /// Counts by kind, with examples.
        summary: String,
    },
    /// Nothing is left to train on.
    #[error("{list}: no usable utterance ({summary})")]
    NoUsable {
        /// The list.
        list: PathBuf,
        /// What happened to the lines.
        summary: String,
    },
}

/// Training applies dither, speed perturbation, SpecAugment and shuffling (as
/// configured); evaluation applies none of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Training.
    Train,
    /// Evaluation and dev-set loss.
    Eval,
}

/// This process's place among the data-parallel ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
}

impl Shard {
    /// The whole list in one process.
    pub const SINGLE: Shard = Shard { rank: 0, world: 1 };
}

/// An utterance that passed every check, ready to be batched.
#[derive(Debug, Clone, PartialEq)]
pub struct Utterance {
    /// Utterance id.
    pub key: String,
    /// Audio file.
    pub wav: PathBuf,
    /// Samples at 16 kHz.
    pub num_samples: usize,
    /// Feature frames (before speed perturbation).
    pub frames: usize,
    /// Token ids of the normalised transcript.
    pub tokens: Vec<i64>,
}

/// What happened to the lines of a list: counted, with a few examples of each problem.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InputReport {
    /// Lines read.
    pub lines: usize,
    /// Utterances that passed.
    pub usable: usize,
    /// Utterances outside the length filters (not bad input).
    pub filtered: usize,
    /// Bad inputs by kind.
    pub bad: BTreeMap<&'static str, usize>,
    /// Up to a few `line N (key): reason` examples.
    pub examples: Vec<String>,
}

const MAX_EXAMPLES: usize = 5;

impl InputReport {
    /// Bad utterances of all kinds.
    pub fn bad_total(&self) -> usize {
        self.bad.values().sum()
    }

    fn add_bad(&mut self, kind: &'static str, example: impl FnOnce() -> String) {
        *self.bad.entry(kind).or_default() += 1;
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(example());
        }
    }

    /// One line: counts by kind, then examples.
    pub fn summary(&self) -> String {
        let kinds: Vec<String> = self.bad.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let mut s = format!(
            "{} lines: {} usable, {} outside length filters, {} bad",
            self.lines,
            self.usable,
            self.filtered,
            self.bad_total()
        );
        if !kinds.is_empty() {
            s.push_str(&format!(
                " ({}); e.g. {}",
                kinds.join(", "),
                self.examples.join("; ")
            ));
        }
        s
    }
}

/// The verdict on one list line.
enum Verdict {
    Use(Utterance),
    Filtered,
    Bad(&'static str, String),
}

/// Checks one entry against the audio header, the units and the filters.
fn inspect(
    reader: &ListReader,
    entry: super::list::ListEntry,
    units: &Units,
    conf: &DatasetConf,
    fbank: &Fbank,
) -> Verdict {
    let wav = reader.resolve(&entry.wav);
    let info = match audio::probe(&wav).and_then(|i| audio::check_model_input(&i).map(|_| i)) {
        Ok(i) => i,
        Err(e) => return Verdict::Bad(e.kind(), format!("{}: {e}", wav.display())),
    };
    let normalized = text::normalize(&entry.txt);
    if normalized.is_empty() {
        return Verdict::Bad(
            "empty transcript",
            format!("transcript {:?} is empty after normalisation", entry.txt),
        );
    }
    let (tokens, unknown) = units.encode(&normalized);
    if unknown > 0 {
        return Verdict::Bad(
            "characters outside the units",
            format!("{unknown} character(s) of {normalized:?} are not in the units file"),
        );
    }
    let f = &conf.filter_conf;
    let centiseconds = info.num_samples as f64 / info.sample_rate as f64 * 100.0;
    let ratio = tokens.len() as f64 / centiseconds.max(1e-9);
    if centiseconds < f.min_length
        || centiseconds > f.max_length
        || tokens.len() < f.token_min_length
        || tokens.len() > f.token_max_length
        || ratio < f.min_output_input_ratio
        || ratio > f.max_output_input_ratio
    {
        return Verdict::Filtered;
    }
    let frames = fbank.num_frames(info.num_samples);
    if frames == 0 {
        return Verdict::Filtered;
    }
    Verdict::Use(Utterance {
        key: entry.key,
        wav,
        num_samples: info.num_samples,
        frames,
        tokens,
    })
}

/// Deterministic seeds for independent streams (splitmix64 over the inputs).
pub fn stream_seed(parts: &[u64]) -> u64 {
    let mut z = 0x9E37_79B9_7F4A_7C15u64;
    for &p in parts {
        z = z.wrapping_add(p).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
}

const STREAM_SHUFFLE: u64 = 1;
const STREAM_AUGMENT: u64 = 2;
const STREAM_LIST: u64 = 3;

/// The order in which an epoch reads the list's `n` entries: torchdata's
/// `shuffle(buffer_size)` (WeNet's list shuffle) over entry indices: a full buffer yields
/// a random one of its entries and takes the next in its place; at the end the buffer
/// empties in random order. With a buffer of the whole list, a uniform permutation.
fn buffer_shuffle(n: usize, buffer: usize, rng: &mut ChaCha8Rng) -> Vec<u32> {
    use rand::Rng;
    let buffer = buffer.clamp(1, n.max(1));
    let mut held: Vec<u32> = Vec::with_capacity(buffer);
    let mut order = Vec::with_capacity(n);
    for i in 0..n as u32 {
        if held.len() == buffer {
            let j = rng.random_range(0..held.len());
            order.push(std::mem::replace(&mut held[j], i));
        } else {
            held.push(i);
        }
    }
    while !held.is_empty() {
        let j = rng.random_range(0..held.len());
        order.push(held.swap_remove(j));
    }
    order
}

/// Shuffle window -> sort window -> batches, as WeNet's pipeline stages, for one rank.
struct Batcher {
    shuffle: Option<(usize, ChaCha8Rng)>,
    sort: Option<usize>,
    batch: BatchRule,
    shuffle_buf: Vec<Utterance>,
    sort_buf: Vec<Utterance>,
    current: Vec<Utterance>,
    longest: usize,
    ready: VecDeque<Vec<Utterance>>,
}

#[derive(Clone, Copy)]
enum BatchRule {
    Count(usize),
    Frames(usize),
}

impl Batcher {
    fn new(conf: &DatasetConf, mode: Mode, seed: u64, epoch: u64, rank: usize) -> Self {
        let shuffle = (mode == Mode::Train && conf.shuffle).then(|| {
            let rng =
                ChaCha8Rng::seed_from_u64(stream_seed(&[seed, STREAM_SHUFFLE, epoch, rank as u64]));
            (conf.shuffle_conf.shuffle_size.max(1), rng)
        });
        let batch = match conf.batch_conf.batch_type {
            BatchType::Static => BatchRule::Count(conf.batch_conf.batch_size),
            BatchType::Dynamic => BatchRule::Frames(conf.batch_conf.max_frames_in_batch),
        };
        Self {
            shuffle,
            sort: conf.sort.then_some(conf.sort_conf.sort_size.max(1)),
            batch,
            shuffle_buf: Vec::new(),
            sort_buf: Vec::new(),
            current: Vec::new(),
            longest: 0,
            ready: VecDeque::new(),
        }
    }

    fn push(&mut self, u: Utterance) {
        match &self.shuffle {
            Some((size, _)) => {
                self.shuffle_buf.push(u);
                if self.shuffle_buf.len() >= *size {
                    self.flush_shuffle();
                }
            }
            None => self.push_sort(u),
        }
    }

    fn flush_shuffle(&mut self) {
        let mut buf = std::mem::take(&mut self.shuffle_buf);
        if let Some((_, rng)) = &mut self.shuffle {
            buf.shuffle(rng);
        }
        for u in buf {
            self.push_sort(u);
        }
    }

    fn push_sort(&mut self, u: Utterance) {
        match self.sort {
            Some(size) => {
                self.sort_buf.push(u);
                if self.sort_buf.len() >= size {
                    self.flush_sort();
                }
            }
            None => self.push_batch(u),
        }
    }

    fn flush_sort(&mut self) {
        let mut buf = std::mem::take(&mut self.sort_buf);
        buf.sort_by_key(|u| u.frames);
        for u in buf {
            self.push_batch(u);
        }
    }

    fn push_batch(&mut self, u: Utterance) {
        match self.batch {
            BatchRule::Count(n) => {
                self.current.push(u);
                if self.current.len() >= n {
                    self.ready.push_back(std::mem::take(&mut self.current));
                }
            }
            // WeNet's dynamic batching: close the batch when the padded size would
            // exceed the budget (an utterance longer than the budget goes alone).
            BatchRule::Frames(max) => {
                let longest = self.longest.max(u.frames);
                if !self.current.is_empty() && longest * (self.current.len() + 1) > max {
                    self.ready.push_back(std::mem::take(&mut self.current));
                    self.longest = u.frames;
                } else {
                    self.longest = longest;
                }
                self.current.push(u);
            }
        }
    }

    fn finish(&mut self) {
        self.flush_shuffle();
        self.flush_sort();
        if !self.current.is_empty() {
            self.ready.push_back(std::mem::take(&mut self.current));
        }
        self.longest = 0;
    }

    fn pop(&mut self) -> Option<Vec<Utterance>> {
        self.ready.pop_front()
    }
}

/// The batch counts of one epoch, identical on every rank.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochPlan {
    /// Batches each rank's own shard gives, by rank.
    pub own_batches: Vec<usize>,
    /// Batches every rank yields (the largest of `own_batches`).
    pub batches_per_rank: usize,
    /// What happened to the list's lines.
    pub report: InputReport,
}

/// A padded batch of features and targets.
#[derive(Debug)]
pub struct Batch {
    /// Position in the epoch, from 0.
    pub index: usize,
    /// Utterance ids.
    pub keys: Vec<String>,
    /// Features, `[B, T, mel]` float32, zero-padded.
    pub feats: Tensor,
    /// Frames per utterance, `[B]` int64.
    pub feats_lengths: Tensor,
    /// Token ids, `[B, L]` int64, padded with -1 (WeNet's `IGNORE_ID`).
    pub target: Tensor,
    /// Tokens per utterance, `[B]` int64.
    pub target_lengths: Tensor,
    /// Frames before padding, summed over the batch.
    pub num_frames: usize,
    /// A repeat that keeps this rank in step with ranks that have more batches.
    pub repeated: bool,
}

impl Batch {
    fn repeat_as(&self, index: usize) -> Batch {
        Batch {
            index,
            keys: self.keys.clone(),
            feats: self.feats.shallow_clone(),
            feats_lengths: self.feats_lengths.shallow_clone(),
            target: self.target.shallow_clone(),
            target_lengths: self.target_lengths.shallow_clone(),
            num_frames: self.num_frames,
            repeated: true,
        }
    }

    /// Pads utterances' features (`dim` values a frame, frame-major) with zeros and their
    /// token ids with -1 (WeNet's `IGNORE_ID`) into one batch.
    pub fn pad(
        index: usize,
        keys: Vec<String>,
        feats: &[Vec<f32>],
        dim: usize,
        targets: &[Vec<i64>],
        repeated: bool,
    ) -> Batch {
        let b = keys.len();
        let lens: Vec<i64> = feats.iter().map(|f| (f.len() / dim) as i64).collect();
        let t_max = lens.iter().copied().max().unwrap_or(0) as usize;
        let mut padded = vec![0f32; b * t_max * dim];
        for (i, f) in feats.iter().enumerate() {
            padded[i * t_max * dim..i * t_max * dim + f.len()].copy_from_slice(f);
        }
        let tlens: Vec<i64> = targets.iter().map(|t| t.len() as i64).collect();
        let l_max = tlens.iter().copied().max().unwrap_or(0) as usize;
        let mut tpad = vec![-1i64; b * l_max];
        for (i, t) in targets.iter().enumerate() {
            tpad[i * l_max..i * l_max + t.len()].copy_from_slice(t);
        }
        Batch {
            index,
            keys,
            feats: Tensor::from_slice(&padded).view([b as i64, t_max as i64, dim as i64]),
            feats_lengths: Tensor::from_slice(&lens),
            target: Tensor::from_slice(&tpad).view([b as i64, l_max as i64]),
            target_lengths: Tensor::from_slice(&tlens),
            num_frames: lens.iter().sum::<i64>() as usize,
            repeated,
        }
    }

    /// Number of utterances.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The first `n` utterances (all of them when there are no more), for a count of
    /// utterances that ends inside a batch.
    pub fn first(self, n: usize) -> Batch {
        if n >= self.len() {
            return self;
        }
        let rows = |t: &Tensor| t.narrow(0, 0, n as i64);
        let feats_lengths = rows(&self.feats_lengths);
        let target_lengths = rows(&self.target_lengths);
        // Targets stay padded to their longest row, as the model's loss expects.
        let longest = target_lengths.max().int64_value(&[]);
        Batch {
            index: self.index,
            keys: self.keys[..n].to_vec(),
            feats: rows(&self.feats),
            num_frames: feats_lengths.sum(tch::Kind::Int64).int64_value(&[]) as usize,
            feats_lengths,
            target: rows(&self.target).narrow(1, 0, longest),
            target_lengths,
            repeated: self.repeated,
        }
    }

    /// Never true for a yielded batch.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The loader of one list for one rank.
#[derive(Debug, Clone)]
pub struct DataLoader {
    list: PathBuf,
    units: Arc<Units>,
    conf: DatasetConf,
    mode: Mode,
    shard: Shard,
    seed: u64,
    fbank: Fbank,
    /// The list surveyed by the first plan, shared by clones (the epoch threads').
    survey: Arc<Mutex<Option<Arc<Survey>>>>,
}

/// What planning needs of a list, read from the audio headers once: per entry (non-blank
/// line) the feature frames (0 where it is bad or filtered) and where its line starts, and
/// what happened to the lines. 12 bytes an entry.
#[derive(Debug)]
struct Survey {
    frames: Vec<u32>,
    offsets: Vec<u64>,
    report: InputReport,
}

impl DataLoader {
    /// Builds a loader; the configuration is checked here.
    pub fn new(
        list: &Path,
        units: Arc<Units>,
        conf: DatasetConf,
        mode: Mode,
        shard: Shard,
        seed: u64,
    ) -> Result<Self, DataError> {
        conf.validate().map_err(DataError::Config)?;
        if shard.world == 0 || shard.rank >= shard.world {
            return Err(DataError::Config(format!(
                "rank {} is not in a world of {}",
                shard.rank, shard.world
            )));
        }
        let mut fbank_opts: FbankOptions = conf.fbank_conf.clone();
        if mode == Mode::Eval {
            fbank_opts.dither = 0.0;
        }
        Ok(Self {
            list: list.to_path_buf(),
            units,
            conf,
            mode,
            shard,
            seed,
            fbank: Fbank::new(fbank_opts),
            survey: Arc::default(),
        })
    }

    /// The list this loader reads.
    pub fn list(&self) -> &Path {
        &self.list
    }

    /// Reads every line's audio header and transcript once: the frames of the usable
    /// lines and the input report. Logs the bad-input warning (rank 0), once.
    fn survey(&self) -> Result<Arc<Survey>, DataError> {
        let mut cached = self.survey.lock().expect("survey lock");
        if let Some(s) = cached.as_ref() {
            return Ok(s.clone());
        }
        let mut frames = Vec::new();
        let mut offsets = Vec::new();
        let mut report = InputReport::default();
        let mut reader = ListReader::open(&self.list)?;
        while let Some(item) = reader.next() {
            let (line, entry) = item?;
            report.lines += 1;
            offsets.push(reader.last_offset());
            let key = entry.key.clone();
            frames.push(
                match inspect(&reader, entry, &self.units, &self.conf, &self.fbank) {
                    Verdict::Use(u) => {
                        report.usable += 1;
                        u32::try_from(u.frames).unwrap_or(u32::MAX)
                    }
                    Verdict::Filtered => {
                        report.filtered += 1;
                        0
                    }
                    Verdict::Bad(kind, why) => {
                        report.add_bad(kind, || format!("line {} ({key}): {why}", line + 1));
                        0
                    }
                },
            );
        }
        if report.bad_total() > 0 && self.shard.rank == 0 {
            tracing::warn!(list = %self.list.display(), "skipping bad input: {}", report.summary());
        }
        let survey = Arc::new(Survey {
            frames,
            offsets,
            report,
        });
        *cached = Some(survey.clone());
        Ok(survey)
    }

    /// The entries of `epoch` in the order they are read (shuffled by `list_shuffle` in
    /// training, the same on every rank); position `p` belongs to rank `p % world`.
    fn entry_order(&self, survey: &Survey, epoch: u64) -> Vec<u32> {
        let n = survey.frames.len();
        if self.mode != Mode::Train || !self.conf.list_shuffle {
            return (0..n as u32).collect();
        }
        let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(&[self.seed, STREAM_LIST, epoch]));
        let buffer = self.conf.list_shuffle_conf.shuffle_size.unwrap_or(n);
        buffer_shuffle(n, buffer, &mut rng)
    }

    /// Simulates every rank's batching of `epoch` from the list's survey (made by the
    /// first call): the batch counts and the input report, the same on every rank.
    /// Refuses lists with too much bad input or none usable.
    pub fn plan(&self, epoch: u64) -> Result<EpochPlan, DataError> {
        let survey = self.survey()?;
        let world = self.shard.world;
        let mut batchers: Vec<Batcher> = (0..world)
            .map(|r| Batcher::new(&self.conf, self.mode, self.seed, epoch, r))
            .collect();
        let mut counts = vec![0usize; world];
        for (position, &entry) in self.entry_order(&survey, epoch).iter().enumerate() {
            let frames = survey.frames[entry as usize];
            if frames == 0 {
                continue;
            }
            // Batching looks at lengths only; empty names and tokens do not allocate.
            let r = position % world;
            batchers[r].push(Utterance {
                key: String::new(),
                wav: PathBuf::new(),
                num_samples: 0,
                frames: frames as usize,
                tokens: Vec::new(),
            });
            while batchers[r].pop().is_some() {
                counts[r] += 1;
            }
        }
        for (b, c) in batchers.iter_mut().zip(&mut counts) {
            b.finish();
            while b.pop().is_some() {
                *c += 1;
            }
        }
        let report = survey.report.clone();
        let bad = report.bad_total();
        if report.lines > 0 && bad as f64 > self.conf.max_bad_fraction * report.lines as f64 {
            return Err(DataError::TooManyBad {
                list: self.list.clone(),
                bad,
                lines: report.lines,
                fraction: 100.0 * bad as f64 / report.lines as f64,
                max: 100.0 * self.conf.max_bad_fraction,
                summary: report.summary(),
            });
        }
        if report.usable == 0 {
            return Err(DataError::NoUsable {
                list: self.list.clone(),
                summary: report.summary(),
            });
        }
        let batches_per_rank = counts.iter().copied().max().unwrap_or(0);
        Ok(EpochPlan {
            own_batches: counts,
            batches_per_rank,
            report,
        })
    }

    /// Starts an epoch: plans it, then prepares batches in background threads.
    pub fn epoch(&self, epoch: u64) -> Result<EpochIter, DataError> {
        self.epoch_from(epoch, 0)
    }

    /// As [`DataLoader::epoch`], from batch `first` on (a resumed run): the batches
    /// before it are planned but neither read nor featurised, and every batch is the one
    /// an uninterrupted epoch would give at that index (its randomness is keyed by it).
    pub fn epoch_from(&self, epoch: u64, first: usize) -> Result<EpochIter, DataError> {
        let plan = self.plan(epoch)?;
        Ok(EpochIter::start(self.clone(), epoch, plan, first))
    }

    /// Streams one rank's batches of utterances (metadata only), exactly
    /// `plan.batches_per_rank` of them, repeats flagged.
    fn produce(
        &self,
        epoch: u64,
        plan: &EpochPlan,
        mut emit: impl FnMut(usize, Vec<Utterance>, bool) -> bool,
    ) -> Result<(), DataError> {
        let total = plan.batches_per_rank;
        // A rank whose shard gives no batch borrows another rank's (all repeats).
        let source = if plan.own_batches[self.shard.rank] > 0 {
            self.shard.rank
        } else {
            plan.own_batches
                .iter()
                .position(|&c| c > 0)
                .expect("plan has batches")
        };
        let borrowed = source != self.shard.rank;
        let keep = total - plan.own_batches[source].min(total);
        let mut kept: Vec<Vec<Utterance>> = Vec::new();
        let mut batcher = Batcher::new(&self.conf, self.mode, self.seed, epoch, source);
        let mut index = 0;
        let mut send =
            |batch: Vec<Utterance>, kept: &mut Vec<Vec<Utterance>>, index: &mut usize| -> bool {
                if *index >= total {
                    return true;
                }
                if kept.len() < keep {
                    kept.push(batch.clone());
                }
                let ok = emit(*index, batch, borrowed);
                *index += 1;
                ok
            };
        let survey = self.survey()?;
        let mut reader = ListReader::open(&self.list)?;
        let order = self.entry_order(&survey, epoch);
        for &e in order.iter().skip(source).step_by(self.shard.world) {
            let e = e as usize;
            if survey.frames[e] == 0 {
                continue;
            }
            let entry = reader.entry_at(survey.offsets[e], e)?;
            if let Verdict::Use(u) = inspect(&reader, entry, &self.units, &self.conf, &self.fbank) {
                batcher.push(u);
                while let Some(b) = batcher.pop() {
                    if !send(b, &mut kept, &mut index) {
                        return Ok(());
                    }
                }
            }
        }
        batcher.finish();
        while let Some(b) = batcher.pop() {
            if !send(b, &mut kept, &mut index) {
                return Ok(());
            }
        }
        // Fill up with this rank's first batches, cyclically.
        let mut i = 0;
        while index < total && !kept.is_empty() {
            if !emit(index, kept[i % kept.len()].clone(), true) {
                return Ok(());
            }
            index += 1;
            i += 1;
        }
        Ok(())
    }

    /// Features and targets of one batch; utterances whose audio fails to decode now
    /// (changed since planning) are dropped and counted in `dropped`.
    fn make_batch(
        &self,
        epoch: u64,
        index: usize,
        utts: Vec<Utterance>,
        repeated: bool,
        dropped: &AtomicUsize,
    ) -> Option<Batch> {
        let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(&[
            self.seed,
            STREAM_AUGMENT,
            epoch,
            self.shard.rank as u64,
            index as u64,
        ]));
        let train = self.mode == Mode::Train;
        let dim = self.fbank.dim();
        let mut feats = Vec::with_capacity(utts.len());
        let mut keys = Vec::with_capacity(utts.len());
        let mut targets = Vec::with_capacity(utts.len());
        for u in utts {
            let samples = match audio::read_model_input(&u.wav) {
                Ok(s) => s,
                Err(e) => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(key = %u.key, "dropping utterance whose audio broke after planning: {e}");
                    continue;
                }
            };
            let samples = if train && self.conf.speed_perturb {
                audio::change_speed(&samples, augment::draw_speed(&mut rng))
            } else {
                samples
            };
            let mut f = self.fbank.compute(&samples, &mut rng);
            if f.is_empty() {
                dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // WeNet's order: masks, then substitution, then trimming.
            if train && self.conf.spec_aug {
                augment::spec_augment(&mut f, dim, &self.conf.spec_aug_conf, &mut rng);
            }
            if train && self.conf.spec_sub {
                augment::spec_substitute(&mut f, dim, &self.conf.spec_sub_conf, &mut rng);
            }
            if train && self.conf.spec_trim {
                let trim =
                    augment::spec_trim_frames(f.len() / dim, &self.conf.spec_trim_conf, &mut rng);
                f.truncate(f.len() - trim * dim);
            }
            feats.push(f);
            keys.push(u.key);
            targets.push(u.tokens);
        }
        if keys.is_empty() {
            return None;
        }
        Some(Batch::pad(index, keys, &feats, dim, &targets, repeated))
    }
}

struct Job {
    index: usize,
    utts: Vec<Utterance>,
    repeated: bool,
}

/// The batches of one epoch, in order, prepared ahead by background threads.
pub struct EpochIter {
    plan: EpochPlan,
    next: usize,
    pending: BTreeMap<usize, Option<Batch>>,
    results: Option<Receiver<(usize, Option<Batch>)>>,
    producer_error: Receiver<DataError>,
    last: Option<Batch>,
    dropped: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
}

impl EpochIter {
    fn start(loader: DataLoader, epoch: u64, plan: EpochPlan, first: usize) -> Self {
        let workers = loader.conf.num_workers;
        let (job_tx, job_rx) = bounded::<Job>(loader.conf.prefetch);
        let (res_tx, res_rx) = bounded(loader.conf.prefetch);
        let (err_tx, err_rx) = bounded(1);
        let dropped = Arc::new(AtomicUsize::new(0));
        let loader = Arc::new(loader);
        let mut threads = Vec::new();
        {
            let (loader, plan) = (loader.clone(), plan.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("data-producer".into())
                    .spawn(move || {
                        let emit = |index, utts, repeated| {
                            index < first
                                || job_tx
                                    .send(Job {
                                        index,
                                        utts,
                                        repeated,
                                    })
                                    .is_ok()
                        };
                        if let Err(e) = loader.produce(epoch, &plan, emit) {
                            let _ = err_tx.send(e);
                        }
                    })
                    .expect("spawn data producer"),
            );
        }
        for w in 0..workers {
            let (loader, job_rx, res_tx, dropped): (_, Receiver<Job>, Sender<_>, _) = (
                loader.clone(),
                job_rx.clone(),
                res_tx.clone(),
                dropped.clone(),
            );
            threads.push(
                std::thread::Builder::new()
                    .name(format!("data-worker-{w}"))
                    .spawn(move || {
                        // Features are computed one utterance at a time per thread;
                        // libtorch's own threads stay for the training step.
                        crate::threads::serial_libtorch();
                        for job in job_rx {
                            let batch = loader.make_batch(
                                epoch,
                                job.index,
                                job.utts,
                                job.repeated,
                                &dropped,
                            );
                            if res_tx.send((job.index, batch)).is_err() {
                                return;
                            }
                        }
                    })
                    .expect("spawn data worker"),
            );
        }
        Self {
            plan,
            next: first,
            pending: BTreeMap::new(),
            results: Some(res_rx),
            producer_error: err_rx,
            last: None,
            dropped,
            threads,
        }
    }

    /// The plan this epoch follows.
    pub fn plan(&self) -> &EpochPlan {
        &self.plan
    }

    /// Utterances dropped so far because their audio failed to decode.
    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.plan.batches_per_rank {
            return None;
        }
        let results = self.results.as_ref()?;
        while !self.pending.contains_key(&self.next) {
            match results.recv() {
                Ok((i, b)) => {
                    self.pending.insert(i, b);
                }
                Err(_) => {
                    return Some(Err(self.producer_error.try_recv().unwrap_or_else(|_| {
                        DataError::Config("data threads stopped before the epoch ended".into())
                    })));
                }
            }
        }
        let index = self.next;
        self.next += 1;
        let batch = match self.pending.remove(&index).expect("present") {
            Some(b) => b,
            // Every utterance of the batch broke after planning: repeat the last batch
            // so that this rank still takes the planned number of steps.
            None => match &self.last {
                Some(last) => last.repeat_as(index),
                None => {
                    return Some(Err(DataError::NoUsable {
                        list: PathBuf::new(),
                        summary: format!("every utterance of batch {index} failed to decode"),
                    }))
                }
            },
        };
        self.last = Some(batch.repeat_as(batch.index));
        Some(Ok(batch))
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // Closing the result channel stops the workers, which stops the producer.
        self.results = None;
        self.pending.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::list::{write_list, ListEntry};
    use std::collections::HashSet;

    /// A list of `n` tiny WAVs of varied length (synthetic: this tests bookkeeping,
    /// not acoustics) with transcripts over "abc ".
    fn make_list(dir: &Path, n: usize) -> (PathBuf, Arc<Units>) {
        let mut entries = Vec::new();
        for i in 0..n {
            let samples: Vec<f32> = (0..1600 + 97 * (i * 37 % 50))
                .map(|j| ((j * (i + 3)) % 200) as f32 - 100.0)
                .collect();
            let wav = dir.join(format!("u{i}.wav"));
            audio::write_wav_i16(&wav, &samples, 16000).unwrap();
            let txt = ["ab", "ba c", "cab", "a b c"][i % 4];
            entries.push(ListEntry {
                key: format!("u{i}"),
                wav: format!("u{i}.wav"),
                txt: txt.into(),
                lang: None,
            });
        }
        let list = dir.join("data.list");
        write_list(&list, &entries).unwrap();
        (list, Arc::new(Units::from_texts(["abc ab"])))
    }

    fn conf(batch: BatchConf) -> DatasetConf {
        DatasetConf {
            batch_conf: batch,
            shuffle_conf: super::super::config::ShuffleConf { shuffle_size: 7 },
            sort_conf: super::super::config::SortConf { sort_size: 5 },
            filter_conf: super::super::config::FilterConf {
                min_length: 0.0,
                ..Default::default()
            },
            ..Default::default()
        }
    }
    use super::super::config::BatchConf;

    #[test]
    fn audio_headers_are_read_once_per_run_not_per_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let (list, units) = make_list(dir.path(), 23);
        let batch = BatchConf {
            batch_type: BatchType::Dynamic,
            batch_size: 0,
            max_frames_in_batch: 120,
            ..BatchConf::default()
        };
        let shard = Shard { rank: 1, world: 3 };
        let l = DataLoader::new(
            &list,
            units.clone(),
            conf(batch.clone()),
            Mode::Train,
            shard,
            5,
        )
        .unwrap();
        let first = l.plan(0).unwrap();
        // Every header made unreadable: later epochs plan from the survey alone (a
        // re-read would find 23 bad lines and refuse the list), and a fresh loader, which
        // must read them, sees that the plan of epoch 1 is the one of the intact list.
        let intact = DataLoader::new(
            &list,
            units.clone(),
            conf(batch.clone()),
            Mode::Train,
            shard,
            5,
        )
        .unwrap()
        .plan(1)
        .unwrap();
        for i in 0..23 {
            std::fs::write(dir.path().join(format!("u{i}.wav")), b"").unwrap();
        }
        let again = l.clone().plan(1).unwrap();
        assert_eq!(again, intact);
        assert_eq!(l.plan(0).unwrap(), first);
        assert_eq!(again.report.usable, 23);
        let fresh = DataLoader::new(&list, units, conf(batch), Mode::Train, shard, 5).unwrap();
        assert!(fresh.plan(1).is_err());
    }

    #[test]
    fn every_rank_yields_the_same_number_of_batches() {
        let dir = tempfile::tempdir().unwrap();
        // 23 utterances: no world size from 2 to 8 divides it.
        let (list, units) = make_list(dir.path(), 23);
        let batchings = [
            BatchConf {
                batch_type: BatchType::Static,
                batch_size: 3,
                max_frames_in_batch: 0,
                ..BatchConf::default()
            },
            BatchConf {
                batch_type: BatchType::Dynamic,
                batch_size: 0,
                max_frames_in_batch: 120,
                ..BatchConf::default()
            },
        ];
        for batch in batchings {
            for world in 1..=8 {
                let mut counts = Vec::new();
                let mut seen = Vec::new();
                for rank in 0..world {
                    let l = DataLoader::new(
                        &list,
                        units.clone(),
                        conf(batch.clone()),
                        Mode::Train,
                        Shard { rank, world },
                        5,
                    )
                    .unwrap();
                    let batches: Vec<Batch> = l.epoch(0).unwrap().map(|b| b.unwrap()).collect();
                    counts.push(batches.len());
                    for b in batches.iter().filter(|b| !b.repeated) {
                        seen.extend(b.keys.iter().cloned());
                    }
                    assert!(batches
                        .iter()
                        .enumerate()
                        .all(|(i, b)| b.index == i && !b.is_empty()));
                }
                assert!(
                    counts.iter().all(|&c| c == counts[0]),
                    "world {world}: {counts:?}"
                );
                // Shards are disjoint and together cover the list.
                let unique: HashSet<_> = seen.iter().collect();
                assert_eq!(
                    unique.len(),
                    seen.len(),
                    "world {world}: a key was read by two ranks"
                );
                assert_eq!(seen.len(), 23, "world {world}");
            }
        }
    }

    /// The keys of `epoch` in the order a single worker trains them (no sort or shuffle
    /// window, one utterance a batch, so the list's order shows).
    fn read_order(list: &Path, units: &Arc<Units>, list_shuffle: bool, epoch: u64) -> Vec<String> {
        let mut c = conf(BatchConf {
            batch_type: BatchType::Static,
            batch_size: 1,
            max_frames_in_batch: 0,
            ..BatchConf::default()
        });
        (c.list_shuffle, c.shuffle, c.sort) = (list_shuffle, false, false);
        let l = DataLoader::new(
            list,
            units.clone(),
            c,
            Mode::Train,
            Shard { rank: 0, world: 1 },
            5,
        )
        .unwrap();
        let keys = l.epoch(epoch).unwrap().flat_map(|b| b.unwrap().keys);
        keys.collect()
    }

    #[test]
    fn the_list_is_shuffled_each_epoch_before_sharding() {
        // A list in two blocks (as a corpus written language by language): a shuffle
        // window of 7 alone trains the first block, then the second.
        let dir = tempfile::tempdir().unwrap();
        let (list, units) = make_list(dir.path(), 40);
        let in_file: Vec<String> = (0..40).map(|i| format!("u{i}")).collect();
        assert_eq!(read_order(&list, &units, false, 0), in_file);
        let (e0, e1) = (
            read_order(&list, &units, true, 0),
            read_order(&list, &units, true, 1),
        );
        for order in [&e0, &e1] {
            let mut sorted = order.clone();
            sorted.sort_by_key(|k| k[1..].parse::<usize>().unwrap());
            assert_eq!(sorted, in_file, "each entry once per epoch");
            let second_block = |keys: &[String]| {
                keys.iter()
                    .filter(|k| k[1..].parse::<usize>().unwrap() >= 20)
                    .count()
            };
            // The first quarter read mixes both blocks.
            assert!((1..10).contains(&second_block(&order[..10])), "{order:?}");
        }
        assert_ne!(e0, e1, "a new order every epoch");
        assert_eq!(e0, read_order(&list, &units, true, 0), "reproducible");
    }

    #[test]
    fn a_bounded_list_shuffle_is_torchdatas_buffer() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for (n, buffer) in [(50, 1), (50, 4), (50, 50), (50, 1000), (0, 4)] {
            let order = buffer_shuffle(n, buffer, &mut rng);
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, (0..n as u32).collect::<Vec<_>>());
            // Position p can only hold an entry read by then: one of the first p + buffer.
            for (p, &e) in order.iter().enumerate() {
                assert!(
                    (e as usize) < p + buffer,
                    "n {n} buffer {buffer}: {order:?}"
                );
            }
            if buffer == 1 {
                assert_eq!(order, sorted);
            }
        }
    }

    #[test]
    fn batches_are_padded_and_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let (list, units) = make_list(dir.path(), 10);
        let mut c = conf(BatchConf {
            batch_type: BatchType::Static,
            batch_size: 4,
            max_frames_in_batch: 0,
            ..BatchConf::default()
        });
        c.spec_aug = true;
        c.spec_sub = true;
        c.spec_trim = true;
        c.speed_perturb = true;
        c.fbank_conf.dither = 1.0;
        let l = DataLoader::new(&list, units, c, Mode::Train, Shard::SINGLE, 1).unwrap();
        let a: Vec<Batch> = l.epoch(3).unwrap().map(|b| b.unwrap()).collect();
        let b: Vec<Batch> = l.epoch(3).unwrap().map(|b| b.unwrap()).collect();
        let other: Vec<Batch> = l.epoch(4).unwrap().map(|b| b.unwrap()).collect();
        assert_eq!(a.len(), 3);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.keys, y.keys);
            assert!(x.feats.equal(&y.feats));
        }
        assert_ne!(
            a.iter().map(|x| x.keys.clone()).collect::<Vec<_>>(),
            other.iter().map(|x| x.keys.clone()).collect::<Vec<_>>()
        );
        let first = &a[0];
        let lens = Vec::<i64>::try_from(&first.feats_lengths).unwrap();
        assert_eq!(first.feats.size()[1], *lens.iter().max().unwrap());
        assert_eq!(first.feats.size()[2], 80);
        let t = Vec::<i64>::try_from(first.target.flatten(0, -1)).unwrap();
        let tl = Vec::<i64>::try_from(&first.target_lengths).unwrap();
        assert_eq!(
            t.iter().filter(|&&v| v == -1).count() as i64,
            first.target.size()[1] * 4 - tl.iter().sum::<i64>()
        );
        // A count of utterances that ends inside a batch takes its first rows.
        let two = a[0].repeat_as(0).first(2);
        assert_eq!(two.keys, a[0].keys[..2]);
        assert!(two.feats.equal(&a[0].feats.narrow(0, 0, 2)));
        assert!(two.target.equal(&a[0].target.narrow(0, 0, 2)));
        assert_eq!(two.num_frames as i64, lens[..2].iter().sum::<i64>());
        assert_eq!(a[0].repeat_as(0).first(9).len(), 4);
    }

    #[test]
    fn bad_inputs_are_counted_and_skipped_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (list, units) = make_list(d, 40);
        let mut lines = std::fs::read_to_string(&list).unwrap();
        // One of each kind of bad input.
        std::fs::write(d.join("empty.wav"), b"").unwrap();
        std::fs::write(d.join("text.wav"), b"hello, I am not a wav file").unwrap();
        let full = std::fs::read(d.join("u1.wav")).unwrap();
        std::fs::write(d.join("trunc.wav"), &full[..full.len() / 2]).unwrap();
        audio::write_wav_i16(&d.join("8k.wav"), &vec![1.0; 8000], 8000).unwrap();
        for (k, wav, txt) in [
            ("missing", "nowhere.wav", "ab"),
            ("empty", "empty.wav", "ab"),
            ("text", "text.wav", "ab"),
            ("trunc", "trunc.wav", "ab"),
            ("rate", "8k.wav", "ab"),
            ("notext", "u2.wav", " ?! "),
            ("oov", "u3.wav", "abz"),
        ] {
            lines.push_str(
                &serde_json::to_string(&ListEntry {
                    key: k.into(),
                    wav: wav.into(),
                    txt: txt.into(),
                    lang: None,
                })
                .unwrap(),
            );
            lines.push('\n');
        }
        std::fs::write(&list, &lines).unwrap();
        let mut c = conf(BatchConf::default());
        c.max_bad_fraction = 0.2;
        let l = DataLoader::new(
            &list,
            units.clone(),
            c.clone(),
            Mode::Eval,
            Shard::SINGLE,
            0,
        )
        .unwrap();
        let plan = l.plan(0).unwrap();
        let kinds: Vec<&str> = plan.report.bad.keys().copied().collect();
        assert_eq!(
            kinds,
            [
                "characters outside the units",
                "empty file",
                "empty transcript",
                "missing file",
                "not audio",
                "truncated audio",
                "wrong sample rate"
            ]
        );
        assert_eq!(plan.report.usable, 40);
        let keys: usize = l.epoch(0).unwrap().map(|b| b.unwrap().len()).sum();
        assert_eq!(keys, 40);

        // Above the allowed fraction: refused with the counts.
        c.max_bad_fraction = 0.1;
        let l = DataLoader::new(&list, units.clone(), c, Mode::Eval, Shard::SINGLE, 0).unwrap();
        let e = l.plan(0).unwrap_err().to_string();
        assert!(
            e.contains("7 of 47")
                && e.contains("max_bad_fraction")
                && e.contains("line 41 (missing)"),
            "{e}"
        );

        // A malformed line names file and line.
        lines.push_str("{not json\n");
        std::fs::write(&list, &lines).unwrap();
        let l = DataLoader::new(
            &list,
            units,
            conf(BatchConf::default()),
            Mode::Eval,
            Shard::SINGLE,
            0,
        )
        .unwrap();
        let e = l.plan(0).unwrap_err().to_string();
        assert!(
            e.contains("data.list:48:") && e.contains("malformed"),
            "{e}"
        );
    }
}
