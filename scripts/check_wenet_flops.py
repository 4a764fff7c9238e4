#!/usr/bin/env python3
"""Checks our model FLOP count (model/src/flops.rs) against WeNet's own model code:
builds WeNet's model with wenet/utils/init_model.py::init_model from a WeNet train.yaml,
counts the forward of one real utterance (the first of DATA_LIST) with PyTorch's
torch.utils.flop_counter.FlopCounterMode, and compares with `upcycle bench train-step`'s
model_flops_per_step / 3 on OUR_CONFIG (the same model imported with `convert
import-wenet`). Development-time only (CI has no WeNet; cli/tests/flops.rs checks the
same count against the WeNet-style PyTorch peer in bench/reference).

WeNet: github.com/wenet-e2e/wenet at commit 015469960db73eb19c49a48c020d5ac9db69bae5;
packages as for scripts/make_wenet_fixture.py.

    upcycle convert import-wenet --checkpoint tests/golden/wenet/moe/final.pt \
        --config tests/golden/wenet/moe/train.yaml --units tests/golden/wenet/moe/lang_char.txt \
        --cmvn tests/golden/wenet/global_cmvn --out /tmp/imp-moe
    PYTHONPATH=/path/to/wenet-deps .venv/bin/python scripts/check_wenet_flops.py \
        --wenet /path/to/wenet tests/golden/wenet/moe/train.yaml DATA_LIST \
        /tmp/imp-moe/step-0/train.yaml

The vocabulary is DATA_LIST's dataset's (its units.txt), with <sos/eos> last, on both sides.
"""
import argparse
import json
import os
import subprocess
import sys
import typing

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wenet", required=True, help="a WeNet checkout")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/upcycle"))
    ap.add_argument("wenet_config")
    ap.add_argument("data_list")
    ap.add_argument("our_config")
    a = ap.parse_args()
    sys.path.insert(0, a.wenet)
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    # Under torch 2.11 squeezeformer imports these two from torch's conv module.
    import torch.nn.modules.conv as conv
    conv.Union, conv.Optional = typing.Union, typing.Optional
    from torch.utils.flop_counter import FlopCounterMode
    from train_step import batch
    from wenet.utils.init_model import init_model

    configs = yaml.safe_load(open(a.wenet_config))
    x, xl, y, yl, vocab = batch(a.data_list, 1)
    configs.update(output_dim=vocab, input_dim=80, cmvn=None, cmvn_conf={})
    for token in ("<sos>", "<eos>"):
        configs["tokenizer_conf"]["special_tokens"][token] = vocab - 1
    args = argparse.Namespace(checkpoint=None, enc_init=None, jit=False, use_lora=False,
                              only_optimize_lora=False)
    model, _ = init_model(args, configs)
    model.train()
    with FlopCounterMode(display=False) as counter:
        model({"feats": x, "feats_lengths": xl, "target": y, "target_lengths": yl,
               "langs": ["en"], "tasks": ["transcribe"]}, torch.device("cpu"))
    wenet = counter.get_total_flops()
    out = subprocess.run([a.bin, "bench", "train-step", "--config", a.our_config, "--list", a.data_list,
                          "--utts", "1", "--steps", "1", "--warmup", "0", "--threads", "1"],
                         check=True, capture_output=True, text=True).stdout
    ours = json.loads(out)["model_flops_per_step"] / 3
    print(json.dumps({"wenet_forward_flops": wenet, "upcycle_forward_flops": ours, "ratio": ours / wenet}))
    sys.exit(0 if ours == wenet else 1)


if __name__ == "__main__":
    main()
