"""Shape builders for the sample corpus: each takes (rng, res) and returns a Trimesh or a Scene.

`res` multiplies the tessellation (1 for the sample corpus, 2 for the large one).
Booleans use trimesh's manifold3d engine; scenes keep their parts as separate
geometries under node transforms so a loader has to flatten them.
"""

from __future__ import annotations

import numpy as np
import trimesh
from trimesh import transformations as tf

ENGINE = "manifold"


def _union(*meshes: trimesh.Trimesh) -> trimesh.Trimesh:
    return trimesh.boolean.union(list(meshes), engine=ENGINE)


def _difference(a: trimesh.Trimesh, *cut: trimesh.Trimesh) -> trimesh.Trimesh:
    return trimesh.boolean.difference([a, *cut], engine=ENGINE)


def _intersection(*meshes: trimesh.Trimesh) -> trimesh.Trimesh:
    return trimesh.boolean.intersection(list(meshes), engine=ENGINE)


def _move(mesh: trimesh.Trimesh, offset=(0.0, 0.0, 0.0), rotate=None) -> trimesh.Trimesh:
    m = np.eye(4)
    if rotate is not None:
        angle, axis = rotate
        m = tf.rotation_matrix(angle, axis)
    m[:3, 3] = offset
    return mesh.copy().apply_transform(m)


def _subdivided_box(extents, levels: int) -> trimesh.Trimesh:
    mesh = trimesh.creation.box(extents=extents)
    for _ in range(levels):
        mesh = mesh.subdivide()
    return mesh


def random_similarity(rng: np.random.Generator) -> np.ndarray:
    """A random rotation, a log-uniform scale in [0.05, 50] and an offset of up to 20 scaled units."""
    scale = float(np.exp(rng.uniform(np.log(0.05), np.log(50.0))))
    m = tf.random_rotation_matrix(rng.random(3))
    m[:3, :3] *= scale
    m[:3, 3] = rng.uniform(-20.0, 20.0, 3) * scale
    return m


def _grid_mesh(points: np.ndarray, wrap_u: bool = False, wrap_v: bool = False) -> trimesh.Trimesh:
    """Triangulate a (nu, nv, 3) grid of points; wrapping closes the grid along that direction."""
    nu, nv = points.shape[:2]
    iu = np.arange(nu if wrap_u else nu - 1)
    iv = np.arange(nv if wrap_v else nv - 1)
    u0, v0 = np.meshgrid(iu, iv, indexing="ij")
    u1, v1 = (u0 + 1) % nu, (v0 + 1) % nv
    a, b, c, d = u0 * nv + v0, u1 * nv + v0, u1 * nv + v1, u0 * nv + v1
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return trimesh.Trimesh(points.reshape(-1, 3), faces, process=True)


def _solidify(points: np.ndarray, thickness: float) -> trimesh.Trimesh:
    """Turn an open (nu, nv, 3) grid surface into a closed thin slab of the given thickness."""
    sheet = _grid_mesh(points)
    normals = sheet.vertex_normals.reshape(points.shape)
    top, bottom = points + normals * thickness / 2, points - normals * thickness / 2
    nu, nv = points.shape[:2]
    # one ring around the grid boundary, walked in order, stitches the two faces
    ring = (
        [(0, j) for j in range(nv)]
        + [(i, nv - 1) for i in range(1, nu)]
        + [(nu - 1, j) for j in range(nv - 2, -1, -1)]
        + [(i, 0) for i in range(nu - 2, 0, -1)]
    )
    side = np.stack([np.stack([top[i, j] for i, j in ring]), np.stack([bottom[i, j] for i, j in ring])], axis=1)
    pieces = [_grid_mesh(top), _grid_mesh(bottom[:, ::-1]), _grid_mesh(side, wrap_u=True)]
    mesh = trimesh.util.concatenate(pieces)
    mesh.merge_vertices()
    trimesh.repair.fix_normals(mesh)
    return mesh


def _tube(curve: np.ndarray, radius: float, sides: int) -> trimesh.Trimesh:
    """Closed tube around a closed curve (n, 3) that never runs parallel to z."""
    tangent = np.roll(curve, -1, axis=0) - np.roll(curve, 1, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = np.cross(tangent, [0.0, 0.0, 1.0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    binormal = np.cross(tangent, normal)
    theta = np.linspace(0, 2 * np.pi, sides, endpoint=False)
    ring = np.cos(theta)[None, :, None] * normal[:, None] + np.sin(theta)[None, :, None] * binormal[:, None]
    mesh = _grid_mesh(curve[:, None] + radius * ring, wrap_u=True, wrap_v=True)
    trimesh.repair.fix_normals(mesh)
    return mesh


def _scene(parts: list[tuple[str, trimesh.Trimesh | None, np.ndarray, str | None]]) -> trimesh.Scene:
    """Scene from (node, geometry, local transform, parent node); geometry may repeat (instancing),
    None makes an empty group node whose transform its children inherit."""
    scene = trimesh.Scene()
    for node, geom, transform, parent in parts:
        if geom is None:
            scene.graph.update(frame_from=parent or scene.graph.base_frame, frame_to=node, matrix=transform)
            continue
        scene.add_geometry(
            geom,
            node_name=node,
            geom_name=geom.metadata.get("name", node),
            parent_node_name=parent,
            transform=transform,
        )
    return scene


def _named(mesh: trimesh.Trimesh, name: str) -> trimesh.Trimesh:
    mesh.metadata["name"] = name
    return mesh


def _at(offset=(0.0, 0.0, 0.0), scale=1.0, rotate=None) -> np.ndarray:
    m = np.eye(4) if rotate is None else tf.rotation_matrix(*rotate)
    m[:3, :3] *= scale
    m[:3, 3] = offset
    return m


# ---- primitives ------------------------------------------------------------


def box_plain(rng, res):
    return trimesh.creation.box(extents=(1.0, 1.0, 1.0))


def box_elongated(rng, res):
    return _subdivided_box((2.0, 0.5, 0.3), 2 + res)


def icosphere(rng, res):
    return trimesh.creation.icosphere(subdivisions=2 + res)


def uv_sphere(rng, res):
    return trimesh.creation.uv_sphere(radius=0.8, count=(24 * res, 32 * res))


def ellipsoid(rng, res):
    mesh = trimesh.creation.icosphere(subdivisions=3 + res)
    mesh.apply_scale(rng.uniform(0.4, 1.5, 3))
    return mesh


def cylinder(rng, res):
    return trimesh.creation.cylinder(radius=0.5, height=1.6, sections=48 * res)


def cone(rng, res):
    return trimesh.creation.cone(radius=0.6, height=1.5, sections=64 * res)


def capsule(rng, res):
    return trimesh.creation.capsule(height=1.2, radius=0.35, count=(24 * res, 24 * res))


def icosahedron(rng, res):
    return trimesh.creation.icosahedron()


def vase(rng, res):
    z = np.linspace(0.0, 2.0, 40 * res)
    r = 0.35 + 0.15 * np.sin(z * 3.5 + rng.uniform(0, 1)) + 0.1 * z
    # start and end on the axis so the revolved surface is closed
    profile = np.column_stack([np.r_[0.0, r, 0.0], np.r_[0.0, z, 2.0]])
    return trimesh.creation.revolve(profile, sections=48 * res)


# ---- booleans --------------------------------------------------------------


def box_minus_sphere(rng, res):
    return _difference(
        _subdivided_box((1, 1, 1), 1),
        trimesh.creation.icosphere(2 + res, radius=0.6).apply_translation((0.5, 0.5, 0.5)),
    )


def box_union_sphere(rng, res):
    return _union(
        trimesh.creation.box(extents=(1, 1, 1)),
        trimesh.creation.icosphere(2 + res, radius=0.55).apply_translation((0.4, 0.3, 0.2)),
    )


def rounded_cube(rng, res):
    return _intersection(
        trimesh.creation.box(extents=(1.6, 1.6, 1.6)), trimesh.creation.icosphere(3 + res, radius=1.05)
    )


def cylinder_cross(rng, res):
    c = trimesh.creation.cylinder(radius=0.3, height=2.0, sections=32 * res)
    return _union(c, _move(c, rotate=(np.pi / 2, (1, 0, 0))), _move(c, rotate=(np.pi / 2, (0, 1, 0))))


def die(rng, res):
    pips = [
        trimesh.creation.icosphere(1 + res, radius=0.12).apply_translation(p)
        for p in [
            (0, 0, 0.5),
            (0.25, 0.25, -0.5),
            (-0.25, -0.25, -0.5),
            (0.5, 0.25, 0.25),
            (0.5, -0.25, -0.25),
            (0.5, 0, 0),
        ]
    ]
    return _difference(trimesh.creation.box(extents=(1, 1, 1)), *pips)


def bracket(rng, res):
    arm = trimesh.creation.box(extents=(1.5, 0.3, 0.6)).apply_translation((0.6, 0, 0))
    leg = trimesh.creation.box(extents=(0.3, 1.5, 0.6)).apply_translation((0, 0.6, 0))
    hole = trimesh.creation.cylinder(radius=0.12, height=1.0, sections=24 * res)
    return _difference(
        _union(arm, leg),
        _move(hole, (1.0, 0, 0), (np.pi / 2, (1, 0, 0))),
        _move(hole, (0, 1.0, 0), (np.pi / 2, (0, 1, 0))),
    )


def mug(rng, res):
    body = trimesh.creation.cylinder(radius=0.5, height=1.2, sections=48 * res)
    inner = trimesh.creation.cylinder(radius=0.42, height=1.2, sections=48 * res).apply_translation((0, 0, 0.1))
    handle = trimesh.creation.torus(0.3, 0.06, 32 * res, 12 * res).apply_transform(
        _at((0.55, 0, 0), rotate=(np.pi / 2, (1, 0, 0)))
    )
    return _difference(_union(body, handle), inner)


def gear(rng, res):
    n = 12
    disk = trimesh.creation.cylinder(radius=0.8, height=0.3, sections=48 * res)
    teeth = [
        trimesh.creation.box(extents=(0.25, 0.15, 0.3)).apply_transform(
            _at((0.85 * np.cos(a), 0.85 * np.sin(a), 0), rotate=(a, (0, 0, 1)))
        )
        for a in np.linspace(0, 2 * np.pi, n, endpoint=False)
    ]
    axle = trimesh.creation.cylinder(radius=0.2, height=1.0, sections=32 * res)
    return _difference(_union(disk, *teeth), axle)


# ---- genus -----------------------------------------------------------------


def torus(rng, res):
    return trimesh.creation.torus(1.0, 0.3, 48 * res, 24 * res)


def torus_quads(res: int) -> tuple[np.ndarray, np.ndarray]:
    """A torus as vertices and quad faces (V, 3), (Q, 4), outward winding."""
    nu, nv = 40 * res, 16 * res
    u, v = np.meshgrid(
        np.linspace(0, 2 * np.pi, nu, endpoint=False), np.linspace(0, 2 * np.pi, nv, endpoint=False), indexing="ij"
    )
    ring = 1.0 + 0.35 * np.cos(v)
    vertices = np.stack([ring * np.cos(u), ring * np.sin(u), 0.35 * np.sin(v)], axis=-1).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(nu), np.arange(nv), indexing="ij")
    i1, j1 = (i + 1) % nu, (j + 1) % nv
    quads = np.stack([i * nv + j, i1 * nv + j, i1 * nv + j1, i * nv + j1], axis=-1).reshape(-1, 4)
    return vertices, quads


def thin_torus(rng, res):
    return trimesh.creation.torus(1.0, 0.06, 64 * res, 12 * res)


def double_torus(rng, res):
    t = trimesh.creation.torus(0.6, 0.2, 40 * res, 16 * res)
    return _union(_move(t, (-0.55, 0, 0)), _move(t, (0.55, 0, 0)))


def triple_torus(rng, res):
    t = trimesh.creation.torus(0.5, 0.16, 36 * res, 14 * res)
    return _union(*[_move(t, (x, 0, 0)) for x in (-0.9, 0.0, 0.9)])


def plate_four_holes(rng, res):
    hole = trimesh.creation.cylinder(radius=0.18, height=1.0, sections=32 * res)
    holes = [_move(hole, (x, y, 0)) for x in (-0.45, 0.45) for y in (-0.45, 0.45)]
    return _difference(_subdivided_box((1.6, 1.6, 0.3), 1), *holes)


def linked_rings(rng, res):
    t = trimesh.creation.torus(0.6, 0.12, 48 * res, 16 * res)
    return trimesh.util.concatenate([_move(t, (-0.3, 0, 0)), _move(t, (0.3, 0, 0), (np.pi / 2, (1, 0, 0)))])


def trefoil_knot(rng, res):
    s = np.linspace(0, 2 * np.pi, 200 * res, endpoint=False)
    curve = np.column_stack([np.sin(s) + 2 * np.sin(2 * s), np.cos(s) - 2 * np.cos(2 * s), -0.8 * np.sin(3 * s)]) / 3.0
    return _tube(curve, 0.12, 16 * res)


# ---- thin plates -----------------------------------------------------------


def thin_plate(rng, res):
    return _subdivided_box((2.0, 2.0, 0.02), 2 + res)


def thin_disk(rng, res):
    return trimesh.creation.cylinder(radius=1.0, height=0.015, sections=96 * res)


def curved_shell(rng, res):
    a, z = np.meshgrid(np.linspace(-1.0, 1.0, 24 * res), np.linspace(-0.8, 0.8, 16 * res), indexing="ij")
    points = np.stack([np.sin(a), np.cos(a) - 1.0, z], axis=-1)
    return _solidify(points, 0.02)


def slotted_plate(rng, res):
    hole = trimesh.creation.cylinder(radius=0.1, height=0.5, sections=24 * res)
    return _difference(
        _subdivided_box((2.0, 0.8, 0.03), 1), *[_move(hole, (x, 0, 0)) for x in np.linspace(-0.75, 0.75, 6)]
    )


def heat_sink(rng, res):
    base = trimesh.creation.box(extents=(1.6, 1.0, 0.2))
    fins = [
        trimesh.creation.box(extents=(0.03, 1.0, 0.8)).apply_translation((x, 0, 0.45))
        for x in np.linspace(-0.7, 0.7, 8)
    ]
    return _union(base, *fins).subdivide()


# ---- open surfaces ---------------------------------------------------------


def hemisphere(rng, res):
    sphere = trimesh.creation.icosphere(3 + res)
    keep = sphere.triangles_center[:, 2] > 0
    return trimesh.Trimesh(sphere.vertices, sphere.faces[keep], process=True)


def open_tube(rng, res):
    a, z = np.meshgrid(np.linspace(0, 2 * np.pi, 48 * res, endpoint=False), np.linspace(-1, 1, 16 * res), indexing="ij")
    return _grid_mesh(np.stack([0.5 * np.cos(a), 0.5 * np.sin(a), z], axis=-1), wrap_u=True)


def terrain(rng, res):
    x, y = np.meshgrid(np.linspace(-1, 1, 48 * res), np.linspace(-1, 1, 48 * res), indexing="ij")
    freq = rng.uniform(1.5, 4.0, (3, 2))
    z = sum(0.15 * np.sin(fx * x * np.pi + fy * y) * np.cos(fy * y * np.pi) for fx, fy in freq)
    return _grid_mesh(np.stack([x, y, z], axis=-1))


def open_box(rng, res):
    box = _subdivided_box((1.0, 1.0, 1.0), 1 + res)
    keep = box.face_normals[:, 2] < 0.5
    return trimesh.Trimesh(box.vertices, box.faces[keep], process=True)


def moebius(rng, res):
    u, w = np.meshgrid(np.linspace(0, 2 * np.pi, 96 * res), np.linspace(-0.3, 0.3, 8 * res), indexing="ij")
    points = np.stack(
        [(1 + w * np.cos(u / 2)) * np.cos(u), (1 + w * np.cos(u / 2)) * np.sin(u), w * np.sin(u / 2)], axis=-1
    )
    mesh = _grid_mesh(points[:-1])
    # glue the last column to the first with a half twist (the defining Moebius seam)
    last, first = points[-2], points[0][::-1]
    seam = _grid_mesh(np.stack([last, first]))
    mesh = trimesh.util.concatenate([mesh, seam])
    mesh.merge_vertices()
    return mesh


def holey_sphere(rng, res):
    sphere = trimesh.creation.icosphere(3 + res)
    centres = sphere.vertices[rng.choice(len(sphere.vertices), 5, replace=False)]
    dist = np.linalg.norm(sphere.triangles_center[:, None] - centres[None], axis=-1).min(axis=1)
    return trimesh.Trimesh(sphere.vertices, sphere.faces[dist > 0.25], process=True)


def cloth(rng, res):
    x, y = np.meshgrid(np.linspace(-1, 1, 40 * res), np.linspace(-1, 1, 40 * res), indexing="ij")
    z = -0.6 * (x**2 + y**2) + 0.08 * np.sin(6 * x + rng.uniform(0, 3)) * (1 - y**2)
    return _grid_mesh(np.stack([x, y, z], axis=-1))


# ---- nested and double-walled shells ---------------------------------------


def hollow_sphere(rng, res):
    inner = trimesh.creation.icosphere(2 + res, radius=0.7)
    inner.invert()
    return trimesh.util.concatenate([trimesh.creation.icosphere(2 + res, radius=1.0), inner])


def double_walled_box(rng, res):
    inner = _subdivided_box((0.8, 0.8, 0.8), 1 + res)
    inner.invert()
    return trimesh.util.concatenate([_subdivided_box((1.0, 1.0, 1.0), 1 + res), inner])


def concentric_spheres(rng, res):
    return trimesh.util.concatenate([trimesh.creation.icosphere(2 + res, radius=r) for r in (1.0, 0.7, 0.4)])


def double_walled_cup(rng, res):
    n = 48 * res
    outer = trimesh.creation.cylinder(radius=0.6, height=1.2, sections=n)
    gap = trimesh.creation.cylinder(radius=0.55, height=1.1, sections=n)
    inner_wall = trimesh.creation.cylinder(radius=0.5, height=1.1, sections=n).apply_translation((0, 0, 0.05))
    cavity = trimesh.creation.cylinder(radius=0.45, height=1.2, sections=n).apply_translation((0, 0, 0.15))
    # sealed vacuum gap between an outer and an inner wall, drinking cavity open at the top
    return _difference(_union(_difference(outer, gap), inner_wall), cavity)


def nested_parts(rng, res):
    box = _subdivided_box((2.0, 2.0, 2.0), res)
    ring = trimesh.creation.torus(0.6, 0.12, 32 * res, 12 * res)
    ball = trimesh.creation.icosphere(2 + res, radius=0.3)
    return trimesh.util.concatenate([box, ring, ball])


# ---- multi-part scenes -----------------------------------------------------


def table(rng, res):
    top = _named(trimesh.creation.box(extents=(1.6, 0.06, 1.0)), "top")
    leg = _named(trimesh.creation.cylinder(radius=0.04, height=0.8, sections=16 * res), "leg")
    leg_up = _at(rotate=(np.pi / 2, (1, 0, 0)))
    legs = [
        (f"leg_{i}", leg, _at((x, -0.43, z)) @ leg_up, "top")
        for i, (x, z) in enumerate([(-0.7, -0.4), (0.7, -0.4), (-0.7, 0.4), (0.7, 0.4)])
    ]
    group = ("table", None, _at((0.2, 0.0, -0.1), rotate=(0.4, (0, 1, 0))), None)  # a node with no mesh
    return _scene([group, ("top", top, _at((0, 0.86, 0)), "table")] + legs)


def chair(rng, res):
    seat = _named(trimesh.creation.box(extents=(0.5, 0.06, 0.5)), "seat")
    back = _named(_subdivided_box((0.5, 0.6, 0.04), res), "back")
    leg = _named(trimesh.creation.box(extents=(0.04, 0.45, 0.04)), "leg")
    parts = [
        ("seat", seat, _at((0, 0.45, 0)), None),
        ("back", back, _at((0, 0.3, -0.23), rotate=(-0.15, (1, 0, 0))), "seat"),
    ]
    parts += [
        (f"leg_{i}", leg, _at((x, -0.24, z)), "seat")
        for i, (x, z) in enumerate([(-0.22, -0.22), (0.22, -0.22), (-0.22, 0.22), (0.22, 0.22)])
    ]
    return _scene(parts)


def snowman(rng, res):
    ball = _named(trimesh.creation.icosphere(2 + res), "ball")
    nose = _named(trimesh.creation.cone(radius=0.05, height=0.3, sections=16 * res), "nose")
    parts = [
        (f"ball_{i}", ball, _at((0, y, 0), scale=s), None)
        for i, (y, s) in enumerate([(0.5, 0.5), (1.25, 0.35), (1.8, 0.25)])
    ]
    parts += [("nose", nose, _at((0, 1.8, 0.22)), None)]
    return _scene(parts)


def molecule(rng, res):
    atom = _named(trimesh.creation.icosphere(1 + res, radius=0.2), "atom")
    bond = _named(trimesh.creation.cylinder(radius=0.05, height=1.0, sections=12 * res), "bond")
    centres = rng.uniform(-1, 1, (6, 3))
    parts = [(f"atom_{i}", atom, _at(c), None) for i, c in enumerate(centres)]
    for i in range(1, len(centres)):
        a, b = centres[i - 1], centres[i]
        m = trimesh.geometry.align_vectors([0, 0, 1], b - a)
        m[:3, :3] *= np.array([1.0, 1.0, np.linalg.norm(b - a)])[None, :]
        m[:3, 3] = (a + b) / 2
        parts.append((f"bond_{i}", bond, m, None))
    return _scene(parts)


def box_stack(rng, res):
    box = _named(_subdivided_box((1.0, 0.4, 0.8), res), "box")
    return _scene(
        [
            (
                f"box_{i}",
                box,
                _at(
                    (rng.uniform(-0.1, 0.1), 0.2 + 0.4 * i, 0),
                    scale=1.0 - 0.15 * i,
                    rotate=(rng.uniform(-0.6, 0.6), (0, 1, 0)),
                ),
                None,
            )
            for i in range(4)
        ]
    )


def robot_arm(rng, res):
    link = _named(trimesh.creation.capsule(height=0.6, radius=0.08, count=(12 * res, 12 * res)), "link")
    joint = _named(trimesh.creation.icosphere(1 + res, radius=0.12), "joint")
    base = _named(trimesh.creation.cylinder(radius=0.3, height=0.1, sections=32 * res), "base")
    parts = [("base", base, _at(), None)]
    parent = "base"
    for i in range(3):
        bend = _at((0, 0, 0.05 if i == 0 else 0.7), scale=0.85, rotate=(rng.uniform(-0.8, 0.8), (1, 0, 0)))
        parts.append((f"joint_{i}", joint, bend, parent))
        parts.append((f"link_{i}", link, _at((0, 0, 0.35)), f"joint_{i}"))
        parent = f"joint_{i}"
    return _scene(parts)


def lamp(rng, res):
    base = _named(trimesh.creation.cylinder(radius=0.3, height=0.05, sections=32 * res), "base")
    pole = _named(trimesh.creation.cylinder(radius=0.02, height=1.2, sections=12 * res), "pole")
    cone = trimesh.creation.cone(radius=0.35, height=0.35, sections=32 * res)
    shade = _named(trimesh.Trimesh(cone.vertices, cone.faces[cone.face_normals[:, 2] > -0.5], process=True), "shade")
    return _scene(
        [
            ("base", base, _at(), None),
            ("pole", pole, _at((0, 0, 0.6)), "base"),
            ("shade", shade, _at((0, 0, 1.1)), "base"),
        ]
    )
