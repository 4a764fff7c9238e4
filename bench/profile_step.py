#!/usr/bin/env python3
"""Where a training step's time goes, for the `small` dense model and its MoE shapes:
`upcycle train` runs STEPS steps on fillets-cs (no evaluation in between) and its
metrics' time split (waiting for data, forward with the losses, backward, gradient sync
and clipping, optimizer) is summed over the logged windows after the first; the forward
pass is split further (attention, convolution, FFN, MoE routing, dispatch, experts, and
subsampling, decoder output layers, CTC and attention losses, and the rest: positional
encodings, norms, masks) by `upcycle_conf.profile_forward`.

    .venv/bin/python bench/profile_step.py [--steps 60] [--data data/fillets-cs] [--json OUT]

Not a comparison with a peer: the breakdown for bench/RESULTS.md, and the check that the
training loop never waits for its data.
"""
import argparse
import json
import os
import subprocess
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ["data", "forward", "backward", "sync", "optimizer"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "data/fillets-cs"))
    ap.add_argument("--configs", default="configs/small.yaml,configs/small-moe-scratch.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/upcycle"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in a.configs.split(","):
            c = yaml.safe_load(open(os.path.join(ROOT, path)))
            c["log_interval"] = a.log_interval
            uc = c.setdefault("upcycle_conf", {})
            uc["eval_interval"] = 10 ** 9
            uc["profile_forward"] = True
            uc.pop("freeze", None)
            cfg = os.path.join(tmp, os.path.basename(path))
            yaml.safe_dump(c, open(cfg, "w"))
            out = os.path.join(tmp, "run-" + os.path.basename(path))
            subprocess.run([a.bin, "train", "--config", cfg, "--data", a.data, "--out", out,
                            "--max-steps", str(a.steps), "--device", "cpu"],
                           check=True, capture_output=True)
            lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
            windows = [l for l in lines if "time_forward_s" in l]
            windows = windows[1:] or windows  # the first window warms up
            sums = {p: sum(w[f"time_{p}_s"] for w in windows) for p in PARTS}
            total = sum(sums.values())
            fwd = {}
            for w in windows:
                for k, v in w.items():
                    if k.startswith("time_fwd_"):
                        part = k[len("time_fwd_"):-2]
                        fwd[part] = fwd.get(part, 0.0) + v
            fwd["other"] = sums["forward"] - sum(fwd.values())
            result[path] = {"seconds": sums, "total_s": total, "forward_parts_s": fwd,
                            "steps": a.log_interval * len(windows),
                            "frames_per_s": sum(w["frames_per_s"] for w in windows) / len(windows)}
    print(f"{'config':<32} {'ms/step':>8} " + " ".join(f"{p:>9}" for p in PARTS))
    for path, r in result.items():
        ms = 1e3 * r["total_s"] / max(r["steps"], 1)
        fr = " ".join(f"{100 * r['seconds'][p] / max(r['total_s'], 1e-9):>8.1f}%" for p in PARTS)
        print(f"{path:<32} {ms:>8.0f} {fr}")
    print("\nforward pass, share of its time:")
    for path, r in result.items():
        parts = r["forward_parts_s"]
        total = max(r["seconds"]["forward"], 1e-9)
        print(f"  {path:<30} " + ", ".join(f"{k} {100 * v / total:.1f}%"
                                           for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))
    if a.json:
        json.dump(result, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
