"""Narrow-band sparse SDF: seconds per mesh, band voxels per second and peak memory at 256/512/1024,
on a ~50k-face scanned mesh and on the sample corpus, against mesh-to-sdf on the same voxels.

    python benchmarks/preprocess.py                          # CPU, one core (each size in a fresh process)
    python benchmarks/preprocess.py --device cuda            # one GPU
    python benchmarks/preprocess.py --device cuda --res 1024 --no-corpus --baseline-points 0 --chunk 25   # chunk 2^25
    python benchmarks/preprocess.py --device cuda --res 1024 --no-corpus --baseline-points 0 --profile   # + launches
    python benchmarks/preprocess.py --mesh bunny.npz --res 256 512 --no-corpus --json out.json
    python benchmarks/preprocess.py --open --no-corpus      # the mesh cut open: winding-number sign path
    python benchmarks/preprocess.py --mesh sign:nested_shells --res 1024 --no-corpus   # a sign-test mesh
    python benchmarks/preprocess.py --rerun 10000           # a rerun over 10,000 finished files, one core
    PYTHONPATH=<tree of another commit> python benchmarks/preprocess.py ...   # that commit, same script

The scanned mesh is the Stanford bunny that pymeshlab's wheel ships (56k faces;
Stanford 3D Scanning Repository, research use with acknowledgement) when
pymeshlab is installed, else `scan_like_mesh()`: a deterministic displaced,
noisy, irregularly triangulated blob of ~50k faces (`--mesh scan_like` picks it). `--mesh` takes a .npz with
arrays v (V,3) and f (F,3), already normalized, or any file trimesh reads.
With several resolutions it also times one `sparse_sdf_multi` call over all of them.
mesh-to-sdf runs on a random subsample of the band's voxels and its time is
extrapolated to the whole band (its fixed surface-sampling cost counted once).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.geometry.sdf import prepare_mesh, sdf_on_grid, sparse_sdf, sparse_sdf_multi

RESOLUTIONS = (256, 512, 1024)


# ---------- meshes ----------

def scan_like_mesh(seed: int = 0, rings: int = 112, noise: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """A closed, scan-like mesh of ~50k faces: UV-sphere topology (fan poles, uneven triangles),
    low-frequency displacement, tangential jitter and per-vertex noise; same seed, same mesh.
    At the default noise (a quarter of an edge) a third of its neighbouring faces fold over each
    other and half its faces pass through others, which sends it down the exact winding path;
    `--mesh scan_smooth` (noise 0.02) is a clean surface of the same size."""
    import trimesh

    rng = np.random.default_rng(seed)
    m = trimesh.creation.uv_sphere(radius=1.0, count=[rings, rings])
    v = np.asarray(m.vertices, dtype=np.float64)
    f = np.asarray(m.faces, dtype=np.int64)
    n = v / np.linalg.norm(v, axis=1, keepdims=True)
    disp = np.zeros(len(v))
    for _ in range(24):  # smooth bumps like a scanned object's shape
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        disp += rng.uniform(0.02, 0.12) * np.sin(rng.uniform(1, 6) * n @ d + rng.uniform(0, 2 * np.pi))
    v = n * (1.0 + disp)[:, None]
    edge = 2 * np.pi / rings
    v += noise * edge * rng.normal(size=v.shape)  # scanner noise and irregular sampling
    v = (v - (v.max(0) + v.min(0)) / 2) * (0.95 / (np.abs(v - (v.max(0) + v.min(0)) / 2).max()))
    return v, f


def scan_mesh(path: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    from pipeline.geometry.mesh import normalize

    if path == "scan_like":
        v, f = scan_like_mesh()
        return v, f, "scan_like"
    if path == "scan_smooth":
        v, f = scan_like_mesh(noise=0.02)
        return v, f, "scan_smooth"
    if path and path.startswith("sign:"):  # a mesh of the sign tests (tests/sign_cases.py)
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from sign_cases import CASES

        v, f = CASES[path[5:]]()
        return v, f, path[5:]
    if path and path.endswith(".npz"):
        d = np.load(path)
        return d["v"], d["f"], Path(path).stem
    if path:
        import trimesh

        m = trimesh.load(path, force="mesh", process=False)
        n = normalize(np.asarray(m.vertices), np.asarray(m.faces))
        return n.vertices, n.faces, Path(path).stem
    try:
        import pymeshlab
        import trimesh

        bunny = Path(pymeshlab.__file__).parent / "tests" / "sample_meshes" / "bunny.obj"
        m = trimesh.load(bunny, force="mesh", process=False)
        n = normalize(np.asarray(m.vertices), np.asarray(m.faces))
        return n.vertices, n.faces, "stanford_bunny"
    except (ImportError, OSError, ValueError):
        v, f = scan_like_mesh()
        return v, f, "scan_like"


def opened(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """The faces left after cutting away everything above y = 0.55 and a slot around x = 0.2: an open
    mesh (on the bunny: ear tips and a slice), so the winding-number sign path runs."""
    cen = v[f].mean(1)
    return f[~((cen[:, 1] > 0.55) | (np.abs(cen[:, 0] - 0.2) < 0.05))]


def corpus_meshes(corpus_dir: str | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Every valid single mesh of the sample corpus (generated into a temporary folder if none given)."""
    import tempfile

    from pipeline.corpus import generate_corpus, load_report
    from pipeline.geometry.mesh import extension, load_mesh, normalize

    root = Path(corpus_dir or tempfile.mkdtemp(prefix="s2corpus_"))
    if not (root / "corpus.json").exists():
        generate_corpus(root)
    out = []
    for e in load_report(root).entries:
        if not e.valid:
            continue
        try:
            v, f = load_mesh((root / e.path).read_bytes(), extension(e.path))
            n = normalize(v, f)
        except ValueError:
            continue
        out.append((e.path, n.vertices, n.faces))
    return out


# ---------- measurements (one function each) ----------

SAMPLE = 2000  # band voxels each measurement hands back for the accuracy check and the baseline
_TETRA = (np.array([[0.5, 0.5, 0.5], [0.5, -0.5, -0.5], [-0.5, 0.5, -0.5], [-0.5, -0.5, 0.5]]),
          np.array([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2]]))


def _sample(s, n=SAMPLE):
    idx = torch.randperm(s.coords.shape[0], generator=torch.Generator().manual_seed(0))[:n]
    return s.coords.cpu()[idx].numpy(), s.values.cpu()[idx].numpy()


def _cpu_child(v, f, res, band, sign, queue):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    torch.set_num_threads(1)
    sparse_sdf(*_TETRA, 16)  # first-call costs (imports, allocator) stay out of the timing
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if isinstance(res, tuple):  # every resolution through one sparse_sdf_multi call
        c = time.process_time()
        sparse_sdf_multi(v, f, res, band, sign=sign)
        queue.put({"cpu_seconds": time.process_time() - c})
        return
    t, c = time.perf_counter(), time.process_time()
    mesh = prepare_mesh(v, f, sign)  # the per-mesh part, shared by resolutions in sparse_sdf_multi
    prep = time.process_time() - c
    s = sdf_on_grid(mesh, res, band)
    sec, cpu = time.perf_counter() - t, time.process_time() - c
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    coords, values = _sample(s)
    queue.put({"seconds": sec, "cpu_seconds": cpu, "prepare_s": prep, "voxels": int(s.coords.shape[0]),
               "peak_rss_gib": peak / 2**20, "rss_over_base_gib": (peak - base) / 2**20,
               "coords": coords, "values": values})


def measure_cpu(v, f, res, band: float = 2.0, sign: str = "winding") -> dict:
    """CPU seconds (of which mesh preparation), band voxels and peak RSS of one `sparse_sdf` call in a
    fresh one-core process; res a tuple: CPU seconds of one `sparse_sdf_multi` call over them."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_cpu_child, args=(v, f, res, band, sign, q))
    p.start()
    out = q.get()
    p.join()
    return out


def measure_gpu(v, f, res: int, band: float = 2.0, sign: str = "winding", repeats: int = 5,
                chunk: int | None = None, profile: bool = False) -> dict:
    """Median seconds of `sparse_sdf` on CUDA (inputs already on the GPU) and its peak GPU memory; chunk:
    candidate pairs per band chunk (default: the library's); profile: also kernels, host waits and GPU
    busy time of one call (profile_gpu)."""
    vt = torch.as_tensor(v, dtype=torch.float32, device="cuda")
    ft = torch.as_tensor(f, dtype=torch.int64, device="cuda")
    s = sparse_sdf(vt, ft, res, band, sign=sign, chunk=chunk)  # warm-up: Triton compile
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        s = sparse_sdf(vt, ft, res, band, sign=sign, chunk=chunk)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    coords, values = _sample(s)
    out = {"seconds": sorted(times)[repeats // 2], "prepare_s": _cuda_median(lambda: prepare_mesh(vt, ft, sign)),
           "voxels": int(s.coords.shape[0]), "peak_gpu_gib": peak, "coords": coords, "values": values}
    if profile:
        out.update(profile_gpu(lambda: sparse_sdf(vt, ft, res, band, sign=sign, chunk=chunk)))
    return out


def profile_gpu(fn) -> dict:
    """One call under torch.profiler: GPU kernels run (launches), host waits (stream/device synchronize and
    blocking copies), and the GPU's busy milliseconds (kernel time summed)."""
    from torch.profiler import ProfilerActivity, profile

    waits = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaMemcpyAsync", "cudaEventSynchronize"}
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels, busy_us, host = 0, 0.0, {}
        for e in prof.events():
            if str(getattr(e, "device_type", "")).endswith("CUDA"):
                if not e.name.startswith(("Memcpy", "Memset")):
                    kernels += 1
                    busy_us += e.time_range.elapsed_us()
            elif e.name in waits:
                host[e.name] = host.get(e.name, 0) + 1
        return {"kernels": kernels, "gpu_busy_ms": busy_us / 1e3, "host_waits": host}
    except Exception as e:  # the profiler is a diagnostic: the timing above stands without it
        return {"profile_error": f"{type(e).__name__}: {e}"}


def _cuda_median(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[repeats // 2]


def measure_gpu_multi(v, f, resolutions, band: float = 2.0, sign: str = "winding") -> float:
    """Median seconds of one `sparse_sdf_multi` call over the resolutions on CUDA (after a warm-up)."""
    vt = torch.as_tensor(v, dtype=torch.float32, device="cuda")
    ft = torch.as_tensor(f, dtype=torch.int64, device="cuda")
    sparse_sdf_multi(vt, ft, resolutions, band, sign=sign)
    return _cuda_median(lambda: sparse_sdf_multi(vt, ft, resolutions, band, sign=sign))


def measure_accuracy(v, f, res: int, band: float, coords: np.ndarray, values: np.ndarray) -> float:
    """Max |error| in voxel widths of |SDF| on sampled voxels against brute force over all triangles."""
    from kernels.distance import point_triangle_sqdist_reference

    h = 2.0 / res
    tri = torch.as_tensor(v[f], dtype=torch.float64)
    worst = 0.0
    for c, val in zip(coords, values):
        p = torch.as_tensor(-1 + (c + 0.5) * h, dtype=torch.float64).expand(len(tri), 3)
        d = point_triangle_sqdist_reference(p, tri[:, 0], tri[:, 1], tri[:, 2])[0].min().sqrt().item()
        worst = max(worst, abs(abs(float(val)) * band * h - d) / h)
    return worst


def measure_mesh_to_sdf(v, f, res: int, voxels: int, coords: np.ndarray, samples: int = 1_000_000) -> dict:
    """mesh-to-sdf ('sample' surface points, 'normal' sign) on sampled band voxels, extrapolated to the band."""
    import mesh_to_sdf
    import trimesh

    mesh = trimesh.Trimesh(v, f, process=False)
    pts = -1 + (coords.astype(np.float64) + 0.5) * (2.0 / res)
    t = time.process_time()  # CPU time of all threads, comparable with ours on one core
    cloud = mesh_to_sdf.get_surface_point_cloud(mesh, surface_point_method="sample", sample_point_count=samples)
    fixed = time.process_time() - t
    t = time.process_time()
    cloud.get_sdf_in_batches(pts, use_depth_buffer=False)
    per_point = (time.process_time() - t) / len(pts)
    return {"fixed_s": fixed, "us_per_point": per_point * 1e6, "seconds": fixed + per_point * voxels}


def measure_corpus(meshes, res: int, band: float = 2.0) -> dict:
    """CPU seconds per mesh over the corpus in this process (one thread), with failures counted."""
    torch.set_num_threads(1)
    secs, vox, failed = [], 0, []
    for name, v, f in meshes:
        t = time.process_time()
        try:
            vox += sparse_sdf(v, f, res, band).coords.shape[0]
        except ValueError as e:
            failed.append(f"{name}: {e}")
            continue
        secs.append(time.process_time() - t)
    return {"meshes": len(secs), "failed": failed, "mean_s": float(np.mean(secs)), "max_s": float(np.max(secs)),
            "voxels_per_s": vox / sum(secs)}


def _has_mesh_to_sdf() -> bool:
    try:
        import mesh_to_sdf  # noqa: F401
        import trimesh  # noqa: F401
    except ImportError:
        return False
    return True


def measure_rerun(n: int) -> dict:
    """Seconds of `pipeline.preprocess.run` over n mesh files that a previous run finished (sources.parquet
    and manifest.parquet as that run leaves them): every file must be skipped unread, Ray never started."""
    import tempfile

    import pyarrow as pa

    from pipeline import config, storage
    from pipeline.preprocess import SUMMARY_SCHEMA, PreprocessConfig, _sources, _write_table, build_manifest, run

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    root = Path(tempfile.mkdtemp(prefix="s2rerun_"))
    (root / "in").mkdir()
    obj = b"v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 2 3\nf 1 3 4\nf 1 4 2\nf 2 4 3\n"
    for i in range(n):
        sub = root / "in" / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        (sub / f"mesh_{i:06d}.obj").write_bytes(obj + f"# {i}\n".encode())
    cfg = config.from_dict(PreprocessConfig, {"input": str(root / "in"), "output": str(root / "out"), "views": 0})
    rows = [{**dict.fromkeys(SUMMARY_SCHEMA.names), "source_uri": u, "size": size, "stamp": stamp, "status": "ok",
             "config_hash": cfg.row_config_hash(), "content_hash": f"{i:064x}", "voxels": 1000, "faces": 4}
            for i, (u, size, stamp) in enumerate(storage.list_files_with_stamps(cfg.input))]
    summary = pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
    _write_table(_sources(summary, None, cfg), str(root / "out" / "sources.parquet"), {})
    _write_table(build_manifest(cfg), str(root / "out" / "manifest.parquet"), {})
    t, c = time.perf_counter(), time.process_time()
    result = run(cfg, progress=False)
    out = {"files": n, "seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c,
           "counts": result.counts()}
    assert out["counts"]["skipped"] == n, out
    return out


# ---------- table ----------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--res", type=int, nargs="+", default=list(RESOLUTIONS))
    ap.add_argument("--band", type=float, default=2.0)
    ap.add_argument("--mesh", default=None, help="scan_like, scan_smooth, sign:<case of tests/sign_cases.py>, .npz (v, f) "
                    "or a mesh file; default: bunny, else scan_like")
    ap.add_argument("--corpus", default=None, help="sample corpus folder (generated if absent)")
    ap.add_argument("--corpus-res", type=int, default=256)
    ap.add_argument("--no-corpus", action="store_true")
    ap.add_argument("--baseline-points", type=int, default=SAMPLE, help="band voxels given to mesh-to-sdf (0: skip)")
    ap.add_argument("--accuracy-points", type=int, default=50, help="band voxels checked by brute force")
    ap.add_argument("--open", action="store_true", help="cut the mesh open (winding-number sign path)")
    ap.add_argument("--rerun", type=int, default=0, help="only time a rerun over this many finished files")
    ap.add_argument("--chunk", type=int, default=None, help="with --device cuda: band chunk of 2^CHUNK candidate "
                    "pairs (the library's default: what a quarter of the free memory holds, 2^23..2^27; fewer "
                    "chunks launch fewer kernels and use more memory)")
    ap.add_argument("--profile", action="store_true", help="with --device cuda: kernels, host waits and GPU busy "
                    "time of one call (torch.profiler)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if (args.chunk is not None or args.profile) and args.device != "cuda":
        ap.error("--chunk and --profile apply to --device cuda")
    if args.rerun:
        torch.set_num_threads(1)
        r = measure_rerun(args.rerun)
        print(f"rerun over {r['files']:,} finished files, one core: {r['seconds']:.2f} s wall, "
              f"{r['cpu_seconds']:.2f} s CPU, {r['counts']}")
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=1))
        return

    v, f, name = scan_mesh(args.mesh)
    if args.open:
        f, name = opened(v, f), name + "_opened"
    print(f"mesh {name}: {len(f)} faces, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else " (one core)"))
    rows = []
    for res in args.res:
        r = (measure_cpu(v, f, res, args.band) if args.device == "cpu"
             else measure_gpu(v, f, res, args.band, chunk=None if args.chunk is None else 1 << args.chunk,
                              profile=args.profile))
        r["res"] = res
        if "kernels" in r or "profile_error" in r:
            print(f"{res}^3 profile of one call: " + (r.get("profile_error") or f"{r['kernels']} GPU kernels, "
                  f"{r['gpu_busy_ms']:.1f} ms GPU busy, host waits {r['host_waits']}"))
        coords, values = r.pop("coords"), r.pop("values")
        r["max_err_voxel"] = measure_accuracy(v, f, res, args.band, coords[:args.accuracy_points],
                                              values[:args.accuracy_points])
        if args.baseline_points and _has_mesh_to_sdf():
            r["mesh_to_sdf"] = measure_mesh_to_sdf(v, f, res, r["voxels"], coords[:args.baseline_points])
        rows.append(r)

    mem_key = "peak_rss_gib" if args.device == "cpu" else "peak_gpu_gib"
    print(f"\n| res | band voxels | seconds (wall / cpu) | of which mesh prep | Mvoxels/s (cpu) | peak mem (GiB) | max err (voxel) | mesh-to-sdf s (extrap.) | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        m2s = r.get("mesh_to_sdf", {}).get("seconds", float("nan"))
        sec = r.get("cpu_seconds", r["seconds"])  # one thread: CPU time is the wall time of an idle core
        print(f"| {r['res']} | {r['voxels']:,} | {r['seconds']:.3f} / {sec:.3f} | {r['prepare_s']:.3f} | "
              f"{r['voxels'] / sec / 1e6:.2f} | {r[mem_key]:.2f} | {r['max_err_voxel']:.4f} | {m2s:.1f} | {m2s / sec:.0f}x |")
    out = {"mesh": name, "faces": int(len(f)), "device": args.device, "rows": rows}
    if len(args.res) > 1:
        res = tuple(args.res)
        multi = (measure_cpu(v, f, res, args.band)["cpu_seconds"] if args.device == "cpu"
                 else measure_gpu_multi(v, f, res, args.band))
        separate = sum(r.get("cpu_seconds", r["seconds"]) for r in rows)
        out["multi"] = {"resolutions": list(res), "seconds": multi, "separate_seconds": separate}
        print(f"\nsparse_sdf_multi over {list(res)}: {multi:.3f} s (separate calls: {separate:.3f} s)")
    if args.device == "cpu" and not args.no_corpus:
        meshes = corpus_meshes(args.corpus)
        c = measure_corpus(meshes, args.corpus_res, args.band)
        out["corpus"] = c
        print(f"\ncorpus at {args.corpus_res}^3, one thread: {c['meshes']} meshes, mean {c['mean_s']:.2f} s, "
              f"max {c['max_s']:.2f} s, {c['voxels_per_s'] / 1e6:.2f} Mvoxels/s, failed {len(c['failed'])}")
        for line in c["failed"]:
            print("  failed:", line)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
