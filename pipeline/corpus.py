"""A deterministic sample mesh corpus for tests, examples and benchmarks (`s2 corpus`).

Every mesh is built in code from a seeded generator, so the same seed writes
byte-identical files (given the same trimesh, numpy and manifold3d): primitives, boolean combinations
(trimesh with the manifold3d engine), tori and higher genus, thin plates, open
surfaces, nested and double-walled shells and multi-part GLB scenes with node
transforms, in OBJ, PLY, STL, OFF and GLB, plus broken files that a loader must
reject with a clear error. About half the meshes are moved off-centre and
rescaled so that normalization is exercised. Where pymeshlab is installed, its
copy of the scanned Stanford bunny is added too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import trimesh

from pipeline import corpus_shapes as shapes

FORMATS = ("obj", "ply", "stl", "off", "glb")
KINDS = ("primitive", "boolean", "genus", "thin_plate", "open", "nested_shell", "multi_part", "scanned")
SCALES = ("sample", "large")

BUNNY_LICENSE = (
    "Stanford Bunny, Stanford 3D Scanning Repository (Stanford University Computer Graphics "
    "Laboratory): free for research use, acknowledge the source. Copied at generation time from "
    "the test data of the installed pymeshlab package (GPL-3.0); not redistributed by this project."
)


@dataclass(frozen=True)
class CorpusEntry:
    """One file of the corpus; `path` is relative to the corpus directory."""

    path: str
    kind: str
    format: str
    valid: bool
    description: str
    sha256: str
    expected_error: str | None = None  # for broken files: one of BROKEN_ERRORS
    faces: int = 0
    vertices: int = 0
    parts: int = 1
    watertight: bool | None = None
    centred: bool = True  # False: randomly offset, rotated and scaled, so normalization matters
    source: str = "generated"
    license: str | None = None


@dataclass
class CorpusReport:
    """What `generate_corpus` wrote; `corpus.json` in the corpus directory holds the same."""

    out_dir: str
    seed: int
    scale: str
    entries: list[CorpusEntry] = field(default_factory=list)

    @property
    def valid(self) -> list[CorpusEntry]:
        return [e for e in self.entries if e.valid]

    @property
    def broken(self) -> list[CorpusEntry]:
        return [e for e in self.entries if not e.valid]

    def to_json(self) -> dict:
        # out_dir is left out so the index is byte-identical wherever it is written
        return {"seed": self.seed, "scale": self.scale, "entries": [asdict(e) for e in self.entries]}

    def summary(self) -> dict[str, dict[str, int]]:
        """Counts of valid meshes per kind and format, and broken files per expected error."""
        out: dict[str, dict[str, int]] = {"kind": {}, "format": {}, "broken": {}}
        for e in self.entries:
            if e.valid:
                out["kind"][e.kind] = out["kind"].get(e.kind, 0) + 1
                out["format"][e.format] = out["format"].get(e.format, 0) + 1
            else:
                out["broken"][e.expected_error] = out["broken"].get(e.expected_error, 0) + 1
        return out


# (name, kind, builder(rng, res) -> Trimesh | Scene, description). Scenes are always GLB.
Recipe = tuple[str, str, Callable[[np.random.Generator, int], "trimesh.Trimesh | trimesh.Scene"], str]

RECIPES: list[Recipe] = [
    ("box_12_faces", "primitive", shapes.box_plain, "unit box with only 12 large triangles"),
    ("box_elongated", "primitive", shapes.box_elongated, "subdivided 2 x 0.5 x 0.3 box"),
    ("icosphere", "primitive", shapes.icosphere, "icosphere, 3 subdivisions"),
    ("uv_sphere", "primitive", shapes.uv_sphere, "latitude-longitude sphere with pole fans"),
    ("ellipsoid", "primitive", shapes.ellipsoid, "anisotropically scaled icosphere"),
    ("cylinder", "primitive", shapes.cylinder, "capped cylinder"),
    ("cone", "primitive", shapes.cone, "capped cone with a sharp apex"),
    ("capsule", "primitive", shapes.capsule, "capsule (cylinder with hemispherical caps)"),
    ("icosahedron", "primitive", shapes.icosahedron, "20-face icosahedron"),
    ("vase", "primitive", shapes.vase, "closed surface of revolution with a wavy profile"),
    ("box_minus_sphere", "boolean", shapes.box_minus_sphere, "cube with a spherical bite at one corner"),
    ("box_union_sphere", "boolean", shapes.box_union_sphere, "cube fused with a sphere"),
    ("rounded_cube", "boolean", shapes.rounded_cube, "intersection of a cube and a sphere"),
    ("cylinder_cross", "boolean", shapes.cylinder_cross, "union of three orthogonal cylinders"),
    ("die", "boolean", shapes.die, "cube with spherical pips carved into its faces"),
    ("bracket", "boolean", shapes.bracket, "L bracket with two bolt holes"),
    ("mug", "boolean", shapes.mug, "hollowed cylinder with a torus handle"),
    ("gear", "boolean", shapes.gear, "toothed disk with an axle hole"),
    ("torus", "genus", shapes.torus, "torus, genus 1"),
    ("thin_torus", "genus", shapes.thin_torus, "torus with a thin tube"),
    ("double_torus", "genus", shapes.double_torus, "union of two overlapping tori, genus 2"),
    ("triple_torus", "genus", shapes.triple_torus, "union of three tori in a row, genus 3"),
    ("plate_four_holes", "genus", shapes.plate_four_holes, "thick plate with four through holes, genus 4"),
    ("linked_rings", "genus", shapes.linked_rings, "two interlocked tori (separate components)"),
    ("trefoil_knot", "genus", shapes.trefoil_knot, "closed tube along a trefoil knot"),
    ("thin_plate", "thin_plate", shapes.thin_plate, "2 x 2 x 0.02 plate"),
    ("thin_disk", "thin_plate", shapes.thin_disk, "disk 0.015 thick"),
    ("curved_shell", "thin_plate", shapes.curved_shell, "thin curved panel (solidified cylinder patch)"),
    ("slotted_plate", "thin_plate", shapes.slotted_plate, "thin plate with a row of holes"),
    ("heat_sink", "thin_plate", shapes.heat_sink, "base block with eight thin fins"),
    ("hemisphere", "open", shapes.hemisphere, "open hemisphere (one boundary loop)"),
    ("open_tube", "open", shapes.open_tube, "cylinder without caps, inside visible"),
    ("terrain", "open", shapes.terrain, "height-field sheet"),
    ("open_box", "open", shapes.open_box, "box without a lid"),
    ("moebius", "open", shapes.moebius, "Moebius strip (non-orientable)"),
    ("holey_sphere", "open", shapes.holey_sphere, "sphere with faces removed in patches"),
    ("cloth", "open", shapes.cloth, "wavy draped sheet"),
    ("hollow_sphere", "nested_shell", shapes.hollow_sphere, "sphere with an inward-facing inner shell"),
    ("double_walled_box", "nested_shell", shapes.double_walled_box, "box with an inverted inner box"),
    ("concentric_spheres", "nested_shell", shapes.concentric_spheres, "three outward-facing nested spheres"),
    ("double_walled_cup", "nested_shell", shapes.double_walled_cup, "cup with inner and outer walls"),
    ("nested_parts", "nested_shell", shapes.nested_parts, "sphere in a torus in a box, disjoint"),
    ("table", "multi_part", shapes.table, "top and four instanced legs"),
    ("chair", "multi_part", shapes.chair, "seat, back and legs in a node hierarchy"),
    ("snowman", "multi_part", shapes.snowman, "stacked spheres with a cone nose"),
    ("molecule", "multi_part", shapes.molecule, "atoms and bonds"),
    ("box_stack", "multi_part", shapes.box_stack, "rotated boxes stacked up"),
    ("robot_arm", "multi_part", shapes.robot_arm, "three-level hierarchy with scaled links"),
    ("lamp", "multi_part", shapes.lamp, "base, pole and an open conical shade"),
]

BROKEN_ERRORS = {
    "truncated": "binary file cut short: the header promises more data than the file holds",
    "garbage": "random bytes under a mesh extension",
    "empty_file": "zero-byte file",
    "nan_vertices": "some vertex coordinates are NaN",
    "face_index_out_of_range": "a face refers to a vertex index past the vertex list",
    "no_faces": "vertices only (a point cloud), no faces",
    "degenerate_faces": "every face has zero area",
    "unknown_extension": "a valid OBJ under an extension no mesh loader knows",
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(out: Path, rel: str, data: bytes) -> str:
    """Write atomically (temporary name, then rename) and return the content hash.

    A file that already holds these bytes is left alone, so a re-run keeps its timestamps."""
    path = out / rel
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return _sha256(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return _sha256(data)


def _export(geom: trimesh.Trimesh | trimesh.Scene, fmt: str) -> bytes:
    data = geom.export(file_type=fmt)
    return data.encode() if isinstance(data, str) else bytes(data)


def _counts(geom: trimesh.Trimesh | trimesh.Scene) -> tuple[int, int, int, bool | None]:
    """Faces, vertices, parts and watertightness of what a loader will see after flattening."""
    if isinstance(geom, trimesh.Scene):
        flat = geom.to_mesh()
        return len(flat.faces), len(flat.vertices), len(geom.graph.nodes_geometry), None
    parts = len(geom.split(only_watertight=False))
    return len(geom.faces), len(geom.vertices), parts, bool(geom.is_watertight)


def _mesh_entry(out: Path, rel: str, kind: str, description: str, geom, data: bytes, **extra) -> CorpusEntry:
    faces, verts, parts, watertight = _counts(geom)
    fmt = rel.rsplit(".", 1)[-1]
    return CorpusEntry(
        path=rel,
        kind=kind,
        format=fmt,
        valid=True,
        description=description,
        sha256=_write(out, rel, data),
        faces=faces,
        vertices=verts,
        parts=parts,
        watertight=watertight,
        **extra,
    )


def _place(geom, rng: np.random.Generator) -> bool:
    """Half the meshes keep their modelling frame, half get a random similarity; True if kept."""
    centred = bool(rng.random() < 0.5)
    if not centred:
        geom.apply_transform(shapes.random_similarity(rng))
    return centred


def _valid_entries(out: Path, rng: np.random.Generator, scale: str) -> list[CorpusEntry]:
    variants, res = (1, 1) if scale == "sample" else (3, 2)
    entries = []
    fmt_cursor = 0
    for variant in range(variants):
        suffix = "" if variants == 1 else f"_v{variant}"
        for name, kind, build, description in RECIPES:
            geom = build(rng, res)
            centred = _place(geom, rng)
            if isinstance(geom, trimesh.Scene):
                fmt = "glb"
            else:
                fmt = FORMATS[fmt_cursor % len(FORMATS)]
                fmt_cursor += 1
            rel = f"{kind}/{name}{suffix}.{fmt}"
            entries.append(_mesh_entry(out, rel, kind, description, geom, _export(geom, fmt), centred=centred))
        entries += _encoding_entries(out, rng, res, suffix)
    return entries


def _encoding_entries(out: Path, rng: np.random.Generator, res: int, suffix: str) -> list[CorpusEntry]:
    """Encodings trimesh's default writers never produce but real libraries hold: ASCII STL, ASCII PLY, quad OBJ."""
    capsule = shapes.capsule(rng, res)
    c1 = _place(capsule, rng)
    cone = shapes.cone(rng, res)
    c2 = _place(cone, rng)
    vertices, quads = shapes.torus_quads(res)
    quad_mesh = trimesh.Trimesh(vertices, np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]]))
    c3 = _place(quad_mesh, rng)
    quad_obj = _obj_text(np.asarray(quad_mesh.vertices), quads)
    return [
        _mesh_entry(
            out,
            f"primitive/capsule_ascii{suffix}.stl",
            "primitive",
            "capsule as ASCII STL",
            capsule,
            trimesh.exchange.stl.export_stl_ascii(capsule).encode(),
            centred=c1,
        ),
        _mesh_entry(
            out,
            f"primitive/cone_ascii{suffix}.ply",
            "primitive",
            "cone as ASCII PLY",
            cone,
            trimesh.exchange.ply.export_ply(cone, encoding="ascii"),
            centred=c2,
        ),
        _mesh_entry(
            out,
            f"genus/torus_quads{suffix}.obj",
            "genus",
            "torus written with quad faces",
            quad_mesh,
            quad_obj,
            centred=c3,
        ),
    ]


def _scanned_entries(out: Path, scale: str) -> list[CorpusEntry]:
    """The Stanford bunny shipped inside pymeshlab's wheel; nothing when pymeshlab is absent."""
    spec = importlib.util.find_spec("pymeshlab")  # locate only: importing loads a large native library
    if spec is None or not spec.submodule_search_locations:
        return []
    name = "bunny.obj" if scale == "large" else "bunny10k_textured.obj"
    src = Path(list(spec.submodule_search_locations)[0]) / "tests" / "sample_meshes" / name
    if not src.is_file():
        return []
    with open(src, "rb") as f:
        loaded = trimesh.load(f, file_type="obj", force="mesh", process=False)
    # drop the texture reference so the corpus file is self-contained
    mesh = trimesh.Trimesh(vertices=np.asarray(loaded.vertices), faces=np.asarray(loaded.faces), process=True)
    return [
        _mesh_entry(
            out,
            "scanned/stanford_bunny.ply",
            "scanned",
            f"scanned Stanford bunny ({len(mesh.faces)} faces)",
            mesh,
            _export(mesh, "ply"),
            centred=False,
            source=f"pymeshlab/tests/sample_meshes/{name}",
            license=BUNNY_LICENSE,
        )
    ]


def _obj_text(vertices: np.ndarray, faces: np.ndarray) -> bytes:
    """Minimal OBJ: positions and faces of any arity (1-based indices)."""
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    lines += ["f " + " ".join(str(i + 1) for i in face) for face in faces]
    return ("\n".join(lines) + "\n").encode()


def _broken_files(rng: np.random.Generator) -> list[tuple[str, str, str, bytes]]:
    """(file name, expected error, description, bytes) for each broken file."""
    sphere = trimesh.creation.icosphere(subdivisions=2)
    ply = _export(sphere, "ply")
    glb = _export(sphere, "glb")
    v, f = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    v_nan = v.copy()
    v_nan[rng.choice(len(v), size=5, replace=False), 1] = np.nan
    f_bad = f.copy()
    f_bad[-3:, 2] = len(v) + 7
    line = np.arange(30.0)[:, None] * np.array([[4.0, 2.0, 1.0]])  # integers: exactly collinear in text
    collinear = np.stack([np.arange(28), np.arange(1, 29), np.arange(2, 30)], axis=1)
    points = "".join(f"{x:.6f} {y:.6f} {z:.6f}\n" for x, y, z in v[:100])
    point_ply = (
        "ply\nformat ascii 1.0\nelement vertex 100\nproperty float x\nproperty float y\nproperty float z\n"
        "element face 0\nproperty list uchar int vertex_indices\nend_header\n" + points
    ).encode()
    return [
        ("truncated_binary.ply", "truncated", "binary PLY cut to 60% of its length", ply[: int(len(ply) * 0.6)]),
        ("truncated.glb", "truncated", "GLB cut in the middle of its binary chunk", glb[: len(glb) // 2]),
        ("garbage.ply", "garbage", "4 KiB of random bytes named .ply", rng.bytes(4096)),
        ("garbage.glb", "garbage", "4 KiB of random bytes named .glb", rng.bytes(4096)),
        ("empty.obj", "empty_file", "zero-byte OBJ", b""),
        ("nan_vertices.obj", "nan_vertices", "icosphere whose five vertices have y = NaN", _obj_text(v_nan, f)),
        (
            "face_index_out_of_range.obj",
            "face_index_out_of_range",
            "icosphere whose last three faces name a missing vertex",
            _obj_text(v, f_bad),
        ),
        ("points_only.ply", "no_faces", "ASCII PLY with 100 vertices and 0 faces", point_ply),
        ("degenerate.obj", "degenerate_faces", "28 faces on collinear vertices", _obj_text(line, collinear)),
        ("mesh.unknownext", "unknown_extension", "valid OBJ text under .unknownext", _obj_text(v, f)),
    ]


def generate_corpus(out_dir: str | os.PathLike, *, seed: int = 0, scale: str = "sample") -> CorpusReport:
    """Write the corpus under `out_dir` (kind/name.ext, broken/..., corpus.json) and describe it.

    The same seed and scale give byte-identical files. `scale="sample"` writes about 50 meshes of
    12 to ~20k faces; `scale="large"` three variants of each at four times the faces, for benchmarks.
    """
    if scale not in SCALES:
        raise ValueError(f"corpus scale {scale!r}: expected one of {', '.join(SCALES)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"corpus seed {seed!r}: expected a non-negative integer")
    if importlib.util.find_spec("manifold3d") is None:
        raise RuntimeError("the corpus's boolean meshes need the manifold3d package: pip install manifold3d")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = _valid_entries(out, rng, scale) + _scanned_entries(out, scale)
    for name, error, description, data in _broken_files(rng):
        rel = f"broken/{name}"
        fmt = name.rsplit(".", 1)[-1]
        entries.append(
            CorpusEntry(
                path=rel,
                kind="broken",
                format=fmt,
                valid=False,
                description=description,
                sha256=_write(out, rel, data),
                expected_error=error,
                faces=0,
                vertices=0,
                parts=0,
            )
        )
    report = CorpusReport(out_dir=str(out), seed=int(seed), scale=scale, entries=entries)
    index = json.dumps(report.to_json(), indent=1, sort_keys=True).encode() + b"\n"
    _write(out, "corpus.json", index)
    return report


def load_report(out_dir: str | os.PathLike) -> CorpusReport:
    """Read `corpus.json` back into a CorpusReport."""
    path = Path(out_dir) / "corpus.json"
    try:
        raw = json.loads(path.read_text())
        entries = [CorpusEntry(**e) for e in raw["entries"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a corpus index ({err})") from err
    return CorpusReport(out_dir=str(out_dir), seed=raw["seed"], scale=raw["scale"], entries=entries)
