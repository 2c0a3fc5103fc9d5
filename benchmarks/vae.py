"""SS-VAE throughput and memory on one GPU: voxels per second of the whole forward at 512³,
and peak GPU memory of decoding at 1024³, whole and chunked.

    python benchmarks/vae.py --size paper --res 512 --decode-res 1024 --chunk 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from model.sdf_shapes import AnalyticShape, narrow_band
from model.sparse import SparseTensor
from model.vae import SparseSDFVAE, VAEConfig


def shell(res: int) -> SparseTensor:
    c, v = narrow_band(AnalyticShape("torus", (0.55, 0.3), (0.4, 0.3, 0.2)), res)
    coords = torch.cat([torch.zeros_like(c[:, :1]), c], 1).cuda()
    return SparseTensor(coords, v.cuda()[:, None], res, 1)


def timed(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="paper")
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--decode-res", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=16, help="latent voxels per chunk side when decoding")
    p.add_argument("--json", default="")
    a = p.parse_args()
    torch.manual_seed(0)
    model = SparseSDFVAE(VAEConfig.named(a.size)).cuda().eval()
    out: dict = {"gpu": torch.cuda.get_device_name(), "size": a.size,
                 "params_m": sum(q.numel() for q in model.parameters()) / 1e6}
    x = shell(a.res)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        def fwd():
            z, _, _ = model.encode(SparseTensor(x.coords, x.feats, x.resolution, 1, check=False), sample=False)
            return model.decode(z)

        torch.cuda.reset_peak_memory_stats()
        sec = timed(fwd)
        dec = fwd()
        out.update({"res": a.res, "voxels": len(x), "decoded_voxels": len(dec), "forward_s": sec,
                    "voxels_per_s": len(x) / sec, "forward_peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30})
        print(json.dumps(out), flush=True)
        del dec
        torch.cuda.empty_cache()
        y = shell(a.decode_res)
        z, _, _ = model.encode(y, sample=False)
        out.update({"decode_res": a.decode_res, "decode_input_voxels": len(y), "latent_voxels": len(z)})
        del y
        torch.cuda.empty_cache()
        for label, chunk in (("chunked", a.chunk), ("whole", None)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                t = time.perf_counter()
                d = model.decode(z, chunk=chunk)
                torch.cuda.synchronize()
                out[f"decode_{label}_s"] = time.perf_counter() - t
                out[f"decode_{label}_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
                out["decoded_voxels_1024"] = len(d)
                del d
            except torch.OutOfMemoryError:
                out[f"decode_{label}_peak_gib"] = "out of memory"
            torch.cuda.empty_cache()
            print(json.dumps(out), flush=True)
    for k, v in out.items():
        print(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
