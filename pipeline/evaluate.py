"""Scoring an asset library against its source meshes: the demo's table.

Each generated mesh is compared with its normalized source (model/metrics.py, 20k points a side):
Chamfer, F1@0.05, how many connected parts it has and whether it is watertight; beside it the same
images through an untrained cascade of the same size and, for the held-out meshes, the trained
cascade given the source's own occupancy as its structure (which separates the structure DiT from
the networks after it).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

NEW_VIEW, HELD_OUT = "training mesh, new view", "held-out mesh"  # the demo library's two sets
F1_AT = 0.05
COLUMNS = ("trained", "untrained", "source_structure")


def mesh_row(vertices, faces, gt: tuple, samples: int = 20_000, cleaned: bool = False) -> dict:
    """Chamfer, F1@0.05, parts before and after the cascade's clean-up, watertightness (after clean-up);
    ``cleaned``: also Chamfer and F1 of the cleaned mesh (``chamfer_clean``, ``f1_clean``)."""
    import numpy as np
    import torch
    import trimesh

    from model.metrics import mesh_metrics
    from model.postprocess import _components, clean_mesh

    v = np.asarray(torch.as_tensor(vertices).detach().cpu(), np.float32)
    f = np.asarray(torch.as_tensor(faces).detach().cpu(), np.int64)
    none = {"chamfer_clean": float("nan"), "f1_clean": 0.0} if cleaned else {}
    if len(f) == 0:
        return {"chamfer": float("nan"), f"f1@{F1_AT:g}": 0.0, "parts": 0, "parts_clean": 0, "watertight": False,
                **none}
    target = (torch.as_tensor(gt[0]), torch.as_tensor(gt[1]))
    m = mesh_metrics((torch.as_tensor(v), torch.as_tensor(f)), target, samples=samples, thresholds=(F1_AT,))
    cv, cf, _ = clean_mesh(v, f)
    mesh = trimesh.Trimesh(cv.astype(np.float64), cf, process=True)
    row = {"chamfer": float(m.chamfer), f"f1@{F1_AT:g}": float(m.fscore[F1_AT]),
           "parts": int(_components(v, f)[0]), "parts_clean": int(_components(cv, cf)[0]),
           "watertight": bool(mesh.is_watertight), **none}
    if cleaned and len(cf):
        mc = mesh_metrics((torch.as_tensor(cv), torch.as_tensor(cf)), target, samples=samples, thresholds=(F1_AT,))
        row.update(chamfer_clean=float(mc.chamfer), f1_clean=float(mc.fscore[F1_AT]))
    return row


def source_structure_cascade():
    """A cascade class whose structure stage is the structure VAE's reconstruction of a given 64³ occupancy.

    It isolates the networks after the structure DiT: with the source mesh's own occupancy, the trained
    structure VAE and the sparse stage alone decide the mesh.
    """
    import torch

    from model.cascade import Cascade
    from model.structure import occupancy_probabilities

    class SourceStructureCascade(Cascade):
        occupancy = None  # (64, 64, 64) bool of the item being generated

        @torch.no_grad()
        def structure_occupancy(self, cond, seeds):
            if self.occupancy is None or len(seeds) != 1:
                raise ValueError("SourceStructureCascade generates one item at a time, after setting .occupancy")
            occ = self.occupancy[None, None].to(self.device, torch.float32)
            logits = self.structure_vae.decode(self.structure_vae.encode(occ)[1])
            return [occupancy_probabilities(logits[0])]

    return SourceStructureCascade


def score_library(library: Path, images: Path, meshes: dict, generation: dict, sets: dict[str, str],
                  untrained_vae: bool = False) -> list[dict]:
    """One row per mesh: the library's result, an untrained cascade's and (held-out meshes) the trained
    cascade on the source's own occupancy, each as ``mesh_row`` columns prefixed by the column name.

    The untrained cascade decodes pooled latents unless ``untrained_vae``: an untrained SS-VAE's output
    layer is zero, so it decodes SDF 0 everywhere and has no surface to score."""
    from model.cascade import Cascade, GenerationConfig, Request
    from model.postprocess import read_mesh_bytes
    from model.structure import occupancy_grid
    from pipeline.geometry.sdf import sparse_sdf

    nets = ("structure_vae", "structure_dit", "dit", "vae")
    cfg = GenerationConfig(**{k: v for k, v in generation.items() if k not in nets})
    untrained = Cascade.random(dataclasses.replace(cfg), size="debug", seed=0, with_vae=untrained_vae)
    given = source_structure_cascade().from_checkpoints(GenerationConfig(**generation))
    records = {r["name"]: r for r in (json.loads(p.read_text()) for p in (library / "records").glob("*.json"))}
    rows = []
    for name in sorted(meshes, key=lambda n: (sets[n] != NEW_VIEW, n)):
        rec = records.get(name, {})
        row = {"name": name, "set": sets[name]}
        if rec.get("status") == "ok":
            v, f = read_mesh_bytes((library / rec["mesh"]).read_bytes(), rec["format"])
            row.update(_prefixed("trained", mesh_row(v, f, meshes[name])))
        request = Request(name, (images / f"{name}.png").read_bytes(), rec.get("seed", 0))
        base = untrained.generate([request])[0]
        if base.ok:
            row.update(_prefixed("untrained", mesh_row(base.vertices, base.faces, meshes[name])))
        if sets[name] == HELD_OUT:
            given.occupancy = occupancy_grid(sparse_sdf(*meshes[name], cfg.resolution).coords, cfg.resolution)
            out = given.generate([request])[0]
            if out.ok:
                row.update(_prefixed("source_structure", mesh_row(out.vertices, out.faces, meshes[name])))
        rows.append(row)
    return rows


def _prefixed(prefix: str, row: dict) -> dict:
    return {(prefix if k == "chamfer" else f"{prefix}_{k}"): v for k, v in row.items()}


def _mean(xs) -> float:
    xs = [float(x) for x in xs if x is not None and x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per set: mean Chamfer of each column, mean F1, the most parts, watertight count, and on how many items
    the trained cascade beats the untrained one."""
    nan = float("nan")
    out = {}
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == name]
        m = {k: _mean(r.get(k) for r in mine) for k in COLUMNS}
        m["trained_f1"] = _mean(r.get(f"trained_f1@{F1_AT:g}") for r in mine)
        m["untrained_f1"] = _mean(r.get(f"untrained_f1@{F1_AT:g}") for r in mine)
        m["trained_parts_max"] = max((r.get("trained_parts_clean", 0) for r in mine), default=0)
        m["trained_watertight"] = sum(bool(r.get("trained_watertight")) for r in mine)
        m["trained_better"] = sum(r.get("trained", nan) < r.get("untrained", nan) for r in mine)
        m["items"] = len(mine)
        out[name] = m
    return out


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Generated meshes against their sources (Chamfer: lower is better; F1@{F1_AT:g}; parts after clean-up)")
    fmt = lambda x: "-" if x is None or x != x else f"{x:.4f}"  # noqa: E731
    for c in ("mesh", "set", "trained", f"F1@{F1_AT:g}", "parts", "watertight", "untrained", "trained, source occupancy"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], r["set"], fmt(r.get("trained")), fmt(r.get(f"trained_f1@{F1_AT:g}")),
                  str(r.get("trained_parts_clean", "-")), "yes" if r.get("trained_watertight") else "no",
                  fmt(r.get("untrained")), fmt(r.get("source_structure")))
    for name, m in summarize(rows).items():
        t.add_row(f"mean ({m['trained_better']}/{m['items']} better)", name, fmt(m["trained"]), fmt(m["trained_f1"]),
                  f"≤ {m['trained_parts_max']}", f"{m['trained_watertight']}/{m['items']}", fmt(m["untrained"]),
                  fmt(m["source_structure"]))
    Console().print(t)


def preview_strip(library: Path, rows: list[dict], out: Path, side: int = 160) -> Path:
    """A PNG of the library's items in table order: each input image above its preview, named and scored.

    What README shows of the demo (docs/img/demo-strip.png is this file from a demo run)."""
    from PIL import Image, ImageDraw

    records = {r["name"]: r for r in (json.loads(p.read_text()) for p in (library / "records").glob("*.json"))}
    shown = [(r, records[r["name"]]) for r in rows if records.get(r["name"], {}).get("status") == "ok"]
    label = 30
    sheet = Image.new("RGB", (max(1, len(shown)) * side, 2 * side + label), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (row, rec) in enumerate(shown):
        for j, key in enumerate(("input", "preview")):
            if rec.get(key):
                with Image.open(library / rec[key]) as im:
                    im = im.convert("RGBA")
                    im.thumbnail((side, side))
                    tile = Image.new("RGBA", (side, side), "white")
                    tile.alpha_composite(im, ((side - im.width) // 2, (side - im.height) // 2))
                    sheet.paste(tile.convert("RGB"), (i * side, j * side))
        held = "held out" if row["set"] == HELD_OUT else "new view"
        draw.text((i * side + 4, 2 * side + 2), f"{row['name']} ({held})", fill="black")
        draw.text((i * side + 4, 2 * side + 15), f"Chamfer {row.get('trained', float('nan')):.3f}", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG", optimize=True)
    return out
