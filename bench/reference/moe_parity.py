#!/usr/bin/env python3
"""Writes parity cases for the Rust MoE layer against WeNet's MoEFFNLayer (u2pp.py):

    .venv/bin/python bench/reference/moe_parity.py --out DIR

For each case, DIR/{case}.safetensors holds the layer's weights under WeNet's names
(gate.weight, experts.{j}.w_1.weight, ...), the input x [B,T,d], the mask `valid` [B,T]
(i64 0/1), the upstream gradient g, and the reference's outputs: y, balance, z,
tokens_per_expert, and grad.x, grad.<param> of loss = sum(y * g) + balance + z.
The last expert never receives a token (feature 0 of x is 3, and its gate row has -50
there), so its gradients are zero. Cases (metadata "case" says which options):
  wenet       WeNet's semantics: top-k of logits, softmax over k, all positions routed
  masked_cap  positions masked, capacity factor 0.5 in training: token copies dropped
  pre_softmax router softmax_topk: softmax over all experts, top-3, times E/k
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from u2pp import MoEFFNLayer  # noqa: E402

CASES = {
    "wenet": dict(k=2, masked=False, capacity_factor=0.0, router="topk_softmax"),
    "masked_cap": dict(k=2, masked=True, capacity_factor=0.5, router="topk_softmax"),
    "pre_softmax": dict(k=3, masked=True, capacity_factor=0.0, router="softmax_topk"),
}


def case(name, opts, seed, out):
    torch.manual_seed(seed)
    b, t, d, f, e = 3, 7, 16, 24, 6
    layer = MoEFFNLayer(d, f, 0.0, torch.nn.SiLU(), True, e, opts["k"])
    layer.router = opts["router"]
    layer.capacity_factor = opts["capacity_factor"]
    with torch.no_grad():
        layer.gate.weight[e - 1, 0] = -50.0
    x = torch.randn(b, t, d)
    x[..., 0] = 3.0
    x.requires_grad_(True)
    lens = torch.tensor([t, t - 2, 3])
    valid = torch.arange(t)[None, :] < lens[:, None] if opts["masked"] else None
    g = torch.randn(b, t, d)
    layer.train()
    y = layer(x, valid)
    loss = (y * g).sum() + layer.aux["balance"] + layer.aux["z"]
    loss.backward()
    tensors = {k: v.detach().clone().contiguous() for k, v in layer.state_dict().items()}
    tensors.update({
        "x": x.detach(), "g": g, "y": y.detach(),
        "valid": (valid if valid is not None else torch.ones(b, t, dtype=torch.bool)).long(),
        "balance": layer.aux["balance"].detach(), "z": layer.aux["z"].detach(),
        "tokens_per_expert": layer.aux["tokens_per_expert"],
        "grad.x": x.grad,
    })
    for pname, p in layer.named_parameters():
        tensors[f"grad.{pname}"] = p.grad if p.grad is not None else torch.zeros_like(p)
    assert tensors["tokens_per_expert"][e - 1] == 0, "the last expert must get no token"
    meta = dict(opts, masked=opts["masked"], n_expert=e, d=d, hidden=f)
    save_file(tensors, os.path.join(out, f"{name}.safetensors"),
              metadata={"case": json.dumps(meta)})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for name, opts in CASES.items():
        case(name, opts, a.seed, a.out)


if __name__ == "__main__":
    main()
