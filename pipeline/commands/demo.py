"""``s2 demo``: the whole pipeline on the bundled sample corpus, on a local Ray cluster.

Generates the sample corpus and holds a few meshes out; starts a local Ray cluster with token auth
(unless ``RAY_ADDRESS`` names a running one); submits ``jobs/preprocess.yaml`` on the rest; trains the
debug networks on the CPU as the paper trains the real ones, one Ray Train job each: structure VAE,
structure DiT, SS-VAE, then the SS-DiT on the SS-VAE's latents (after each VAE a job scales its latents to
unit spread for the DiT that models them); serves them with the Serve app and generates an asset library
from held-out views: new camera angles of training meshes, one per kind of the corpus, and views of the meshes kept
out of training (the ``s2 generate`` job, which starts the app from a Serve config file); scores the
library against the source meshes (``pipeline/evaluate.py``) next to an untrained cascade, and prints
where the gallery is. The cluster it started is stopped at the end. docs/demo.md has the measurements.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from pipeline.evaluate import (HELD_OUT, NEW_VIEW, preview_strip, print_table, score_library,  # noqa: F401 (the demo's table)
                               summarize)

ROOT = Path(__file__).resolve().parents[2]


def register(sub) -> None:
    p = sub.add_parser("demo", help="sample corpus -> preprocess -> train -> serve -> asset library, on a local cluster")
    p.add_argument("--data", default=str(ROOT / "data"), help="folder for the corpus, dataset, runs and library")
    p.add_argument("--resolutions", default=None,
                   help="grids to preprocess (default: 64,128,256 with --preprocess-only, else the training grid)")
    p.add_argument("--views", type=int, default=32,
                   help="views per mesh (the structure DiT from three new cameras of six training meshes: latent-voxel "
                        "IoU 0.589 with 4 views, 0.692 with 16 at 800 steps; 0.77 with 16 and 0.87 with 32 at 2,400; "
                        "docs/demo.md)")
    p.add_argument("--view-size", type=int, default=None,
                   help="view side in pixels (default: 256, or 128 for the whole demo: the debug encoder reads 64²)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: all)")
    p.add_argument("--keep-cluster", action="store_true", help="leave the cluster (and the Serve app) running")
    p.add_argument("--preprocess-only", action="store_true", help="stop after preprocessing")
    p.add_argument("--held-out", type=int, default=3, help="meshes kept out of training; their views are generated")
    p.add_argument("--new-views", type=int, default=8,
                   help="training meshes (one per kind first) also generated from a camera their training views lack")
    p.add_argument("--guidance", type=float, default=2.0,
                   help="classifier-free guidance of the served cascade (the debug networks overshoot at the usual 7)")
    p.add_argument("--train-resolution", type=int, default=64,
                   help="grid the debug networks train and generate at (64: the SS-VAE trains in minutes on a CPU)")
    p.add_argument("--latent", choices=("ss_vae", "pooled"), default="ss_vae",
                   help="what the SS-DiT models: an SS-VAE trained on the shards first (the paper's way), or the "
                        "fixed pooled statistics of model/pooled_latent.py (no SS-VAE; coarse surfaces, docs/demo.md)")
    p.add_argument("--vae-model", choices=("debug", "debug_r4"), default="debug_r4",
                   help="the SS-VAE's size: 'debug_r4' (two levels, a 16³ latent at 64³: reconstructs 2x closer; its "
                        "SS-DiT is debug_grid16, see DIT_MODEL) or 'debug' (the release's three levels, 8³; docs/demo.md)")
    p.add_argument("--vae-steps", type=int, default=1500,
                   help="optimizer steps of the SS-VAE (one or two shapes a step: batches of up to 40k band voxels)")
    p.add_argument("--train-steps", type=int, default=800, help="optimizer steps of the SS-DiT")
    p.add_argument("--structure-dit-steps", type=int, default=3200,
                   help="optimizer steps of the structure DiT (32 shapes of 512 tokens a step: ~0.5 s on one core)")
    p.add_argument("--structure-vae-steps", type=int, default=300,
                   help="optimizer steps of the structure VAE (4 shapes a step; its 16³ latent voxels from the "
                        "reconstruction: IoU 0.915 after 60 steps, 0.936 after 120, 0.956 after 200; docs/demo.md)")
    p.add_argument("--quick", action="store_true",
                   help=f"fewer optimizer steps and items ({', '.join(f'{k} {v}' for k, v in QUICK.items())}); "
                        "docs/demo.md")
    p.set_defaults(func=_run)
    FULL.update({k: p.get_default(k) for k in QUICK})


# --quick: each network's steps cut to what the 2-core machine trains in about 25 minutes together (docs/demo.md);
# the SS-VAE's 900 (at KL 1e-5) reconstruct five training shapes at Chamfer 0.085 where 600 gave 0.110 and 1,200 0.091,
# one seed each: three seeds at 900 spread 0.085-0.110, so 900 against 1,200 is within that noise. The structure DiT on
# 32 views a mesh: latent IoU from new views 0.83 at 1,400 steps, 0.85 at 1,800, 0.87 at 2,400 (means of 2-3 seeds).
# The SS-DiT's samples on six training shapes' own latent voxels: Chamfer 0.068 at 300 steps, 0.059 at 600 (the
# SS-VAE's own reconstruction 0.050); its chain still ends before the structure DiT's. The structure VAE's 100 steps
# (bfloat16 autocast) take about the time its 60 in float32 took; 160 reconstructed better (the cascade on the
# sources' own occupancy: 0.053 against 0.070 after 60) but put the demo at 31:47 (docs/demo.md). With 100, the
# structure DiT's 2,400 steps ended the demo at 30:26 on a slower day than 2322700's 29:26: it takes 2,000 (its last
# steps run two threads once the sparse chain is done, ~0.24 s each: about 1.5 minutes less).
QUICK = {"structure_vae_steps": 100, "structure_dit_steps": 2000, "vae_steps": 900, "train_steps": 600,
         "held_out": 2, "new_views": 4}
FULL: dict = {}  # the parser's defaults of those settings: --quick leaves a value the user gave alone


def apply_quick(args) -> None:
    """With ``--quick``, the settings of ``QUICK`` that still hold their default take the quick value."""
    if getattr(args, "quick", False):
        for key, value in QUICK.items():
            if getattr(args, key) == FULL.get(key):
                setattr(args, key, value)


def _start_cluster(num_cpus: int | None, env: dict[str, str]) -> str:
    """A local cluster in its own temp folder; ``cluster.stop_local()`` ends its processes and no others."""
    from pipeline.commands.cluster import ensure_token, start_local

    ensure_token(env)
    done = start_local(env, num_cpus=num_cpus or None, quiet=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if "already running" in done.stderr:
            raise SystemExit("s2 demo: a Ray cluster already runs on this machine; run the demo on it with "
                             "RAY_ADDRESS=http://127.0.0.1:8265 (its dashboard address), or stop it first "
                             f"(`s2 cluster down`). ray start said: {last}")
        raise SystemExit(f"s2 demo: `ray start` failed (exit {done.returncode}): {last}")
    return "http://127.0.0.1:8265"


def split_corpus(report, corpus: Path, train_dir: Path, held_out: int) -> list:
    """Link every corpus file but ``held_out`` valid meshes (spread over the kinds) into ``train_dir``."""
    valid = sorted((e for e in report.entries if e.valid), key=lambda e: e.path)
    step = max(1, len(valid) // max(held_out, 1))
    held = valid[::step][:held_out]
    held_paths = {e.path for e in held}
    train_dir.mkdir(parents=True, exist_ok=True)
    for e in report.entries:
        link = train_dir / Path(e.path).name
        if e.path not in held_paths and not link.exists():
            link.symlink_to(Path(corpus, e.path).resolve() if not Path(e.path).is_absolute() else Path(e.path))
    return held


def render_held_out(held, corpus: Path, out: Path, size: int, seed: int = 100) -> dict[str, tuple]:
    """One condition-style view of each mesh -> ``out/<name>.png``; returns name -> normalized mesh.

    ``seed + i`` seeds the camera of the i-th mesh; the preprocess job seeds its views from each mesh's
    content hash, so a view rendered here is from a camera the training views do not share."""
    from pipeline.geometry.mesh import load_mesh, normalize
    from pipeline.geometry.render import render_views

    out.mkdir(parents=True, exist_ok=True)
    meshes = {}
    for i, e in enumerate(held):
        path = Path(e.path) if Path(e.path).is_absolute() else corpus / e.path
        v, f = load_mesh(path.read_bytes(), path.suffix.lstrip("."))
        n = normalize(v, f)
        name = path.stem
        (out / f"{name}.png").write_bytes(render_views(n.vertices, n.faces, n_views=1, size=size, seed=seed + i)[0].png(camera=True))
        meshes[name] = (n.vertices, n.faces)
    return meshes


def pick_new_view_meshes(report, held, count: int) -> list:
    """``count`` training meshes for new views: one per kind of the corpus (its first folder) in turn."""
    held_paths = {e.path for e in held}
    kinds: dict[str, list] = {}
    for e in sorted((e for e in report.entries if e.valid and e.path not in held_paths), key=lambda e: e.path):
        kinds.setdefault(Path(e.path).parts[0] if len(Path(e.path).parts) > 1 else "", []).append(e)
    picked, rank = [], 0
    while len(picked) < count and any(rank < len(v) for v in kinds.values()):
        for members in kinds.values():
            if rank < len(members) and len(picked) < count:
                picked.append(members[(len(members) // 2 + rank) % len(members)])
        rank += 1
    return picked


def latest_checkpoint(runs: Path, name: str) -> str:
    found = sorted(Path(runs, name).rglob("weights.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(f"{runs / name}: the training job left no checkpoint (no weights.pt)")
    return str(found[-1].parent)


def _job(name: str, argv: list[str], threads: int = 1):
    from pipeline import jobs

    spec = jobs.JobSpec(path=f"demo:{name}", name=name, entrypoint=shlex.join(argv),
                        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}})
    jobs.check_entrypoint(spec)
    return spec


# Learning rates of the debug networks, measured on the sample corpus (docs/generate.md, docs/demo.md):
# networks this small learn nothing recognisable in a few hundred CPU steps at the paper-size 1e-4.
DEBUG_LR = {"structure-vae": 2e-3, "structure-dit": 2e-3, "vae": 2e-3, "dit": 1e-3}
DEBUG_WARMUP = 10
# The DiTs' frozen image encoder: the built-in tiny one with each patch's own pixels in its token, so the
# silhouette reaches them exactly (structure DiT on new views of training meshes: latent-voxel IoU 0.48 with
# 'tiny', 0.61 with 64² in 8×8 patches), read at 32² in 4×4 patches (the same 64 tokens, a coarser silhouette:
# 0.564 -> 0.589 at 800 steps, 0.551 -> 0.576 at 400, a weak gain: 7 of 18 new views better, 8 worse; docs/demo.md).
IMAGE_ENCODER = "tiny-pixels-32"
# The SS-VAE's batches are voxels, not tokens: at 64³ the corpus's shapes hold 5k-142k band voxels. A step
# costs about its voxels, so one or two shapes a step (a shape over the budget alone: --oversize alone, which
# a CPU's memory allows at 64³) gives ~4x the updates of 160k-voxel batches for the same time (docs/demo.md).
VAE_TOKEN_BUDGET = 40_000
# The SS-VAE's learning rate decays along a cosine after its warm-up: at a constant 2e-3 its input error on the
# whole corpus still sat at 0.30 after 600 steps; decayed, it fell to 0.25 in the same steps (docs/demo.md).
VAE_LR_SCHEDULE = "cosine"
# The SS-VAE's KL weight: at the release's 1e-3 its posterior stayed mostly noise on the whole corpus (means spread
# 0.2-1.0 under noise of std ~1); at 1e-5 the means spread 2.0-2.5 under noise 0.6 and 600 steps reconstruct at
# Chamfer 0.105 instead of 0.113 (docs/demo.md). The paper config keeps the release's weight.
VAE_KL_WEIGHT = 1e-5
# The SS-VAE's convolutions multiply bfloat16 operands where the trainer's CPU has AMX or AVX-512 BF16 (float32
# elsewhere; the worker decides): its step ran 1.35-1.5x faster with AMX, and 900 steps reconstructed as well as
# float32 (docs/demo.md).
# The structure VAE's dense convolutions take the same setting (bfloat16 autocast): 1.45 s a step of 4 shapes
# instead of 2.6 s; after 200 steps its 16³ latent voxels at IoU 0.956 against float32's 0.963 (one seed each).
VAE_CONV_PRECISION = "auto"
# The DiTs' linear layers under bfloat16 autocast where the trainer's CPU multiplies bfloat16 natively, attention
# float32 (model/cpu_precision.py): the structure DiT's 2,000 steps 1,504 s -> 1,413 s on an AMD EPYC, the new-view
# table as before (Chamfer 0.0573 / F1 0.837 against 0.0558 / 0.848; docs/demo.md).
DIT_PRECISION = "auto"
# The paper's order within each chain; the two chains train side by side (train_debug_networks).
CHAINS = (("structure-vae", "structure-dit"), ("vae", "dit"))
# CPUs a demo trainer reserves (it runs one thread): two side by side leave a 2-CPU cluster one CPU for the
# Ray Data tasks that read their shards.
CHAIN_CPUS = 0.5


# The SS-DiT for each SS-VAE size: over a two-level SS-VAE's 16³ latents the debug SS-DiT's samples decode to
# 35-45% band sign error; with a learned vector per latent cell and the image reaching every cell (the structure
# DiT's recipe) 13% (docs/demo.md, "The SS-VAE's latent grid").
DIT_MODEL = {"debug": "debug", "debug_r4": "debug_grid16"}


def _write_threads(path: Path, n: int) -> None:
    """Replace the threads file at once, so a trainer never reads it half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{n}\n")
    os.replace(tmp, path)


def train_debug_networks(dataset: Path, runs: Path, resolution: int, steps: dict[str, int],
                         address: str, latent: str = "ss_vae", vae_model: str = "debug_r4",
                         threads_alone: int = 1) -> dict[str, str]:
    """One Ray job per network; ``steps`` maps structure-vae, structure-dit, vae and dit to optimizer steps.

    ``latent`` 'ss_vae' (the paper's way): the SS-VAE trains on the shards first and the SS-DiT on its
    latents; 'pooled': no SS-VAE, the SS-DiT models model/pooled_latent.py's fixed statistics.

    The structure chain (structure VAE, then its DiT) and the sparse chain (SS-VAE, then the SS-DiT) need
    nothing from each other, so they run side by side, each job on one thread. Each trainer reserves half a
    CPU (``CHAIN_CPUS``), so two of them on a 2-CPU cluster leave a CPU for their jobs' Ray Data read tasks.
    A job that starts after the other chain has finished runs ``threads_alone`` threads (the machine's CPUs
    when the demo started its own cluster): on 2 cores the SS-DiT's 60 steps took 44-46 s on two threads against
    69-72 s on one, the same losses (docs/demo.md). A trainer still running then takes them too, through
    ``<runs>/demo-threads`` (``TrainConfig.threads_file``): the SS-VAE's steps ran 1.5x faster on two threads."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pipeline import jobs

    common = ["--shards", str(dataset), "--resolution", str(resolution), "--model", "debug", "--storage", str(runs),
              "--num-workers", "1", "--cpus-per-worker", str(CHAIN_CPUS), "--warmup-steps", str(DEBUG_WARMUP)]

    lock, running = threading.Lock(), [0]
    threads_file = runs / "demo-threads"
    if threads_alone > 1:  # a cluster the demo started: its trainers run on this host and read the file
        runs.mkdir(parents=True, exist_ok=True)
        _write_threads(threads_file, 1)
        common += ["--threads-file", str(threads_file)]

    def threads() -> int:
        with lock:
            return threads_alone if running[0] == 1 else 1

    def chain(nets: tuple[str, ...]) -> dict[str, str]:
        try:
            return run_chain(nets)
        finally:
            with lock:
                running[0] -= 1
                if running[0] == 1 and threads_alone > 1:  # the other chain's trainer gets the freed cores
                    _write_threads(threads_file, threads_alone)

    def run_chain(nets: tuple[str, ...]) -> dict[str, str]:
        ckpt: dict[str, str] = {}
        for net in nets:
            extra: list[str] = []
            if net == "structure-vae":  # its dense 3D convolutions under bfloat16 autocast likewise
                extra = ["--cpu-conv-precision", VAE_CONV_PRECISION]
            elif net == "structure-dit":  # the released debug layout plus the grid inputs (model/dense_dit.py)
                extra = ["--structure-vae", ckpt["structure_vae"], "--model", "debug_grid",
                         "--image-encoder", IMAGE_ENCODER, "--cpu-dit-precision", DIT_PRECISION]
            elif net == "vae":
                extra = ["--model", vae_model, "--token-budget", str(VAE_TOKEN_BUDGET), "--oversize", "alone",
                         "--lr-schedule", VAE_LR_SCHEDULE, "--kl-weight", str(VAE_KL_WEIGHT),
                         "--cpu-conv-precision", VAE_CONV_PRECISION]
            elif net == "dit":
                model = DIT_MODEL[vae_model] if latent == "ss_vae" else "debug"  # pooled latents: no SS-VAE grid
                extra = ["--model", model, "--image-encoder", IMAGE_ENCODER, "--cpu-dit-precision", DIT_PRECISION] + (
                    ["--latent", ckpt["vae"]] if latent == "ss_vae" else [])
            n = steps[net]
            extra = [*extra, "--lr", str(DEBUG_LR[net]), "--steps", str(n), "--checkpoint-every", str(n)]
            t = time.time()
            status = jobs.submit(_job(f"demo-{net}", ["s2", "train", net, *common, "--name", f"demo-{net}", *extra],
                                      threads()), address=address)
            if status != "SUCCEEDED":
                raise RuntimeError(f"training {net}: job {status}")
            ckpt[net.replace("-", "_")] = latest_checkpoint(runs, f"demo-{net}")
            print(f"trained {net}: {n} steps in {time.time() - t:.0f} s")
            if net in ("structure-vae", "vae"):  # each DiT models latents of unit spread (pipeline/train/latents.py)
                key = net.replace("-", "_")
                out = str(runs / f"demo-{net}-latents")
                status = jobs.submit(_job(f"demo-{net}-latents", [
                    "python", "-m", "pipeline.train.latents", ckpt[key], "--network", key, "--shards", str(dataset),
                    "--resolution", str(resolution), "--out", out], threads()), address=address)
                if status != "SUCCEEDED":
                    raise RuntimeError(f"latent statistics of the {net}: job {status}")
                ckpt[key] = out
        return ckpt

    chains = [CHAINS[0], tuple(n for n in CHAINS[1] if n != "vae" or latent == "ss_vae")]
    running[0] = len(chains)
    with ThreadPoolExecutor(len(chains)) as pool:
        futures = [pool.submit(chain, c) for c in chains]
    return {k: v for f in futures for k, v in f.result().items()}


def write_serve_config(path: Path, ckpt: dict[str, str], resolution: int, guidance: float = 7.0,
                       torch_threads: int = 0) -> dict:
    import yaml

    # No decimation (target_faces 0), as the release unless asked: the 64³ meshes hold ~40k faces, and vertex
    # clustering to 20k split a watertight torus shard into 178 open pieces (docs/demo.md).
    generation = {**ckpt, "resolution": resolution, "image_encoder": IMAGE_ENCODER, "device": "cpu", "target_faces": 0,
                  "guidance": guidance}
    doc = {"http_options": {"host": "127.0.0.1", "port": 8000},
           "applications": [{"name": "s2", "route_prefix": "/", "import_path": "pipeline.serve.app:app_builder",
                             "args": {"generation": generation, "num_cpus": 1, "max_batch_size": 4,
                                      "batch_wait_timeout_s": 0.2, **({"torch_threads": torch_threads}
                                                                      if torch_threads else {})}}]}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return generation


def _run(args) -> int:
    from pipeline import jobs
    from pipeline.corpus import generate_corpus

    apply_quick(args)
    if args.num_cpus is not None and args.num_cpus < 2 and not args.preprocess_only:
        raise SystemExit(f"s2 demo: --num-cpus {args.num_cpus}: training needs at least 2 CPUs (two trainers of "
                         f"{CHAIN_CPUS} CPU side by side, and a CPU for the Ray Data tasks that read their shards)")
    data = Path(args.data).resolve()
    corpus, train_corpus, dataset = data / "corpus", data / "corpus-train", data / "dataset"
    t0 = time.time()
    report = generate_corpus(corpus, seed=0)
    valid = sum(e.valid for e in report.entries)
    print(f"sample corpus: {valid} meshes and {len(report.entries) - valid} broken files in {corpus}")
    held = split_corpus(report, corpus, train_corpus, 0 if args.preprocess_only else args.held_out)
    # The whole demo needs only the training grid and views the debug image encoder can read (64²).
    whole = not args.preprocess_only
    args.view_size = args.view_size if args.view_size is not None else (128 if whole else 256)
    resolutions = args.resolutions or ("64,128,256" if not whole else str(args.train_resolution))
    if whole:
        resolutions = ",".join(sorted({*resolutions.split(","), str(args.train_resolution)}, key=int))

    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("RAY_AUTH_MODE", "token")
    address = env.get("RAY_ADDRESS")
    started = False
    if not address:
        address = _start_cluster(args.num_cpus, env)
        started = True
        print(f"local Ray cluster started at {address} (token auth)")
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "PATH")})
    status = "FAILED"
    try:
        spec = jobs.with_overrides(jobs.load_job_spec(ROOT / "jobs" / "preprocess.yaml"), [
            f"input={train_corpus}", f"output={dataset}", f"resolutions={resolutions}", f"views={args.views}",
            f"view_size={args.view_size}", "memory_per_task_gb=none"])
        jobs.check_entrypoint(spec)
        status = jobs.submit(spec, address=address)
        print(f"\npreprocess {status} in {time.time() - t0:.0f} s; shards in {dataset}")
        if status == "SUCCEEDED" and not args.preprocess_only:
            # nothing else runs on a cluster the demo started: a job alone may use every CPU's thread
            threads_alone = (args.num_cpus or os.cpu_count() or 1) if started else 1
            status = _generate_library(args, data, corpus, dataset, report, held, address, threads_alone)
    finally:
        if started and not args.keep_cluster:
            from pipeline.commands.cluster import stop_local

            stop_local()  # the processes this demo started, not every Ray process of the machine
    print(f"\ndemo {status} in {time.time() - t0:.0f} s")
    return 0 if status == "SUCCEEDED" else 1


def _generate_library(args, data: Path, corpus: Path, dataset: Path, report, held, address: str,
                      threads_alone: int = 1) -> str:
    from pipeline import jobs

    t = time.time()
    steps = {"structure-vae": args.structure_vae_steps, "structure-dit": args.structure_dit_steps,
             "vae": args.vae_steps, "dit": args.train_steps}
    ckpt = train_debug_networks(dataset, data / "runs", args.train_resolution, steps, address, latent=args.latent,
                                vae_model=args.vae_model, threads_alone=threads_alone)
    print(f"\ntrained the debug networks in {time.time() - t:.0f} s: {ckpt}")
    images, library = data / "held-out-views", data / "library"
    meshes = render_held_out(held, corpus, images, args.view_size, seed=100)
    sets = dict.fromkeys(meshes, HELD_OUT)
    fresh = render_held_out(pick_new_view_meshes(report, held, args.new_views), corpus, images, args.view_size, seed=1000)
    sets.update(dict.fromkeys(fresh, NEW_VIEW))
    meshes.update(fresh)
    serve_yaml = data / "serve.yaml"
    generation = write_serve_config(serve_yaml, ckpt, args.train_resolution, args.guidance, torch_threads=threads_alone)
    status = jobs.submit(_job("demo-generate", ["s2", "generate", "--images", str(images), "--output", str(library),
                                                "--serve-config", str(serve_yaml), "--app-name", "s2",
                                                "--concurrency", "4", "--no-progress"]), address=address)
    if status != "SUCCEEDED":
        return status
    rows = score_library(library, images, meshes, generation, sets)
    print_table(rows)
    (library / "chamfer.json").write_text(json.dumps({"rows": rows, "summary": summarize(rows)}, indent=1))
    print(f"previews beside their inputs: {preview_strip(library, rows, library / 'strip.png')}")
    print(f"\nasset library: {library}  (index.parquet, meshes/, previews/)")
    print(f"gallery: file://{library / 'gallery.html'}")
    return status
