//! `upcycle data prepare` on the real corpora of DATA.md, through the binary, and the
//! loader reading what it wrote.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use upcycle_dataset::audio;
use upcycle_dataset::cmvn::CmvnStats;
use upcycle_dataset::config::DatasetConf;
use upcycle_dataset::list::ListReader;
use upcycle_dataset::loader::{DataLoader, Mode, Shard};
use upcycle_dataset::text::Units;

/// Runs `upcycle data prepare --no-install --corpus CORPUS --out OUT EXTRA...`.
fn run_prepare(corpus: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_upcycle"))
        .args([
            "data",
            "prepare",
            "--no-install",
            "--corpus",
            corpus,
            "--out",
        ])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// Prepares a corpus, which must succeed; returns its summary.
fn prepare(corpus: &str, out: &Path, extra: &[&str]) -> serde_json::Value {
    let o = run_prepare(corpus, out, extra);
    assert!(
        o.status.success(),
        "prepare {corpus} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("train") && stdout.contains("hours"),
        "{stdout}"
    );
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

fn texts(dir: &Path, split: &str) -> Vec<String> {
    ListReader::open(&dir.join(split).join("data.list"))
        .unwrap()
        .map(|r| r.unwrap().1.txt)
        .collect()
}

/// Every list entry is a 16 kHz mono WAV; units, CMVN and summary are consistent.
fn check_dataset(dir: &Path, summary: &serde_json::Value) {
    let units = Units::load(&dir.join("units.txt")).unwrap();
    assert_eq!(units.len() as u64, summary["units"].as_u64().unwrap());
    for split in ["train", "dev", "test"] {
        let list = dir.join(split).join("data.list");
        let mut reader = ListReader::open(&list).unwrap();
        let mut n = 0;
        while let Some(item) = reader.next() {
            let (_, e) = item.unwrap();
            let info = audio::probe(&reader.resolve(&e.wav)).unwrap();
            audio::check_model_input(&info).unwrap();
            assert!(!e.txt.is_empty());
            n += 1;
        }
        assert_eq!(
            n,
            summary["splits"][split]["utterances"].as_u64().unwrap(),
            "{split}"
        );
    }
    // Training text never has <unk>: the units come from it.
    for t in texts(dir, "train") {
        assert_eq!(units.encode(&t).1, 0, "{t}");
    }
    let cmvn = CmvnStats::load(&dir.join("global_cmvn")).unwrap();
    assert_eq!(cmvn.mean_stat.len(), 80);
    assert_eq!(cmvn.frame_num, summary["cmvn_frames"].as_u64().unwrap());
    let (mean, istd) = cmvn.mean_istd();
    assert!(mean.iter().all(|m| m.is_finite()) && istd.iter().all(|s| s.is_finite() && *s > 0.0));
}

/// A statistic summed over train, dev and test.
fn total(summary: &serde_json::Value, field: &str) -> f64 {
    ["train", "dev", "test"]
        .iter()
        .map(|k| summary["splits"][k][field].as_f64().unwrap())
        .sum()
}

#[test]
fn fillets_cs_is_split_by_level_without_shared_sentences() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fillets");
    let s = prepare("fillets-cs", &dir, &[]);
    check_dataset(&dir, &s);
    let utts = total(&s, "utterances") as u64;
    let hours = total(&s, "hours");
    // DATA.md: about 1,750 utterances and 1.6 hours with transcripts.
    assert!((1650..=1800).contains(&utts), "{utts} utterances");
    assert!((1.5..=1.7).contains(&hours), "{hours} hours");
    assert!(s["splits"]["train"]["speakers"].as_u64().unwrap() >= 10);
    let train = s["splits"]["train"]["utterances"].as_f64().unwrap() / utts as f64;
    assert!((0.7..=0.9).contains(&train), "train fraction {train}");

    // No sentence of dev or test is in train; no level is in two splits.
    let train_texts: HashSet<String> = texts(&dir, "train").into_iter().collect();
    for split in ["dev", "test"] {
        for t in texts(&dir, split) {
            assert!(
                !train_texts.contains(&t),
                "{split} sentence {t:?} is also in train"
            );
        }
    }
    let level = |key: &str| key.split('-').nth(1).unwrap().to_string();
    let levels = |split: &str| -> HashSet<String> {
        ListReader::open(&dir.join(split).join("data.list"))
            .unwrap()
            .map(|r| level(&r.unwrap().1.key))
            .collect()
    };
    let (tr, dv, te) = (levels("train"), levels("dev"), levels("test"));
    assert!(tr.is_disjoint(&te) && tr.is_disjoint(&dv) && dv.is_disjoint(&te));

    // Deterministic: a second preparation gives identical lists.
    let again = tmp.path().join("again");
    prepare("fillets-cs", &again, &[]);
    for split in ["train", "dev", "test"] {
        assert_eq!(texts(&dir, split), texts(&again, split));
    }

    // The loader reads the real training list: every rank gets the same batch count.
    let units = Arc::new(Units::load(&dir.join("units.txt")).unwrap());
    let conf = DatasetConf::default();
    let counts: Vec<usize> = (0..3)
        .map(|rank| {
            let l = DataLoader::new(
                &dir.join("train/data.list"),
                units.clone(),
                conf.clone(),
                Mode::Train,
                Shard { rank, world: 3 },
                0,
            )
            .unwrap();
            l.plan(0).unwrap().batches_per_rank
        })
        .collect();
    assert!(
        counts.iter().all(|&c| c == counts[0] && c > 0),
        "{counts:?}"
    );
}

#[test]
fn asterisk_en_is_upsampled_and_skips_tone_descriptions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("asterisk");
    let s = prepare("asterisk-en", &dir, &[]);
    check_dataset(&dir, &s);
    let utts = total(&s, "utterances") as u64;
    assert!((450..=568).contains(&utts), "{utts}");
    let all: Vec<String> = ["train", "dev", "test"]
        .iter()
        .flat_map(|k| texts(&dir, k))
        .collect();
    // Descriptions of sounds are dropped, digits and keys are spelled as spoken.
    for t in &all {
        assert!(
            !t.contains("sound plays")
                && !t.contains("beep")
                && !t.chars().any(|c| c.is_ascii_digit()),
            "{t}"
        );
    }
    assert!(all.iter().any(|t| t.contains("seven key")));
    assert_eq!(s["splits"]["train"]["speakers"], 1);
}

/// The entries of a split: (key, text, language tag).
fn entries(dir: &Path, split: &str) -> Vec<(String, String, Option<String>)> {
    ListReader::open(&dir.join(split).join("data.list"))
        .unwrap()
        .map(|r| {
            let e = r.unwrap().1;
            (e.key, e.txt, e.lang)
        })
        .collect()
}

/// The fraction of a recording's power above `hz`, from Hann-windowed 512-point DFTs of
/// its frames.
fn power_above(wav: &Path, hz: f64) -> f64 {
    let a = audio::read_wav(wav).unwrap();
    let rate = a.sample_rate as f64;
    let x = a.into_mono();
    const N: usize = 512;
    let (mut high, mut all) = (0.0, 0.0);
    let hann = |n: usize| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / N as f64).cos();
    for frame in x.chunks_exact(N).step_by(4) {
        for k in 1..N / 2 {
            let (mut re, mut im) = (0.0f64, 0.0f64);
            for (n, &v) in frame.iter().enumerate() {
                let w = -2.0 * std::f64::consts::PI * (k * n) as f64 / N as f64;
                re += v as f64 * hann(n) * w.cos();
                im += v as f64 * hann(n) * w.sin();
            }
            let p = re * re + im * im;
            all += p;
            if k as f64 * rate / N as f64 > hz {
                high += p;
            }
        }
    }
    high / all
}

#[test]
fn multilingual_tags_six_languages_and_holds_out_test_sentences() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("multilingual");
    let s = prepare("multilingual", &dir, &["--synth", "40"]);
    check_dataset(&dir, &s);
    // espeak-ng speech in every language, in the training split only; the Asterisk
    // languages band-limited as their telephone prompts are, Czech not.
    let synth = s["synthetic_train"][0].as_u64().unwrap();
    assert!((200..=240).contains(&synth), "{s}");
    let synth_keys = |split: &str| -> Vec<(String, String)> {
        entries(&dir, split)
            .into_iter()
            .filter(|(k, _, _)| k.starts_with("espeak-"))
            .map(|(k, _, l)| (k, l.unwrap()))
            .collect()
    };
    assert!(synth_keys("dev").is_empty() && synth_keys("test").is_empty());
    let train_synth = synth_keys("train");
    assert_eq!(train_synth.len() as u64, synth);
    for lang in ["cs", "en", "es", "fr", "it", "ru"] {
        let (key, _) = train_synth
            .iter()
            .find(|(_, l)| l == lang)
            .unwrap_or_else(|| panic!("no synthetic {lang}"));
        let wav = dir.join("wav").join(format!("{key}.wav"));
        // Measured: 0.006-0.016 for synthetic Czech; 1e-5 to 2e-4 for the band-limited
        // languages.
        let high = power_above(&wav, 4500.0);
        if lang == "cs" {
            assert!(high > 2e-3, "{key}: {high} of its power above 4.5 kHz");
        } else {
            assert!(high < 5e-4, "{key}: {high} of its power above 4.5 kHz");
        }
    }
    // The real telephone prompts that the band-limited speech imitates pass the same
    // bound (the real Czech lines vary: some are narrow-band themselves).
    let prompts = entries(&dir, "train");
    let prompts = prompts.iter().filter(|e| e.0.starts_with("asterisk-"));
    for (key, _, _) in prompts.step_by(97) {
        let high = power_above(&dir.join("wav").join(format!("{key}.wav")), 4500.0);
        assert!(high < 5e-4, "real {key}: {high} of its power above 4.5 kHz");
    }
    // Prepared again with another --synth: refused, naming both.
    let o = run_prepare("multilingual", &dir, &["--synth", "0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--synth 40 (not 0)"),
        "{err}"
    );
    // --synth belongs to the multilingual corpus.
    let o = run_prepare("librivox", &tmp.path().join("not-made"), &["--synth", "3"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("multilingual corpus only"),
        "{err}"
    );
    assert!(!tmp.path().join("not-made").exists());
    let langs = ["cs", "en", "es", "fr", "it", "ru"];
    // Every language has a real held-out dev and test set, about a tenth of it.
    for lang in langs {
        let per = &s["languages"][lang];
        let n = |split: &str| per[split]["utterances"].as_u64().unwrap_or(0);
        assert!(n("train") >= 300, "{lang}: {per}");
        for split in ["dev", "test"] {
            let frac = n(split) as f64 / (n("train") + n("dev") + n("test")) as f64;
            assert!((0.05..=0.2).contains(&frac), "{lang} {split}: {per}");
        }
    }
    let splits: Vec<_> = ["train", "dev", "test"]
        .iter()
        .map(|k| entries(&dir, k))
        .collect();
    // Tagged by source; Russian is Cyrillic (bar a few Latin letter names), written
    // without "ё"; only English spells digits, the other languages' lines with digits are out.
    let mut cyrillic = 0;
    for (key, txt, lang) in splits.iter().flatten() {
        let lang = lang
            .as_deref()
            .unwrap_or_else(|| panic!("{key} has no tag"));
        assert!(langs.contains(&lang), "{key}: {lang}");
        let source_lang = if key.starts_with("fillets-") {
            "cs"
        } else {
            key.split('-').nth(1).unwrap()
        };
        assert_eq!(lang, source_lang, "{key}");
        assert!(!txt.chars().any(|c| c.is_ascii_digit()), "{key}: {txt}");
        if lang == "ru" {
            assert!(!txt.contains('ё'), "{txt}");
            cyrillic += txt.chars().any(|c| ('а'..='я').contains(&c)) as usize;
        }
    }
    assert!(cyrillic >= 400, "{cyrillic} Russian lines in Cyrillic");
    // One vocabulary over all scripts.
    let units = Units::load(&dir.join("units.txt")).unwrap();
    for t in ["žluťoučký", "мир", "è", "ç", "á"] {
        assert_eq!(units.encode(t).1, 0, "{t} not in the units");
    }
    // No dev or test sentence is trained on; a prompt file or a level is in one split only.
    let train_texts: HashSet<&String> = splits[0].iter().map(|(_, t, _)| t).collect();
    for held_out in &splits[1..] {
        for (key, t, _) in held_out {
            assert!(!train_texts.contains(t), "{key}: {t:?} is also in train");
        }
    }
    let unit_of = |key: &str| -> String {
        let parts: Vec<&str> = key.splitn(3, '-').collect();
        match parts[0] {
            "fillets" => format!("level {}", parts[1]),
            _ => format!("prompt {}", parts[2]),
        }
    };
    let units_of = |i: usize| -> HashSet<String> {
        splits[i]
            .iter()
            .filter(|e| !e.0.starts_with("espeak-"))
            .map(|e| unit_of(&e.0))
            .collect()
    };
    let (tr, dv, te) = (units_of(0), units_of(1), units_of(2));
    assert!(tr.is_disjoint(&te) && tr.is_disjoint(&dv) && dv.is_disjoint(&te));
}

#[test]
fn librivox_espeak_and_a_users_own_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let libri = tmp.path().join("librivox");
    let s = prepare("librivox", &libri, &[]);
    check_dataset(&libri, &s);
    assert_eq!(total(&s, "utterances"), 10.0);

    // A complete dataset is not rebuilt (and not lost) by a second run.
    let mtime = std::fs::metadata(libri.join("summary.json"))
        .unwrap()
        .modified()
        .unwrap();
    prepare("librivox", &libri, &[]);
    assert_eq!(
        mtime,
        std::fs::metadata(libri.join("summary.json"))
            .unwrap()
            .modified()
            .unwrap()
    );
    let o = run_prepare("asterisk-en", &libri, &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds corpus librivox"));

    let espeak = tmp.path().join("espeak");
    let s = prepare("espeak-en", &espeak, &["--count", "24"]);
    check_dataset(&espeak, &s);
    assert!(
        s["splits"]["train"]["speakers"].as_u64().unwrap() > 5,
        "varied voices"
    );

    // dir: Kaldi wav.scp + text pointing at 8 kHz Asterisk prompts and a broken file.
    let src = tmp.path().join("mine");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("broken.wav"), b"RIFF....not really").unwrap();
    let sounds = "/usr/share/asterisk/sounds/en_US_f_Allison";
    let mut scp = String::new();
    let mut text = String::new();
    for (i, (f, t)) in [
        ("digits/1", "one"),
        ("digits/2", "two"),
        ("digits/3", "three"),
        ("digits/4", "four"),
        ("digits/5", "five"),
        ("digits/6", "six"),
        ("digits/7", "seven"),
        ("digits/8", "eight"),
        ("digits/9", "nine"),
        ("digits/10", "ten"),
        ("digits/11", "eleven"),
        ("digits/12", "twelve"),
        ("digits/13", "thirteen"),
        ("digits/14", "fourteen"),
        ("digits/15", "fifteen"),
        ("digits/16", "sixteen"),
        ("digits/17", "seventeen"),
        ("digits/18", "eighteen"),
        ("digits/19", "nineteen"),
        ("digits/20", "twenty"),
    ]
    .iter()
    .enumerate()
    {
        scp.push_str(&format!("u{i:02} {sounds}/{f}.wav\n"));
        text.push_str(&format!("u{i:02} {t}\n"));
    }
    scp.push_str("bad broken.wav\n");
    text.push_str("bad nothing\n");
    std::fs::write(src.join("wav.scp"), scp).unwrap();
    std::fs::write(src.join("text"), text).unwrap();
    let mine = tmp.path().join("mine-data");
    let s = prepare("dir", &mine, &["--src", src.to_str().unwrap()]);
    check_dataset(&mine, &s);
    assert_eq!(s["skipped"]["not audio"], 1, "{s}");
    // 8 kHz in, 16 kHz out, same duration.
    let first = ListReader::open(&mine.join("train/data.list"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .1;
    let info = audio::probe(&mine.join("train").join(&first.wav)).unwrap();
    let n: usize = first.key[1..].parse().unwrap();
    let orig = audio::probe(Path::new(&format!("{sounds}/digits/{}.wav", n + 1))).unwrap();
    assert_eq!(info.sample_rate, 16000);
    assert_eq!(info.num_samples, orig.num_samples * 2);
}

#[test]
fn check_command_reads_a_real_list_with_a_bad_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("librivox");
    prepare("librivox", &dir, &[]);
    // One missing file among the training list: counted, not fatal at 20%.
    let list = dir.join("train/data.list");
    let mut lines = std::fs::read_to_string(&list).unwrap();
    lines.push_str("{\"key\":\"gone\",\"wav\":\"../wav/gone.wav\",\"txt\":\"he was\"}\n");
    std::fs::write(&list, lines).unwrap();
    let cfg = tmp.path().join("data.yaml");
    std::fs::write(
        &cfg,
        "max_bad_fraction: 0.2\nbatch_conf: {batch_type: static, batch_size: 2}\n",
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_upcycle"))
        .args(["data", "check", "--iterate", "--world", "4", "--data"])
        .arg(dir.join("train"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("1 missing file") && out.contains("batches per rank"),
        "{out}"
    );
    // With the default 5% it is refused, naming the setting.
    let o = Command::new(env!("CARGO_BIN_EXE_upcycle"))
        .args(["data", "check", "--data"])
        .arg(dir.join("train"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("max_bad_fraction"));
}

#[test]
fn bench_fbank_smoke() {
    let o = Command::new(env!("CARGO_BIN_EXE_upcycle"))
        .args([
            "bench",
            "fbank",
            "--repeat",
            "1",
            "/usr/share/pocketsphinx/test/data/cards/001.wav",
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["frames"], 108);
    assert!(r["frames_per_second"].as_f64().unwrap() > 0.0);
}
