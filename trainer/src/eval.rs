//! `upcycle eval` and `upcycle transcribe`: decoding with CTC greedy search, CTC prefix
//! beam search and attention rescoring, in full context and chunked, with CER/WER,
//! real-time factor, hypotheses and a per-utterance report.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use tch::{Device, Tensor};
use upcycle_dataset::audio;
use upcycle_dataset::fbank::{Fbank, FbankOptions};
use upcycle_dataset::list::ListReader;
use upcycle_model::mask::ChunkMode;
use upcycle_model::moe::Routing;
use upcycle_model::precision::{autocast, Precision};
use upcycle_model::search::{attention_rescoring, ctc_greedy, ctc_prefix_beam_search, Hypothesis};

use crate::checkpoint::{load_model, LoadedModel};
use crate::scoring::ErrorRate;

/// A decoding method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Best path of the CTC head.
    CtcGreedy,
    /// CTC prefix beam search.
    CtcPrefixBeam,
    /// CTC n-best rescored by both attention decoders.
    AttentionRescoring,
}

impl Method {
    /// All methods, in report order.
    pub const ALL: [Method; 3] = [
        Method::CtcGreedy,
        Method::CtcPrefixBeam,
        Method::AttentionRescoring,
    ];

    fn name(self) -> &'static str {
        match self {
            Method::CtcGreedy => "ctc_greedy",
            Method::CtcPrefixBeam => "ctc_prefix_beam",
            Method::AttentionRescoring => "attention_rescoring",
        }
    }
}

/// Decoding settings.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// Methods to run.
    pub methods: Vec<Method>,
    /// Chunk sizes after subsampling; 0 means full context.
    pub chunks: Vec<i64>,
    /// Left chunks visible in chunked mode (negative: all).
    pub left_chunks: i64,
    /// Beam of the prefix search.
    pub beam: usize,
    /// CTC weight in attention rescoring.
    pub ctc_weight: f64,
    /// Right-to-left decoder weight in attention rescoring.
    pub reverse_weight: f64,
    /// Device.
    pub device: Device,
    /// Arithmetic of the encoder and decoders (bf16: autocast; scores stay fp32).
    pub precision: Precision,
}

/// One line of the eval table.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    /// Method name.
    pub method: Method,
    /// Chunk size (0: full).
    pub chunk: i64,
    /// CER, percent.
    pub cer: f64,
    /// WER, percent.
    pub wer: f64,
    /// Decoding seconds / audio seconds (features excluded, batch 1).
    pub rtf: f64,
    /// Error counts.
    pub errors: ErrorRate,
    /// CER, percent, per language tag of the list (absent when the list has no tags).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cer_by_language: BTreeMap<String, f64>,
}

/// The chunk setting of `--chunk N` (0 or less: full context).
pub fn chunk_mode(chunk: i64, left: i64) -> ChunkMode {
    if chunk <= 0 {
        ChunkMode::Full
    } else {
        ChunkMode::Chunk {
            size: chunk,
            left_chunks: left,
        }
    }
}

/// Decodes one utterance's features `[T, dim]` (before CMVN, which the model applies)
/// with every requested method; returns `(method, hypothesis, seconds)` per method. The
/// encoder runs once; its time is added to every method.
pub fn decode_one(
    m: &LoadedModel,
    feats: &Tensor,
    chunk: ChunkMode,
    o: &DecodeOptions,
) -> Vec<(Method, Hypothesis, f64)> {
    tch::no_grad(|| {
        let t0 = Instant::now();
        let x = feats.unsqueeze(0).to_device(o.device);
        let lens = Tensor::from_slice(&[feats.size()[0]]).to_device(o.device);
        let (enc, mask, logp) = autocast(o.precision, o.device, || {
            let (enc, mask) =
                m.model
                    .encoder()
                    .forward(&x, &lens, chunk, false, &mut Routing::off());
            let logp = m.model.ctc().log_softmax(&enc);
            (enc, mask, logp)
        });
        let enc_secs = t0.elapsed().as_secs_f64();
        let hlen = mask.sum(tch::Kind::Int64).int64_value(&[]);
        let mut out = Vec::new();
        let mut nbest: Option<(Vec<Hypothesis>, f64)> = None;
        for &method in &o.methods {
            let t = Instant::now();
            let hyp = match method {
                Method::CtcGreedy => ctc_greedy(&logp, &Tensor::from_slice(&[hlen])).remove(0),
                Method::CtcPrefixBeam | Method::AttentionRescoring => {
                    let (beams, beam_secs) = nbest.get_or_insert_with(|| {
                        let tb = Instant::now();
                        let b = ctc_prefix_beam_search(
                            &logp.get(0).narrow(0, 0, hlen).to_device(Device::Cpu),
                            o.beam,
                        );
                        (b, tb.elapsed().as_secs_f64())
                    });
                    let base = *beam_secs;
                    let h = if method == Method::CtcPrefixBeam {
                        beams.first().cloned().unwrap_or(Hypothesis {
                            tokens: vec![],
                            score: 0.0,
                        })
                    } else {
                        autocast(o.precision, o.device, || {
                            attention_rescoring(
                                &m.model,
                                &enc,
                                beams,
                                o.ctc_weight,
                                o.reverse_weight,
                            )
                        })
                    };
                    out.push((method, h, enc_secs + base + t.elapsed().as_secs_f64()));
                    continue;
                }
            };
            out.push((method, hyp, enc_secs + t.elapsed().as_secs_f64()));
        }
        out
    })
}

fn features(path: &Path, fbank: &Fbank) -> Result<(Tensor, f64)> {
    let a = audio::read_wav(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let rate = a.sample_rate;
    let samples = audio::resample(&a.into_mono(), rate, audio::SAMPLE_RATE);
    let secs = samples.len() as f64 / audio::SAMPLE_RATE as f64;
    let f = fbank.compute(&samples, &mut rand::rng());
    let frames = (f.len() / fbank.dim()) as i64;
    anyhow::ensure!(frames > 0, "{}: shorter than one frame", path.display());
    Ok((
        Tensor::from_slice(&f).view([frames, fbank.dim() as i64]),
        secs,
    ))
}

/// Decodes a list and writes `OUT/<method>_chunk<N>.txt` hypotheses,
/// `OUT/utterances.jsonl` and `OUT/results.json`; returns one result per mode.
pub fn evaluate(
    checkpoint: &Path,
    list: &Path,
    out: &Path,
    o: &DecodeOptions,
) -> Result<Vec<ModeResult>> {
    let m = load_model(checkpoint, o.device)?;
    let list = if list.is_dir() {
        list.join("data.list")
    } else {
        list.to_path_buf()
    };
    std::fs::create_dir_all(out)?;
    let fbank = Fbank::new(FbankOptions {
        num_mel_bins: m.config.input_dim as usize,
        ..FbankOptions::default()
    });
    let mut reader = ListReader::open(&list)?;
    let mut utts = Vec::new();
    while let Some(item) = reader.next() {
        let (_, e) = item?;
        utts.push((e.key.clone(), reader.resolve(&e.wav), e.txt, e.lang));
    }
    let mut results = Vec::new();
    let mut report = std::io::BufWriter::new(std::fs::File::create(out.join("utterances.jsonl"))?);
    for &chunk in &o.chunks {
        let mode = chunk_mode(chunk, o.left_chunks);
        let mut per: Vec<(ErrorRate, f64, Vec<String>)> =
            o.methods.iter().map(|_| Default::default()).collect();
        let mut per_lang: Vec<BTreeMap<&str, ErrorRate>> =
            o.methods.iter().map(|_| BTreeMap::new()).collect();
        let mut audio_secs = 0.0;
        for (key, wav, txt, lang) in &utts {
            let (feats, secs) = match features(wav, &fbank) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("skipping {key}: {e:#}");
                    continue;
                }
            };
            audio_secs += secs;
            for (i, (method, hyp, dsecs)) in decode_one(&m, &feats, mode, o).into_iter().enumerate()
            {
                let text = m.units.decode(&hyp.tokens);
                let (ce, n) = per[i].0.add(txt, &text);
                if let Some(lang) = lang {
                    per_lang[i]
                        .entry(lang.as_str())
                        .or_default()
                        .add(txt, &text);
                }
                per[i].1 += dsecs;
                per[i].2.push(format!("{key} {text}"));
                writeln!(
                    report,
                    "{}",
                    serde_json::json!({"key": key, "method": method, "chunk": chunk, "ref": txt, "hyp": text,
                                       "char_errors": ce, "chars": n})
                )?;
            }
        }
        for (i, &method) in o.methods.iter().enumerate() {
            let (er, secs, lines) = &per[i];
            std::fs::write(
                out.join(format!("{}_chunk{chunk}.txt", method.name())),
                lines.join("\n") + "\n",
            )?;
            results.push(ModeResult {
                method,
                chunk,
                cer: er.cer(),
                wer: er.wer(),
                rtf: secs / audio_secs.max(1e-9),
                errors: *er,
                cer_by_language: per_lang[i]
                    .iter()
                    .map(|(lang, e)| (lang.to_string(), e.cer()))
                    .collect(),
            });
        }
    }
    report.flush()?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )
    .with_context(|| format!("writing {}", out.join("results.json").display()))?;
    Ok(results)
}

/// The eval table, one line per method and chunk setting.
pub fn table(results: &[ModeResult]) -> String {
    let mut s = String::from("method               chunk     CER %    WER %    RTF\n");
    for r in results {
        let chunk = if r.chunk <= 0 {
            "full".to_string()
        } else {
            r.chunk.to_string()
        };
        s.push_str(&format!(
            "{:<20} {chunk:>5} {:>9.2} {:>8.2} {:>6.3}\n",
            r.method.name(),
            r.cer,
            r.wer,
            r.rtf
        ));
        if r.cer_by_language.len() > 1 {
            let langs: Vec<String> = r
                .cer_by_language
                .iter()
                .map(|(l, c)| format!("{l} {c:.2}"))
                .collect();
            s.push_str(&format!(
                "{:>26}CER % by language: {}\n",
                "",
                langs.join("  ")
            ));
        }
    }
    s
}

/// Transcribes audio files with attention rescoring in full context.
pub fn transcribe(
    checkpoint: &Path,
    files: &[PathBuf],
    o: &DecodeOptions,
) -> Result<Vec<(PathBuf, String)>> {
    let m = load_model(checkpoint, o.device)?;
    let fbank = Fbank::new(FbankOptions {
        num_mel_bins: m.config.input_dim as usize,
        ..FbankOptions::default()
    });
    let mut out = Vec::new();
    for f in files {
        let (feats, _) = features(f, &fbank)?;
        let mode = chunk_mode(o.chunks.first().copied().unwrap_or(0), o.left_chunks);
        let hyps = decode_one(&m, &feats, mode, o);
        let best = hyps.last().context("no decoding method")?;
        out.push((f.clone(), m.units.decode(&best.1.tokens)));
    }
    Ok(out)
}
