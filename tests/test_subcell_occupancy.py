"""The SS-DiT's sub-cell occupancy input: where a latent voxel is coarser than the 64³ structure grid, the
structure stage's occupancy inside it reaches the sparse DiT in training (the shard's band) and generation
(the structure stage's decoded occupancy) in the same layout."""
import dataclasses

import pytest
import torch

from model.dit import DiTConfig, SparseDiT
from model.sparse import SparseTensor
from model.structure import grid_to_latent_coords, occupancy_grid, subcell_occupancy, subcell_side


def _grid(*voxels):
    occ = torch.zeros(64, 64, 64, dtype=torch.bool)
    for v in voxels:
        occ[v] = True
    return occ


def test_each_structure_voxel_lands_on_its_latent_voxel_and_bit():
    occ = _grid((5, 9, 14), (6, 9, 14), (63, 0, 2))
    coords = grid_to_latent_coords(occ, 16)
    assert sorted(map(tuple, coords.tolist())) == [(1, 2, 3), (15, 0, 0)]
    bits = subcell_occupancy(occ, coords, 16)
    assert bits.shape == (2, 64) and bits.dtype == torch.float32
    row = {tuple(c): b for c, b in zip(coords.tolist(), bits)}
    # (x, y, z) within the 4³ block, z fastest
    assert row[(1, 2, 3)].nonzero().flatten().tolist() == [(1 * 4 + 1) * 4 + 2, (2 * 4 + 1) * 4 + 2]
    assert row[(15, 0, 0)].nonzero().flatten().tolist() == [(3 * 4 + 0) * 4 + 2]
    # the release's sizes: one structure voxel a latent voxel, every bit 1
    full = subcell_occupancy(occ, grid_to_latent_coords(occ, 64), 64)
    assert full.shape == (3, 1) and bool(full.all())


def test_latent_grids_that_do_not_divide_the_structure_grid_are_refused():
    assert subcell_side(16) == 4 and subcell_side(8) == 8 and subcell_side(64) == 1
    for bad in (0, 12, 128):
        with pytest.raises(ValueError, match="divisor of 64"):
            subcell_side(bad)
    with pytest.raises(ValueError, match="outside the 16³ grid"):
        subcell_occupancy(_grid((0, 0, 0)), torch.tensor([[16, 0, 0]]), 16)


def _net_and_input(seed=0):
    torch.manual_seed(seed)
    net = SparseDiT(DiTConfig.named("debug_grid16")).eval()  # the demo's SS-DiT reads 4³ sub-cells
    torch.nn.init.normal_(net.out_layer.weight, std=0.1)  # zero as built (adaLN-Zero): make the output depend on h
    occ = torch.zeros(64, 64, 64, dtype=torch.bool)
    occ[20:44, 30:34, 20:44] = True  # a slab: its latent voxels hold 4³ blocks of two kinds
    occ[20:44, 31, 20:44] = False
    coords = grid_to_latent_coords(occ, 16)
    x = SparseTensor.from_samples([coords], [torch.randn(len(coords), 16)], 16, ordered=False)
    return net, x, occ, coords


def test_the_sparse_dit_reads_the_occupancy_and_names_what_is_missing():
    net, x, occ, coords = _net_and_input()
    t, cond = torch.tensor([0.4]), torch.randn(1, 64, 64)
    bits = subcell_occupancy(occ, coords, 16)
    with torch.no_grad():
        v = net(x, t, cond, bits).feats
        v_other = net(x, t, cond, torch.ones_like(bits)).feats
    assert v.shape == (len(coords), 16) and not torch.allclose(v, v_other)
    with pytest.raises(ValueError, match="occupancy_subcells=4"):
        net(x, t, cond)
    with pytest.raises(ValueError, match=r"occupancy must be \(\d+, 64\)"):
        net(x, t, cond, bits[:, :8])
    plain = SparseDiT(DiTConfig.named("debug_grid16", occupancy_subcells=0))
    with pytest.raises(ValueError, match="without occupancy_subcells"):
        plain(x, t, cond, bits)
    with pytest.raises(ValueError, match="occupancy_subcells must be >= 0"):
        DiTConfig.named("debug", occupancy_subcells=-1)


def test_training_batches_carry_the_shards_band_occupancy_in_the_token_order(tmp_path):
    from pipeline.shards import rows_to_table
    from pipeline.train.config import TrainConfig
    from pipeline.train.data import Skipped, iter_samples
    from pipeline.train.synthetic import synthetic_rows
    from pipeline.train.tasks import build_task

    samples = list(iter_samples([rows_to_table(synthetic_rows(2, 64))], Skipped()))
    cfg = TrainConfig(network="dit", model="debug", latent="pooled")
    base = build_task(cfg, seed=0)
    task = build_task(cfg, seed=0, model_config=dataclasses.replace(base.model_config, occupancy_subcells=8))
    items = [task.prepare(s) for s in samples]
    batch = task.collate(items, torch.device("cpu"), torch.float32)
    start = 0
    for s in samples:  # pooled latents are /8: at 64³ an 8³ grid, 8³ structure voxels a latent voxel
        n = len(torch.unique(s.coords.long() // 8, dim=0))
        coords = batch["x0"].coords[start:start + n, 1:]
        want = subcell_occupancy(occupancy_grid(s.coords, 64), coords, 8)
        assert torch.equal(batch["occupancy"][start:start + n], want)
        assert bool(want.any(1).all())  # every latent voxel holds some band
        start += n
    assert start == len(batch["occupancy"])
    torch.nn.init.normal_(task.module.dit.out_layer.weight, std=0.1)  # zero as built: let gradients through
    loss, _ = task.module(**batch)
    loss.backward()
    assert task.module.dit.occupancy_in.weight.grad.abs().sum() > 0
    # a shard whose latent grid does not match the network's sub-cells is named
    wrong = build_task(cfg, seed=0, model_config=dataclasses.replace(base.model_config, occupancy_subcells=4))
    with pytest.raises(ValueError, match=rf"{samples[0].mesh_id}: .* holds 8³ structure voxels .* reads 4³"):
        wrong.prepare(samples[0])


def test_the_cascade_gives_the_structure_stages_occupancy_to_the_sparse_stage(monkeypatch):
    from model.cascade import Cascade, GenerationConfig, Request, random_network
    from model.condition import build_image_encoder
    from tests.test_cascade import png

    cfg = GenerationConfig(resolution=64, structure_steps=2, sparse_steps=2, guidance=2.0, device="cpu", dtype="fp32")
    enc = build_image_encoder(cfg.image_encoder)
    torch.manual_seed(0)
    vae = random_network("vae", "debug_r4")
    torch.nn.init.normal_(vae.module.decoder.out_layer.weight, std=0.5)
    dit = random_network("dit", "debug_grid16", cond_dim=enc.dim)
    nets = {"structure_vae": random_network("structure_vae"),
            "structure_dit": random_network("structure_dit", cond_dim=enc.dim), "dit": dit, "vae": vae}
    c = Cascade(cfg, enc, **nets)
    # an untrained structure VAE decodes low probabilities: put the bits' threshold inside what it gives
    from model.condition import decode_image
    (p0,) = c.structure_occupancy(c.condition(decode_image(png(), enc.image_size, with_mask=True)[None]), [0])
    cfg = c.cfg = dataclasses.replace(cfg, subcell_threshold=float(p0[p0 >= cfg.occupancy_threshold].median()))
    seen = []
    real = dit.module.forward
    monkeypatch.setattr(dit.module, "forward", lambda x, t, cond, occupancy=None: (seen.append(occupancy),
                                                                                  real(x, t, cond, occupancy))[1])
    probs = []
    real_occupancy = c.structure_occupancy
    monkeypatch.setattr(c, "structure_occupancy", lambda cond, seeds: probs.extend(real_occupancy(cond, seeds)) or probs)
    (res,) = c.generate([Request("box", png(), seed=0)])
    assert res.ok, res.error
    (p,) = probs
    # the latent voxels where the occupancy reaches occupancy_threshold, the bits where it reaches subcell_threshold
    coords = grid_to_latent_coords(p >= cfg.occupancy_threshold, 16)
    want = subcell_occupancy(p >= cfg.subcell_threshold, coords, 16)
    assert 0 < want.mean() < subcell_occupancy(p >= cfg.occupancy_threshold, coords, 16).mean()
    assert len(seen) == 2 and all(o.shape == (2 * len(coords), 64) for o in seen)  # guidance: the batch twice
    # the tokens are sampled in the structure's coords order; each row's bits are its voxel's
    assert torch.equal(seen[0][: len(coords)], want) and torch.equal(seen[0][len(coords):], want)
    with pytest.raises(ValueError, match="refine stage does not have"):
        Cascade(cfg, enc, **nets, dit_refine=random_network("dit", "debug_grid16", cond_dim=enc.dim))
    for key in ("subcell_threshold", "occupancy_threshold"):
        for bad in (0.0, 1.0):
            with pytest.raises(ValueError, match=f"{key}: must be in"):
                GenerationConfig(**{key: bad}).validate()
    with pytest.raises(ValueError, match=r"reads 8³ structure voxels .* holds 4³"):
        Cascade(cfg, enc, **{**nets, "dit": random_network("dit", "debug_grid16", cond_dim=enc.dim, occupancy_subcells=8)})
