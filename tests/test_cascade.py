"""The generation cascade with tiny networks: batching, seeds, bad items, checkpoints, clean-up."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from model.cascade import Cascade, GenerationConfig, Request, load_network, pooled_sdf
from model.postprocess import PostprocessConfig, clean_mesh, decimate, mesh_bytes, read_mesh_bytes

FAST = GenerationConfig(resolution=64, structure_steps=2, sparse_steps=2, guidance=1.0, device="cpu")


def png(color=(180, 70, 40), w=80, h=80, box=True) -> bytes:
    img = np.full((h, w, 4), (255, 255, 255, 0), np.uint8)  # transparent background, the object opaque
    if box:
        img[h // 4: 3 * h // 4, w // 5: 4 * w // 5] = (*color, 255)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cascade():
    torch.set_num_threads(1)
    return Cascade.random(FAST, seed=0)


def test_batch_gives_meshes_and_names_bad_items(cascade):
    reqs = [Request("good", png(), 1), Request("junk", b"GIF89a nonsense", 1), Request("flat", png(box=False), 1),
            Request("other", png((20, 90, 200)), 2)]
    res = cascade.generate(reqs)
    assert [r.name for r in res] == ["good", "junk", "flat", "other"]
    for r in (res[0], res[3]):
        assert r.ok and len(r.faces) > 0 and np.isfinite(r.vertices).all()
        assert np.abs(r.vertices).max() <= 1.0 and r.faces.max() < len(r.vertices)
        assert {"condition", "structure", "sparse", "decode", "mesh"} <= set(r.timings)
    assert res[1].error.startswith("junk: unreadable image")
    assert res[2].error.startswith("flat: no foreground")


def test_seed_reproduces_the_mesh_whatever_the_batch(cascade):
    alone = cascade.generate([Request("a", png(), 7)])[0]
    again = cascade.generate([Request("a", png(), 7)])[0]
    batched = cascade.generate([Request("b", png((10, 200, 10)), 3), Request("a", png(), 7)])[1]
    other = cascade.generate([Request("a", png(), 8)])[0]
    assert np.array_equal(alone.faces, again.faces) and np.array_equal(alone.vertices, again.vertices)
    assert alone.faces.shape == batched.faces.shape and np.allclose(alone.vertices, batched.vertices, atol=1e-4)
    assert alone.faces.shape != other.faces.shape or not np.allclose(alone.vertices, other.vertices)


def test_empty_structure_fails_that_item_only(cascade, monkeypatch):
    real = cascade.structure_stage

    def second_empty(cond, seeds):
        out = real(cond, seeds)
        out[1] = out[1][:0]
        return out

    monkeypatch.setattr(cascade, "structure_stage", second_empty)
    res = cascade.generate([Request("x", png(), 1), Request("y", png(), 2), Request("z", png(), 3)])
    assert res[0].ok and res[2].ok
    assert res[1].error == "y: empty structure (the structure stage predicted no occupied voxels)"


def test_structure_that_predicts_nothing_is_a_clear_error():
    c = Cascade.random(FAST, seed=1)
    torch.nn.init.constant_(c.structure_vae.decoder.out_layer[-1].bias, -50.0)  # every voxel far below the 0.1 threshold
    res = c.generate([Request("p", png(), 0), Request("q", png(), 1)])
    assert all("empty structure" in r.error for r in res)


def _save_trainer_checkpoint(path, network, bundle, **extra):
    from pipeline.train.checkpoints import describe

    prefix = "vae." if network == "structure_vae" else "dit."
    blob = {"state_dict": {prefix + k: v for k, v in bundle.module.state_dict().items()},
            "model_config": bundle.config, **describe(network, bundle.config), "step": 5, **extra}
    path.mkdir(parents=True)
    torch.save(blob, path / "weights.pt")
    return str(path)


def test_checkpoints_round_trip_and_refuse_bad_ones(cascade, tmp_path):
    b = cascade.bundles
    paths = {k: _save_trainer_checkpoint(tmp_path / k, k, b[k]) for k in ("structure_vae", "structure_dit", "dit")}
    loaded = Cascade.from_checkpoints(dataclasses.replace(FAST, **paths))
    want = cascade.generate([Request("a", png(), 4)])[0]
    got = loaded.generate([Request("a", png(), 4)])[0]
    assert np.array_equal(want.faces, got.faces) and np.allclose(want.vertices, got.vertices)
    assert loaded.info()["networks"]["dit"]["step"] == 5

    with pytest.raises(FileNotFoundError, match="nowhere/weights.pt: not found"):
        Cascade.from_checkpoints(dataclasses.replace(FAST, **{**paths, "dit": str(tmp_path / "nowhere")}))
    with pytest.raises(ValueError, match="holds network 'structure_vae', expected 'dit'"):
        load_network(paths["structure_vae"], "dit")
    res = _save_trainer_checkpoint(tmp_path / "dit256", "dit", b["dit"], resolution=256)
    with pytest.raises(ValueError, match="trained at resolution 256, resolution is 64"):
        Cascade.from_checkpoints(dataclasses.replace(FAST, **{**paths, "dit": res}))
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"network": "dit", "payload": Image.new("RGB", (2, 2))}, evil / "weights.pt")  # an arbitrary object
    with pytest.raises(ValueError, match="unreadable without unpickling arbitrary objects"):
        load_network(str(evil), "dit")
    stray = tmp_path / "stray.json"  # a file where a checkpoint folder belongs
    stray.write_text("{}")
    with pytest.raises(ValueError, match=r"stray.json/weights.pt: cannot be read \(Not a directory\)"):
        load_network(str(stray), "dit")
    wide = _save_trainer_checkpoint(tmp_path / "wide", "dit", dataclasses.replace(
        b["dit"], config=dataclasses.replace(b["dit"].config, cond_dim=32),
        module=type(b["dit"].module)(dataclasses.replace(b["dit"].config, cond_dim=32))))
    with pytest.raises(ValueError, match="expects condition width 32"):
        Cascade.from_checkpoints(dataclasses.replace(FAST, **{**paths, "dit": wide}))


def test_pooled_latent_decodes_to_the_surface():
    from model import pooled_latent
    from model.mesh_extract import extract_mesh

    res = 64
    r = torch.arange(res)
    grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    p = -1 + (grid + 0.5) * 2 / res
    d = p.norm(dim=1) - 0.6
    band = d.abs() < 2 * 2 / res
    coords, values = grid[band], (d[band] / (2 * 2 / res)).clamp(-1, 1)
    lc, feats = pooled_latent.encode(coords, values)
    c, v, sub_res = pooled_sdf(lc, feats, res // 8)
    verts, faces = extract_mesh(c, v, sub_res)
    radius = verts.norm(dim=1)
    assert len(faces) > 100 and (radius - 0.6).abs().mean() < 2 / sub_res


def test_clean_mesh_drops_shells_and_specks_and_meets_the_face_target():
    outer = trimesh.creation.icosphere(3, radius=0.9)
    inner = trimesh.creation.icosphere(2, radius=0.4)
    inner.invert()
    speck = trimesh.creation.icosphere(1, radius=0.03)
    speck.apply_translation((0.95, 0.95, 0.95))
    m = trimesh.util.concatenate([outer, inner, speck])
    v, f, stats = clean_mesh(m.vertices, m.faces, PostprocessConfig(target_faces=0))
    assert stats["interior_shells_dropped"] == 1 and stats["small_parts_dropped"] == 1 and len(f) == len(outer.faces)
    v2, f2 = decimate(v, f, 400)
    assert 100 < len(f2) <= 400
    kept = trimesh.Trimesh(v2, f2)
    assert abs(np.linalg.norm(kept.vertices, axis=1).mean() - 0.9) < 0.05
    back = read_mesh_bytes(mesh_bytes(v2, f2, "ply"), "ply")
    assert back[1].shape == f2.shape
    with pytest.raises(ValueError, match="unknown mesh format 'stl'"):
        mesh_bytes(v2, f2, "stl")


def test_shell_cascade_runs_every_network_on_the_requested_token_count():
    """The benchmarks' untrained cascade: a sphere shell of about the asked token count, a closed mesh of it."""
    from shell_cascade import ShellCascade, shell, shell_radius

    from pipeline.config import ConfigError, from_dict
    from pipeline.serve.config import ServeConfig

    cfg = GenerationConfig(resolution=128, structure_steps=1, sparse_steps=1, device="cpu")
    c = ShellCascade.random(cfg, "debug", with_vae=True)
    c.tokens = {128: 500}
    calls = []
    real = Cascade.structure_stage
    c.structure_stage = lambda cond, seeds: (calls.append(len(seeds)), ShellCascade.structure_stage(c, cond, seeds))[1]
    [r] = c.generate([Request("a", png(), 0)])
    assert r.ok, r.error
    expect = len(shell(16, 500))
    assert r.stats["tokens"] == expect and abs(expect - 500) < 150
    assert calls == [1] and real is not ShellCascade.structure_stage
    radius = np.linalg.norm(r.vertices, axis=1)  # the sphere's surface, not the random decoder's
    assert abs(np.median(radius) - shell_radius(16, 500) * 2 / 16) < 0.02 and radius.std() < 0.02
    c.tokens = {}
    [bad] = c.generate([Request("b", png(), 0)])
    assert not bad.ok and "no token count for resolution 128" in bad.error
    with pytest.raises(ConfigError, match="shell_tokens"):  # a benchmark fixture: Serve has no way to it
        from_dict(ServeConfig, {"generation": {}, "shell_tokens": 100}, where="ServeConfig")


def test_offload_keeps_only_the_running_stage_on_the_device(monkeypatch):
    """GenerationConfig.offload: during each stage the device holds that stage's networks and no others. This
    machine has one device, so the moves are recorded instead of made (``home`` stands for host memory);
    tests/test_cascade_gpu.py makes them on a GPU and compares the meshes and the peak memory, and
    test_offload_place_points_tensors_at_masters checks the move itself."""
    cfg = dataclasses.replace(FAST, offload=True, refine_resolution=128, refine_steps=2)
    c = Cascade.random(cfg, seed=0, with_vae=True, refine=True)
    c.home = torch.device("cpu", 1)
    names = ["encoder", "structure_vae", "structure_dit", "dit", "vae", "dit_refine"]
    name_of, where = {id(getattr(c, n)): n for n in reversed(names)}, {}
    monkeypatch.setattr(c, "_place", lambda module, dev: where.__setitem__(name_of[id(module)], dev))
    during, run = {}, c._timed

    def timed(timings, key, fn, *args):
        def spy(*a):
            during[key] = sorted(n for n in names if where.get(n) == c.device)
            return fn(*a)
        return run(timings, key, spy, *args)

    monkeypatch.setattr(c, "_timed", timed)
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))  # every first surface a box: the refine stage always runs
    monkeypatch.setattr(c, "march", lambda sdf: (np.asarray(box.vertices, np.float32), np.asarray(box.faces)))
    res = c.generate([Request("a", png(), 1)])
    assert during["condition"] == ["encoder"]
    assert during["structure"] == ["structure_dit", "structure_vae"]
    assert during["sparse"] == ["dit"] and during["decode"] == ["vae"]
    assert during["mesh"] == ["vae"]  # marching runs no network: nothing is moved for it
    assert during["refine"] == ["dit_refine"] and during["refine_decode"] == ["vae"]
    assert res[0].error is None, res[0].error


def test_every_sampling_stage_goes_through_the_graph_wrapper(monkeypatch):
    """GenerationConfig.cuda_graphs reaches each stage's sampler (structure, sparse, refine) through
    model.graphs.CapturedVelocity, which on the CPU calls the network once per step and changes nothing;
    tests/test_cascade_gpu.py compares graphed and eager meshes on a GPU."""
    import model.cascade as cascade_module
    from model.graphs import CapturedVelocity

    made = []

    class Spy(CapturedVelocity):
        def __init__(self, fn, enabled=True):
            super().__init__(fn, enabled)
            made.append(self)

    monkeypatch.setattr(cascade_module, "CapturedVelocity", Spy)
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    out = {}
    # (cuda_graphs, cuda_graph_max_tokens) -> which stages would replay: here the structure stage's forward
    # runs 8³ grid tokens, the first sparse stage 512 and the refine stage 1,352; one over the limit stays eager
    cases = {(True, 32768): [True] * 3, (False, 32768): [False] * 3, (True, 1): [False] * 3,
             (True, 1000): [True, True, False]}
    for (graphs, limit), want in cases.items():
        made.clear()
        cfg = dataclasses.replace(FAST, refine_resolution=128, refine_steps=3, cuda_graphs=graphs,
                                  cuda_graph_max_tokens=limit)
        c = Cascade.random(cfg, seed=0, refine=True)
        monkeypatch.setattr(c, "march", lambda sdf: (np.asarray(box.vertices, np.float32), np.asarray(box.faces)))
        out[graphs, limit] = c.generate([Request("a", png(), 1)])[0]
        assert out[graphs, limit].error is None, out[graphs, limit].error
        assert [(w.enabled, w.calls, w.graph) for w in made] == [(e, 0, None) for e in want]  # CPU: never captured
    for key in cases:
        np.testing.assert_array_equal(out[key].vertices, out[True, 32768].vertices)


def test_offload_place_points_tensors_at_masters():
    """``_place`` to the device gives each tensor a copy of its host master; back home, the master itself
    (no copy back, the same storage each time), and the outputs do not change."""
    c = Cascade.random(dataclasses.replace(FAST, offload=True), seed=0)
    net = c.dit
    x = [p.detach().clone() for p in net.parameters()]
    c._place(net, torch.device("cpu", 0))  # "another device" that is host memory on this machine
    moved = [p.data_ptr() for p in net.parameters()]
    c._place(net, c.home)
    home = [p.data_ptr() for p in net.parameters()]
    c._place(net, torch.device("cpu", 0))
    c._place(net, c.home)
    assert [p.data_ptr() for p in net.parameters()] == home  # the same masters every time
    assert all(torch.equal(a, p) for a, p in zip(x, net.parameters()))
    assert len(moved) == len(home)


def _two_level_cascade_parts():
    """64³ generation settings, the tiny encoder and untrained networks over a two-level (debug_r4) SS-VAE whose
    output layer decodes a sign."""
    from model.cascade import random_network
    from model.condition import build_image_encoder

    cfg = GenerationConfig(resolution=64, structure_steps=2, sparse_steps=2, guidance=1.0, device="cpu", dtype="fp32")
    enc = build_image_encoder(cfg.image_encoder)
    torch.manual_seed(0)
    vae = random_network("vae", "debug_r4")
    torch.nn.init.normal_(vae.module.decoder.out_layer.weight, std=0.5)  # zero as released: make it decode a sign
    nets = {"structure_vae": random_network("structure_vae"),
            "structure_dit": random_network("structure_dit", cond_dim=enc.dim),
            "dit": random_network("dit", "debug_grid16", cond_dim=enc.dim), "vae": vae}
    return cfg, enc, nets


def test_a_two_level_ss_vae_sets_the_sparse_latent_grid():
    # debug_r4 halves its grid twice: at 64³ the structure's occupancy becomes a 16³ set of latent voxels and
    # the decoder returns the 64³ grid; the refine stage keeps needing the release's 8 (a named error)
    from model.cascade import random_network
    from model.condition import decode_image

    cfg, enc, nets = _two_level_cascade_parts()
    c = Cascade(cfg, enc, **nets)
    assert Cascade.latent_resolution(c.vae, 64) == 16 and Cascade.latent_resolution(None, 64) == 8
    cond = c.condition(decode_image(png(), enc.image_size, with_mask=True)[None])
    (coords,) = c.structure_stage(cond, [0])
    assert len(coords) and int(coords.max()) < 16 and int(coords.max()) >= 8  # a 16³ grid, not 8³
    (p,) = c.structure_occupancy(cond, [0])
    (z,) = c.sparse_stage(c.dit, [coords], cond, [0], 2, 1.0, 1, [p >= 0.5])
    sdf = c.decode(c.vae, [coords], [z], 16)[0]
    assert sdf[2] == 64 and len(sdf[0]) == 64 * len(coords)
    with pytest.raises(ValueError, match="refine stage needs 8"):
        Cascade(cfg, enc, **nets, dit_refine=random_network("dit", "debug", cond_dim=enc.dim))


def test_decode_hands_the_march_the_enclosed_fill_or_the_release_fill():
    """GenerationConfig.fill_enclosed as the decode applies it: on, the fill is ``enclosed_fill`` of the decoded
    set over its latent voxels (the core a hollow set of latent voxels encloses takes the facing voxels' sign,
    the empty region outside it and the layer beyond the grid +1); off, +1 everywhere, as the release marches."""
    from model.mesh_extract import enclosed_fill

    cfg, enc, nets = _two_level_cascade_parts()
    vae = nets["vae"]
    r = torch.arange(3, 13)
    cube = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    coords = cube[((cube == 3) | (cube == 12)).any(1)].int()  # a closed shell of latent voxels around a 8³ core
    z = torch.randn(len(coords), vae.module.config.latent_channels, generator=torch.Generator().manual_seed(1))
    probe = torch.tensor([[32, 32, 32], [2, 40, 40], [-1, 0, 0], [64, 10, 10]])  # core, outside, beyond the grid
    c_on, c_off = Cascade(cfg, enc, **nets), Cascade(dataclasses.replace(cfg, fill_enclosed=False), enc, **nets)
    (on,), (off,) = c_on.decode(c_on.vae, [coords], [z], 16), c_off.decode(c_off.vae, [coords], [z], 16)
    assert off[4] == 1.0 and callable(on[4])
    want = enclosed_fill(on[0], on[1], 64, coords, 16, on[3])(probe)
    assert torch.equal(on[4](probe), want) and want[1:].tolist() == [1.0, 1.0, 1.0] and abs(float(want[0])) == 1.0
