#!/usr/bin/env python3
"""Filterbank speed and agreement: upcycle (Rust) vs kaldi-native-fbank, same audio,
same run, one thread each, alternating repetitions.

    .venv/bin/python bench/fbank.py [--list data/fillets-cs/test/data.list] [--files N] [--repeat R] [--json OUT]

Prints frames/s of both, their ratio (median and spread over repetitions) and the max
abs difference of the features; writes the same as JSON.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import wave

import kaldi_native_fbank as knf
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_pcm16(path):
    with wave.open(path, "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32)


def knf_fbank(samples):
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = 80
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, samples)
    fb.input_finished()
    return fb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--list", default=os.path.join(ROOT, "data/fillets-cs/test/data.list"))
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/upcycle"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    base = os.path.dirname(a.list)
    files = []
    for line in open(a.list):
        wav = json.loads(line)["wav"]
        files.append(wav if os.path.isabs(wav) else os.path.normpath(os.path.join(base, wav)))
        if len(files) >= a.files:
            break
    audio = [read_pcm16(f).tolist() for f in files]  # lists: knf's input type, converted untimed

    ours, theirs = [], []
    frames = None
    for _ in range(a.repeat):
        out = subprocess.run([a.bin, "bench", "fbank", "--repeat", "1", *files],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out)
        frames = r["frames"]
        ours.append(r["frames_per_second"])
        t = time.perf_counter()
        n = sum(knf_fbank(x).num_frames_ready for x in audio)
        theirs.append(n / (time.perf_counter() - t))
        assert n == frames, (n, frames)

    # Agreement on the first file, through the `data fbank` command.
    npy = "/tmp/upcycle-bench-fbank.npy"
    subprocess.run([a.bin, "data", "fbank", files[0], "--out", npy], check=True, capture_output=True)
    fb = knf_fbank(audio[0])
    ref = np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])
    diff = float(np.abs(np.load(npy) - ref).max())

    ratios = [o / t for o, t in zip(ours, theirs)]
    result = {
        "benchmark": "fbank", "files": len(files), "frames": frames, "repeat": a.repeat,
        "upcycle_frames_per_s": statistics.median(ours), "knf_frames_per_s": statistics.median(theirs),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "max_abs_diff": diff,
    }
    print(f"fbank: {len(files)} files, {frames} frames, {a.repeat} repetitions, one thread each")
    print(f"  upcycle            {result['upcycle_frames_per_s']:>12,.0f} frames/s")
    print(f"  kaldi-native-fbank {result['knf_frames_per_s']:>12,.0f} frames/s")
    print(f"  ratio              {result['ratio_median']:.2f}x (min {result['ratio_min']:.2f}, max {result['ratio_max']:.2f})")
    print(f"  max abs diff       {diff:.2e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
