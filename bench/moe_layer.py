#!/usr/bin/env python3
"""MoE layer: upcycle's (Rust, tch: sorted tokens, stacked experts; grouped GEMM, padded
bmm or a loop) vs WeNet's MoEFFNLayer (bench/reference/u2pp.py: a Python loop over
experts), same shapes, same threads, same run, alternating.

    .venv/bin/python bench/moe_layer.py [--tokens 4096] [--d 144] [--hidden 576]
        [--experts 8] [--top-k 2] [--steps 10] [--repeat 3] [--threads 2] [--json OUT]

A pass is forward + backward of sum(y * g) over random tokens, train mode, no dropout.
Prints the median pass time of each (median over passes, then over repetitions) and the
speed-up of each Rust variant over the peer with its spread over repetitions.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "reference"))
from u2pp import MoEFFNLayer  # noqa: E402

VARIANTS = ["grouped_mm", "bmm", "loop"]


def peer(a):
    torch.manual_seed(0)
    layer = MoEFFNLayer(a.d, a.hidden, 0.0, torch.nn.SiLU(), True, a.experts, a.top_k)
    layer.train()
    x = torch.randn(1, a.tokens, a.d, requires_grad=True)
    g = torch.randn(1, a.tokens, a.d)
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        (layer(x) * g).sum().backward()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ours(a, compute):
    out = subprocess.run(
        [a.bin, "bench", "moe-layer", "--tokens", str(a.tokens), "--d", str(a.d),
         "--hidden", str(a.hidden), "--experts", str(a.experts), "--top-k", str(a.top_k),
         "--compute", compute, "--steps", str(a.steps), "--warmup", str(a.warmup),
         "--threads", str(a.threads)],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["median_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "upcycle"))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d", type=int, default=144)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = {v: [] for v in VARIANTS + ["peer"]}
    for _ in range(a.repeat):
        rows["peer"].append(peer(a))
        for v in VARIANTS:
            rows[v].append(ours(a, v))
    print(f"MoE layer fwd+bwd, {a.tokens} tokens, d {a.d}, hidden {a.hidden}, "
          f"E {a.experts}, top-{a.top_k}, {a.threads} threads, {a.repeat} repetitions")
    print(f"{'':12} {'median ms':>10} {'speed-up vs peer (min..max)':>30}")
    peer_ms = statistics.median(rows["peer"]) * 1e3
    print(f"{'WeNet loop':12} {peer_ms:10.2f}")
    result = {"shape": vars(a), "peer_s": rows["peer"]}
    # The headline ratio is the variant `expert_compute: auto` picks (grouped GEMM).
    auto = [p / o for p, o in zip(rows["peer"], rows["grouped_mm"])]
    result["ratio_median"] = statistics.median(auto)
    for v in VARIANTS:
        ms = statistics.median(rows[v]) * 1e3
        ratios = [p / o for p, o in zip(rows["peer"], rows[v])]
        print(f"{v:12} {ms:10.2f} {statistics.median(ratios):18.2f}x "
              f"({min(ratios):.2f}..{max(ratios):.2f})")
        result[v] = {"seconds": rows[v], "speedup": ratios}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
