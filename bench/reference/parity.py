#!/usr/bin/env python3
"""Writes a parity case for the Rust U2++ model: deterministic weights, real features and
targets, and every output of the WeNet oracle (u2pp.py beside this file), in safetensors.

    .venv/bin/python bench/reference/parity.py --config configs/tiny.yaml --vocab 30 \\
        --wav /usr/share/pocketsphinx/test/data/cards/001.wav \\
              /usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0880.wav \\
        --seed 0 --out /tmp/parity-tiny

DIR/weights.safetensors  the full state_dict (WeNet names, cmvn buffers included); float32,
                         except BatchNorm's num_batches_tracked (int64) when there is one.
DIR/io.safetensors       feats [B,T,80] f32, feats_lengths [B] i64, target [B,Lmax] i64
                         (padded with -1), target_lengths [B] i64, and for each mode
                         full (decoding_chunk_size -1), chunk4 (4, left chunks -1) and
                         chunk4left1 (4, left chunks 1):
                           {mode}.encoder_out [B,T',d], {mode}.encoder_mask [B,1,T'] i64 (0/1),
                           {mode}.ctc_log_probs [B,T',V], {mode}.decoder_out [B,Lmax+1,V]
                           (left decoder logits), {mode}.r_decoder_out [B,Lmax+1,V],
                           {mode}.loss, {mode}.loss_ctc, {mode}.loss_att (0-d f32);
                         and grad.<param name> for every parameter, from loss.backward() in
                         mode full. Metadata key "parity": JSON of config, vocab, seed, wavs,
                         modes.

The model runs in eval() (no dropout; BatchNorm, if configured, uses its running stats).
Parameters are re-drawn from torch.manual_seed(seed), in named_parameters() order:
Linear/Conv weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases U(-0.1, 0.1), embeddings
U(-1, 1), LayerNorm/BatchNorm weights U(0.5, 1.5), pos_bias_u/v U(-0.5, 0.5); then
BatchNorm running_mean U(-0.1, 0.1) and running_var U(0.5, 1.5). Targets: utterance i has
5 + 4*i ids drawn from U{2..V-2} with a torch.Generator seeded seed + 1. CMVN: mean and
1/std over the valid frames of these features (variance floored at 1e-20, as WeNet).
Features: kaldi-native-fbank, 80 bins, dither 0, 16-bit sample scale, other options default.

With --save-pt PATH it also writes the model as WeNet saves one,
torch.save(model.state_dict(), PATH) (a WeNet checkpoint for the import tests).

Also checks (and prints) that every output is finite, that chunk modes differ from full,
and that each utterance run alone gives the same valid frames as in the batch (asserted
only with a causal conv module: a non-causal one reads padded frames, as in WeNet).
"""
import argparse
import json
import math
import os
import sys
import wave

import kaldi_native_fbank as knf
import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from u2pp import build_model  # noqa: E402

MODES = [("full", -1, -1), ("chunk4", 4, -1), ("chunk4left1", 4, 1)]


# ------------------------------------------------------------------------------ config
def _scalar(text):
    t = text.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("null", "~", ""):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    if t.startswith("[") and t.endswith("]"):
        inner = t[1:-1].strip()
        return [] if not inner else [_scalar(x) for x in inner.split(",")]
    return t


def load_yaml(path):
    """PyYAML when installed; else a reader for the subset train.yaml files use here:
    nested mappings by indentation, scalars, inline [a, b] lists, # comments."""
    try:
        import yaml
        with open(path) as f:
            return yaml.safe_load(f)
    except ImportError:
        pass
    root = {}
    stack = [(-1, root)]  # (indent, mapping)
    with open(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
            if not line.strip():
                continue
            indent = len(line) - len(line.lstrip(" "))
            body = line.strip()
            if body.startswith("- ") or ":" not in body:
                raise ValueError(f"{path}:{lineno}: unsupported YAML (install PyYAML): {raw!r}")
            key, _, value = body.partition(":")
            while indent <= stack[-1][0]:
                stack.pop()
            parent = stack[-1][1]
            if value.strip() == "":
                child = {}
                parent[key.strip()] = child
                stack.append((indent, child))
            else:
                parent[key.strip()] = _scalar(value)
    return root


# ------------------------------------------------------------------------------ inputs
def read_pcm16(path):
    with wave.open(path, "rb") as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1, f"{path}: not 16-bit mono"
        rate = w.getframerate()
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32)
    return samples, rate


def fbank80(samples, rate):
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = rate
    opts.mel_opts.num_bins = 80
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(rate, samples.tolist())
    fb.input_finished()
    return np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)]).astype(np.float32)


def reinit(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            if isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
                if leaf == "weight":
                    p.uniform_(0.5, 1.5)
                else:
                    p.uniform_(-0.1, 0.1)
            elif leaf in ("pos_bias_u", "pos_bias_v"):
                p.uniform_(-0.5, 0.5)
            elif isinstance(module, nn.Embedding):
                p.uniform_(-1.0, 1.0)
            elif leaf == "bias":
                p.uniform_(-0.1, 0.1)
            else:  # Linear / Conv weight: (out, in/groups, *kernel)
                bound = 1.0 / math.sqrt(p[0].numel())
                p.uniform_(-bound, bound)
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def set_cmvn(model, feats, lengths):
    valid = torch.cat([feats[i, :int(n)] for i, n in enumerate(lengths)]).double()
    mean = valid.mean(0)
    var = (valid * valid).mean(0) - mean * mean
    var = torch.clamp(var, min=1e-20)
    cmvn = model.encoder.global_cmvn
    cmvn.mean.copy_(mean.float())
    cmvn.istd.copy_((1.0 / torch.sqrt(var)).float())


def make_targets(n, vocab, seed):
    g = torch.Generator().manual_seed(seed + 1)
    lens = [5 + 4 * i for i in range(n)]
    target = torch.full((n, max(lens)), -1, dtype=torch.int64)
    for i, length in enumerate(lens):
        target[i, :length] = torch.randint(2, vocab - 1, (length, ), generator=g)
    return target, torch.tensor(lens, dtype=torch.int64)


# ------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="WeNet train.yaml (e.g. configs/tiny.yaml)")
    ap.add_argument("--vocab", type=int, required=True, help="vocabulary size (sos=eos=V-1)")
    ap.add_argument("--wav", nargs="+", required=True, help="16-bit mono WAV files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--quiet", action="store_true", help="do not print the parameter names")
    ap.add_argument("--save-pt", help="also torch.save(model.state_dict()) here, as WeNet does")
    a = ap.parse_args()
    assert a.vocab >= 5, "--vocab must leave room for blank, one id, ids >= 2 and sos/eos"

    config = load_yaml(a.config)
    torch.set_grad_enabled(True)
    model = build_model(config, a.vocab)
    model.eval()
    model.ctc.dropout_rate = 0.0  # WeNet's CTC dropout ignores eval(); it is 0 there anyway
    reinit(model, a.seed)

    feats_list = []
    for path in a.wav:
        samples, rate = read_pcm16(path)
        feats_list.append(torch.from_numpy(fbank80(samples, rate)))
    n = len(feats_list)
    lengths = torch.tensor([f.shape[0] for f in feats_list], dtype=torch.int64)
    feats = torch.zeros(n, int(lengths.max()), 80, dtype=torch.float32)
    for i, f in enumerate(feats_list):
        feats[i, :f.shape[0]] = f
    with torch.no_grad():
        set_cmvn(model, feats, lengths)
    target, target_lengths = make_targets(n, a.vocab, a.seed)

    io = {
        "feats": feats,
        "feats_lengths": lengths,
        "target": target,
        "target_lengths": target_lengths,
    }
    grads = {}
    for mode, chunk, left in MODES:
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(mode == "full"):
            out = model.compute(feats, lengths, target, target_lengths,
                                decoding_chunk_size=chunk, num_decoding_left_chunks=left)
            if mode == "full":
                out["loss"].backward()
                no_grad = []
                for name, p in model.named_parameters():
                    if p.grad is None:  # e.g. right_decoder when reverse_weight == 0
                        no_grad.append(name)
                        grads[f"grad.{name}"] = torch.zeros_like(p)
                    else:
                        grads[f"grad.{name}"] = p.grad.detach().clone()
                if no_grad:
                    print(f"note: {len(no_grad)} parameters got no gradient (saved as zeros), "
                          f"e.g. {no_grad[0]}")
        io[f"{mode}.encoder_out"] = out["encoder_out"].detach()
        io[f"{mode}.encoder_mask"] = out["encoder_mask"].to(torch.int64)
        io[f"{mode}.ctc_log_probs"] = out["ctc_log_probs"].detach()
        io[f"{mode}.decoder_out"] = out["decoder_out"].detach()
        if out["r_decoder_out"].dim() == 3:
            io[f"{mode}.r_decoder_out"] = out["r_decoder_out"].detach()
        for k in ("loss", "loss_ctc", "loss_att"):
            io[f"{mode}.{k}"] = out[k].detach().reshape(())
        print(f"{mode:12s} loss {out['loss'].item():.6f}  ctc {out['loss_ctc'].item():.6f}  "
              f"att {out['loss_att'].item():.6f}  encoder_out {tuple(out['encoder_out'].shape)}")
    io.update(grads)

    # ---- checks
    for k, v in io.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), f"{k} has non-finite values"
    valid = io["full.encoder_mask"].squeeze(1).bool()  # (B, T')
    for mode, _, _ in MODES[1:]:
        d = (io[f"{mode}.encoder_out"] - io["full.encoder_out"]).abs()[valid].max().item()
        print(f"max |{mode} - full| encoder_out at valid frames: {d:.4g}")
        assert d > 1e-3, f"{mode} does not differ from full"
    d = (io["chunk4left1.encoder_out"] - io["chunk4.encoder_out"]).abs()[valid].max().item()
    print(f"max |chunk4left1 - chunk4| encoder_out at valid frames: {d:.4g}")
    worst = 0.0
    with torch.no_grad():
        for mode, chunk, left in MODES:
            for i in range(n):
                t_i = int(lengths[i])
                o = model.compute(feats[i:i + 1, :t_i], lengths[i:i + 1],
                                  target[i:i + 1, :int(target_lengths[i])],
                                  target_lengths[i:i + 1], decoding_chunk_size=chunk,
                                  num_decoding_left_chunks=left)
                tv = int(valid[i].sum())
                ltok = int(target_lengths[i]) + 1
                for key, got, ref in (
                    ("encoder_out", o["encoder_out"][0, :tv], io[f"{mode}.encoder_out"][i, :tv]),
                    ("decoder_out", o["decoder_out"][0, :ltok],
                     io[f"{mode}.decoder_out"][i, :ltok]),
                ):
                    worst = max(worst, (got - ref).abs().max().item())
    print(f"max |alone - in batch| over valid frames/tokens, all modes: {worst:.3g}")
    convs = [layer.conv_module for layer in model.encoder.encoders
             if layer.conv_module is not None]
    if all(c.lorder > 0 for c in convs):
        assert worst < 1e-4, "an utterance alone differs from the same one in the batch"
    else:
        # Expected, and WeNet's behaviour: the conv module zeroes padded frames before
        # pointwise_conv1, whose bias makes them GLU(bias) != 0, and a non-causal depthwise
        # conv then reads them at the last valid frames. The batch is the reference.
        print("  (non-causal conv module: valid frames near the end depend on the padding,"
              " as in WeNet)")

    # ---- write
    os.makedirs(a.out, exist_ok=True)
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for k, v in weights.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
    save_file(weights, os.path.join(a.out, "weights.safetensors"))
    if a.save_pt:
        torch.save(model.state_dict(), a.save_pt)
    io = {k: v.detach().clone().contiguous() for k, v in io.items()}
    for k, v in io.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
    # One metadata key: safetensors writes several in no fixed order, and the files should
    # be byte-for-byte the same from run to run.
    meta = {"parity": json.dumps({"config": config, "vocab": a.vocab, "seed": a.seed,
                                  "wavs": a.wav, "modes": MODES}, sort_keys=True)}
    save_file(io, os.path.join(a.out, "io.safetensors"), metadata=meta)

    if not a.quiet:
        print("state_dict:")
        for k, v in weights.items():
            print(f"  {k} {list(v.shape)}")
    print(f"wrote {a.out}/weights.safetensors ({len(weights)} tensors), "
          f"{a.out}/io.safetensors ({len(io)} tensors)")


if __name__ == "__main__":
    main()
