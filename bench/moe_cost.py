#!/usr/bin/env python3
"""MoE cost: training-step time of the `small` MoE model over the dense one at equal
active parameters (8 experts, top-2, each expert half the dense FFN width: the same
FLOPs per token), and of the upcycled shape (experts as wide as the dense FFN: twice the
active FFN parameters), upcycle (Rust) only, same batch, same threads, alternating.

    .venv/bin/python bench/moe_cost.py [--list data/fillets-cs/train/data.list]
        [--utts 16] [--steps 5] [--repeat 3] [--threads 2] [--json OUT]

Target (BENCHMARKS.md): MoE step / dense step <= 1.15 at equal active parameters.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def moe(config, hidden):
    c = json.loads(json.dumps(config))
    for section in ("encoder_conf", "decoder_conf"):
        c[section].update(mlp_type="moe", n_expert=8, n_expert_activated=2, linear_units=hidden)
    return c


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs/small.yaml"))
    ap.add_argument("--list", default=os.path.join(ROOT, "data/fillets-cs/train/data.list"))
    ap.add_argument("--utts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/upcycle"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dense = yaml.safe_load(open(a.config))
    width = dense["encoder_conf"]["linear_units"]
    shapes = {"dense": dense, "moe_equal_active": moe(dense, width // 2),
              "moe_upcycled": moe(dense, width)}
    runs = {name: [] for name in shapes}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, c in shapes.items():
            files[name] = os.path.join(tmp, f"{name}.yaml")
            yaml.safe_dump(c, open(files[name], "w"))
        for _ in range(a.repeat):
            for name, f in files.items():
                out = subprocess.run(
                    [a.bin, "bench", "train-step", "--config", f, "--list", a.list, "--utts",
                     str(a.utts), "--steps", str(a.steps), "--warmup", str(a.warmup),
                     "--threads", str(a.threads)],
                    check=True, capture_output=True, text=True).stdout
                runs[name].append(json.loads(out))
    fps = {n: [r["frames_per_second"] for r in rs] for n, rs in runs.items()}
    print(f"training step, {runs['dense'][0]['frames']} frames, {a.threads} threads, "
          f"{a.steps} steps x {a.repeat} repetitions")
    result = {"threads": a.threads, "steps": a.steps, "repeat": a.repeat}
    for name in shapes:
        ratios = [d / m for d, m in zip(fps["dense"], fps[name])]  # time ratio vs dense
        result[name] = {"params": runs[name][0]["params"], "frames_per_s": fps[name],
                        "step_time_over_dense": ratios}
        print(f"  {name:18} {runs[name][0]['params']:>10,} params "
              f"{statistics.median(fps[name]):>9,.0f} frames/s   step / dense "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}..{max(ratios):.2f})")
    result["ratio_median"] = statistics.median(result["moe_equal_active"]["step_time_over_dense"])
    if a.json:
        json.dump(result, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
