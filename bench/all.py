#!/usr/bin/env python3
"""Every benchmark of bench/, each side by side with its peer in the same run, then one
table of their headline ratios (median, and the spread each script reports) and one JSON
with every script's full result.

    .venv/bin/python bench/all.py [--quick] [--list DATA_LIST] [--json OUT]

--quick runs each with one tiny repetition (what the test suite does, so that none can
rot); without it, the settings that bench/RESULTS.md reports. Benchmarks measure; they
do not pass or fail.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_STEP = ["--list", "{list}", "--config", "configs/tiny.yaml", "--utts", "2", "--steps", "1",
             "--warmup", "0", "--repeat", "1", "--threads", "1"]

# (name, script, what its ratio_median is, full arguments, quick arguments); "{list}" is
# replaced by a data list.
BENCHMARKS = [
    ("fbank.py", "frames/s over kaldi-native-fbank", [],
     ["--list", "{list}", "--files", "3", "--repeat", "1"]),
    ("train_step.py", "training frames/s over the PyTorch peer (small, fp32)", [], TINY_STEP),
    ("train_step.py:loader", "the same on a batch as the loader makes it (sorted, <= 16k frames)",
     ["--batch-frames", "16000"], TINY_STEP + ["--batch-frames", "3000"]),
    ("train_step.py:moe", "the same, MoE 8 experts top-2 (small-moe-scratch, fp32)",
     ["--config", "configs/small-moe-scratch.yaml"], TINY_STEP),
    ("train_step.py:bf16", "the same, both under bf16 autocast (small)", ["--precision", "bf16"],
     TINY_STEP + ["--precision", "bf16"]),
    ("train_step.py:moe-bf16", "the same, MoE under bf16 autocast",
     ["--config", "configs/small-moe-scratch.yaml", "--precision", "bf16"],
     TINY_STEP + ["--precision", "bf16"]),
    ("moe_layer.py", "MoE layer speed over WeNet's loop", [],
     ["--tokens", "64", "--d", "8", "--hidden", "16", "--experts", "4", "--steps", "1",
      "--warmup", "0", "--repeat", "1", "--threads", "1"]),
    ("moe_cost.py", "MoE step time over dense (equal active)", [],
     ["--list", "{list}", "--config", "configs/tiny.yaml", "--utts", "2", "--steps", "1",
      "--warmup", "0", "--repeat", "1", "--threads", "1"]),
    ("collectives.py", "bandwidth over raw MPI (2 ranks)", [],
     ["--sizes", "65536", "--autograd-sizes", "65536", "--repeat", "1"]),
    ("checkpoint.py", "checkpoint I/O over plain file I/O", [],
     ["--config", "configs/tiny.yaml", "--synthetic-mib", "16", "--repeat", "1"]),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--list", default=None, help="data list for --quick (default: fillets-cs test)")
    ap.add_argument("--only", default=None, help="comma-separated script or benchmark names")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/upcycle"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    data_list = a.list or os.path.join(ROOT, "data/fillets-cs/test/data.list")
    results, failed = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name, what, full, quick in BENCHMARKS:
            script = name.split(":")[0]
            if a.only and script not in a.only.split(",") and name not in a.only.split(","):
                continue
            args = [x.replace("{list}", data_list) for x in (quick if a.quick else full)]
            out = os.path.join(tmp, name.replace(":", "-") + ".json")
            print(f"== {name}", flush=True)
            run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args,
                                  "--bin", a.bin, "--json", out], cwd=ROOT)
            if run.returncode != 0:
                failed.append(name)
                continue
            results[name] = {"what": what, "result": json.load(open(out))}
    print(f"\n{'benchmark':<22} {'ratio':>7}  what")
    for name, r in results.items():
        res = r["result"]
        spread = ""
        if "ratio_min" in res:
            spread = f" ({res['ratio_min']:.2f}..{res['ratio_max']:.2f})"
        print(f"{name:<22} {res['ratio_median']:>6.2f}x  {r['what']}{spread}")
    if a.json:
        json.dump(results, open(a.json, "w"), indent=1)
    if failed:
        print(f"failed to run: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
