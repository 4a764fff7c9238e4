#!/usr/bin/env python3
"""Collectives through `parallel/` vs raw MPI on the same sizes, 2 ranks, same run:
all-reduce (sum) and all-to-all with uneven splits, 64 KB .. 64 MB per rank, repetitions
interleaved inside each process (`upcycle bench collectives`); plus what the autograd
all-to-all (a C++ autograd node calling back into Rust) adds per forward + backward.

    .venv/bin/python bench/collectives.py [--np 2] [--repeat 5] [--sizes 65536,...] [--json OUT]

Target (issue 5): >= 0.9x raw MPI bandwidth.
"""
import argparse
import json
import os
import statistics
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def size_name(b):
    return f"{b >> 20} MB" if b >= 1 << 20 else f"{b >> 10} KB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sizes", default="65536,1048576,16777216,67108864")
    ap.add_argument("--autograd-sizes", default="65536,1048576")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/upcycle"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out = subprocess.run(
        ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(a.np), a.bin,
         "bench", "collectives", "--sizes", a.sizes, "--autograd-sizes", a.autograd_sizes,
         "--repeat", str(a.repeat)],
        check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    print(f"{a.np} ranks, {a.repeat} repetitions each way (raw MPI and upcycle interleaved)")
    print(f"{'op':<11} {'size':>6} {'ours GB/s':>9} {'ours/raw':>8} {'spread':>13}")
    ratios = []
    for c in r["collectives"]:
        per_rep = [raw / ours for raw, ours in zip(c["raw_s"], c["ours_s"])]
        ratios.append(c["ratio"])
        print(f"{c['op']:<11} {size_name(c['bytes']):>6} {c['ours_gb_s']:>9.2f} "
              f"{c['ratio']:>7.2f}x {min(per_rep):>5.2f}..{max(per_rep):.2f}")
    for g in r["autograd"]:
        print(f"autograd all_to_all {size_name(g['bytes'])}: two plain exchanges "
              f"{g['plain_s'] * 1e6:.0f} us, through the autograd node {g['autograd_s'] * 1e6:.0f} us "
              f"(of which product/sum {g['compute_s'] * 1e6:.0f} us): the node adds "
              f"{g['wrapper_s'] * 1e6:.0f} us per forward + backward")
    r["ratio_median"] = statistics.median(ratios)
    print(f"median ours/raw: {r['ratio_median']:.2f}x")
    if a.json:
        json.dump(r, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
