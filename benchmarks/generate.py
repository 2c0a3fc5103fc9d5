"""Generation speed and memory: seconds per mesh and peak GPU memory at 512 and 1024, meshes per minute
per batch size (the Generator's work), and meshes per minute through the Serve app over HTTP.

    python benchmarks/generate.py --size paper --device cuda            # paper-size networks, random weights
    python benchmarks/generate.py --pretrained OUT/converted --image-encoder OUT/dinov2.pth   # a converted release
    python benchmarks/generate.py --release-snapshot OUT --size paper   # write a paper-size synthetic release
                                                                        # snapshot, convert it, then time it
    python benchmarks/generate.py --size debug --device cpu --steps-scale 0.1
    python benchmarks/generate.py --serve --batches 1,4,16              # through Ray Serve (CPU, debug networks)
    python benchmarks/generate.py --size paper --syncs                  # + host syncs of one mesh, by source line

Random weights give random occupancy and random SDFs, which would make token counts and meshes
meaningless. So the structure stage runs for its time only, and the sparse stages run on a sphere shell
with the paper's token counts (about 10.7k latent voxels at 512, 46k at 1024, DESIGN.md); the networks'
decoded SDF is timed, then replaced by the sphere's SDF on the same voxels so marching extracts a mesh of
realistic size (`tests/shell_cascade.py`: a fixture, out of the Serve app's reach). The image encoder is stood in for by random DINOv2-L-sized tokens (1,374 × 1,024): its
own cost (one ViT-L pass, ~0.05 s on an H100) is not in the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from model.cascade import GenerationConfig, random_network  # noqa: E402
from model.mesh_extract import extract_mesh  # noqa: E402
from shell_cascade import ShellCascade  # noqa: E402


class RandomTokens(torch.nn.Module):
    """Stands in for the image encoder: fixed random tokens of the encoder's shape."""

    def __init__(self, dim: int, tokens: int, image_size: int = 518):
        super().__init__()
        self.dim, self.tokens, self.image_size = dim, tokens, image_size

    def forward(self, images):
        g = torch.Generator().manual_seed(0)
        return torch.randn(images.shape[0], self.tokens, self.dim, generator=g).to(images.device)


def build(size: str, device: str, refine_attention: str, steps_scale: float) -> ShellCascade:
    cond_dim, tokens = (1024, 1374) if size == "paper" else (64, 64)
    s = lambda n: max(1, round(n * steps_scale))  # noqa: E731
    cfg = GenerationConfig(device=device, structure_steps=s(50), sparse_steps=s(30), refine_steps=s(15),
                           dit_refine="<random>", resolution=512, refine_resolution=1024)
    torch.manual_seed(0)
    nets = {"structure_vae": random_network("structure_vae", size),
            "structure_dit": random_network("structure_dit", size, cond_dim=cond_dim),
            "dit": random_network("dit", size, cond_dim=cond_dim),
            "vae": random_network("vae", size),
            "dit_refine": random_network("dit", size, cond_dim=cond_dim, attention=refine_attention)}
    return ShellCascade(cfg, RandomTokens(cond_dim, tokens), **nets)


def build_pretrained(folder: str, image_encoder: str, device: str, steps_scale: float,
                     offload: bool = False) -> ShellCascade:
    """The cascade of a converted release folder (refiners included), on the sphere shell."""
    s = lambda n: max(1, round(n * steps_scale))  # noqa: E731
    cfg = GenerationConfig(pretrained=folder, image_encoder=image_encoder, device=device, structure_steps=s(50),
                           sparse_steps=s(30), refine_steps=s(15), offload=offload)
    return ShellCascade.from_checkpoints(cfg)


def write_release(out: str, size: str) -> tuple[str, str]:
    """A synthetic release snapshot of ``size`` (paper: the released layouts and sizes) converted under ``out``;
    returns (converted folder, DINOv2 .pth). Random weights in the released .ckpt format."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import release_snapshot

    from model.official import convert_snapshot, write_synthetic_snapshot

    t0 = time.perf_counter()
    snap = os.path.join(out, "snapshot")
    if size == "paper":
        from model.dinov2 import DinoV2

        sections = release_snapshot.paper_sections()
        write_synthetic_snapshot(snap, sections, extra={**release_snapshot.ENCODERS, **release_snapshot.SCHEDULERS})
        dino = os.path.join(out, "dinov2_vitl14_reg4_pretrained.pth")
        torch.save({k: v * 0.02 if v.ndim > 1 else v for k, v in DinoV2().state_dict().items()}, dino)
    else:
        snap, dino = release_snapshot.write(out)
    t1 = time.perf_counter()
    convert_snapshot(snap, os.path.join(out, "converted"))
    print(f"# synthetic {size} snapshot written in {t1 - t0:.0f} s, converted in {time.perf_counter() - t1:.0f} s",
          flush=True)
    return os.path.join(out, "converted"), dino


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_reset(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gb(dev) -> float:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")


def run_once(c: ShellCascade, batch: int, refine: bool, tokens512: int, tokens1024: int) -> dict:
    """One batch through every stage; seconds per stage (for the whole batch) and each stage's peak memory.

    ``c`` is a ShellCascade: the structure stage and the decoders run, then the geometry is the sphere
    shell of ``tokens512`` / ``tokens1024`` latent voxels (tests/shell_cascade.py)."""
    dev = c.device
    c.tokens = {c.cfg.resolution: tokens512, c.cfg.refine_resolution: tokens1024}
    t = {}

    def timed(key, fn, *a):
        sync(dev)
        peak_reset(dev)  # each stage's own peak (resident weights and live tensors of earlier stages included)
        t0 = time.perf_counter()
        c.bring(BENCH_STAGES.get(key, key))  # with offload: this stage's networks to the device, the rest away
        out = fn(*a)
        sync(dev)
        t[key] = time.perf_counter() - t0
        t[f"{key}_gb"] = peak_gb(dev)
        return out

    def march(sdfs):
        faces = 0
        for sdf in sdfs:
            faces += len(c.march(sdf)[1])
        return faces

    seeds = list(range(batch))
    images = torch.zeros(batch, 4, 518, 518)
    images[:, :, 100:400, 120:420] = 1.0  # an opaque square: the sparse condition keeps its patches
    cond = timed("condition", c.condition, images)
    coords = timed("structure", c.structure_stage, cond, seeds)
    lat = timed("sparse_512", c.sparse_stage, c.dit, coords, c.sparse_condition(c.dit, cond, images), seeds,
                c.cfg.sparse_steps, c.cfg.sparse_shift, 1)
    sdfs = timed("decode_512", c.decode, c.vae, coords, lat, c.cfg.resolution // 8, c.refiner, 2.0 * c.level)
    t["voxels_512"] = len(sdfs[0][0])
    if refine:
        coords = [c.refine_coords(None) for _ in sdfs]
        lat = timed("sparse_1024", c.sparse_stage, c.dit_refine, coords, c.sparse_condition(c.dit_refine, cond, images),
                    seeds, c.cfg.refine_steps, c.cfg.refine_shift, 2)
        sdfs = timed("decode_1024", c.decode, c.vae_refine, coords, lat, c.cfg.refine_resolution // 8,
                     c.refiner_refine, c.level)
        t["voxels_1024"] = len(sdfs[0][0])
    t["faces"] = timed("mesh_1024" if refine else "mesh_512", march, sdfs) / batch
    t["peak_gb"] = max(v for k, v in t.items() if k.endswith("_gb"))
    t["tokens"] = len(coords[0])
    return t


BENCH_STAGES = {"sparse_512": "sparse", "decode_512": "decode", "sparse_1024": "refine", "decode_1024": "refine_decode"}
STAGE_KEYS = ("condition", "structure", "sparse_512", "decode_512", "mesh_512", "sparse_1024", "decode_1024", "mesh_1024")


def gpu_table(args) -> list[dict]:
    if args.release_snapshot:
        args.pretrained, args.image_encoder = write_release(args.release_snapshot, args.size)
    if args.pretrained:
        c = build_pretrained(args.pretrained, args.image_encoder, args.device, args.steps_scale, args.offload)
    else:
        c = build(args.size, args.device, args.refine_attention, args.steps_scale)
    print(f"# cascade: {json.dumps({k: v for k, v in c.info().items() if k != 'networks'})}", flush=True)
    rows = []
    t_start = time.perf_counter()
    # warm-up through every stage: kernels compiled, allocator primed. Small shells by default; the first
    # full-size rows may still carry first-use costs (a warm-up without the 1024 stage left 11.0 s against 9.6 s
    # for the same eager stage later in one call), so A/B rows take --full-warmup
    if args.full_warmup:
        run_once(c, 1, True, args.tokens512, args.tokens1024)
    else:
        run_once(c, 1, True, min(2000, args.tokens512), min(4000, args.tokens1024))
    plan = [(512, 1, False, True), (1024, 1, True, True)]
    if args.eager_too:  # the same meshes with the sampling steps launched from Python, same cascade and card
        plan += [(512, 1, False, False), (1024, 1, True, False)]
    plan += [(512, b, False, True) for b in args.batches if b > 1]
    for res, b, refine, graphs in plan:
        if time.perf_counter() - t_start > args.budget_s:
            rows.append({"resolution": res, "batch": b, "skipped": "time budget"})
            continue
        c.cfg.cuda_graphs = graphs
        try:
            t = run_once(c, b, refine, args.tokens512, args.tokens1024)
        except torch.OutOfMemoryError as e:
            rows.append({"resolution": res, "batch": b, "skipped": f"out of memory ({str(e)[:60]})"})
            torch.cuda.empty_cache()
            continue
        total = sum(t.get(k, 0.0) for k in STAGE_KEYS)
        rows.append({"resolution": res, "batch": b, "graphs": c.cfg.cuda_graphs, "s_per_mesh": total / b,
                     "meshes_per_min": 60 * b / total,
                     **{k: round(v, 3) if isinstance(v, float) else v for k, v in t.items()}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def count_syncs(args) -> None:
    """Every device-to-host synchronisation of one mesh at 512 and at 1024, by the source line that caused it
    (CUDA only): the sampling loops should have none."""
    import collections
    import warnings

    c = (build_pretrained(args.pretrained, args.image_encoder, args.device, args.steps_scale, args.offload)
         if args.pretrained else build(args.size, args.device, args.refine_attention, args.steps_scale))
    for res, refine in ((512, False), (1024, True)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run_once(c, 1, refine, args.tokens512, args.tokens1024)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        where = collections.Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in seen
                                    if "synchroniz" in str(w.message))
        print(f"\nhost syncs, one mesh at {res}: {sum(where.values())}")
        print_table([{"source line": k, "syncs": v} for k, v in where.most_common(20)], ["source line", "syncs"])


def serve_table(args) -> list[dict]:
    """Meshes per minute through the Serve app over HTTP at each max_batch_size (one replica, local cluster).

    ``--size debug`` on the CPU: the debug networks at resolution 64 with 4 + 4 steps (the mechanism).
    With ``--pretrained``: the converted release cascade at resolution 512 with the paper's steps and CFG,
    its real shapes' token counts, one GPU replica when ``--device cuda``. Untrained networks of another
    size are refused: their random occupancy makes token counts meaningless, and the sphere-shell fixture
    that fixes it for the direct rows is not reachable from Serve."""
    import io
    import threading

    import numpy as np
    if args.size != "debug" and not args.pretrained:
        raise SystemExit("--serve at a size other than debug needs --pretrained (a converted release folder)")
    import ray
    import requests
    from PIL import Image
    from ray import serve

    from pipeline.serve.app import start
    from pipeline.serve.config import ServeConfig

    img = np.full((96, 96, 3), 255, np.uint8)
    img[24:72, 20:76] = (180, 70, 40)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    data = buf.getvalue()
    gpu = args.device.startswith("cuda")
    ray.init(num_cpus=args.serve_cpus, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False)
    rows = []
    if args.pretrained:
        s = lambda n: max(1, round(n * args.steps_scale))  # noqa: E731
        gen = {"pretrained": args.pretrained, "resolution": 512, "structure_steps": s(50), "sparse_steps": s(30),
               "device": args.device, "image_encoder": args.image_encoder}
        random_weights = ""
    else:
        gen = {"resolution": 64, "structure_steps": 4, "sparse_steps": 4, "guidance": 1.0, "device": args.device}
        random_weights = "debug"
    for b in args.batches:
        cfg = ServeConfig(name="bench", port=args.port, generation=gen, random_weights=random_weights,
                          max_batch_size=b, batch_wait_timeout_s=0.5, num_cpus=1, num_gpus=1 if gpu else 0,
                          max_ongoing_requests=max(32, 2 * b), torch_threads=0 if gpu else 1)
        start(cfg)
        url = f"http://127.0.0.1:{args.port}/v1/generate"
        n = max(b, args.serve_requests)
        sizes, lock = [], threading.Lock()

        def one(i):
            r = requests.post(url, data=data, headers={"Content-Type": "image/png"}, params={"seed": i}, timeout=900)
            r.raise_for_status()
            with lock:
                sizes.append(int(r.headers["x-s2-batch-size"]))

        one(10_000)  # warm-up
        sizes.clear()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        dt = time.perf_counter() - t0
        rows.append({"max_batch_size": b, "requests": n, "seconds": round(dt, 2), "meshes_per_min": round(60 * n / dt, 1),
                     "mean_batch": round(sum(sizes) / len(sizes), 2), "size": args.size, "device": args.device})
        print(json.dumps(rows[-1]), flush=True)
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()
    return rows


def print_table(rows: list[dict], keys: list[str]) -> None:
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="paper", choices=["debug", "small", "paper"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="1,4,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--tokens512", type=int, default=10_700)
    p.add_argument("--tokens1024", type=int, default=46_000)
    p.add_argument("--refine-attention", default="full", choices=["full", "ssa"])
    p.add_argument("--steps-scale", type=float, default=1.0, help="scale every stage's step count (quick runs)")
    p.add_argument("--budget-s", type=float, default=240.0, help="skip the remaining rows after this long")
    p.add_argument("--pretrained", default="", help="a converted release folder (s2 convert official)")
    p.add_argument("--image-encoder", default="tiny", help="with --pretrained: the DINOv2 .pth or folder")
    p.add_argument("--release-snapshot", default="", help="write a synthetic release snapshot of --size here, "
                                                            "convert it and time the converted cascade")
    p.add_argument("--offload", action="store_true", help="with --pretrained / --release-snapshot: each stage "
                   "brings only its own networks to the device (GenerationConfig.offload)")
    p.add_argument("--syncs", action="store_true", help="after the table, count the host syncs of one mesh at 512 "
                   "and at 1024 by source line (torch.cuda.set_sync_debug_mode)")
    p.add_argument("--full-warmup", action="store_true", help="warm up on a whole 1024 mesh of the rows' size "
                   "(for A/B rows in one call: otherwise the first rows carry the first full-size stage)")
    p.add_argument("--eager-too", action="store_true", help="after the rows with CUDA-graph sampling "
                   "(GenerationConfig.cuda_graphs), the same meshes launched from Python (an A/B in one run)")
    p.add_argument("--off", default="", help="comma-separated optional kernels to turn off for an A/B in one "
                   "tree: gelu, group-norm, residuals (benchmarks/sample_step.py --off)")
    p.add_argument("--serve", action="store_true", help="measure through Ray Serve over HTTP instead")
    p.add_argument("--serve-cpus", type=int, default=2)
    p.add_argument("--serve-requests", type=int, default=8)
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args()
    if args.off:
        from sample_step import set_switches  # benchmarks/ is this script's folder

        set_switches(args.off, False, p)
    dev = torch.device(args.device)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"# device: {card}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    if args.serve:
        print_table(serve_table(args), ["max_batch_size", "requests", "seconds", "meshes_per_min", "mean_batch"])
        return
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = gpu_table(args)
    print_table(rows, ["resolution", "batch", "graphs", "tokens", "s_per_mesh", "meshes_per_min", "peak_gb", "faces",
                       *STAGE_KEYS, "skipped"])
    print("\nPeak GB per stage (resident weights included):")
    print_table(rows, ["resolution", "batch", *[f"{k}_gb" for k in STAGE_KEYS]])
    if args.syncs and dev.type == "cuda":
        count_syncs(args)


if __name__ == "__main__":
    main()
