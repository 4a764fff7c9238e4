#!/usr/bin/env python3
"""Regenerates tests/golden/fbank: Kaldi filterbank features of real utterances from
every corpus, computed by kaldi-native-fbank (the reference), for dataset/tests/fbank_parity.rs
(and cli/tests/fbank_parity.rs, which runs `upcycle data fbank`).

    .venv/bin/python scripts/make_fbank_goldens.py

Each item names its source recording and how it becomes 16 kHz mono 16-bit PCM (the
file itself, or sox with dither off); the SHA-256 of those samples is stored so the test
can tell "different input" from "different features". The audio itself is not committed.
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import wave

import kaldi_native_fbank as knf
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "golden", "fbank")

# (name, source, how): "wav16k" = a 16 kHz mono 16-bit WAV used as is, "sox" = converted
# with `sox -D -R SRC -r 16000 -c 1 -b 16 -e signed-integer OUT`, "espeak:ARGS" =
# synthesised with espeak-ng then converted with sox.
ITEMS = [
    ("fillets-airplane-let-m-divna", "/usr/share/games/fillets-ng/sound/airplane/cs/let-m-divna.ogg", "sox"),
    ("fillets-barrel-bar-v-co", "/usr/share/games/fillets-ng/sound/barrel/cs/bar-v-co.ogg", "sox"),
    ("asterisk-agent-loginok", "/usr/share/asterisk/sounds/en_US_f_Allison/agent-loginok.wav", "sox"),
    ("asterisk-digits-7", "/usr/share/asterisk/sounds/en_US_f_Allison/digits/7.wav", "sox"),
    ("librivox-0880", "/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0880.wav", "wav16k"),
    ("cards-001", "/usr/share/pocketsphinx/test/data/cards/001.wav", "wav16k"),
    ("espeak-en-us-f2", "the quick brown fox jumps over the lazy dog", "espeak:-v en-us+f2 -s 160 -p 50"),
]


def to_16k(source, how, tmp):
    """Returns the path of the 16 kHz mono 16-bit WAV that both sides read."""
    if how == "wav16k":
        return source
    src = source
    if how.startswith("espeak:"):
        src = os.path.join(tmp, "espeak.wav")
        subprocess.run(["espeak-ng", *how[len("espeak:"):].split(), "-w", src, source], check=True)
    out = os.path.join(tmp, "in16k.wav")
    subprocess.run(["sox", "-D", "-R", src, "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer", out], check=True)
    return out


def read_pcm16(path):
    with wave.open(path, "rb") as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2, path
        raw = w.readframes(w.getnframes())
    return raw, np.frombuffer(raw, dtype="<i2").astype(np.float32)


def fbank(samples):
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = 16000
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = 80
    opts.energy_floor = 0.0
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, samples.tolist())
    fb.input_finished()
    return np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)]).astype(np.float32)


def main():
    os.makedirs(OUT, exist_ok=True)
    manifest = []
    for name, source, how in ITEMS:
        with tempfile.TemporaryDirectory() as tmp:
            raw, samples = read_pcm16(to_16k(source, how, tmp))
        feats = fbank(samples)
        np.save(os.path.join(OUT, f"{name}.npy"), feats)
        manifest.append({
            "name": name, "source": source, "how": how,
            "pcm_sha256": hashlib.sha256(raw).hexdigest(),
            "frames": int(feats.shape[0]),
        })
        print(f"{name}: {feats.shape[0]} frames", file=sys.stderr)
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump({"reference": f"kaldi-native-fbank {knf.__version__ if hasattr(knf, '__version__') else '1.22.4'}",
                   "items": manifest}, f, indent=1)


if __name__ == "__main__":
    main()
