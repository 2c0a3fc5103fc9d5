"""Which SSA branch differs: the SSA layer with its gate pinned to one branch at a time, release vs ours.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.parity.ssa_branches [--layer 1] [--device cuda --dtype bfloat16]

The gate (a sigmoid over a linear map, one weight per branch) is replaced on both sides by a constant
one-hot, so the output is one branch's attention through proj_o: compression, selection, window.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.parity"

from benchmarks.parity import common, run

BRANCHES = ("compression", "selection", "window")


class _ReleaseGate(nn.Module):
    def __init__(self, onehot):
        super().__init__()
        self.onehot = onehot

    def forward(self, x):
        return x.replace(self.onehot.to(x.feats).expand(x.feats.shape[0], 3).contiguous())


class _OurGate(nn.Module):
    def __init__(self, onehot):
        super().__init__()
        self.onehot = onehot

    def forward(self, feats):
        return self.onehot.to(feats).expand(feats.shape[0], 3)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--size", default="narrow", choices=["narrow", "paper"])
    ap.add_argument("--layer", type=int, default=0, help="0: plain windows, 1: shifted windows")
    ap.add_argument("--official", default=common.DEFAULT_OFFICIAL)
    ap.add_argument("--seed", type=int, default=0)


def build_ssa_stage(args):
    """(stage, ctx, release SS-DiT, ours converted from its weights, inputs) of the SSA layer's parity stage."""
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    common.import_release(args.official, device, "auto", dtype)
    stage = next(s for s in run.STAGES if s.name == ("ssa" if args.layer == 0 else "ssa_shifted"))
    ctx = run.Ctx(device, dtype, args.size, args.seed, Path(tempfile.mkdtemp(prefix="s2-ssa-")))
    sec = common.SECTIONS[stage.section]
    params = stage.params_edit(common.params(stage.params_key, args.size))
    release = common.build_release_module(sec.target, params, seed=args.seed)
    ours = run.adapters.convert(stage.section, params, common.release_state_dict(release), sec.target, dtype,
                                device)
    return stage, ctx, release, ours, stage.inputs(ctx, params)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    add_args(ap)
    args = ap.parse_args(argv)
    stage, ctx, release, ours, inputs = build_ssa_stage(args)
    dtype, device = ctx.dtype, ctx.device
    print(f"SSA layer {args.layer}: {inputs['coords'].shape[0]} tokens, {args.dtype} on {device}")
    for b, name in enumerate(BRANCHES):
        onehot = torch.zeros(1, 3)
        onehot[0, b] = 1.0
        rel = release.blocks[args.layer].self_attn
        saved_rel, rel.gate = rel.gate, _ReleaseGate(onehot)
        mine = ours.blocks[args.layer].self_attn
        saved_ours, mine.gate = mine.gate, _OurGate(onehot)
        _, ref = run._release_output(stage, release, inputs, ctx, dtype)
        with torch.no_grad():
            _, out = run._as_dense(stage.ours(ours, run._to(inputs, device, dtype)))
        rel.gate, mine.gate = saved_rel, saved_ours
        err = common.compare(out, ref)
        rows = ((out - ref).abs().amax(1) > common.TOLERANCE[dtype] * ref.abs().max()).sum().item()
        print(f"  {name:12s} max rel {err.max:9.2e}  mean rel {err.mean:9.2e}  rows off {rows}/{ref.shape[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
