"""The library's static HTML gallery: per asset the input image, the preview from the input's camera and a
rotatable 3D view of the mesh, with the facts a person needs to judge it.

Files beside the library (``<library>/``): ``gallery.html`` (style and scripts inline, from
``pipeline/static/``), ``inputs/<asset_id>.png`` (the input, scaled down), ``previews/<asset_id>.png`` and
``viewer/<asset_id>.js``: the mesh for the 3D view (16-bit positions and triangle indices, base64) as one
call ``S2Viewer.mesh(...)``. A script file, not a fetch: browsers refuse fetch() of local files, so the page
opens from a file as well as from an S3 website or any static host, with nothing from outside.
"""
from __future__ import annotations

import base64
import html
import io
import json
import posixpath
from datetime import datetime, timezone
from importlib import resources

import numpy as np

VIEWER_FACES = 100_000  # the 3D view gets a vertex-clustered copy above this (a few MB of script at most)
INPUT_SIDE = 512  # longest side of the input copy the page shows

NOTE = ("Meshes are untextured (geometry only) and normalised to [-1, 1]<sup>3</sup>. The preview is rendered "
        "from the input's camera where the input carries it (views of the sample corpus); for other images "
        "(photos) from the front camera of glTF's convention: on +Z looking at the origin, +Y up, 40&deg; "
        "field of view.")


def _static(name: str) -> str:
    return resources.files("pipeline").joinpath("static", name).read_text(encoding="utf-8")


def save_input(lib, asset_id: str, image: bytes) -> str | None:
    """``inputs/<asset_id>.png``: the input image with its longest side at most INPUT_SIDE; None when it does
    not decode (the item's own error says why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as im:
            im.thumbnail((INPUT_SIDE, INPUT_SIDE))
            im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
    except Exception:  # any undecodable input: the page shows that the input is missing
        return None
    rel = f"inputs/{asset_id}.png"
    lib.write(rel, buf.getvalue())
    return rel


def mesh_facts(vertices: np.ndarray, faces: np.ndarray) -> dict:
    """Faces, vertices, connected parts and whether the surface is closed (coincident vertices merged)."""
    import trimesh

    m = trimesh.Trimesh(np.asarray(vertices, np.float64), np.asarray(faces, np.int64), process=True)
    return {"faces": int(len(faces)), "vertices": int(len(vertices)), "components": int(m.body_count),
            "watertight": bool(m.is_watertight)}


def _cluster_on_grid(v: np.ndarray, f: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """One vertex per occupied cell of a cells^3 grid over the mesh (the mean of its vertices); faces
    that collapse or repeat are dropped."""
    lo = v.min(0)
    size = max(float((v.max(0) - lo).max()), 1e-12) / cells
    ijk = np.minimum(((v - lo) / size).astype(np.int64), cells - 1)
    cell, inv = np.unique((ijk[:, 0] * cells + ijk[:, 1]) * cells + ijk[:, 2], return_inverse=True)
    count = np.bincount(inv, minlength=len(cell))[:, None]
    pos = np.stack([np.bincount(inv, weights=v[:, d], minlength=len(cell)) for d in range(3)], 1) / count
    g = inv.reshape(-1)[f]
    g = g[(g[:, 0] != g[:, 1]) & (g[:, 1] != g[:, 2]) & (g[:, 0] != g[:, 2])]
    s = np.sort(g, axis=1)
    pair = s[:, 0] * len(cell) + s[:, 1]
    order = np.lexsort((s[:, 2], pair))
    pair, last = pair[order], s[order, 2]
    repeat = np.zeros(len(order), bool)
    repeat[1:] = (pair[1:] == pair[:-1]) & (last[1:] == last[:-1])
    used, g = np.unique(g[np.sort(order[~repeat])], return_inverse=True)
    return pos[used], g.reshape(-1, 3)


def coarsen(vertices: np.ndarray, faces: np.ndarray, max_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_faces`` faces (or what a 2^3 grid leaves) by vertex clustering, for the 3D view: a
    surface's face count goes with the square of the grid, so the grid is scaled by sqrt(target / faces)
    until it fits (two or three passes; 2.5 s for a 1.3M-face sphere on one shared core)."""
    v, f = np.asarray(vertices, np.float64), np.asarray(faces, np.int64)
    cells = 1024
    while len(f) > max_faces:
        cv, cf = _cluster_on_grid(v, f, cells)
        if len(cf) <= max_faces or cells <= 2:
            return cv, cf
        cells = max(2, min(cells - 1, int(cells * 0.97 * (max_faces / len(cf)) ** 0.5)))
    return v, f


def viewer_script(asset_id: str, vertices: np.ndarray, faces: np.ndarray, max_faces: int = VIEWER_FACES) -> bytes:
    """The mesh as one ``S2Viewer.mesh(id, meta, base64)`` call (see ``pipeline/static/viewer.js``)."""
    v, f = coarsen(vertices, faces, max_faces)
    lo, hi = v.min(0), v.max(0)
    scale = max(float((hi - lo).max()), 1e-9)
    q = np.rint((v - lo) / scale * 65535).astype("<u2")
    pos = q.tobytes() + b"\0" * ((-q.nbytes) % 4)
    idx = f.astype("<u2" if len(v) < 65536 else "<u4")
    centre = (lo + hi) / 2
    meta = {"vertices": len(v), "faces": len(f), "index": "u16" if idx.dtype.itemsize == 2 else "u32",
            "lo": [round(float(x), 7) for x in lo], "scale": scale, "centre": [round(float(x), 7) for x in centre],
            "reach": float(np.linalg.norm(v - centre, axis=1).max())}
    data = base64.b64encode(pos + idx.tobytes()).decode("ascii")
    return f"S2Viewer.mesh({json.dumps(asset_id)}, {json.dumps(meta)}, \"{data}\");\n".encode()


def write_asset_view(lib, asset_id: str, mesh: bytes, fmt: str) -> dict:
    """Writes ``viewer/<asset_id>.js``; returns the record fields: the viewer path and the mesh's facts.

    Never raises for a mesh it cannot read or measure: the asset is still a good mesh, so its card says
    why the 3D view is missing (``viewer_error``) instead."""
    from model.postprocess import read_mesh_bytes

    try:
        v, f = read_mesh_bytes(mesh, fmt)
        facts = mesh_facts(v, f)
        script = viewer_script(asset_id, v, f)
    except Exception as e:  # noqa: BLE001 - whatever the loaders raise, the item keeps its mesh and preview
        return {"viewer": None, "viewer_error": f"{type(e).__name__}: {e}"[:200]}
    rel = f"viewer/{asset_id}.js"
    lib.write(rel, script)
    return {"viewer": rel, "viewer_faces": min(len(f), VIEWER_FACES), **facts}


def _camera_caption(cam: dict | None) -> tuple[str, float, float]:
    """What the preview's caption says about its camera, and the 3D view's first angles."""
    if cam is None:  # a library written before cameras were recorded: previews from a fixed three-quarter view
        return "preview from a fixed camera (elevation 20&deg;, azimuth 35&deg;)", 20.0, 35.0
    el, az = float(cam["elevation"]), float(cam["azimuth"])
    where = "the input's camera" if cam.get("source") == "image" else "the front camera (the input has none)"
    # the 3D view opens 45 degrees round from the preview and at least 20 degrees up: a second look at once
    return f"preview from {where}: elevation {el:.0f}&deg;, azimuth {az:.0f}&deg;", max(el, 20.0), az + 45.0


def _fact(name: str, value) -> str:
    return f"<dt>{html.escape(name)}</dt><dd>{value}</dd>"


def _yes_no(value) -> str:
    return "&ndash;" if value is None else ("yes" if value else "no")


def _input_panel(row: dict) -> str:
    e = html.escape
    if row.get("input"):
        return (f'<figure><img class="input" src="{e(row["input"])}" alt="input" loading="eager">'
                f'<figcaption>input image</figcaption></figure>')
    return '<figure><div class="missing">input not in the library</div><figcaption>input image</figcaption></figure>'


def _card(row: dict) -> str:
    e = html.escape
    aid = e(row["asset_id"])
    head = f'<div class="asset {e(row["status"])}" data-asset="{aid}" data-status="{e(row["status"])}">'
    if row["status"] != "ok":
        facts = (_fact("seed", row["seed"]) + _fact("source", e(row["source"])))
        return (f'{head}{_input_panel(row)}<div class="facts"><h2>{e(row.get("name") or aid)}</h2>'
                f'<div class="err">{e(row["error"] or "failed")}</div><dl>{facts}</dl></div></div>')
    caption, el, az = _camera_caption(row.get("camera"))
    preview = (f'<figure><img class="preview" src="{e(row["preview"])}" alt="preview" loading="eager">'
               f'<figcaption>{caption}</figcaption></figure>')
    if row.get("viewer"):
        view = (f'<figure><canvas class="view" width="256" height="256" data-asset="{aid}" '
                f'data-mesh="{e(row["viewer"])}" data-elevation="{el:.3f}" data-azimuth="{az:.3f}"></canvas>'
                f'<figcaption>3D: drag to orbit, wheel to zoom, double-click to reset'
                f'<span class="viewnote"></span></figcaption></figure>')
    else:
        why = e(row.get("viewer_error") or "")
        view = f'<figure><div class="missing">no 3D view</div><figcaption>3D {why}</figcaption></figure>'
    shown = row.get("viewer_faces")
    faces = f'{row["faces"]:,}' + (f" (3D view: {shown:,})" if shown and shown < row["faces"] else "")
    facts = (_fact("seed", row["seed"]) + _fact("faces", faces)
             + _fact("parts", row["components"] if row.get("components") is not None else "&ndash;")
             + _fact("watertight", _yes_no(row.get("watertight")))
             + _fact("seconds", f'{row["seconds"]:.1f}')
             + _fact("mesh", f'<a href="{e(row["mesh"])}">{e(posixpath.basename(row["mesh"]))}</a>')
             + _fact("source", e(row["source"])))
    return (f'{head}{_input_panel(row)}{preview}{view}<div class="facts"><h2>{e(row.get("name") or aid)}</h2>'
            f'<dl>{facts}</dl></div></div>')


def gallery_html(rows: list[dict], title: str = "s2ray asset library") -> str:
    """The page for library records (asset_id, name, status, input, preview, viewer, camera, mesh, seed, faces,
    components, watertight, seconds, error, source); the fields added with the 3D view may be missing."""
    rows = sorted(rows, key=lambda r: (r["status"] != "ok", r["asset_id"]))
    ok = sum(r["status"] == "ok" for r in rows)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cards = "\n".join(_card(r) for r in rows)
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_static("gallery.css")}</style></head><body data-assets="{len(rows)}">'
            f'<h1>{html.escape(title)}</h1><div class="summary">{ok} meshes, {len(rows) - ok} failed · {stamp}</div>'
            f'<div class="note">{NOTE}</div>\n{cards}\n'
            f'<script>{_static("viewer.js")}</script><script>{_static("gallery.js")}</script></body></html>')


def write_gallery(lib, rows: list[dict], title: str) -> None:
    """``gallery.html`` for the records; a mesh recorded without its 3D view (a library written before the
    view existed) gets ``viewer/<asset_id>.js`` now."""
    rows = [dict(r) for r in rows]
    for r in rows:
        if r["status"] != "ok" or "viewer" in r or not r.get("mesh"):
            continue
        rel = f"viewer/{r['asset_id']}.js"
        try:
            if lib.fs.exists(posixpath.join(lib.path, rel)):
                r["viewer"] = rel
            else:
                mesh = lib.fs.cat_file(posixpath.join(lib.path, r["mesh"]))
                r.update(write_asset_view(lib, r["asset_id"], mesh, r.get("format") or r["mesh"].rsplit(".", 1)[-1]))
        except (OSError, ValueError):  # a mesh that cannot be read keeps its card, without the 3D view
            continue
    lib.write("gallery.html", gallery_html(rows, title).encode())
