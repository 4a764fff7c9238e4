//! The data part of the configuration: WeNet's `dataset_conf` keys (unknown keys are
//! refused by name) plus upcycle's bad-input policy.

use serde::{Deserialize, Serialize};

use super::augment::{SpecAugConf, SpecSubConf, SpecTrimConf};
use super::fbank::FbankOptions;

/// WeNet's `dataset_conf`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConf {
    /// Length filters.
    #[serde(default)]
    pub filter_conf: FilterConf,
    /// Sample rate of the model input; only 16000 is supported.
    #[serde(default)]
    pub resample_conf: ResampleConf,
    /// Speed perturbation (0.9/1.0/1.1) in training.
    #[serde(default)]
    pub speed_perturb: bool,
    /// Filterbank options (dither applies in training only).
    #[serde(default)]
    pub fbank_conf: FbankOptions,
    /// SpecAugment in training (on unless set false, as in WeNet).
    #[serde(default = "yes")]
    pub spec_aug: bool,
    /// SpecAugment options.
    #[serde(default)]
    pub spec_aug_conf: SpecAugConf,
    /// Time substitution in training (U2++): spans replaced by earlier frames.
    #[serde(default)]
    pub spec_sub: bool,
    /// Time substitution options.
    #[serde(default)]
    pub spec_sub_conf: SpecSubConf,
    /// Trailing frames trimmed in training (TrimTail).
    #[serde(default)]
    pub spec_trim: bool,
    /// Trimming options.
    #[serde(default)]
    pub spec_trim_conf: SpecTrimConf,
    /// Only `fbank` (WeNet also has `mfcc` and `log_mel_spectrogram`).
    #[serde(default = "fbank")]
    pub feats_type: String,
    /// WeNet's first shuffle stage: the list's lines are shuffled in training, each epoch,
    /// before they are sharded over the workers. Without it a list written in some order
    /// (by language, speaker, length) trains on one block of it after another: a
    /// six-language list in language order did not learn at all.
    #[serde(default = "yes")]
    pub list_shuffle: bool,
    /// Its buffer (WeNet's default: the whole list).
    #[serde(default)]
    pub list_shuffle_conf: ListShuffleConf,
    /// Shuffle utterances within a window in training (WeNet's second stage).
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Shuffle window.
    #[serde(default)]
    pub shuffle_conf: ShuffleConf,
    /// Sort by length within a window (less padding).
    #[serde(default = "yes")]
    pub sort: bool,
    /// Sort window.
    #[serde(default)]
    pub sort_conf: SortConf,
    /// Batch composition.
    #[serde(default)]
    pub batch_conf: BatchConf,
    /// Refuse a list when more than this fraction of its lines is bad input (missing,
    /// broken or wrong-format audio, empty transcripts, characters outside the units).
    #[serde(default = "default_max_bad_fraction")]
    pub max_bad_fraction: f64,
    /// Threads computing features in the background.
    #[serde(default = "default_num_workers")]
    pub num_workers: usize,
    /// Batches prepared ahead of the training loop.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,

    // WeNet keys with no meaning here (list sharding and cycling are upcycle's own; one
    // channel, one language, no speaker labels; the other feature types' options when
    // `feats_type` is fbank): accepted so that WeNet's train.yaml files load, and named by
    // [`DatasetConf::ignored_keys`].
    #[serde(default, skip_serializing)]
    pub(crate) cycle: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    pub(crate) singal_channel_conf: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    pub(crate) language_conf: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    pub(crate) speaker_conf: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    pub(crate) mfcc_conf: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    pub(crate) log_mel_spectrogram_conf: Option<serde_yaml::Value>,
}

fn yes() -> bool {
    true
}
fn fbank() -> String {
    "fbank".into()
}
fn default_max_bad_fraction() -> f64 {
    0.05
}
fn default_num_workers() -> usize {
    2
}
fn default_prefetch() -> usize {
    4
}

impl Default for DatasetConf {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("every field has a default")
    }
}

impl DatasetConf {
    /// WeNet's `dataset_conf` keys present here that upcycle ignores (prefixed with the
    /// section).
    pub fn ignored_keys(&self) -> Vec<&'static str> {
        [
            ("dataset_conf.cycle", self.cycle.is_some()),
            (
                "dataset_conf.singal_channel_conf",
                self.singal_channel_conf.is_some(),
            ),
            ("dataset_conf.language_conf", self.language_conf.is_some()),
            ("dataset_conf.speaker_conf", self.speaker_conf.is_some()),
            ("dataset_conf.mfcc_conf", self.mfcc_conf.is_some()),
            (
                "dataset_conf.log_mel_spectrogram_conf",
                self.log_mel_spectrogram_conf.is_some(),
            ),
            (
                "dataset_conf.spec_aug_conf.max_w",
                self.spec_aug_conf.max_w.is_some(),
            ),
            (
                "dataset_conf.batch_conf.bucket_boundaries",
                self.batch_conf.bucket_boundaries.is_some(),
            ),
            (
                "dataset_conf.batch_conf.bucket_batch_sizes",
                self.batch_conf.bucket_batch_sizes.is_some(),
            ),
        ]
        .into_iter()
        .filter_map(|(k, present)| present.then_some(k))
        .collect()
    }

    /// Checks values that parse but cannot work, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.feats_type != "fbank" {
            return Err(format!(
                "dataset_conf.feats_type: {:?} is not supported (supported: fbank, Kaldi's \
                 log-mel filterbank; a model trained on other features needs them to decode)",
                self.feats_type
            ));
        }
        if let Some(w) = self
            .fbank_conf
            .window_type
            .as_deref()
            .filter(|w| *w != "povey")
        {
            return Err(format!(
                "dataset_conf.fbank_conf.window_type: {w:?} is not supported (supported: povey, \
                 WeNet's default)"
            ));
        }
        if self.list_shuffle_conf.shuffle_size == Some(0) {
            return Err(
                "dataset_conf.list_shuffle_conf.shuffle_size: must be at least 1 \
                        (leave it out to shuffle the whole list, or set list_shuffle: false)"
                    .into(),
            );
        }
        let f = &self.filter_conf;
        if f.min_length > f.max_length {
            return Err("dataset_conf.filter_conf: min_length is above max_length".into());
        }
        if f.token_min_length > f.token_max_length {
            return Err(
                "dataset_conf.filter_conf: token_min_length is above token_max_length".into(),
            );
        }
        if self.resample_conf.resample_rate != super::audio::SAMPLE_RATE {
            return Err(format!(
                "dataset_conf.resample_conf.resample_rate: only {} is supported (data prepare converts audio to it)",
                super::audio::SAMPLE_RATE
            ));
        }
        if self.fbank_conf.num_mel_bins == 0
            || self.fbank_conf.frame_shift <= 0.0
            || self.fbank_conf.frame_length <= 0.0
        {
            return Err("dataset_conf.fbank_conf: num_mel_bins, frame_length and frame_shift must be positive".into());
        }
        match self.batch_conf.batch_type {
            BatchType::Static if self.batch_conf.batch_size == 0 => {
                return Err("dataset_conf.batch_conf.batch_size must be at least 1".into())
            }
            BatchType::Dynamic if self.batch_conf.max_frames_in_batch == 0 => {
                return Err("dataset_conf.batch_conf.max_frames_in_batch must be at least 1".into())
            }
            _ => {}
        }
        if !(0.0..=1.0).contains(&self.max_bad_fraction) {
            return Err("dataset_conf.max_bad_fraction must be between 0 and 1".into());
        }
        if self.num_workers == 0 || self.prefetch == 0 {
            return Err(
                "dataset_conf.num_workers and dataset_conf.prefetch must be at least 1".into(),
            );
        }
        Ok(())
    }
}

/// WeNet's `filter_conf`: lengths in 10 ms frames and in tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConf {
    /// Longest utterance, in 10 ms frames.
    #[serde(default = "default_max_length")]
    pub max_length: f64,
    /// Shortest utterance, in 10 ms frames.
    #[serde(default = "default_min_length")]
    pub min_length: f64,
    /// Most tokens.
    #[serde(default = "default_token_max_length")]
    pub token_max_length: usize,
    /// Fewest tokens.
    #[serde(default = "default_token_min_length")]
    pub token_min_length: usize,
    /// Smallest tokens-per-frame ratio.
    #[serde(default = "default_min_ratio")]
    pub min_output_input_ratio: f64,
    /// Largest tokens-per-frame ratio.
    #[serde(default = "default_max_ratio")]
    pub max_output_input_ratio: f64,
}

// WeNet's defaults (its `processor.filter`), so that a train.yaml means the same here.
fn default_max_length() -> f64 {
    10240.0
}
fn default_min_length() -> f64 {
    10.0
}
fn default_token_max_length() -> usize {
    200
}
fn default_token_min_length() -> usize {
    1
}
fn default_min_ratio() -> f64 {
    0.0005
}
fn default_max_ratio() -> f64 {
    1.0
}

impl Default for FilterConf {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("every field has a default")
    }
}

/// WeNet's `resample_conf`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResampleConf {
    /// Target rate in Hz.
    #[serde(default = "default_rate")]
    pub resample_rate: u32,
}

fn default_rate() -> u32 {
    super::audio::SAMPLE_RATE
}

impl Default for ResampleConf {
    fn default() -> Self {
        Self {
            resample_rate: default_rate(),
        }
    }
}

/// WeNet's `list_shuffle_conf`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListShuffleConf {
    /// Lines in the shuffle buffer (torchdata's `shuffle(buffer_size)`); absent: the whole
    /// list, a uniform permutation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shuffle_size: Option<usize>,
}

/// WeNet's `shuffle_conf`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShuffleConf {
    /// Utterances shuffled together.
    #[serde(default = "default_shuffle_size")]
    pub shuffle_size: usize,
}

fn default_shuffle_size() -> usize {
    1500
}

impl Default for ShuffleConf {
    fn default() -> Self {
        Self {
            shuffle_size: default_shuffle_size(),
        }
    }
}

/// WeNet's `sort_conf`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SortConf {
    /// Utterances sorted by length together.
    #[serde(default = "default_sort_size")]
    pub sort_size: usize,
}

fn default_sort_size() -> usize {
    500
}

impl Default for SortConf {
    fn default() -> Self {
        Self {
            sort_size: default_sort_size(),
        }
    }
}

/// How utterances are grouped into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum BatchType {
    /// A fixed number of utterances.
    Static,
    /// As many as fit `max_frames_in_batch` once padded.
    Dynamic,
}

impl TryFrom<String> for BatchType {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "static" => Ok(Self::Static),
            "dynamic" => Ok(Self::Dynamic),
            "bucket" => Err(
                "batch_type: bucket (WeNet's length buckets) is not implemented; \
                             use dynamic (max_frames_in_batch), which also groups utterances \
                             of similar length, or static (batch_size)"
                    .into(),
            ),
            other => Err(format!(
                "batch_type: {other:?} is not one of static, dynamic"
            )),
        }
    }
}

/// WeNet's `batch_conf`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConf {
    /// `static` or `dynamic`.
    #[serde(default = "default_batch_type")]
    pub batch_type: BatchType,
    /// Utterances per static batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Padded frames per dynamic batch.
    #[serde(default = "default_max_frames")]
    pub max_frames_in_batch: usize,
    /// WeNet's bucket batching (not implemented; accepted when another type is chosen).
    #[serde(default, skip_serializing)]
    pub bucket_boundaries: Option<serde_yaml::Value>,
    /// WeNet's bucket batching (not implemented; accepted when another type is chosen).
    #[serde(default, skip_serializing)]
    pub bucket_batch_sizes: Option<serde_yaml::Value>,
}

fn default_batch_type() -> BatchType {
    BatchType::Static
}
fn default_batch_size() -> usize {
    16
}
fn default_max_frames() -> usize {
    12000
}

impl Default for BatchConf {
    fn default() -> Self {
        Self {
            batch_type: default_batch_type(),
            batch_size: default_batch_size(),
            max_frames_in_batch: default_max_frames(),
            bucket_boundaries: None,
            bucket_batch_sizes: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzzing, seeded, a fixed number of inputs: the shipped `dataset_conf` mutated,
    /// parsed and validated. No input may panic, hang (2 s each) or allocate above the
    /// test binary's bound.
    #[test]
    fn fuzz_dataset_conf() {
        let seed = include_bytes!("../../configs/dataset_conf.yaml").to_vec();
        let limit = std::time::Duration::from_secs(2);
        upcycle_files::fuzz::run("dataset_conf", &[seed], 19_006, 5000, limit, |bytes| {
            let text = String::from_utf8_lossy(bytes);
            if let Ok(c) = serde_yaml::from_str::<DatasetConf>(&text) {
                let _ = c.validate();
                let _ = c.ignored_keys();
            }
        });
    }

    #[test]
    fn the_shipped_config_parses_and_validates() {
        let c: DatasetConf =
            serde_yaml::from_str(include_str!("../../configs/dataset_conf.yaml")).unwrap();
        c.validate().unwrap();
        assert!(c.spec_aug && c.speed_perturb);
        assert_eq!(c.batch_conf.batch_type, BatchType::Dynamic);
    }

    #[test]
    fn accepts_wenet_keys_and_names_unknown_ones() {
        let yaml = "
filter_conf: {max_length: 40960, min_length: 0, token_max_length: 200, token_min_length: 1}
resample_conf: {resample_rate: 16000}
speed_perturb: true
fbank_conf: {num_mel_bins: 80, frame_shift: 10, frame_length: 25, dither: 1.0}
spec_aug: true
spec_aug_conf: {num_t_mask: 2, num_f_mask: 2, max_t: 50, max_f: 10}
shuffle: true
shuffle_conf: {shuffle_size: 1500}
sort: true
sort_conf: {sort_size: 500}
batch_conf: {batch_type: dynamic, max_frames_in_batch: 12000}
";
        let c: DatasetConf = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(c.batch_conf.batch_type, BatchType::Dynamic);
        assert_eq!(c.fbank_conf.dither, 1.0);
        c.validate().unwrap();

        let e = serde_yaml::from_str::<DatasetConf>("spec_subs: true")
            .unwrap_err()
            .to_string();
        assert!(e.contains("spec_subs"), "{e}");
        let e = serde_yaml::from_str::<DatasetConf>("fbank_conf: {num_mel_bin: 80}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_mel_bin"), "{e}");
        let e = serde_yaml::from_str::<DatasetConf>("batch_conf: {batch_type: bucket}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bucket") && e.contains("use dynamic"), "{e}");
        let bad: DatasetConf =
            serde_yaml::from_str("resample_conf: {resample_rate: 8000}").unwrap();
        assert!(bad.validate().unwrap_err().contains("resample_rate"));
    }
}
