#!/usr/bin/env python3
"""Training step: upcycle (Rust, tch) vs the PyTorch eager peer (bench/reference/u2pp.py,
WeNet's model), same config, same utterances, same threads, same run, alternating.

    .venv/bin/python bench/train_step.py [--config configs/small.yaml]
        [--list data/fillets-cs/train/data.list] [--utts 16] [--steps 5] [--repeat 3]
        [--threads 2] [--precision fp32|bf16] [--device cpu|cuda] [--json OUT]
        [--batch-frames 32000 [--sort-window 500]] [--peak-tflops 786]

A step is forward + backward + global-norm clipping + AdamW, full-context attention,
dropout on. `--precision bf16` runs both forward passes under bfloat16 autocast
(`upcycle_conf.precision: bf16`; the peer inside `torch.autocast("cpu", torch.bfloat16)`). Prints frames/s of both (median over steps, then over repetitions), the ratio
with its spread, each process's peak resident memory, and both sides' model TFLOP/s
(`upcycle_model::flops`: matrix products on the real lengths, training = 3x forward); with
`--peak-tflops` (the device's measured bf16 peak) also MFU.

Which utterances: the first `--utts` of the list, padded to the longest (a worst case), or
with `--batch-frames F` a batch as training's loader makes them: the first `--sort-window`
utterances sorted by length and cut into batches of at most F frames (WeNet's
`batch_type: dynamic`), of which the middle one is taken. Both sides get the same batch.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import wave

import kaldi_native_fbank as knf
import numpy as np
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "reference"))
from u2pp import build_model  # noqa: E402


def peak_rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def normalize(text):
    # Data lists from `upcycle data prepare` are already normalised.
    return " ".join(text.split())


def batch(list_path, utts):
    base = os.path.dirname(list_path)
    units = {}
    for line in open(os.path.join(base, "..", "units.txt"), encoding="utf-8"):
        sym, idx = line.rstrip("\n").rsplit(" ", 1)
        units[sym] = int(idx)
    feats, targets = [], []
    for line in open(list_path, encoding="utf-8"):
        e = json.loads(line)
        wav = e["wav"] if os.path.isabs(e["wav"]) else os.path.join(base, e["wav"])
        with wave.open(wav, "rb") as w:
            x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32)
        o = knf.FbankOptions()
        o.frame_opts.dither = 0.0
        o.mel_opts.num_bins = 80
        fb = knf.OnlineFbank(o)
        fb.accept_waveform(16000, x.tolist())
        fb.input_finished()
        feats.append(np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)]))
        targets.append([units.get("▁" if c == " " else c, 1) for c in normalize(e["txt"])])
        if len(feats) >= utts:
            break
    lens = torch.tensor([f.shape[0] for f in feats])
    x = torch.zeros(len(feats), int(lens.max()), 80)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = torch.from_numpy(f)
    tl = torch.tensor([len(t) for t in targets])
    y = torch.full((len(targets), int(tl.max())), -1, dtype=torch.long)
    for i, t in enumerate(targets):
        y[i, : len(t)] = torch.tensor(t)
    return x, lens, y, tl, len(units)


def num_frames(wav):
    """Fbank frames of a WAV file (25 ms windows every 10 ms at 16 kHz, snip_edges)."""
    with wave.open(wav, "rb") as w:
        return max(0, 1 + (w.getnframes() - 400) // 160)


def loader_batch(list_path, window, max_frames):
    """A data list holding the middle dynamic batch of the first `window` utterances sorted
    by length (what the loader feeds training), beside the dataset's units and CMVN."""
    base = os.path.dirname(list_path)
    entries = []
    for line in open(list_path, encoding="utf-8"):
        e = json.loads(line)
        e["wav"] = e["wav"] if os.path.isabs(e["wav"]) else os.path.abspath(os.path.join(base, e["wav"]))
        entries.append((num_frames(e["wav"]), e))
        if len(entries) >= window:
            break
    entries.sort(key=lambda fe: fe[0])
    batches, current, longest = [], [], 0
    for frames, e in entries:
        # Dynamic batching counts padded frames: the longest so far times the batch size.
        if current and max(longest, frames) * (len(current) + 1) > max_frames:
            batches.append(current)
            current, longest = [], 0
        current.append(e)
        longest = max(longest, frames)
    batches.append(current)
    chosen = batches[len(batches) // 2]
    root = tempfile.mkdtemp()
    os.makedirs(os.path.join(root, "train"))
    for name in ("units.txt", "global_cmvn"):
        if os.path.exists(os.path.join(base, "..", name)):
            os.symlink(os.path.abspath(os.path.join(base, "..", name)), os.path.join(root, name))
    out = os.path.join(root, "train", "data.list")
    with open(out, "w", encoding="utf-8") as f:
        for e in chosen:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    return out, len(chosen)


def peer(config, list_path, utts, steps, warmup, precision, device):
    x, xl, y, yl, vocab = (t.to(device) if torch.is_tensor(t) else t for t in batch(list_path, utts))
    torch.manual_seed(0)
    model = build_model(config, vocab).to(device)
    model.train()
    # PyTorch's default AdamW for the device: per-tensor on the CPU, foreach on a GPU.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=config.get("optim_conf", {}).get("weight_decay", 0.0))
    clip = float(config.get("grad_clip", 5.0))
    seconds = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        opt.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model.compute(x, xl, y, yl, decoding_chunk_size=-1)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            seconds.append(time.perf_counter() - t)
    frames = int(xl.sum())
    return {"frames": frames, "seconds": seconds, "frames_per_second": frames / statistics.median(seconds),
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "configs/small.yaml"))
    ap.add_argument("--list", default=os.path.join(ROOT, "data/fillets-cs/train/data.list"))
    ap.add_argument("--utts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/upcycle"))
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--batch-frames", type=int, default=0, help="a loader-made batch of at most this many padded frames")
    ap.add_argument("--sort-window", type=int, default=500)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak, for MFU")
    ap.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    config = yaml.safe_load(open(a.config))
    torch.set_num_threads(a.threads)

    if a.peer_only:  # one measurement in a fresh process, so its peak memory is its own
        r = peer(config, a.list, a.utts, a.steps, a.warmup, a.precision, a.device)
        r["peak_rss_mib"] = peak_rss_mib()
        print(json.dumps(r))
        return

    if a.batch_frames:
        a.list, a.utts = loader_batch(a.list, a.sort_window, a.batch_frames)
    ours_config = a.config
    if a.precision != "fp32":  # ours reads it from the config
        config.setdefault("upcycle_conf", {})["precision"] = a.precision
        ours_config = os.path.join(tempfile.mkdtemp(), "config.yaml")
        yaml.safe_dump(config, open(ours_config, "w"))
    ours, theirs = [], []
    for _ in range(a.repeat):
        out = subprocess.run([a.bin, "bench", "train-step", "--config", ours_config, "--list", a.list,
                              "--utts", str(a.utts), "--steps", str(a.steps), "--warmup", str(a.warmup),
                              "--threads", str(a.threads), "--device", a.device],
                             check=True, capture_output=True, text=True).stdout
        ours.append(json.loads(out))
        out = subprocess.run([sys.executable, __file__, "--peer-only", "--config", a.config, "--list", a.list,
                              "--utts", str(a.utts), "--steps", str(a.steps), "--warmup", str(a.warmup),
                              "--threads", str(a.threads), "--precision", a.precision, "--device", a.device],
                             check=True, capture_output=True, text=True).stdout
        theirs.append(json.loads(out))
    o_fps = [r["frames_per_second"] for r in ours]
    t_fps = [r["frames_per_second"] for r in theirs]
    ratios = [o / t for o, t in zip(o_fps, t_fps)]
    result = {
        "benchmark": "train_step", "config": os.path.relpath(a.config, ROOT), "utterances": ours[0]["utterances"],
        "frames": ours[0]["frames"], "params_upcycle": ours[0]["params"], "params_peer": theirs[0]["params"],
        "threads": a.threads, "precision": a.precision, "device": a.device, "steps": a.steps, "repeat": a.repeat,
        "upcycle_frames_per_s": statistics.median(o_fps), "peer_frames_per_s": statistics.median(t_fps),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "upcycle_peak_rss_mib": max(r["peak_rss_mib"] for r in ours),
        "peer_peak_rss_mib": max(r["peak_rss_mib"] for r in theirs),
        "model_flops_per_step": ours[0]["model_flops_per_step"],
        "batch": "loader (sorted, dynamic)" if a.batch_frames else "first utterances, padded",
    }
    per_frame = result["model_flops_per_step"] / result["frames"]
    result["upcycle_tflops"] = per_frame * result["upcycle_frames_per_s"] / 1e12
    result["peer_tflops"] = per_frame * result["peer_frames_per_s"] / 1e12
    if a.peak_tflops:
        result["peak_tflops"] = a.peak_tflops
        result["upcycle_mfu"] = result["upcycle_tflops"] / a.peak_tflops
        result["peer_mfu"] = result["peer_tflops"] / a.peak_tflops
    print(f"training step: {result['config']}, {result['utterances']} utterances, {result['frames']} frames, "
          f"{a.precision}, {a.threads} threads, {a.steps} steps x {a.repeat} repetitions, {result['batch']}")
    mfu = lambda side: f"   MFU {result[side + '_mfu']:.1%}" if a.peak_tflops else ""
    print(f"  upcycle        {result['upcycle_frames_per_s']:>10,.0f} frames/s   {result['upcycle_tflops']:.3f} TFLOP/s{mfu('upcycle')}   peak RSS {result['upcycle_peak_rss_mib']:,.0f} MiB")
    print(f"  PyTorch peer   {result['peer_frames_per_s']:>10,.0f} frames/s   {result['peer_tflops']:.3f} TFLOP/s{mfu('peer')}   peak RSS {result['peer_peak_rss_mib']:,.0f} MiB")
    print(f"  ratio          {result['ratio_median']:.2f}x (min {result['ratio_min']:.2f}, max {result['ratio_max']:.2f})")
    if a.json:
        json.dump(result, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
