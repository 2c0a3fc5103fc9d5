"""Where the demo's surface noise comes from: each stage of the sparse path alone, on a few corpus meshes.

    OMP_NUM_THREADS=1 python benchmarks/demo_noise.py --shards data/dataset --resolution 64 \
        --vae runs/demo-vae/checkpoint_X [--dit runs/demo-dit/checkpoint_Y] [--pooled-dit ...] \
        --meshes torus,cylinder,chair,die --steps 30 --guidance 2 --shift 6

Rows (one per stage and mesh, then the mean per stage), all against the normalized source mesh:

- ``shard``: the ground-truth sparse SDF marched as it is (the ceiling at this grid);
- ``pooled``: the pooled latent of that SDF decoded to its sub-cell grid (what a pooled-latent DiT
  can at best produce); ``pooled+noise σ``: with noise of σ × the latent's std added (a DiT's sample
  error), sign_err the share of sub-cells whose sign the noise flips;
- ``vae``: SS-VAE encode -> decode (posterior mean); also the share of band voxels whose decoded sign
  is wrong;
  ``--train-vae N`` instead of ``--vae``: a debug SS-VAE first trained N steps on every shape of ``--shards``
  as the demo trains it (``--lr``, ``--lr-schedule``, ``--token-budget``), in one process;
- ``vae+noise σ``: the same with Gaussian noise of σ × the latent's std added to the latent (how much
  a DiT's sample error the decoder tolerates);
- ``dit``: the SS-DiT's sample on the source's own latent voxels, from one of its training views,
  decoded by the VAE (``pooled-dit``: a pooled-latent DiT, decoded by ``pooled_sdf``);
- ``structure_vae`` (``--train-structure-vae N`` or ``--structure-vae``): the structure VAE's reconstruction
  (posterior mean, decoded occupancy at 0.1 as the cascade reads it) of every shape of ``--shards`` against
  the shard's band occupancy: IoU at 64³ and of the 16³ latent voxels the sparse stage samples on
  (``--structure-vae-precision bf16``: its convolutions under bfloat16 autocast, as ``s2 demo`` trains it);
- ``structure`` (``--structure-vae``, ``--structure-dit``): the structure stage alone, sampled from each
  of the mesh's stored (training) views and from one new view; its latent voxels against the shard's
  (IoU). A DiT that learned one view per shape shows a best view near 1 and a low mean.

Each row: Chamfer, F1@0.05, connected parts and watertightness of the marched mesh before and after the
cascade's clean-up (model/postprocess.py). Nothing here is asserted; docs/demo.md keeps the tables.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def source_mesh(sample):
    from pipeline.geometry.mesh import load_mesh, normalize

    path = Path(sample.source_uri.removeprefix("file://"))
    v, f = load_mesh(path.read_bytes(), path.suffix.lstrip("."))
    n = normalize(v, f)
    return torch.as_tensor(n.vertices), torch.as_tensor(n.faces)


def band_sign_error(coords, values, dec_coords, dec_values, resolution: int) -> float:
    """Share of band voxels (|SDF| < 1) whose decoded value has the other sign; an undecoded voxel reads +1."""
    from kernels.sparse_conv import coord_keys

    def keys(c):
        return coord_keys(torch.cat([torch.zeros_like(c[:, :1]), c], 1).int(), resolution)

    dk, order = torch.sort(keys(dec_coords))
    dv = dec_values[order]
    q = keys(coords)
    pos = torch.searchsorted(dk, q).clamp(max=len(dk) - 1)
    found = dk[pos] == q
    pred = torch.where(found, dv[pos], torch.ones_like(q, dtype=dv.dtype))
    band = values.abs() < 1
    return float(((pred[band] < 0) != (values[band] < 0)).float().mean())


def main() -> None:
    from pipeline.evaluate import mesh_row
    from model.mesh_extract import extract_mesh
    from pipeline.shards import read_samples

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="data/dataset")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--meshes", default="torus,cylinder,chair,die,box_minus_sphere,double_torus")
    ap.add_argument("--vae", default="", help="SS-VAE checkpoint (training checkpoint folder)")
    ap.add_argument("--dit", default="", help="SS-DiT trained on that SS-VAE's latents")
    ap.add_argument("--pooled-dit", default="", help="SS-DiT trained on pooled latents")
    ap.add_argument("--noise", default="0.1,0.3", help="latent noise levels (× the latent std) for the vae rows")
    ap.add_argument("--steps", default="30", help="Euler steps of the DiT rows (comma list: a sweep)")
    ap.add_argument("--guidance", default="2", help="guidance of the DiT rows (comma list)")
    ap.add_argument("--shift", default="6", help="time shift of the DiT rows (comma list)")
    ap.add_argument("--level", type=float, default=0.0, help="marching level of decoded SDFs")
    ap.add_argument("--structure-vae", default="", help="structure VAE checkpoint (the structure rows)")
    ap.add_argument("--structure-dit", default="", help="structure DiT checkpoint (the structure rows)")
    ap.add_argument("--image-encoder", default="tiny-pixels-32", help="the DiTs' image encoder (the demo's)")
    ap.add_argument("--stages", default="shard,pooled,vae,dit")
    ap.add_argument("--train-vae", type=int, default=0,
                    help="without --vae: train a debug SS-VAE this many steps on every shape of --shards first")
    ap.add_argument("--lr", type=float, default=2e-3, help="--train-vae: peak learning rate (the demo's)")
    ap.add_argument("--seed", type=int, default=0,
                    help="--train-vae, --train-structure-dit, --train-dit: seed of the initial weights and the "
                         "batch order")
    ap.add_argument("--lr-schedule", default="cosine", help="--train-vae: 'constant' or 'cosine' after warm-up")
    ap.add_argument("--structure-set", default="",
                    help="--train-structure-dit: DenseDiTConfig fields replaced, JSON values, e.g. grid_condition_hidden=1024")
    ap.add_argument("--structure-lr", type=float, default=2e-3,
                    help="--train-structure-dit: learning rate (the demo's)")
    ap.add_argument("--structure-token-budget", type=int, default=16384,
                    help="--train-structure-dit: tokens a step (the demo's: 32 shapes of 512 tokens)")
    ap.add_argument("--dit-lr-schedule", default="constant",
                    help="--train-dit / --train-structure-dit: 'constant' (the demo's) or 'cosine' after warm-up")
    ap.add_argument("--token-budget", type=int, default=40_000, help="--train-vae: band voxels a step")
    ap.add_argument("--kl-weight", type=float, default=1e-5, help="--train-vae: KL weight (the demo's; release 1e-3)")
    ap.add_argument("--vae-levels", type=int, default=None,
                    help="--train-vae: down/up blocks of the SS-VAE (the tiny config's when unset)")
    ap.add_argument("--train-dit", type=int, default=0,
                    help="dit rows: train the SS-DiT here for this many steps on --vae's latents (the demo's task)")
    ap.add_argument("--dit-lr", type=float, default=1e-3, help="--train-dit: peak learning rate (the demo's)")
    ap.add_argument("--dit-model", default="debug", help="--train-dit: named SS-DiT size")
    ap.add_argument("--dit-set", default="",
                    help="--train-dit: DiTConfig fields replaced, JSON values, e.g. width=128,heads=8")
    ap.add_argument("--dit-token-budget", type=int, default=16384, help="--train-dit: latent tokens a step")
    ap.add_argument("--train-structure-dit", type=int, default=0,
                    help="without --structure-dit: train the demo's structure DiT this many steps on every shape of "
                         "--shards (views drawn each step, EMA as the trainer) on --structure-vae first")
    ap.add_argument("--cond-augment", default="",
                    help="--train-structure-dit: 'shift:K' (views moved up to K pixels of the encoder's grid), "
                         "'token-drop:P' (a share P of patch tokens zeroed), 'token-noise:S' (noise of std S), "
                         "'view-mix:P' (with probability P the tokens of two azimuth-adjacent views, mixed)")
    ap.add_argument("--train-exclude", default="",
                    help="--train-structure-dit, --train-dit: meshes left out of training (comma list of names), "
                         "e.g. a demo's held-out meshes when --shards holds the whole corpus")
    ap.add_argument("--device", default="cpu",
                    help="structure and dit rows: where the DiTs train and sample (cuda: the same tasks and "
                         "float32 sampling, for sweeps of the demo's CPU settings in seconds)")
    ap.add_argument("--new-views", type=int, default=1, help="structure rows: new renders of each mesh")
    ap.add_argument("--train-structure-vae", type=int, default=0,
                    help="structure_vae rows: train the demo's structure VAE this many steps first (4 shapes a "
                         "step, lr --structure-vae-lr, 10 warm-up steps, constant) instead of reading --structure-vae")
    ap.add_argument("--structure-vae-lr", type=float, default=2e-3, help="--train-structure-vae: learning rate")
    ap.add_argument("--structure-vae-precision", choices=("fp32", "bf16"), default="fp32",
                    help="--train-structure-vae: its convolutions in float32 or under bfloat16 autocast")
    args = ap.parse_args()
    torch.set_num_threads(1)
    stages = set(args.stages.split(","))
    names = set(args.meshes.split(","))
    res = args.resolution

    samples = list({s.mesh_id: s for s in read_samples(args.shards, resolution=res)
                    if Path(s.source_uri).stem in names}.values())  # a mesh preprocessed twice counts once
    # in --meshes order: the i-th mesh's new views are seeded by i, so two shard sets give the same cameras
    order = args.meshes.split(",")
    samples.sort(key=lambda s: order.index(Path(s.source_uri).stem))
    print(f"{len(samples)} meshes at {res}³: {', '.join(Path(s.source_uri).stem for s in samples)}")
    rows: list[dict] = []

    def add(stage, s, v, f, t0, **extra):
        # the mesh as marched, and after the cascade's clean-up (what a served library holds: interior shells
        # between the decoded voxels and the +1 fill beyond them are dropped there)
        row = {"stage": stage, "mesh": Path(s.source_uri).stem, **mesh_row(v, f, gts[s.mesh_id], cleaned=True),
               **extra, "seconds": time.time() - t0}
        rows.append(row)
        print("  ".join(f"{k}={_fmt(x)}" for k, x in row.items()), flush=True)

    gts = {s.mesh_id: source_mesh(s) for s in samples}
    for s in samples:
        if "shard" in stages:
            t0 = time.time()
            v, f = extract_mesh(s.coords, s.values, res)
            add("shard", s, v, f, t0)
        if "pooled" in stages:
            from model import pooled_latent
            from model.cascade import pooled_sdf

            lc, lf = pooled_latent.encode(s.coords, s.values)
            std = float(lf.std())
            for sigma in [0.0, *(float(n) for n in args.noise.split(",") if n)]:
                t0 = time.time()
                g = torch.Generator().manual_seed(0)
                noisy = lf + sigma * std * torch.randn(lf.shape, generator=g)
                c, vals, r = pooled_sdf(lc, noisy, res // 8)
                clean_c, clean_v, _ = pooled_sdf(lc, lf, res // 8)
                err = float(((vals < 0) != (clean_v < 0)).float().mean())
                v, f = extract_mesh(c.long(), vals, r, fill=1.0)
                add("pooled" if sigma == 0 else f"pooled+noise {sigma:g}", s, v, f, t0, sign_err=err, latent_std=std)

    vae = None
    if args.vae:
        from model.cascade import load_network

        vae = load_network(args.vae, "vae").module
    elif args.train_vae:
        vae = train_vae(args)
    if vae is not None and "vae" in stages:
        from model.sparse import SparseTensor

        for s in samples:
            t0 = time.time()
            with torch.no_grad():
                x = SparseTensor.from_unsorted(torch.cat([torch.zeros_like(s.coords[:, :1]), s.coords], 1).int(),
                                               s.values.float()[:, None], res, 1)
                z, mean, _ = vae.encode(x, sample=False)
                std = float(mean.std())
                for sigma in [0.0, *(float(n) for n in args.noise.split(",") if n)]:
                    t0 = time.time()
                    g = torch.Generator().manual_seed(0)
                    feats = mean + sigma * std * torch.randn(mean.shape, generator=g)
                    dec = vae.decode(z.replace(feats.to(z.feats.dtype)))
                    dc, dv = dec.coords[:, 1:], dec.feats[:, 0].float()
                    err = band_sign_error(s.coords, s.values, dc, dv, res)
                    keep = dv < 0.999
                    v, f = extract_mesh(dc[keep], dv[keep], res, level=args.level, fill=1.0)
                    add("vae" if sigma == 0 else f"vae+noise {sigma:g}", s, v, f, t0, sign_err=err,
                        latent_std=std, latent_mean=float(mean.mean()))
    dit_rows(args, samples, vae, add)
    if rows:
        summary(rows)
    structure_vae_rows(args)
    structure_rows(args, samples)


def structure_vae_rows(args) -> None:
    """The structure VAE's reconstruction of every shape of --shards: band IoU at the grid and of its latent voxels."""
    if "structure_vae" not in args.stages.split(",") or not (args.structure_vae or args.train_structure_vae):
        return
    from model.cascade import GenerationConfig, load_network
    from model.structure import grid_to_latent_coords
    from pipeline.shards import read_samples
    from pipeline.train.tasks import occupancy_grid

    shapes = list({s.mesh_id: s for s in read_samples(args.shards, resolution=args.resolution)}.values())
    t0 = time.time()
    vae = (train_structure_vae(args, shapes) if args.train_structure_vae
           else load_network(args.structure_vae, "structure_vae").module)
    trained = time.time() - t0
    vae.eval()
    threshold, latent_res = GenerationConfig().occupancy_threshold, 16  # the cascade's; the SS-VAE's 16³ at 64³
    ious, ious16 = [], []
    with torch.no_grad():
        for s in shapes:
            occ = occupancy_grid(s.coords, args.resolution)
            got = torch.sigmoid(vae.decode(vae.encode(occ[None, None].float())[1]).float())[0, 0] >= threshold
            want = occ > 0.5
            ious.append(float((got & want).sum() / (got | want).sum()))
            ious16.append(set_iou(*({tuple(c) for c in grid_to_latent_coords(x, latent_res).tolist()} for x in (got, want))))
    print(f"structure_vae over {len(shapes)} shapes: IoU at {args.resolution}³ mean {np.mean(ious):.4f} "
          f"(min {np.min(ious):.4f}); {latent_res}³ latent voxels mean {np.mean(ious16):.4f} (min {np.min(ious16):.4f}); "
          f"trained in {trained:.0f} s", flush=True)


def train_structure_vae(args, shapes):
    """The demo's structure VAE trained in one process as the trainer trains it (4 shapes of 64³ a step,
    AdamW, 10 warm-up steps, constant rate, clip 1, EMA), its convolutions under --structure-vae-precision
    (the trainer's cpu_conv_precision); returns its EMA weights, as its checkpoint holds them."""
    from kernels.sparse_conv import gather_gemm
    from pipeline.train import tasks
    from pipeline.train.config import TrainConfig
    from pipeline.train.engine import EMA

    cfg = TrainConfig(network="structure_vae", model="debug", steps=args.train_structure_vae,
                      lr=args.structure_vae_lr, warmup_steps=10, token_budget=16384)
    torch.manual_seed(args.seed)
    task = tasks.build_task(cfg, args.seed)
    items = [task.prepare(s) for s in shapes]
    ema = EMA(task.module, cfg.ema_decay, warmup=True)  # a checkpoint holds these weights
    gather_gemm.GEMM_DTYPE = gather_gemm.gemm_dtype(args.structure_vae_precision)
    try:
        _fit(task, items, cfg, "structure VAE", "bce", ema, seed=args.seed)
    finally:
        gather_gemm.GEMM_DTYPE = None
    task.module.load_state_dict(ema.full_state_dict(), strict=False)
    return task.module.vae


def structure_rows(args, samples) -> None:
    """Latent voxels of the structure stage from each stored view and one new view, IoU with the shard's."""
    if "structure" not in args.stages.split(",") or not (args.structure_dit or args.train_structure_dit):
        return
    from model.cascade import Cascade, GenerationConfig, load_network, random_network
    from model.condition import decode_image
    from pipeline.geometry.render import render_views

    enc = bench_encoder(args.image_encoder)
    structure_dit = (train_structure_dit(args, enc) if args.train_structure_dit
                     else load_network(args.structure_dit, "structure_dit"))
    nets = {"structure_vae": load_network(args.structure_vae, "structure_vae"), "structure_dit": structure_dit,
            "dit": random_network("dit", cond_dim=enc.dim)}
    lookup = stored_view_lookup(args, enc)
    for guidance in (float(x) for x in args.guidance.split(",")):
        cfg = GenerationConfig(resolution=args.resolution, device=args.device, dtype="fp32",
                               image_encoder=args.image_encoder, guidance=guidance)
        cascade = Cascade(cfg, enc, **nets)
        stats = []
        for i, s in enumerate(samples):
            truth = {tuple(c) for c in torch.unique(s.coords.long() // 8, dim=0).tolist()}
            v, f = source_mesh(s)
            k = args.new_views  # the demo renders a new view of mesh i with seed 1000 + i; the others 1000 apart
            new = [render_views(v.numpy(), f.numpy(), n_views=1, size=128, seed=1000 * (j + 1) + i)[0].png(camera=True)
                   for j in range(k)]
            pngs = [view.png for view in s.views] + new
            images = torch.stack([decode_image(png, enc.image_size, with_mask=True) for png in pngs])
            coords = cascade.structure_stage(cascade.condition(images), [0] * len(pngs))
            gots = [{tuple(c) for c in lc.long().tolist()} for lc in coords]
            ious = [set_iou(truth, got) for got in gots]
            # the same up to a quarter turn about +Y (up in every view): how much of a miss is orientation
            turns = quarter_turns_about_y(truth, args.resolution // 8)
            turned = [max(set_iou(t, got) for t in turns) for got in gots[-k:]]
            looked = [set_iou(truth, got) for got in lookup(images[-k:])]
            stats.append((max(ious[:-k]), float(np.mean(ious[:-k])), float(np.mean(ious[-k:])), float(np.mean(turned)),
                          float(np.mean(looked))))
            print(f"structure guidance {guidance:g} {Path(s.source_uri).stem}: latent voxels {len(truth)}, IoU from "
                  f"its stored views {' '.join(f'{x:.2f}' for x in ious[:-k])}, from new views "
                  f"{' '.join(f'{x:.2f}' for x in ious[-k:])} (best quarter turn about +Y "
                  f"{' '.join(f'{x:.2f}' for x in turned)}; the nearest stored view's shape "
                  f"{' '.join(f'{x:.2f}' for x in looked)})", flush=True)
        best, mean, new, turned, looked = np.mean(stats, axis=0)
        print(f"structure guidance {guidance:g}, mean over {len(stats)} meshes: IoU best stored view {best:.3f}, "
              f"stored views {mean:.3f}, new views {new:.3f} (best quarter turn about +Y {turned:.3f}; the nearest "
              f"stored view's shape {looked:.3f})", flush=True)


def stored_view_lookup(args, enc):
    """A new view's structure by lookup, no network: the latent voxels of the shard whose stored view (any view
    of any shard in --shards) is nearest to it by L2 over the condition tokens. What a DiT that maps conditions
    between its training views no worse than the nearest one would reach (benchmarks/view_retrieval.py)."""
    from model.condition import decode_image
    from pipeline.shards import read_samples

    voxels, tokens = [], []
    device = next(enc.parameters()).device
    for s in {s.mesh_id: s for s in read_samples(args.shards, resolution=args.resolution)}.values():
        if not s.views:
            continue
        cells = {tuple(c) for c in torch.unique(s.coords.long() // 8, dim=0).tolist()}
        images = torch.stack([decode_image(v.png, enc.image_size, with_mask=True)[:3] for v in s.views])
        with torch.no_grad():
            tokens.append(enc(images.to(device)).flatten(1).float())
        voxels += [cells] * len(s.views)
    bank = torch.cat(tokens)

    def lookup(images: torch.Tensor) -> list[set]:
        with torch.no_grad():
            query = enc(images[:, :3].to(device)).flatten(1).float()
        return [voxels[int(i)] for i in torch.cdist(query, bank).argmin(1)]
    return lookup


def set_iou(a: set, b: set) -> float:
    """IoU of two voxel sets (0 when both are empty)."""
    return len(a & b) / max(1, len(a | b))


def quarter_turns_about_y(voxels: set, side: int) -> list[set]:
    """The voxel set turned by 0, 90, 180 and 270 degrees about the grid's +Y axis (x, z) -> (z, side-1-x)."""
    out, cur = [voxels], voxels
    for _ in range(3):
        cur = {(z, y, side - 1 - x) for x, y, z in cur}
        out.append(cur)
    return out


def bench_encoder(spec: str):
    """The DiTs' image encoder: a name ``build_image_encoder`` knows, or ``tiny-pixels@SIZE/PATCH`` (the tiny
    encoder reading SIZE² images in PATCH² patches, their pixels appended), seeded as the built-in ones."""
    from model.condition import TinyEncoderConfig, TinyImageEncoder, build_image_encoder

    if "@" not in spec:
        return build_image_encoder(spec)
    size, patch = (int(x) for x in spec.split("@")[1].split("/"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        enc = TinyImageEncoder(TinyEncoderConfig(image_size=size, patch=patch, pixels=True))
    return enc.eval().requires_grad_(False)


def train_structure_dit(args, enc):
    """The demo's structure DiT trained in one process as the trainer trains it (the task with ``enc``, lr 2e-3,
    10 warm-up steps, condition dropout 0.1, batches of 32 shapes, EMA), optionally with ``--cond-augment``;
    returns its EMA weights as a network of the cascade."""
    import dataclasses
    from unittest import mock

    from model.cascade import NetworkBundle
    from pipeline.shards import read_samples
    from pipeline.train.checkpoints import load_weights
    from pipeline.train.config import TrainConfig
    from pipeline.train.engine import EMA
    from pipeline.train import tasks

    cfg = TrainConfig(network="structure_dit", model="debug_grid", steps=args.train_structure_dit,
                      lr=args.structure_lr, token_budget=args.structure_token_budget, warmup_steps=10,
                      structure_vae=args.structure_vae, image_encoder=args.image_encoder,
                      lr_schedule=args.dit_lr_schedule)
    torch.manual_seed(args.seed)
    with mock.patch.object(tasks, "build_image_encoder", lambda spec: enc):
        task = tasks.build_task(cfg, args.seed, frozen_weights=load_weights(args.structure_vae, "structure_vae"))
        if args.structure_set:  # the named size's config as the task built it, with these fields replaced
            sets = {k: json.loads(v) for k, v in (kv.split("=") for kv in args.structure_set.split(","))}
            torch.manual_seed(args.seed)
            task = tasks.build_task(cfg, args.seed,
                                    frozen_weights=load_weights(args.structure_vae, "structure_vae"),
                                    model_config=dataclasses.replace(task.model_config, **sets))
    augment(task, args.cond_augment)
    task.to(args.device)  # the encoder and the frozen VAE
    task.module.to(args.device)
    left_out = set(filter(None, args.train_exclude.split(",")))
    items = [task.prepare(s) for s in {s.mesh_id: s for s in read_samples(args.shards, resolution=args.resolution)
                                       if Path(s.source_uri).stem not in left_out}.values()]
    print(f"structure DiT: {len(items)} shapes, encoder {args.image_encoder} ({enc.dim} wide), "
          f"augment {args.cond_augment or 'none'}", flush=True)
    ema = EMA(task.module, cfg.ema_decay, warmup=True)
    _fit(task, items, cfg, "structure DiT", "flow_mse", ema, seed=args.seed, device=args.device)
    dit = task.module.dit
    dit.load_state_dict({k.removeprefix("dit."): v for k, v in ema.full_state_dict().items()}, strict=False)
    return NetworkBundle("structure_dit", dit.eval().requires_grad_(False), dataclasses.replace(task.model_config),
                         "<trained here>")


def train_sparse_dit(args):
    """The demo's SS-DiT trained in one process as the trainer trains it (the task on --vae's latents, the
    image encoder, 10 warm-up steps, condition dropout 0.1, batches to the token budget, EMA); returns its EMA
    weights as a network of the cascade."""
    import dataclasses

    from model.cascade import NetworkBundle
    from pipeline.shards import read_samples
    from pipeline.train.config import TrainConfig
    from pipeline.train.engine import EMA
    from pipeline.train import tasks

    cfg = TrainConfig(network="dit", model=args.dit_model, steps=args.train_dit, lr=args.dit_lr, warmup_steps=10,
                      latent=args.vae, image_encoder=args.image_encoder, token_budget=args.dit_token_budget,
                      lr_schedule=args.dit_lr_schedule)
    torch.manual_seed(args.seed)
    task = tasks.build_task(cfg, args.seed)
    if args.dit_set:  # the named size's config as the task built it, with these fields replaced
        sets = {k: json.loads(v) for k, v in (kv.split("=") for kv in args.dit_set.split(","))}
        torch.manual_seed(args.seed)
        task = tasks.build_task(cfg, args.seed, model_config=dataclasses.replace(task.model_config, **sets))
    left_out = set(filter(None, args.train_exclude.split(",")))
    items = [task.prepare(s) for s in {s.mesh_id: s for s in read_samples(args.shards, resolution=args.resolution)
                                       if Path(s.source_uri).stem not in left_out}.values()]
    print(f"SS-DiT: {len(items)} shapes, {sum(i.tokens for i in items)} latent tokens, lr {cfg.lr}, "
          f"budget {cfg.token_budget}", flush=True)
    task.to(args.device)  # the encoder and the frozen SS-VAE
    task.module.to(args.device)
    ema = EMA(task.module, cfg.ema_decay, warmup=True)
    _fit(task, items, cfg, "SS-DiT", "flow_mse", ema, seed=args.seed, device=args.device)
    dit = task.module.dit
    dit.load_state_dict({k.removeprefix("dit."): v for k, v in ema.full_state_dict().items()}, strict=False)
    return NetworkBundle("dit", dit.eval().requires_grad_(False), dataclasses.replace(task.model_config),
                         "<trained here>", meta={"latent_space": task.latent_space})


def augment(task, spec: str) -> None:
    """Wrap the task's view drawing or condition with an augmentation that keeps the image's shape."""
    if not spec:
        return
    kind, value = spec.split(":")
    value = float(value)
    draw, condition = task.view_image, task.conditions
    g = torch.Generator().manual_seed(1)
    if kind == "shift":
        def shifted(item):
            im = draw(item)
            if im is None:
                return im
            k = int(value)
            dy, dx = (int(x) for x in torch.randint(-k, k + 1, (2,), generator=g))
            fill = torch.tensor([1.0, 1.0, 1.0, 0.0])[:, None, None].expand_as(im)  # white, alpha 0
            pad = torch.cat([fill, fill, fill], 1)
            pad = torch.cat([pad, pad, pad], 2).clone()
            side = im.shape[1]
            pad[:, side:2 * side, side:2 * side] = im
            return pad[:, side - dy:2 * side - dy, side - dx:2 * side - dx].contiguous()
        task.view_image = shifted
    elif kind in ("token-drop", "token-noise"):
        def noisy(images, device):
            cond = condition(images, device)
            if kind == "token-drop":
                keep = (torch.rand(cond.shape[:2], generator=g) >= value).to(cond.dtype)
                return cond * keep[..., None]
            return cond + value * torch.randn(cond.shape, generator=g)
        task.conditions = noisy
    elif kind == "view-mix":
        # a condition between two azimuth-adjacent views of the shape (views are stored in azimuth order, one
        # a sector): where a new camera lies. With probability P; the tokens mixed by λ uniform in [0, 1].
        from model.condition import decode_image, drop_condition

        def pair(item):
            views = item.data["views"]
            if not views:
                return None
            k = task.rng.randrange(len(views))
            k2 = (k + 1) % len(views) if float(torch.rand((), generator=g)) < value else k
            return torch.cat([decode_image(views[j], task.encoder.image_size, name=f"{item.name} view {j}",
                                           with_mask=True) for j in (k, k2)])

        def mixed(images, device):
            first = [im[:4] if im is not None else None for im in images]
            second = [im[4:] if im is not None else None for im in images]
            with mock_drop(task):
                a, b = condition(first, device), condition(second, device)
            lam = torch.rand(len(images), 1, 1, generator=g).to(a)
            return drop_condition(lam * a + (1 - lam) * b, task.cfg.cond_drop, task.gen)
        task.view_image, task.conditions = pair, mixed
    else:
        raise SystemExit(f"--cond-augment {spec!r}: expected shift:K, token-drop:P, token-noise:S or view-mix:P")


def mock_drop(task):
    """The task's condition without its dropout (applied once, after mixing)."""
    from unittest import mock

    from pipeline.train import tasks

    return mock.patch.object(tasks, "drop_condition", lambda cond, p, gen: cond)


def train_vae(args):
    """The demo's SS-VAE training in one process, as the trainer runs it (task, targets, AdamW with betas
    0.9/0.99, 10 warm-up steps, clip 1, shapes packed up to the voxel budget, a larger one alone), without
    DeepSpeed or the EMA: returns the network's last weights."""
    from pipeline.shards import read_samples
    from pipeline.train.config import TrainConfig
    from pipeline.train.tasks import SparseVAETask

    cfg = TrainConfig(network="vae", model="debug", steps=args.train_vae, lr=args.lr, warmup_steps=10,
                      lr_schedule=args.lr_schedule, token_budget=args.token_budget, oversize="alone",
                      kl_weight=args.kl_weight)
    torch.manual_seed(args.seed)
    model_config = None
    if args.vae_levels is not None:
        import dataclasses

        from model.vae import VAEConfig
        model_config = dataclasses.replace(VAEConfig.named("tiny"), levels=args.vae_levels)
    task = SparseVAETask(cfg, args.seed, model_config)
    items = [task.prepare(s) for s in {s.mesh_id: s for s in read_samples(
        args.shards, resolution=args.resolution, with_views=False)}.values()]
    _fit(task, items, cfg, "SS-VAE", "input", seed=args.seed)
    return task.module.vae.eval()


def _fit(task, items, cfg, label: str, term: str, ema=None, seed: int = 0, device: str = "cpu") -> None:
    """The trainer's optimizer loop in one process: AdamW (betas 0.9/0.99), its learning-rate schedule, clip,
    items shuffled each epoch and packed to the budget as the trainer packs them; ``ema`` folded in each step."""
    import random

    from pipeline.train.data import Skipped, token_batches
    from pipeline.train.engine import lr_factor

    rng = random.Random(seed)
    opt = torch.optim.AdamW(task.module.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    batches, errors, t0 = [], [], time.time()
    for step in range(cfg.steps):
        if not batches:  # the trainer's packing (oversize "alone" counts a large shape at the budget)
            rng.shuffle(items)
            batches = list(token_batches(items, cfg.token_budget, lambda i: i.tokens, lambda i: i.name, Skipped()))
        loss, terms = task.module(**task.collate(batches.pop(0), device, torch.float32))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.module.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(step)
        errors.append(float(terms[term]))
        if (step + 1) % 50 == 0:
            print(f"{label} step {step + 1}: {term} {np.mean(errors[-50:]):.3f} ({time.time() - t0:.0f} s)", flush=True)


def dit_rows(args, samples, vae, add) -> None:
    """The SS-DiT's samples on each source's own latent voxels, from one of its views."""
    if "dit" not in args.stages.split(",") or not (args.dit or args.pooled_dit or args.train_dit):
        return
    import dataclasses

    from model.cascade import Cascade, GenerationConfig, load_network, random_network
    from model.condition import build_image_encoder, decode_image
    from model.sparse import SparseTensor
    from model.structure import occupancy_grid

    res = args.resolution
    grids_of = {id(s): [occupancy_grid(s.coords, res)] for s in samples}  # each shard's own 64³ band occupancy
    for kind, path in (("dit", args.dit or args.train_dit), ("pooled-dit", args.pooled_dit)):
        if not path:
            continue
        dit = train_sparse_dit(args) if kind == "dit" and args.train_dit else load_network(path, "dit")
        enc = build_image_encoder(args.image_encoder)
        nets = {"structure_vae": random_network("structure_vae"),
                "structure_dit": random_network("structure_dit", cond_dim=enc.dim), "dit": dit}
        if kind == "dit":
            nets["vae"] = load_network(args.vae, "vae")
        base = GenerationConfig(resolution=res, device=args.device, dtype="fp32", cuda_graphs=False,
                                image_encoder=args.image_encoder)
        for steps in (int(x) for x in args.steps.split(",")):
            for guidance in (float(x) for x in args.guidance.split(",")):
                for shift in (float(x) for x in args.shift.split(",")):
                    cfg = dataclasses.replace(base, guidance=guidance, sparse_steps=steps, sparse_shift=shift)
                    cascade = Cascade(cfg, enc, **nets)
                    down = res // cascade.latent_resolution(cascade.vae, res)
                    for s in samples:
                        t0 = time.time()
                        img = decode_image(s.views[0].png, enc.image_size, with_mask=True)[None]
                        cond = cascade.condition(img)
                        lc = torch.unique(s.coords.long() // down, dim=0).int()
                        (z,) = cascade.sparse_stage(cascade.dit, [lc], cond, [0], steps, shift, 1, grids_of[id(s)])
                        sdf = cascade.decode(cascade.vae, [lc], [z], res // down)[0]
                        extra = {"steps": steps, "guidance": guidance, "shift": shift}
                        if cascade.vae is not None:
                            dev = cascade.device
                            x = SparseTensor.from_unsorted(
                                torch.cat([torch.zeros_like(s.coords[:, :1]), s.coords], 1).int().to(dev),
                                s.values.float()[:, None].to(dev), res, 1)
                            with torch.no_grad():
                                zt, mean, _ = cascade.vae.encode(x, sample=False)
                            ref = cascade.vae.scale(mean).cpu()
                            order = _match(zt.coords[:, 1:].cpu(), lc)
                            extra["latent_rmse"] = float((z.cpu()[order] - ref).pow(2).mean().sqrt())
                            extra["latent_std"] = float(ref.std())
                            with torch.no_grad():
                                dec = cascade.vae.decode(SparseTensor.from_unsorted(
                                    torch.cat([torch.zeros_like(lc[:, :1]), lc], 1).int().to(dev),
                                    cascade.vae.unscale(z.to(dev)), res // down, 1))
                            extra["sign_err"] = band_sign_error(s.coords, s.values, dec.coords[:, 1:].cpu(),
                                                                dec.feats[:, 0].float().cpu(), res)
                        try:
                            v, f = cascade.march(sdf)
                        except ValueError as e:
                            print(f"{kind} {Path(s.source_uri).stem}: {e}")
                            continue
                        add(kind, s, torch.as_tensor(v), torch.as_tensor(f), t0, **extra)


def _match(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Index into ``b`` of each row of ``a`` (both (N, 3) int, the same set)."""
    key = lambda c: (c[:, 0].long() * 4096 + c[:, 1].long()) * 4096 + c[:, 2].long()  # noqa: E731
    kb, order = torch.sort(key(b))
    return order[torch.searchsorted(kb, key(a))]


def _fmt(x):
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def summary(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="stage -> metric (mean over meshes; Chamfer and F1@0.05 against the source mesh)")
    cols = ["chamfer", "f1@0.05", "chamfer_clean", "f1_clean", "parts", "parts_clean", "watertight", "sign_err",
            "latent_rmse"]
    t.add_column("stage")
    t.add_column("meshes")
    for c in cols:
        t.add_column(c)
    for stage in dict.fromkeys(r["stage"] for r in rows):
        group = [r for r in rows if r["stage"] == stage]
        for key in dict.fromkeys((r.get("steps"), r.get("guidance"), r.get("shift")) for r in group):
            g = [r for r in group if (r.get("steps"), r.get("guidance"), r.get("shift")) == key]
            label = stage if key == (None, None, None) else f"{stage} steps {key[0]} cfg {key[1]:g} shift {key[2]:g}"
            vals = []
            for c in cols:
                xs = [float(r[c]) for r in g if c in r]
                vals.append(f"{np.mean(xs):.4f}" if xs else "-")
            t.add_row(label, str(len(g)), *vals)
    Console(width=200).print(t)


if __name__ == "__main__":
    main()
