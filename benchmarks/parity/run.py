"""Parity of our modules against the released Direct3D-S2 ones, stage by stage.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.parity.run --device cpu --dtype float32 --size narrow
    python -m benchmarks.parity.run --device cuda --dtype bfloat16 --size paper --stages ss_dit_512,ssa

Each stage builds a released module with seeded random weights, writes it as the release ships it
(config.yaml + model_*.ckpt), reads that back, converts it through model/official.py, runs both on the
same inputs and prints max / mean relative error (max |ours − release| / max |release|; mean over mean).
Pass: max within 1e-4 (float32) or 1e-2 (bfloat16). In bfloat16 the release runs its own half-precision
path (use_fp16 with bfloat16); the table adds ours against the float32 release ("vs f32") and the
release's own bfloat16-vs-float32 error ("floor"). A bfloat16 stage over 1e-2 whose "vs f32" is within
1.5x the floor reads "floor": SSA's top-k block choice flips under bfloat16 rounding, so there no two
bfloat16 runs agree to 1e-2, the release's own included.
See benchmarks/parity/README.md.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.parity"

import torch

from benchmarks.parity import adapters, common, standins
from benchmarks.parity.adapters import NotBuilt


FLOOR_MARGIN = 1.5


@dataclasses.dataclass
class Ctx:
    device: torch.device
    dtype: torch.dtype
    size: str
    seed: int
    workdir: Path
    perturb: bool = False

    @property
    def paper(self) -> bool:
        return self.size == "paper"


@dataclasses.dataclass
class Stage:
    name: str
    section: str               # config.yaml section the module is written under
    params_key: str            # common.params key
    inputs: Callable           # (ctx, params) -> dict of CPU float32 tensors / ints
    release: Callable          # (module, inputs) -> tensor or (coords, feats)
    ours: Callable             # (module, inputs) -> tensor or (coords, feats)
    half: bool = True          # the release has a half-precision path for this module (use_fp16)
    params_edit: Callable | None = None


# -- inputs -----------------------------------------------------------------------------------------------


def _dense_vae_inputs(ctx, p):
    res = 64 if ctx.paper else 32
    occ = common.dense_occupancy(res, 2)
    g = torch.Generator().manual_seed(ctx.seed + 11)
    z = torch.randn(2, p["embed_dim"], res // 4, res // 4, res // 4, generator=g)
    return {"occ": occ, "z": z}


def _dense_dit_inputs(ctx, p):
    g = torch.Generator().manual_seed(ctx.seed + 12)
    r = p["resolution"]
    x = torch.randn(2, p["in_channels"], r, r, r, generator=g)
    return {"x": x, "t": common.timesteps(2), "cond": common.cond_tokens(2, 1374 if ctx.paper else 20,
                                                                          p["cond_channels"], ctx.seed + 13)}


def _ss_vae_encode_inputs(ctx, p):
    res = 256 if ctx.paper else 64
    batch = common.sparse_sdf_batch(res, 1 if ctx.paper else 2)
    coords = torch.cat([batch["batch_idx"][:, None], batch["sparse_index"]], 1).int()
    return {"coords": coords, "sdf": batch["sparse_sdf"][:, None], "res": res}


def _ss_vae_decode_inputs(ctx, p):
    chunked = p.get("chunk_size", 1) > 1
    # paper: 32³ latents (64³ when chunked, so that the 128 / chunk_size cubes and their overlaps are used)
    res = (64 if chunked else 32) if ctx.paper else 8
    n = 1 if (ctx.paper or chunked) else 2   # chunked decoding repeats work per chunk
    lat = common.latent_coords(res, n)
    lat = common.sort_by_coords(lat, lat)[0]
    g = torch.Generator().manual_seed(ctx.seed + 14)
    return {"lat_coords": lat, "z": torch.randn(lat.shape[0], p["embed_dim"], generator=g), "lat_res": res}


def _ss_dit_inputs(ctx, p):
    batch = 1 if (ctx.paper and p["resolution"] > 64) else 2
    coords = common.latent_coords(p["resolution"], batch, p.get("selection_block_size", 8))
    g = torch.Generator().manual_seed(ctx.seed + 15)
    out = {"coords": coords, "x": torch.randn(coords.shape[0], p["in_channels"], generator=g),
           "t": common.timesteps(batch)}
    if p.get("sparse_conditions"):
        out["cond"], out["cond_coords"] = common.sparse_cond_tokens(batch, 37 if ctx.paper else 8,
                                                                    p["cond_channels"], ctx.seed + 16)
    else:
        out["cond"] = common.cond_tokens(batch, 1374 if ctx.paper else 20, p["cond_channels"], ctx.seed + 16)
    return out


def _ssa_inputs(ctx, p):
    out = _ss_dit_inputs(ctx, p)
    g = torch.Generator().manual_seed(ctx.seed + 17)
    out["h"] = torch.randn(out["coords"].shape[0], p["model_channels"], generator=g)
    return out


def _refiner_inputs(ctx, p):
    size = 64 if ctx.paper else 16
    g = torch.Generator().manual_seed(ctx.seed + 18)
    occ = common.dense_occupancy(size, 1)
    sdf = (0.5 - occ) * 0.8 + 0.05 * torch.randn(occ.shape, generator=g)   # a signed field in [-1, 1]
    return {"sdf": sdf, "feats": torch.randn(1, 32, size, size, size, generator=g)}


# -- the release's calls --------------------------------------------------------------------------------


def _sp(feats, coords):
    return common.release_sp().SparseTensor(feats, coords)


def _rel_ss_dit(m, i):
    cond = _sp(i["cond"], i["cond_coords"]) if "cond_coords" in i else i["cond"]
    return m(_sp(i["x"], i["coords"]), i["t"], cond).feats


def _rel_ss_vae_encode(m, i):
    h = m.encoder(_sp(i["sdf"], i["coords"]))
    return h.coords, h.feats


def _rel_ss_vae_decode(m, i):
    out = m.decoder(_sp(i["z"], i["lat_coords"]))
    return out.coords, out.feats


def _rel_ssa(layer):
    def call(m, i):
        return m.blocks[layer].self_attn(_sp(i["h"], i["coords"])).feats
    return call


def _rel_refiner(m, i):
    """One patch of Voxel_RefinerXL.run (its loop body), on the release's own submodules."""
    unet_refiner = sys.modules[type(m).__module__]
    h = m.conv_in(i["sdf"])
    f = m.latent_mlp(i["feats"].permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
    mid = m.unet3d1(torch.cat([h, f], dim=1))
    mid = unet_refiner.adaptive_block(mid, m.adaptive_conv1)
    mid = m.mid_conv(mid)
    mid = unet_refiner.adaptive_block(mid, m.adaptive_conv2)
    final = m.conv_out(mid)
    final = unet_refiner.adaptive_block(final, m.adaptive_conv3, weights_=mid)
    return torch.tanh(final)


def _rel_refiner_sign(m, i):
    """One patch of Voxel_RefinerXL_sign.run before its hard sign: sigmoid(conv_out(unet(conv_in(sdf))))."""
    return torch.sigmoid(m.conv_out(m.unet3d1(m.conv_in(i["sdf"]))))


def _two_blocks(p):
    return dict(p, num_blocks=2)


STAGES: list[Stage] = [
    Stage("dense_vae_encode", "dense_vae", "dense_vae", _dense_vae_inputs,
          lambda m, i: m.encoder(i["occ"] * 2.0 - 1.0), lambda o, i: adapters.dense_vae_encode(o, i["occ"]),
          half=False),
    Stage("dense_vae_decode", "dense_vae", "dense_vae", _dense_vae_inputs,
          lambda m, i: m.decoder(i["z"]), lambda o, i: adapters.dense_vae_decode(o, i["z"]), half=False),
    Stage("dense_dit", "dense_dit", "dense_dit", _dense_dit_inputs,
          lambda m, i: m(i["x"], i["t"], i["cond"]), lambda o, i: adapters.dense_dit(o, i["x"], i["t"], i["cond"])),
    Stage("ss_vae_encode", "sparse_vae_512", "sparse_vae_512", _ss_vae_encode_inputs, _rel_ss_vae_encode,
          lambda o, i: adapters.ss_vae_encode(o, i["coords"], i["sdf"], i["res"])),
    Stage("ss_vae_decode", "sparse_vae_512", "sparse_vae_512", _ss_vae_decode_inputs, _rel_ss_vae_decode,
          lambda o, i: adapters.ss_vae_decode(o, i["lat_coords"], i["z"], i["lat_res"])),
    Stage("ss_vae_decode_chunked", "sparse_vae_1024", "sparse_vae_1024", _ss_vae_decode_inputs, _rel_ss_vae_decode,
          lambda o, i: adapters.ss_vae_decode(o, i["lat_coords"], i["z"], i["lat_res"])),
    Stage("ssa", "sparse_dit_512", "sparse_dit_512", _ssa_inputs, _rel_ssa(0),
          lambda o, i: adapters.ssa_layer(o, 0, i["coords"], i["h"]), params_edit=_two_blocks),
    Stage("ssa_shifted", "sparse_dit_512", "sparse_dit_512", _ssa_inputs, _rel_ssa(1),
          lambda o, i: adapters.ssa_layer(o, 1, i["coords"], i["h"]), params_edit=_two_blocks),
    Stage("ss_dit_512", "sparse_dit_512", "sparse_dit_512", _ss_dit_inputs, _rel_ss_dit,
          lambda o, i: adapters.ss_dit(o, i["coords"], i["x"], i["t"], i["cond"], i.get("cond_coords"))),
    Stage("ss_dit_densecond", "sparse_dit_512", "sparse_dit_densecond", _ss_dit_inputs, _rel_ss_dit,
          lambda o, i: adapters.ss_dit(o, i["coords"], i["x"], i["t"], i["cond"])),
    Stage("ss_dit_1024", "sparse_dit_1024", "sparse_dit_1024", _ss_dit_inputs, _rel_ss_dit,
          lambda o, i: adapters.ss_dit(o, i["coords"], i["x"], i["t"], i["cond"], i.get("cond_coords"))),
    Stage("refiner", "refiner", "refiner", _refiner_inputs, _rel_refiner,
          lambda o, i: adapters.refiner_patch(o, i["sdf"], i["feats"])),
    Stage("refiner_1024", "refiner_1024", "refiner_1024", _refiner_inputs, _rel_refiner_sign,
          lambda o, i: adapters.refiner_patch(o, i["sdf"], None)),
]


# -- running ----------------------------------------------------------------------------------------------


def _to(inputs: dict, device, dtype) -> dict:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point() and k != "t":
                v = v.to(dtype)
        out[k] = v
    return out


def _as_dense(out, notes: list | None = None):
    """A sparse output (coords, feats) as feats in (batch, x, y, z) order plus its coords; dense as is.

    Repeated coordinates (the release's chunked decoding emits the voxels of a chunk's 7-voxel overlap
    twice) keep their first row; ``notes`` gets how many and how far the repeated values disagree."""
    if not isinstance(out, tuple):
        return None, out.float().cpu()
    coords, feats = common.sort_by_coords(out[0].cpu(), out[1].float().cpu())
    coords = coords.long()
    same = torch.zeros(coords.shape[0], dtype=torch.bool)
    same[1:] = (coords[1:] == coords[:-1]).all(1)
    if same.any():
        first = torch.cumsum(~same, 0) - 1
        spread = (feats - feats[~same][first]).abs().max().item()
        if notes is not None:
            notes.append(f"release repeats {int(same.sum())} voxels (values within {spread:.1e})")
        coords, feats = coords[~same], feats[~same]
    return coords, feats


def _release_output(stage, module, inputs, ctx, dtype, notes=None):
    m = copy.deepcopy(module).to(ctx.device)
    if dtype != torch.float32 and stage.half:
        common.to_release_dtype(m, dtype)
    use = dtype if stage.half else torch.float32
    # the release's SSA Triton kernels take half precision only: a float32 run uses the references
    before = standins.set_release_ssa_ops(True) if use == torch.float32 else None
    try:
        with torch.no_grad():
            return _as_dense(stage.release(m, _to(inputs, ctx.device, use)), notes)
    finally:
        if before is not None:
            standins.set_release_ssa_ops(before)


def run_stage(stage: Stage, ctx: Ctx) -> dict:
    t0 = time.time()
    sec = common.SECTIONS[stage.section]
    params = common.params(stage.params_key, ctx.size)
    if stage.params_edit:
        params = stage.params_edit(params)
    module = common.build_release_module(sec.target, params, seed=ctx.seed)
    folder = ctx.workdir / stage.name
    common.write_release_checkpoint(folder, {stage.section: (params, common.release_state_dict(module))})
    params_back, state_back = common.read_release_checkpoint(folder, stage.section)
    inputs = stage.inputs(ctx, params)
    notes: list[str] = []
    rel_coords, ref = _release_output(stage, module, inputs, ctx, ctx.dtype, notes)
    floor = ref32 = None
    if ctx.dtype != torch.float32:
        coords32, ref32 = _release_output(stage, module, inputs, ctx, torch.float32)
        if ref32.shape != ref.shape or (coords32 is not None and not torch.equal(coords32, rel_coords)):
            ref32 = None  # the half-precision run made other voxels: no floor
        floor = common.compare(ref, ref32).max if ref32 is not None else None
    del module
    try:
        ours = adapters.convert(stage.section, params_back, state_back, sec.target, ctx.dtype, ctx.device)
    except NotBuilt as e:
        return {"stage": stage.name, "status": "not built", "note": str(e).splitlines()[0][:120],
                "seconds": time.time() - t0}
    if ctx.perturb:
        with torch.no_grad():  # negative control: every weight off by 1e-3 relative must fail the stage
            g = torch.Generator().manual_seed(ctx.seed + 99)
            for w in ours.parameters():
                w.mul_(1 + 1e-3 * torch.randn(w.shape, generator=g).to(w))
    our_notes: list[str] = []
    with torch.no_grad():
        our_coords, out = _as_dense(stage.ours(ours, _to(inputs, ctx.device, ctx.dtype)), our_notes)
    if our_notes:
        notes.append("ours: " + our_notes[0].replace("release ", ""))
    if rel_coords is not None:
        if our_coords is None or our_coords.shape != rel_coords.shape or not torch.equal(our_coords, rel_coords):
            n_ours = None if our_coords is None else our_coords.shape[0]
            notes.append(f"output voxels differ: ours {n_ours} rows, release {rel_coords.shape[0]}")
            return {"stage": stage.name, "status": "FAIL", "note": "; ".join(notes), "seconds": time.time() - t0}
    err = common.compare(out, ref)
    tol = common.TOLERANCE[ctx.dtype]
    status = "pass" if err.passes(tol) else "FAIL"
    vs32 = common.compare(out, ref32).max if ref32 is not None else None
    if status == "FAIL" and vs32 is not None and floor is not None and vs32 <= max(tol, FLOOR_MARGIN * floor):
        # SSA's top-k block choice flips under bfloat16 rounding: no bfloat16 run, the release's included,
        # stays within 1e-2 of another there. "floor": ours is as close to the float32 release as the
        # release's own bfloat16 run is.
        status = "floor"
    if status == "FAIL":
        over, rows = err.rows_over(tol)
        if rows:
            notes.append(f"{over} of {rows} rows over {tol:g}")
    if not err.ref_scale > 0:
        notes.append("the release's output is all zeros")
        status = "FAIL"
    return {"stage": stage.name, "status": status, "max": err.max, "mean": err.mean, "vs32": vs32, "floor": floor,
            "numel": err.numel, "note": "; ".join(notes), "seconds": time.time() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--size", default="narrow", choices=["narrow", "paper"])
    ap.add_argument("--stages", default="all", help="comma-separated: " + ",".join(s.name for s in STAGES))
    ap.add_argument("--official", default=common.DEFAULT_OFFICIAL, help="folder holding direct3d_s2/")
    ap.add_argument("--ssa-ops", default="auto", choices=["auto", "triton", "torch"],
                    help="the release's SSA kernels: its Triton ops or our PyTorch references")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None, help="folder to keep the written release checkpoints in")
    ap.add_argument("--perturb", action="store_true",
                    help="negative control: every weight of ours times 1 + N(0, 1e-3²) (every stage should fail)")
    args = ap.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    common.import_release(args.official, device, args.ssa_ops, dtype)
    wanted = [s.strip() for s in args.stages.split(",")] if args.stages != "all" else [s.name for s in STAGES]
    unknown = sorted(set(wanted) - {s.name for s in STAGES})
    if unknown:
        ap.error(f"unknown stage(s) {unknown}")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="s2-parity-"))
    ctx = Ctx(device, dtype, args.size, args.seed, work, args.perturb)
    print(f"parity: {args.size} sizes, {args.dtype} on {device} (release SSA ops: {common.release_ssa_ops()}), "
          f"tolerance {common.TOLERANCE[dtype]:g}; checkpoints under {work}", flush=True)
    rows = []
    for stage in [s for s in STAGES if s.name in wanted]:
        try:
            row = run_stage(stage, ctx)
        except Exception as e:  # one stage's failure is a row, not the end of the run
            tb = traceback.extract_tb(e.__traceback__)
            where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb)
                          if "benchmarks/parity" not in f.filename), "")
            row = {"stage": stage.name, "status": "error", "note": f"{type(e).__name__}: {str(e)[:140]} ({where})"}
            if os.environ.get("S2_PARITY_TRACEBACK"):
                traceback.print_exc()
        rows.append(row)
        print(_format(row, args.dtype), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(f"{'stage':24s} {'dtype':9s} {'max rel':>10s} {'mean rel':>10s} {'vs f32':>10s} {'floor':>10s}  result")
    for r in rows:
        print(_format(r, args.dtype))
    bad = [r for r in rows if r["status"] in ("FAIL", "error")]
    return 1 if bad else 0


def _format(r: dict, dtype: str) -> str:
    def num(v):
        return f"{v:10.2e}" if isinstance(v, float) else f"{'-':>10s}"
    line = (f"{r['stage']:24s} {dtype:9s} {num(r.get('max'))} {num(r.get('mean'))} {num(r.get('vs32'))} "
            f"{num(r.get('floor'))}  {r['status']}")
    if r.get("note"):
        line += f" ({r['note']})"
    if r.get("seconds") is not None:
        line += f" [{r['seconds']:.1f} s]"
    return line


if __name__ == "__main__":
    sys.exit(main())
