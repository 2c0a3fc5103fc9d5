"""Does the demo's image condition tell the meshes apart from a new camera? Nearest-view retrieval.

The structure DiT of `s2 demo` returns a training mesh's latent voxels at IoU ~0.9 from the views it trained
on and ~0.65-0.72 from new cameras, and more training views a mesh (16 -> 48) did not close the gap
(docs/demo.md). This asks whether the condition itself carries the mesh's identity to a new camera: every
valid mesh of the sample corpus is rendered from `--views` training cameras (as the preprocess job renders
them) and from `--new-views` other cameras (as the demo renders its new views), each view goes through the
frozen encoder exactly as training and serving prepare it (`decode_image`), and each new view is matched to
its nearest training view (L2 over the condition tokens). A DiT that mapped conditions smoothly would do at
least as well from a new view as this lookup does; where the lookup names another mesh, the condition does
not separate them.

    OMP_NUM_THREADS=1 python benchmarks/view_retrieval.py                       # 16 views, 3 new views a mesh
    OMP_NUM_THREADS=1 python benchmarks/view_retrieval.py --views 4,16,48 --encoders tiny-pixels-32,tiny,silhouette

Prints one row per (encoder, views): the IoU of the new view's mesh and the matched view's mesh over the
8³ cells their surfaces pass through (what the structure DiT's latent-voxel IoU scores; 1.0 for the same
mesh, and high for meshes of one outside such as the corpus's spheres), top-1 accuracy (the nearest training view is of the same mesh), top-5
(a view of the same mesh among the five nearest), the share of the same mesh's views among the 5 nearest,
and for the correct matches the azimuth gap to the matched view.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.condition import build_image_encoder, decode_image  # noqa: E402
from model.metrics import sample_surface  # noqa: E402
from pipeline.corpus import generate_corpus  # noqa: E402
from pipeline.geometry.mesh import load_mesh, normalize  # noqa: E402
from pipeline.geometry.render import render_views  # noqa: E402


def surface_cells(vertices, faces, grid: int) -> torch.Tensor:
    """Cells of a grid³ over [-1, 1]³ that the surface passes through (flat indices): the structure stage's
    latent voxels of a 64³ shard are the 8³ cells its narrow band touches, which this approximates."""
    pts = sample_surface(torch.as_tensor(vertices, dtype=torch.float64), torch.as_tensor(faces, dtype=torch.int64),
                         50_000)[0]
    c = ((pts + 1.0) * 0.5 * grid).floor().clamp(0, grid - 1).long()
    return torch.unique((c[:, 0] * grid + c[:, 1]) * grid + c[:, 2])


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    inter = np.intersect1d(a.numpy(), b.numpy()).size
    return inter / (a.numel() + b.numel() - inter)


def render_sets(corpus: Path, entries, n_train: int, n_new: int, size: int, grid: int):
    """{mesh: (training views, new views, surface cells)}, views as lists of (png bytes, azimuth)."""
    out = {}
    for i, e in enumerate(entries):
        path = corpus / e.path
        data = path.read_bytes()
        v, f = load_mesh(data, path.suffix.lstrip("."))
        n = normalize(v, f)
        # training cameras seeded by content (the preprocess job's way), new ones by 1000 + index (the demo's)
        seed = int(hashlib.sha256(data).hexdigest()[:8], 16) % (2**31)
        train = [(r.png(), r.azimuth) for r in render_views(n.vertices, n.faces, n_views=n_train, size=size, seed=seed)]
        new = [(r.png(), r.azimuth) for k in range(n_new)
               for r in render_views(n.vertices, n.faces, n_views=1, size=size, seed=1000 + 97 * i + k)]
        out[Path(e.path).stem] = (train, new, surface_cells(n.vertices, n.faces, grid))
    return out


def features(encoder_spec: str, pngs: list[bytes]) -> torch.Tensor:
    """(N, F) condition of each view as the DiT reads it: the encoder's tokens, flattened."""
    if encoder_spec == "silhouette":  # no encoder: the alpha at 32², the plainest shape signal
        return torch.stack([decode_image(p, 32, with_mask=True)[3].flatten() for p in pngs])
    enc = build_image_encoder(encoder_spec)
    imgs = torch.stack([decode_image(p, enc.image_size, with_mask=True)[:3] for p in pngs])
    with torch.no_grad():
        return torch.cat([enc(imgs[i:i + 64]).flatten(1).float() for i in range(0, len(imgs), 64)])


def score(sets: dict, encoder_spec: str, scored: set | None = None) -> dict:
    """Every mesh's stored views are candidates; the new views of ``scored`` (None: every mesh) are matched."""
    names = sorted(sets)
    train = [(m, png, az) for m in names for png, az in sets[m][0]]
    new = [(m, png, az) for m in names if scored is None or m in scored for png, az in sets[m][1]]
    ft = features(encoder_spec, [p for _, p, _ in train])
    fn = features(encoder_spec, [p for _, p, _ in new])
    d = torch.cdist(fn.double(), ft.double())
    order = d.argsort(1)[:, :5]
    owner = np.array([m for m, _, _ in train])
    top1, top5, share, gaps, cells = [], [], [], [], []
    for i, (m, _, az) in enumerate(new):
        near = owner[order[i].numpy()]
        cells.append(iou(sets[m][2], sets[near[0]][2]))
        top1.append(near[0] == m)
        top5.append(m in near)
        share.append(float(np.mean(near == m)))
        if near[0] == m:
            gap = abs((train[int(order[i, 0])][2] - az + 180.0) % 360.0 - 180.0)
            gaps.append(gap)
    return {"iou": float(np.mean(cells)), "top1": float(np.mean(top1)), "top5": float(np.mean(top5)), "share5": float(np.mean(share)),
            "gap": float(np.median(gaps)) if gaps else float("nan"), "n_new": len(new), "n_train": len(train),
            "wrong": sorted({m for (m, _, _), ok in zip(new, top1) if not ok})}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views", default="16", help="comma list: training views a mesh")
    ap.add_argument("--new-views", type=int, default=3, help="new cameras a mesh")
    ap.add_argument("--encoders", default="tiny-pixels-32,silhouette")
    ap.add_argument("--size", type=int, default=128, help="view side in pixels (the whole demo's 128)")
    ap.add_argument("--meshes", default="",
                    help="comma list: score only these meshes' new views (every mesh's stored views still compete)")
    ap.add_argument("--grid", type=int, default=8, help="cells a side of the IoU (the structure stage's 8³ at 64³)")
    ap.add_argument("--corpus", default="", help="a generated sample corpus (default: generate one, seed 0)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(args.corpus or tmp)
        report = generate_corpus(corpus, seed=0)
        entries = [e for e in report.entries if e.valid]
        rows = []
        for n_train in (int(v) for v in args.views.split(",")):
            t0 = time.perf_counter()
            sets = render_sets(corpus, entries, n_train, args.new_views, args.size, args.grid)
            print(f"rendered {len(entries)} meshes x ({n_train} + {args.new_views}) views in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            for spec in args.encoders.split(","):
                rows.append((spec, n_train, score(sets, spec, set(args.meshes.split(",")) if args.meshes else None)))
    print(f"\n| condition | training views a mesh | new views | {args.grid}³ surface-cell IoU of the match | top-1 same mesh "
          "| top-5 | same mesh among 5 nearest | azimuth gap of correct matches (median) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for spec, n_train, r in rows:
        print(f"| {spec} | {n_train} | {r['n_new']} | {r['iou']:.3f} | {r['top1']:.3f} | {r['top5']:.3f} "
              f"| {r['share5']:.3f} | {r['gap']:.1f}° |")
    for spec, n_train, r in rows:
        print(f"{spec}, {n_train} views: meshes with a wrong top-1 match: {', '.join(r['wrong']) or 'none'}")


if __name__ == "__main__":
    main()
