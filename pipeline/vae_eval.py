"""SS-VAE reconstruction evaluation: encode, decode, extract meshes, compare with the input SDF's mesh.

A sample is a shard sample (``pipeline.shards.SparseSDFSample``: ``mesh_id``, ``coords`` (N, 3),
``values`` (N,), ``resolution``). The training loop runs it on the shapes it holds out
(``TrainConfig.holdout``); ``s2 eval-vae`` on any checkpoint.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table

from model.mesh_extract import extract_mesh
from model.metrics import mesh_metrics
from model.sparse import SparseTensor
from model.vae import SparseSDFVAE

THRESHOLDS = (0.005, 0.001)


@torch.no_grad()
def reconstruct(model: SparseSDFVAE, sample, device: torch.device | str = "cpu", chunk: int | None = None):
    """Decoded SDF of one sample: (coords (M, 3), values (M,)) at the sample's resolution."""
    if not bool(torch.isfinite(sample.values).all()):
        raise ValueError(f"{sample.mesh_id}: the SDF holds NaN or infinite values")
    model.eval()
    x = SparseTensor.from_samples([sample.coords], [sample.values.float()], sample.resolution, device)
    z, _, _ = model.encode(x, sample=False)
    out = model.decode(z, chunk=chunk)
    return out.coords[:, 1:], out.feats[:, 0].float()


def evaluate_one(model: SparseSDFVAE, sample, points: int = 20000, device="cpu", chunk: int | None = None) -> dict:
    """Metrics of one sample's reconstruction against the mesh of its input SDF (same extractor, same resolution)."""
    t0 = time.time()
    coords, values = reconstruct(model, sample, device, chunk)
    # extraction runs where the decoded SDF is (the GPU when there is one)
    gt = extract_mesh(sample.coords.to(coords.device), sample.values.to(coords.device), sample.resolution)
    row = {"name": sample.mesh_id, "voxels": int(sample.coords.shape[0]), "decoded_voxels": int(coords.shape[0])}
    pred = extract_mesh(coords, values, sample.resolution)
    if pred[1].shape[0] == 0:
        # nothing decoded crosses zero: the worst score, not a crash
        row.update({"chamfer": float("inf"), "normal_consistency": 0.0, **{f"f1@{t:g}": 0.0 for t in THRESHOLDS}})
    else:
        row.update(mesh_metrics(pred, gt, points, THRESHOLDS).row())
    row["seconds"] = time.time() - t0
    return row


def summarize(rows: list[dict]) -> dict:
    """Means over samples; Chamfer over the samples whose reconstruction has a surface (the rest are counted)."""
    if not rows:
        return {}
    out = {k: sum(r[k] for r in rows) / len(rows) for k in ["normal_consistency"] + [f"f1@{t:g}" for t in THRESHOLDS]}
    finite = [r["chamfer"] for r in rows if r["chamfer"] != float("inf")]
    out["chamfer"] = sum(finite) / len(finite) if finite else float("inf")
    out["no_surface"] = len(rows) - len(finite)
    return out


def evaluate(model: SparseSDFVAE, samples, points: int = 20000, device="cpu", chunk: int | None = None) -> dict:
    """Mean metrics over samples, with the per-sample rows under "rows"."""
    rows = [evaluate_one(model, s, points, device, chunk) for s in samples]
    return {**summarize(rows), "rows": rows}


def print_table(result: dict, title: str = "SS-VAE reconstruction") -> None:
    table = Table(title=title)
    cols = ["name", "voxels", "chamfer", "f1@0.005", "f1@0.001", "normal_consistency"]
    for c in cols:
        table.add_column(c, justify="left" if c == "name" else "right")
    fmt = lambda v: f"{v:.5f}" if isinstance(v, float) else str(v)  # noqa: E731
    for r in result.get("rows", []):
        table.add_row(*[fmt(r[c]) for c in cols])
    if result.get("rows"):
        label = "mean" + (f" ({result['no_surface']} without a surface)" if result.get("no_surface") else "")
        table.add_row(label, "", *[fmt(result[c]) for c in cols[2:]], style="bold")
    Console().print(table)
