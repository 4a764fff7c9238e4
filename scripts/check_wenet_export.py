#!/usr/bin/env python3
"""Checks a directory written by `upcycle convert export-wenet` with WeNet's own code:
builds the model with wenet/utils/init_model.py::init_model from its train.yaml, loads
final.pt with load_state_dict(strict=True), and prints as JSON on stdout WeNet's
ctc_greedy_search and attention_rescoring hyps (full context and chunk 16) for the 5
LibriVox clips of pocketsphinx-testdata. Development-time only (CI has no WeNet).

WeNet: github.com/wenet-e2e/wenet at commit 015469960db73eb19c49a48c020d5ac9db69bae5.

    PYTHONPATH=/path/to/wenet-deps .venv/bin/python scripts/check_wenet_export.py \
        --wenet /path/to/wenet EXPORT_DIR [--checkpoint final.pt] > hyps.json

EXPORT_DIR holds final.pt, train.yaml, units.txt, global_cmvn; train.yaml's
cmvn_conf.cmvn_file and tokenizer_conf.symbol_table_path are taken from EXPORT_DIR
whatever they say. units.txt is that model's own units file: <sos/eos> may be last
(tests/golden/wenet/dense) or third, id 2 (tests/golden/wenet/moe, aishell's layout), and
the script fails unless the model's sos/eos (from train.yaml's
tokenizer_conf.special_tokens, vocab_size - 1 without them) is units.txt's <sos/eos>.
Packages: see scripts/make_wenet_fixture.py (this script does not need deepspeed).
Decoding settings match hyps.json of tests/golden/wenet: batch 1, beam 10, ctc_weight
0.3, reverse_weight 0.3, num_decoding_left_chunks -1.
"""
import argparse
import contextlib
import json
import os
import sys

# The fixture script's WeNet commit, clips, shims, features and decoding settings.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_wenet_fixture import (CHUNKS, DECODE, WENET_COMMIT,  # noqa: E402
                                _patch_for_torch_2_11, fbank, read_clips)

METHODS = ["ctc_greedy_search", "attention_rescoring"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wenet", required=True, help="WeNet checkout")
    ap.add_argument("--checkpoint", default="final.pt", help="file in EXPORT_DIR")
    ap.add_argument("export_dir")
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.wenet))
    # WeNet prints to stdout (e.g. about torch_npu); keep stdout for the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    json.dump(result, sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")


def run(args):
    import types

    import torch
    import yaml
    _patch_for_torch_2_11()
    from wenet.utils.init_model import init_model

    d = os.path.abspath(args.export_dir)
    with open(os.path.join(d, "train.yaml")) as f:
        configs = yaml.load(f, Loader=yaml.FullLoader)
    if configs.get("cmvn") == "global_cmvn":
        configs["cmvn_conf"]["cmvn_file"] = os.path.join(d, "global_cmvn")
    configs.setdefault("tokenizer_conf", {})["symbol_table_path"] = \
        os.path.join(d, "units.txt")
    model, configs = init_model(types.SimpleNamespace(), configs)
    state = torch.load(os.path.join(d, args.checkpoint), map_location="cpu")
    model.load_state_dict(state, strict=True)
    model.eval()

    units = {}
    with open(os.path.join(d, "units.txt"), encoding="utf-8") as f:
        for line in f:
            tok, idx = line.rstrip("\n").rsplit(" ", 1)
            units[int(idx)] = tok
    sos_eos = [i for i, t in units.items() if t == "<sos/eos>"]
    if sos_eos != [model.sos] or model.eos != model.sos:
        raise SystemExit("units.txt has <sos/eos> at {} but the model's sos/eos are {}/{} "
                         "(tokenizer_conf.special_tokens: {})".format(
                             sos_eos, model.sos, model.eos,
                             configs.get("tokenizer_conf", {}).get("special_tokens")))

    hyps, text = {}, {}
    with torch.no_grad():
        for key, wav, _ in read_clips():
            feats = fbank(wav).unsqueeze(0)
            lens = torch.tensor([feats.size(1)], dtype=torch.int32)
            for cname, chunk in CHUNKS.items():
                res = model.decode(METHODS, feats, lens, decoding_chunk_size=chunk,
                                   **DECODE)
                for m in METHODS:
                    ids = [int(t) for t in res[m][0].tokens]
                    hyps.setdefault(m, {}).setdefault(cname, {})[key] = ids
                    text.setdefault(m, {}).setdefault(cname, {})[key] = "".join(
                        units[i] for i in ids).replace("\u2581", " ")
    settings = dict(DECODE, methods=METHODS, decoding_chunk_size=CHUNKS, batch_size=1,
                    checkpoint=args.checkpoint, sos=model.sos, eos=model.eos,
                    vocab_size=len(units), wenet_commit=WENET_COMMIT,
                    torch=torch.__version__)
    return {"settings": settings, "hyps": hyps, "text": text}


if __name__ == "__main__":
    main()
