//! Where each corpus's recordings and transcripts are, and how to read them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::RawUtterance;
use crate::list::{read_kaldi_dir, ListReader};
use crate::text;

/// Fish Fillets NG, Czech dialogue.
pub(crate) const FILLETS_ROOT: &str = "/usr/share/games/fillets-ng";
/// Asterisk core prompts: per language, the voice folder under `ASTERISK_SOUNDS` (8 kHz
/// WAV, one speaker each; the speaker is the voice's name) and the package whose
/// `core-sounds-<lang>.txt.gz` holds the transcripts.
pub(crate) const ASTERISK_SOUNDS: &str = "/usr/share/asterisk/sounds";
pub(crate) const ASTERISK_VOICES: [(&str, &str); 5] = [
    ("en", "en_US_f_Allison"),
    ("es", "es_MX_f_Allison"),
    ("fr", "fr_CA_f_June"),
    ("it", "it_IT_m_Carlo"),
    ("ru", "ru_RU_f_IvrvoiceRU"),
];
/// pocketsphinx test clips.
pub(crate) const POCKETSPHINX: &str = "/usr/share/pocketsphinx/test/data";
/// Text for synthetic speech.
pub(crate) const FORTUNES: &str = "/usr/share/games/fortunes";

/// Tokens of a Lua file as far as the dialogue scripts need them.
#[derive(Debug, PartialEq)]
enum LuaToken {
    Ident(String),
    Str(String),
    Punct(char),
}

fn lua_tokens(src: &str) -> Vec<LuaToken> {
    let mut out = Vec::new();
    let mut it = src.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '-' if it.peek() == Some(&'-') => {
                for c in it.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' | '\'' => {
                let mut s = String::new();
                while let Some(d) = it.next() {
                    match d {
                        '\\' => match it.next() {
                            Some('n') => s.push(' '),
                            Some('t') => s.push(' '),
                            Some(e) => s.push(e),
                            None => {}
                        },
                        d if d == c => break,
                        d => s.push(d),
                    }
                }
                out.push(LuaToken::Str(s));
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut s = c.to_string();
                while let Some(&d) = it.peek() {
                    if d.is_alphanumeric() || d == '_' {
                        s.push(d);
                        it.next();
                    } else {
                        break;
                    }
                }
                out.push(LuaToken::Ident(s));
            }
            c if c.is_whitespace() => {}
            c => out.push(LuaToken::Punct(c)),
        }
    }
    out
}

/// One line of a Fillets NG dialogue script:
/// `dialogId("id", "font", "english") dialogStr("translation")`.
#[derive(Debug, PartialEq)]
struct DialogLine {
    id: String,
    font: String,
    /// The game's source text.
    english: String,
    /// The text in the file's language (`dialogs_<lang>.lua`).
    translation: String,
}

/// Every line of a `dialogs_<lang>.lua` script that has a translation.
fn parse_dialogs(src: &str) -> Vec<DialogLine> {
    let toks = lua_tokens(src);
    let mut out = Vec::new();
    let mut i = 0;
    // Collects the string arguments of a call starting at toks[i] = Ident(name).
    let args = |i: usize| -> Option<(Vec<String>, usize)> {
        if toks.get(i + 1) != Some(&LuaToken::Punct('(')) {
            return None;
        }
        let mut strs = Vec::new();
        let mut j = i + 2;
        loop {
            match toks.get(j)? {
                LuaToken::Str(s) => strs.push(s.clone()),
                LuaToken::Punct(',') | LuaToken::Punct('.') => {}
                LuaToken::Punct(')') => return Some((strs, j + 1)),
                _ => return None,
            }
            j += 1;
        }
    };
    while i < toks.len() {
        if toks[i] == LuaToken::Ident("dialogId".into()) {
            if let Some((id_args, next)) = args(i) {
                if toks.get(next) == Some(&LuaToken::Ident("dialogStr".into())) {
                    if let Some((tr, after)) = args(next) {
                        if let (Some(id), Some(translation)) = (id_args.first(), tr.first()) {
                            out.push(DialogLine {
                                id: id.clone(),
                                font: id_args.get(1).cloned().unwrap_or_default(),
                                english: id_args.get(2).cloned().unwrap_or_default(),
                                translation: translation.clone(),
                            });
                        }
                        i = after;
                        continue;
                    }
                }
            }
        }
        i += 1;
    }
    out
}

/// Fish Fillets NG Czech: utterances grouped by level (the split unit).
pub(crate) fn fillets_cs() -> Result<Vec<RawUtterance>> {
    let root = Path::new(FILLETS_ROOT);
    let scripts = root.join("script");
    let mut levels: Vec<PathBuf> = std::fs::read_dir(&scripts)
        .with_context(|| format!("reading {}", scripts.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("dialogs_cs.lua").exists())
        .collect();
    levels.sort();
    let mut out = Vec::new();
    for dir in levels {
        let level = dir.file_name().unwrap().to_string_lossy().to_string();
        let src = std::fs::read_to_string(dir.join("dialogs_cs.lua"))?;
        for DialogLine {
            id,
            font,
            translation,
            ..
        } in parse_dialogs(&src)
        {
            let audio = root
                .join("sound")
                .join(&level)
                .join("cs")
                .join(format!("{id}.ogg"));
            if !audio.exists() {
                continue; // a line with no Czech recording
            }
            let speaker = font.strip_prefix("font_").unwrap_or(&font).to_string();
            out.push(RawUtterance {
                key: format!("fillets-{level}-{id}"),
                audio,
                text: translation,
                speaker: if speaker.is_empty() {
                    "narrator".into()
                } else {
                    speaker
                },
                group: level.clone(),
                lang: Some("cs".into()),
                split: None,
            });
        }
    }
    Ok(out)
}

/// The transcript file of the Asterisk prompts in `lang`.
pub(crate) fn asterisk_text_file(lang: &str) -> PathBuf {
    PathBuf::from(format!(
        "/usr/share/doc/asterisk-core-sounds-{lang}/core-sounds-{lang}.txt.gz"
    ))
}

/// What a prompt's transcript says aloud in `lang`, normalised, or `None` when it cannot
/// be written as spoken characters. Descriptions of sounds are dropped ("dot [.]" ->
/// "dot"; "(simple tone sound plays)", "<beep ascending>" -> nothing). English spells
/// digits and keys ("7" -> "seven", "*" -> "star"); the other languages' numbers are not
/// spelled here, so their prompts with digits are left out. Russian writes "ё" as "е", as
/// most Russian text does. The result is what training and scoring both see.
pub(crate) fn spoken_text(lang: &str, raw: &str) -> Option<String> {
    let mut clean = String::new();
    let mut depth = 0;
    for c in raw.chars() {
        match c {
            '[' | '(' | '<' => depth += 1,
            ']' | ')' | '>' => depth = (depth - 1).max(0),
            _ if depth > 0 => {}
            '*' | '#' if lang != "en" => return None,
            '*' => clean.push_str(" star "),
            '#' => clean.push_str(" pound "),
            c if c.is_ascii_digit() && lang != "en" => return None,
            c => clean.push(c),
        }
    }
    let spelled = if lang == "en" {
        spell_numbers(&clean)
    } else {
        clean
    };
    let mut norm = text::normalize(&spelled);
    if lang == "ru" {
        norm = norm.replace('ё', "е");
    }
    (!norm.is_empty()).then_some(norm)
}

/// Asterisk prompts in `lang` (one speaker): `relpath: Text.` lines; `silence/*` and
/// prompts with nothing speakable are dropped. The group is the prompt file, which is
/// the same file name in every language, so one prompt's translations share a split.
pub(crate) fn asterisk(lang: &str) -> Result<Vec<RawUtterance>> {
    let voice = ASTERISK_VOICES
        .iter()
        .find(|(l, _)| *l == lang)
        .map(|(_, v)| *v)
        .with_context(|| format!("no Asterisk voice for language {lang:?}"))?;
    let file = asterisk_text_file(lang);
    let gz = std::process::Command::new("zcat")
        .arg(&file)
        .output()
        .with_context(|| format!("running zcat on {}", file.display()))?;
    if !gz.status.success() {
        bail!("cannot read {}", file.display());
    }
    let text = String::from_utf8_lossy(&gz.stdout);
    let speaker = voice.rsplit('_').next().unwrap_or(voice).to_lowercase();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((rel, t)) = line.split_once(": ") else {
            continue;
        };
        let rel = rel.trim_start_matches('\u{feff}').trim();
        if rel.starts_with(';') || rel.starts_with("silence/") {
            continue;
        }
        let audio = Path::new(ASTERISK_SOUNDS)
            .join(voice)
            .join(format!("{rel}.wav"));
        let Some(spoken) = spoken_text(lang, t) else {
            continue;
        };
        if !audio.exists() {
            continue;
        }
        out.push(RawUtterance {
            key: format!("asterisk-{lang}-{}", rel.replace('/', "-")),
            audio,
            text: spoken,
            speaker: speaker.clone(),
            group: format!("asterisk/{rel}"),
            lang: Some(lang.into()),
            split: None,
        });
    }
    Ok(out)
}

/// English words of a number below one million.
fn number_words(n: u64) -> String {
    const ONES: [&str; 20] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
    ];
    const TENS: [&str; 10] = [
        "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    ];
    match n {
        0..=19 => ONES[n as usize].to_string(),
        20..=99 => match n % 10 {
            0 => TENS[(n / 10) as usize].to_string(),
            r => format!("{} {}", TENS[(n / 10) as usize], ONES[r as usize]),
        },
        100..=999 => match n % 100 {
            0 => format!("{} hundred", ONES[(n / 100) as usize]),
            r => format!("{} hundred {}", ONES[(n / 100) as usize], number_words(r)),
        },
        _ => match n % 1000 {
            0 => format!("{} thousand", number_words(n / 1000)),
            r => format!("{} thousand {}", number_words(n / 1000), number_words(r)),
        },
    }
}

/// Replaces digit runs (below one million) by English words, as the prompts speak them.
pub(crate) fn spell_numbers(text: &str) -> String {
    let mut out = String::new();
    let mut digits = String::new();
    let flush = |digits: &mut String, out: &mut String| {
        if !digits.is_empty() {
            match digits.parse::<u64>() {
                Ok(n) if n < 1_000_000 => out.push_str(&format!(" {} ", number_words(n))),
                _ => out.push_str(digits),
            }
            digits.clear();
        }
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
        } else {
            flush(&mut digits, &mut out);
            out.push(c);
        }
    }
    flush(&mut digits, &mut out);
    out
}

/// pocketsphinx's LibriVox and "cards" clips with their Sphinx transcriptions.
pub(crate) fn librivox() -> Result<Vec<RawUtterance>> {
    let mut out = Vec::new();
    for (sub, trans, speaker) in [
        ("librivox", "transcription", "librivox"),
        ("cards", "cards.transcription", "cards"),
    ] {
        let dir = Path::new(POCKETSPHINX).join(sub);
        let path = dir.join(trans);
        let t = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for line in t.lines() {
            // `<s> text </s> (id)`
            let Some((body, id)) = line.rsplit_once('(') else {
                continue;
            };
            let id = id.trim_end_matches(')').trim();
            let body = body.replace("<s>", "").replace("</s>", "");
            out.push(RawUtterance {
                key: format!("{sub}-{id}"),
                audio: dir.join(format!("{id}.wav")),
                text: body.trim().to_string(),
                speaker: speaker.into(),
                group: text::normalize(&body),
                lang: Some("en".into()),
                split: None,
            });
        }
    }
    Ok(out)
}

/// The lines of every Fillets NG dialogue in `lang`, as `(level, text)`: the game's
/// translation (`dialogs_<lang>.lua`), or for `en` its source text (which every
/// translation holds). Text only; most languages have no recordings.
pub(crate) fn fillets_lines(lang: &str) -> Result<Vec<(String, String)>> {
    let scripts = Path::new(FILLETS_ROOT).join("script");
    // English lines are read from the Czech scripts, where each carries its source text.
    let file = format!("dialogs_{}.lua", if lang == "en" { "cs" } else { lang });
    let mut levels: Vec<PathBuf> = std::fs::read_dir(&scripts)
        .with_context(|| format!("reading {}", scripts.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(&file).exists())
        .collect();
    levels.sort();
    let mut out = Vec::new();
    for dir in levels {
        let level = dir.file_name().unwrap().to_string_lossy().to_string();
        let path = dir.join(&file);
        let src = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for line in parse_dialogs(&src) {
            let text = if lang == "en" {
                line.english
            } else {
                line.translation
            };
            out.push((level.clone(), text));
        }
    }
    Ok(out)
}

/// English voices of espeak-ng and variants that change timbre.
const ESPEAK_VOICES: [&str; 8] = [
    "en-us",
    "en",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-us-nyc",
];
const ESPEAK_VARIANTS: [&str; 14] = [
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
];

/// Sentences of 3 to 16 plain English words from the fortune files, deduplicated.
fn english_sentences() -> Result<Vec<String>> {
    let mut sentences = std::collections::BTreeSet::new();
    for name in ["fortunes", "literature", "riddles"] {
        let p = Path::new(FORTUNES).join(name);
        let Ok(t) = std::fs::read_to_string(&p) else {
            continue;
        };
        let flat = t.replace('\n', " ");
        for s in flat.split(['.', '?', '!', '%', ':', ';', '"']) {
            let s = s.trim();
            let words = s.split_whitespace().count();
            let plain = s
                .chars()
                .all(|c| c.is_ascii_alphabetic() || c == ' ' || c == ',' || c == '\'');
            if (3..=16).contains(&words) && plain {
                sentences.insert(s.split_whitespace().collect::<Vec<_>>().join(" "));
            }
        }
    }
    if sentences.is_empty() {
        bail!("no English text found under {FORTUNES} (apt-get install fortunes-min)");
    }
    Ok(sentences.into_iter().collect())
}

/// Synthesises `count` English utterances with varied voices, speeds and pitches into
/// `work/`; returns them as raw utterances (grouped by sentence).
pub(crate) fn espeak_en(count: usize, seed: u64, work: &Path) -> Result<Vec<RawUtterance>> {
    let sentences = english_sentences()?;
    let how = Synthesis {
        lang: "en",
        voices: &ESPEAK_VOICES,
        telephone: false,
        key_prefix: "espeak",
    };
    espeak(&how, &sentences, count, seed, work)
}

/// espeak-ng's voices for each language of the multilingual corpus.
pub(crate) const ESPEAK_LANGUAGES: [(&str, &[&str]); 6] = [
    ("cs", &["cs"]),
    ("en", &ESPEAK_VOICES),
    ("es", &["es", "es-419"]),
    ("fr", &["fr-fr", "fr-be", "fr-ch"]),
    ("it", &["it"]),
    ("ru", &["ru", "ru-lv"]),
];

/// How one language is synthesised.
pub(crate) struct Synthesis<'a> {
    /// Language tag of the utterances.
    pub(crate) lang: &'a str,
    /// espeak-ng voices to draw from (each combined with a random variant).
    pub(crate) voices: &'a [&'a str],
    /// Band-limit to 8 kHz, as the Asterisk prompts are recorded.
    pub(crate) telephone: bool,
    /// Keys are `<key_prefix>-<index>`.
    pub(crate) key_prefix: &'a str,
}

/// Synthesises `count` utterances of `texts` (cycled through in a shuffled order) with
/// random voices, variants, speeds and pitches into `work/`; returns them as raw
/// utterances grouped by sentence.
pub(crate) fn espeak(
    how: &Synthesis<'_>,
    texts: &[String],
    count: usize,
    seed: u64,
    work: &Path,
) -> Result<Vec<RawUtterance>> {
    if texts.is_empty() {
        bail!("no text to synthesise in language {:?}", how.lang);
    }
    let mut texts = texts.to_vec();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    texts.shuffle(&mut rng);
    std::fs::create_dir_all(work)?;
    let jobs: Vec<(RawUtterance, Vec<String>)> = (0..count)
        .map(|i| {
            let text = texts[i % texts.len()].clone();
            let voice = how.voices[rng.random_range(0..how.voices.len())];
            let variant = ESPEAK_VARIANTS[rng.random_range(0..ESPEAK_VARIANTS.len())];
            let speed = rng.random_range(120..=200);
            let pitch = rng.random_range(25..=75);
            let key = format!("{}-{i:06}", how.key_prefix);
            let audio = work.join(format!("{key}.wav"));
            let args = vec![
                "-v".into(),
                format!("{voice}+{variant}"),
                "-s".into(),
                speed.to_string(),
                "-p".into(),
                pitch.to_string(),
                "-w".into(),
                audio.display().to_string(),
                text.clone(),
            ];
            let u = RawUtterance {
                key,
                audio,
                group: text::normalize(&text),
                text,
                speaker: format!("{voice}+{variant}"),
                lang: Some(how.lang.into()),
                split: None,
            };
            (u, args)
        })
        .collect();
    super::parallel_map("synthesising", &jobs, |(u, args)| {
        let st = std::process::Command::new("espeak-ng")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .context("running espeak-ng (apt-get install espeak-ng)")?;
        if !st.success() {
            bail!("espeak-ng failed for {}", u.key);
        }
        if how.telephone {
            to_telephone_band(&u.audio)?;
        }
        Ok(())
    })
    .into_iter()
    .collect::<Result<Vec<()>>>()?;
    Ok(jobs.into_iter().map(|(u, _)| u).collect())
}

/// Rewrites a WAV at 8 kHz, so that it carries no more of the spectrum than a telephone
/// prompt does (the dataset's conversion brings it back to 16 kHz).
fn to_telephone_band(path: &Path) -> Result<()> {
    const TELEPHONE_RATE: u32 = 8000;
    let a = crate::audio::read_wav(path).with_context(|| format!("reading {}", path.display()))?;
    let rate = a.sample_rate;
    let narrow = crate::audio::resample(&a.into_mono(), rate, TELEPHONE_RATE);
    crate::audio::write_wav_i16(path, &narrow, TELEPHONE_RATE)
        .with_context(|| format!("writing {}", path.display()))
}

/// A user's own data: a folder with Kaldi's `wav.scp` + `text` (and optionally
/// `utt2spk`), or a `data.list` file (or a folder holding one). A folder with `train/`,
/// `dev/` and `test/` inside keeps that split.
pub(crate) fn user_dir(src: &Path) -> Result<Vec<RawUtterance>> {
    let splits = ["train", "dev", "test"];
    if splits.iter().all(|s| src.join(s).is_dir()) {
        let mut out = Vec::new();
        for s in splits {
            let mut part = user_dir(&src.join(s))?;
            part.iter_mut().for_each(|u| u.split = Some(s));
            out.extend(part);
        }
        return Ok(out);
    }
    let entries = if src.is_file() {
        read_list_entries(src)?
    } else if src.join("data.list").is_file() {
        read_list_entries(&src.join("data.list"))?
    } else if src.join("wav.scp").is_file() {
        read_kaldi_dir(src)?
    } else {
        bail!(
            "{} holds neither wav.scp + text nor data.list (nor train/ dev/ test/ folders of them)",
            src.display()
        );
    };
    let dir = if src.is_file() {
        src.parent().unwrap_or(Path::new("."))
    } else {
        src
    };
    let utt2spk: BTreeMap<String, String> = std::fs::read_to_string(dir.join("utt2spk"))
        .map(|t| {
            t.lines()
                .filter_map(|l| l.split_once(char::is_whitespace))
                .map(|(u, s)| (u.to_string(), s.trim().to_string()))
                .collect()
        })
        .unwrap_or_default();
    Ok(entries
        .into_iter()
        .map(|e| RawUtterance {
            speaker: utt2spk
                .get(&e.key)
                .cloned()
                .unwrap_or_else(|| "unknown".into()),
            group: text::normalize(&e.txt),
            audio: PathBuf::from(e.wav),
            key: e.key,
            text: e.txt,
            lang: e.lang,
            split: None,
        })
        .collect())
}

fn read_list_entries(path: &Path) -> Result<Vec<crate::list::ListEntry>> {
    let mut reader = ListReader::open(path)?;
    let mut out = Vec::new();
    while let Some(item) = reader.next() {
        let (_, mut e) = item?;
        e.wav = reader.resolve(&e.wav).display().to_string();
        out.push(e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_spelled() {
        assert_eq!(
            text::normalize(&spell_numbers("use the 7 key, 20 or 115 or 3000")),
            "use the seven key twenty or one hundred fifteen or three thousand"
        );
        assert_eq!(number_words(42), "forty two");
    }

    #[test]
    fn prompts_are_normalised_per_language() {
        assert_eq!(
            spoken_text("en", "Press 7 or * [beep]").as_deref(),
            Some("press seven or star")
        );
        assert_eq!(
            spoken_text("fr", "Pour quitter, appuyez sur l'étoile.").as_deref(),
            Some("pour quitter appuyez sur l'étoile")
        );
        // Numbers are not spelled outside English: such prompts are left out.
        assert_eq!(spoken_text("es", "marque 1 para salir"), None);
        assert_eq!(spoken_text("it", "[toni ascendenti]"), None);
        assert_eq!(
            spoken_text("ru", "Всё ЕЩЁ здесь").as_deref(),
            Some("все еще здесь")
        );
    }

    #[test]
    fn dialogue_scripts_parse_including_multiline_calls() {
        let src = r#"
-- comment with dialogId("x", "y", "z")
dialogId("let-m-divna", "font_small", "What kind of strange ship is that?")
dialogStr("Co je to za divnou loď?")

dialogId("a-b", "font_big",
 "English")
dialogStr(
"Jak si to \"představuješ\"? Pohne ocelí, no a?")
dialogId("no-cs", "", "only english")
"#;
        let d = parse_dialogs(src);
        assert_eq!(d.len(), 2);
        assert_eq!(
            d[0],
            DialogLine {
                id: "let-m-divna".into(),
                font: "font_small".into(),
                english: "What kind of strange ship is that?".into(),
                translation: "Co je to za divnou loď?".into()
            }
        );
        assert_eq!(d[1].english, "English");
        assert_eq!(
            d[1].translation,
            "Jak si to \"představuješ\"? Pohne ocelí, no a?"
        );
    }
}
