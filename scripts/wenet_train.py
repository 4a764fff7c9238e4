#!/usr/bin/env python3
"""Trains one of our train.yaml configs with WeNet's own training loop for a wall-time
budget: the peer side of scripts/wenet_vs_upcycle.sh (issue 20, "the dense trainer, held
against WeNet's own").

What runs is WeNet's wenet/bin/train.py from a checkout given by --wenet (no WeNet code is
copied into this repository), in this process (world of one: torch_ddp over gloo on CPU),
after the torch 2.11 shims of scripts/make_wenet_fixture.py. It reads the dataset that
`upcycle data prepare` wrote (its data.list is WeNet's raw format; units.txt is WeNet's
lang_char.txt; global_cmvn is WeNet's JSON CMVN) through a recipe directory laid out as
WeNet's recipes are (data/dict/lang_char.txt, data/train/global_cmvn, train.list and
cv.list with absolute wav paths).

Three things are set from outside WeNet, each by wrapping, not by editing its code:
  * the seed: train.py seeds torch with 777 and its DataLoader generator with 777; both
    take --seed instead (777 is what --seed 777 reproduces);
  * the budget: WeNet trains by epochs. The training loader stops yielding once --minutes
    have passed since this script started; train.py then ends the epoch as it always does
    (CV on the dev list, epoch_N.pt saved) and the next epoch exits at once, so the last
    epoch_N.pt holds the weights at the budget (plus that epoch's closing CV, as our
    trainer's closing dev evaluation);
  * the train.yaml: the keys of ours that WeNet reads are written unchanged; WeNet's own
    keys for tokenizer, CTC and CMVN are added as its recipes write them, and
    `upcycle_conf` (ours only) is dropped. WeNet has no cosine schedule, so the config must
    name one WeNet has (warmuplr or NoamHoldAnnealing).

Writes OUT/recipe/ (the recipe directory), OUT/recipe/exp/ (WeNet's model directory:
train.yaml, epoch_N.pt, logs), and OUT/summary.json: the last checkpoint, its step, the
steps done and the wall time.
"""
import argparse
import json
import os
import runpy
import shutil
import socket
import sys
import time

START = time.monotonic()
HERE = os.path.dirname(os.path.abspath(__file__))


def wenet_config(ours, units):
    """Our train.yaml as WeNet's train.py reads it (paths relative to the recipe dir)."""
    conf = {k: v for k, v in ours.items() if k != "upcycle_conf"}
    if conf.get("scheduler") not in ("warmuplr", "NoamHoldAnnealing"):
        sys.exit("wenet_train.py: scheduler {!r} does not exist in WeNet; use a config "
                 "with warmuplr or NoamHoldAnnealing".format(conf.get("scheduler")))
    sos = units.index("<sos/eos>")
    conf["tokenizer"] = "char"
    conf["tokenizer_conf"] = {
        "symbol_table_path": "data/dict/lang_char.txt", "split_with_space": False,
        "bpe_path": None, "non_lang_syms_path": None, "is_multilingual": False,
        "num_languages": 1,
        "special_tokens": {"<blank>": units.index("<blank>"), "<unk>": units.index("<unk>"),
                           "<sos>": sos, "<eos>": sos}}
    conf["ctc"] = "ctc"
    conf["ctc_conf"] = {"ctc_blank_id": units.index("<blank>")}
    conf["cmvn"] = "global_cmvn"
    conf["cmvn_conf"] = {"cmvn_file": "data/train/global_cmvn", "is_json_cmvn": True}
    conf["dataset"] = "asr"
    return conf


def write_list(src, dst):
    """A data.list with each wav path made absolute (WeNet opens them from its cwd)."""
    base = os.path.dirname(os.path.abspath(src))
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in f:
            if not line.strip():
                continue
            entry = json.loads(line)
            entry["wav"] = os.path.normpath(os.path.join(base, entry["wav"]))
            out.write(json.dumps(entry, ensure_ascii=False) + "\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_wrappers(seed, deadline, log):
    """Seed and wall-time budget around WeNet's train.py (see the module doc)."""
    import torch
    import wenet.utils.executor as executor
    import wenet.utils.train_utils as train_utils

    manual_seed = torch.manual_seed
    torch.manual_seed = lambda s: manual_seed(seed if s == 777 else s)
    init_loader = train_utils.init_dataset_and_dataloader
    init_loader.__defaults__ = (seed,)

    def until_deadline(loader):
        for batch in loader:
            if time.monotonic() >= deadline:
                log["stopped_by_budget"] = True
                return
            yield batch

    train_epoch = executor.Executor.train

    def train(self, model, optimizer, scheduler, train_loader, *rest):
        if time.monotonic() >= deadline:
            raise SystemExit(0)
        train_epoch(self, model, optimizer, scheduler, until_deadline(train_loader), *rest)
        log["steps"] = self.step - 1

    executor.Executor.train = train


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wenet", required=True, help="WeNet checkout")
    ap.add_argument("--config", required=True, help="our train.yaml (WeNet keys)")
    ap.add_argument("--data", required=True, help="dataset from `upcycle data prepare`")
    ap.add_argument("--out", required=True, help="a new directory")
    ap.add_argument("--minutes", type=float, required=True, help="wall-time budget")
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--num-workers", type=int, default=1,
                    help="DataLoader workers (feature extraction)")
    ap.add_argument("--prefetch", type=int, default=10)
    args = ap.parse_args()
    import yaml

    wenet = os.path.abspath(args.wenet)
    out = os.path.abspath(args.out)
    recipe = os.path.join(out, "recipe")
    if os.path.exists(out):
        sys.exit("wenet_train.py: {} exists; give a new directory".format(out))
    os.makedirs(os.path.join(recipe, "data", "dict"))
    os.makedirs(os.path.join(recipe, "data", "train"))
    os.makedirs(os.path.join(recipe, "exp"))
    shutil.copy(os.path.join(args.data, "units.txt"),
                os.path.join(recipe, "data", "dict", "lang_char.txt"))
    shutil.copy(os.path.join(args.data, "global_cmvn"),
                os.path.join(recipe, "data", "train", "global_cmvn"))
    write_list(os.path.join(args.data, "train", "data.list"),
               os.path.join(recipe, "data", "train.list"))
    write_list(os.path.join(args.data, "dev", "data.list"),
               os.path.join(recipe, "data", "cv.list"))
    with open(os.path.join(args.data, "units.txt"), encoding="utf-8") as f:
        units = [line.rsplit(" ", 1)[0] for line in f if line.strip()]
    with open(args.config, encoding="utf-8") as f:
        ours = yaml.safe_load(f)
    with open(os.path.join(recipe, "train.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(wenet_config(ours, units), f, allow_unicode=True)

    sys.path.insert(0, HERE)
    sys.path.insert(0, wenet)
    from make_wenet_fixture import _patch_for_torch_2_11
    _patch_for_torch_2_11()
    log = {"stopped_by_budget": False, "steps": 0}
    install_wrappers(args.seed, START + 60.0 * args.minutes, log)
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    os.chdir(recipe)
    sys.argv = [os.path.join(wenet, "wenet/bin/train.py"), "--train_engine", "torch_ddp",
                "--ddp.dist_backend", "gloo", "--device", "cpu", "--config", "train.yaml",
                "--data_type", "raw", "--train_data", "data/train.list",
                "--cv_data", "data/cv.list", "--model_dir", "exp",
                "--num_workers", str(args.num_workers), "--prefetch", str(args.prefetch)]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    epochs = sorted((f for f in os.listdir("exp") if f.startswith("epoch_")
                     and f.endswith(".pt")), key=lambda f: int(f[6:-3]))
    if not epochs:
        sys.exit("wenet_train.py: WeNet saved no epoch within the budget")
    summary = {"checkpoint": os.path.join(recipe, "exp", epochs[-1]),
               "config": os.path.join(recipe, "exp", "train.yaml"),
               "steps": log["steps"], "epochs": len(epochs),
               "stopped_by_budget": log["stopped_by_budget"],
               "wall_min": (time.monotonic() - START) / 60.0, "seed": args.seed,
               "num_workers": args.num_workers}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
