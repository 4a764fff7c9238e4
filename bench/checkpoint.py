#!/usr/bin/env python3
"""Sharded checkpoints: save and load throughput of the `small` MoE (parameters and AdamW
moments) and of a synthetic 1 GB set, against a plain sequential write (+fsync) and read
of the same bytes on the same disk, repetitions alternating in one run
(`upcycle bench checkpoint`); and what training waits for at a save, in the foreground
and with `upcycle_conf.async_checkpoint`.

    .venv/bin/python bench/checkpoint.py [--synthetic-mib 1024] [--repeat 3] [--json OUT]

Target (issue 6): >= 0.5x the plain file throughput. Reads hit the page cache on both
sides (the data was just written).
"""
import argparse
import json
import os
import statistics
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs/small-upcycle.yaml"))
    ap.add_argument("--synthetic-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=os.path.join(ROOT, "target/bench-checkpoint"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/upcycle"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out = subprocess.run(
        [a.bin, "bench", "checkpoint", "--config", a.config, "--synthetic-mib",
         str(a.synthetic_mib), "--repeat", str(a.repeat), "--dir", a.dir],
        check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    med = statistics.median
    print(f"{'tensors':<20} {'MB':>7} {'save MB/s':>9} {'write MB/s':>10} {'ratio':>6} "
          f"{'load MB/s':>9} {'read MB/s':>9} {'ratio':>6}")
    ratios = []
    for c in r["io"]:
        mb = c["bytes"] / 1e6
        ratios += [c["save_ratio"], c["load_ratio"]]
        print(f"{c['name']:<20} {mb:>7.1f} {mb / med(c['save_s']):>9.0f} "
              f"{mb / med(c['write_s']):>10.0f} {c['save_ratio']:>5.2f}x "
              f"{mb / med(c['load_s']):>9.0f} {mb / med(c['read_s']):>9.0f} {c['load_ratio']:>5.2f}x")
    s = r["stall"]
    print(f"training stall per save of the model: foreground {s['foreground_s'] * 1e3:.0f} ms, "
          f"background {s['background_s'] * 1e3:.0f} ms")
    r["ratio_median"] = med(ratios)
    if a.json:
        json.dump(r, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
