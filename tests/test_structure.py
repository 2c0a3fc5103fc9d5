import pytest
import torch

from model.structure import (StructureDiT, StructureVAE, StructureVAEConfig, check_structure_pair, occupancy_grid,
                             occupancy_to_latent_coords, structure_dit_config)


def test_shapes_and_scaling():
    vae = StructureVAE(StructureVAEConfig.named("debug", latents_scale=2.0, latents_shift=0.5))
    occ = torch.rand(2, 1, 64, 64, 64) < 0.05
    z, mean, logvar = vae.encode(occ)
    assert z.shape == mean.shape == logvar.shape == (2, 8, 16, 16, 16) and torch.equal(z, mean)
    assert vae.decode(z).shape == (2, 1, 64, 64, 64)
    assert torch.allclose(vae.unscale(vae.scale(z)), z, atol=1e-6)
    assert torch.allclose(vae.scale(z), (z - 0.5) * 2.0)
    zs, _, _ = vae.encode(occ, sample=True)
    assert not torch.equal(zs, z)


def test_occupied_voxels_threshold():
    """The released structure decode: sigmoid(logit) >= 0.1 after unscaling the DiT's latent."""
    vae = StructureVAE(StructureVAEConfig.named("debug", latents_scale=2.0))
    z = torch.randn(2, 8, 16, 16, 16)
    logits = vae.decode(vae.unscale(z))
    idx = vae.occupied_voxels(z, 0.1)
    for i in range(2):
        want = (torch.sigmoid(logits[i, 0]) >= 0.1).nonzero()
        assert torch.equal(idx[i], want)


def test_structure_dit_velocity_shape_and_pair_check():
    cfg = structure_dit_config("debug")
    net = StructureDiT(cfg).eval()
    x = torch.randn(2, 8, 16, 16, 16)
    with torch.no_grad():
        v = net(x, torch.tensor([0.2, 0.9]), torch.randn(2, 5, cfg.cond_dim))
    assert v.shape == x.shape and float(v.abs().max()) == 0.0  # adaLN-zero output layer at initialisation
    check_structure_pair(StructureVAEConfig.named("debug"), cfg)
    with pytest.raises(ValueError, match="channels"):
        check_structure_pair(StructureVAEConfig.named("debug", latent_channels=4), cfg)
    with pytest.raises(ValueError, match="latent, the structure VAE's is 32"):
        check_structure_pair(StructureVAEConfig.named("debug", enc_channels=(8, 16), dec_channels=(16, 8)), cfg)
    with pytest.raises(ValueError, match="unknown DenseDiTConfig key"):
        structure_dit_config("debug", grid_positions=8)


def test_occupancy_grid_and_latent_coords():
    coords = torch.tensor([[0, 0, 0], [7, 7, 7], [8, 0, 0], [511, 511, 511]])
    occ = occupancy_grid(coords, 512)
    assert occ.sum() == 3 and occ[0, 0, 0] and occ[1, 0, 0] and occ[63, 63, 63]
    logits = torch.full((64, 64, 64), -10.0)
    logits[1, 2, 3] = 0.0  # sigmoid 0.5 >= 0.1
    logits[4, 4, 4] = -2.0  # sigmoid 0.12 >= 0.1
    logits[5, 5, 5] = -2.5  # sigmoid 0.076 < 0.1
    at512 = occupancy_to_latent_coords(logits, 64)
    assert sorted(map(tuple, at512.tolist())) == [(1, 2, 3), (4, 4, 4)]
    at1024 = occupancy_to_latent_coords(logits, 128)
    assert len(at1024) == 16 and tuple(at1024.min(0).values.tolist()) == (2, 4, 6)
    assert len(occupancy_to_latent_coords(logits, 32)) == 2


def _shells(n: int = 32) -> torch.Tensor:
    """Five thin shells (four spheres, one box) on an n³ grid, ~10% occupied: (5, 1, n, n, n) float."""
    r = torch.arange(n).float()
    p = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), 0)
    shapes = []
    for centre, radius in (((15.5, 15.5, 15.5), 10), ((12, 18, 15), 7), ((17, 14, 16), 12), ((15, 15, 12), 5)):
        d = (p - torch.tensor(centre)[:, None, None, None]).norm(dim=0)
        shapes.append((d - radius).abs() < 1.5)
    shapes.append(((p - 15.5).abs().amax(0) - 9).abs() < 1.5)
    return torch.stack(shapes)[:, None].float()


def test_untrained_decoder_starts_at_the_occupancy_prior():
    torch.manual_seed(0)
    cfg = StructureVAEConfig.named("debug")
    vae = StructureVAE(cfg)
    with torch.no_grad():
        z, _, logvar = vae.encode(_shells())
        p = torch.sigmoid(vae.decode(z))
    assert abs(float(p.mean()) - cfg.occupancy_prior) < 0.05
    assert float(logvar.mean()) < -2  # narrow posterior: the decoder sees the encoder's mean
    with pytest.raises(ValueError, match="occupancy_prior"):
        StructureVAE(StructureVAEConfig.named("debug", occupancy_prior=1.0))


def test_structure_vae_learns_occupancy_at_the_paper_threshold():
    """A few dozen steps on five shells must beat marking everything occupied by far at sigmoid >= 0.1.

    Measured with the released layout's debug width (lr 2e-3): IoU 0.67 after 20 steps, 0.70 after 40;
    every voxel occupied gives 0.10.
    """
    torch.manual_seed(0)
    occ = _shells()
    target = occ > 0.5
    vae = StructureVAE(StructureVAEConfig.named("debug"))
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, betas=(0.9, 0.99))
    for _ in range(20):
        loss, _ = vae.loss(occ)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = torch.sigmoid(vae.decode(vae.encode(occ)[0])) >= 0.1
    iou = float((pred & target).sum() / (pred | target).sum())
    all_occupied = float(target.float().mean())
    assert all_occupied < 0.11
    assert iou > 0.45, f"IoU {iou:.3f} at threshold 0.1 (all occupied: {all_occupied:.3f})"


def test_sort_block_is_the_released_order():
    from model.structure import sort_block

    g = torch.Generator().manual_seed(0)
    coords = torch.unique(torch.randint(0, 24, (300, 3), generator=g), dim=0).int()
    got = sort_block(coords[torch.randperm(len(coords), generator=g)], 8)
    # numpy.lexsort over (in-block z, y, x, block z, y, x), last key primary, as the release sorts
    import numpy as np

    c = coords.numpy()
    order = np.lexsort((c[:, 2] % 8, c[:, 1] % 8, c[:, 0] % 8, c[:, 2] // 8, c[:, 1] // 8, c[:, 0] // 8))
    assert torch.equal(got, coords[torch.from_numpy(order)])


@pytest.mark.parametrize("rank", [0, 8])
def test_grid_inputs_of_the_demo_config(rank):
    """debug_grid (not in the release): a learned vector per token and the image's tokens, in order, mapped
    to every token (rank 8: through 8 values a token and one shared linear). Reordering the image tokens
    changes the velocity even without cross-attention."""
    cfg = structure_dit_config("debug_grid", grid_condition_rank=rank)
    net = StructureDiT(cfg).eval()
    assert net.grid_pos.shape == (512, 64) and "grid_pos" not in StructureDiT(structure_dit_config("debug")).state_dict()
    assert net.grid_cond[-1].out_features == 512 * (rank or 64)
    assert ("grid_cond_up.weight" in net.state_dict()) == bool(rank)
    with torch.no_grad():
        net.out_layer.weight.normal_()
        for blk in net.blocks:  # without cross-attention the grid path is the only way the image gets in
            blk.cross_attn.to_out.weight.zero_()
            blk.cross_attn.to_out.bias.zero_()
        x, t = torch.randn(2, 8, 16, 16, 16), torch.tensor([0.5, 0.5])
        cond = torch.randn(2, 64, 64)
        swapped = cond.clone()
        swapped[1] = cond[1].flip(0)
        v0, v1 = net(x, t, cond), net(x, t, swapped)
    assert torch.allclose(v0[0], v1[0], atol=1e-6) and not torch.allclose(v0[1], v1[1], atol=1e-4)
    with pytest.raises(ValueError, match="condition has 16 tokens"):
        net(x, t, cond[:, :16])
    with pytest.raises(ValueError, match="grid condition"):
        structure_dit_config("debug", grid_condition_tokens=-1)
    with pytest.raises(ValueError, match="grid_condition_rank"):
        structure_dit_config("debug_grid", grid_condition_rank=-1)


def test_cpu_channels_last_trunks_same_result(monkeypatch):
    """model.dense_vae.CPU_CHANNELS_LAST: the trunks' activations channels-last on a CPU, the same numbers as
    PyTorch's default layout (forward and gradients)."""
    import model.dense_vae as dense_vae

    occ = (torch.rand(2, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0)) < 0.1).float()
    results = {}
    for channels_last in (False, True):
        monkeypatch.setattr(dense_vae, "CPU_CHANNELS_LAST", channels_last)
        torch.manual_seed(0)
        vae = StructureVAE(StructureVAEConfig.named("debug"))
        with torch.no_grad():  # the zero-initialised second convolutions too, so every layer moves the result
            for p in vae.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        layouts, inner = [], {m for name, m in vae.named_modules()
                              if isinstance(m, torch.nn.Conv3d) and not name.endswith("input_layer")}
        hook = torch.nn.modules.module.register_module_forward_hook(  # every convolution after a trunk's first
            lambda mod, args, out: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last_3d))
            if mod in inner else None)
        try:
            logits = vae.decode(vae.encode(occ)[0])
            logits.square().mean().backward()
        finally:
            hook.remove()
        # (the default layout mixes: a channel LayerNorm's output comes back channels-last, a residual sum not)
        assert all(layouts) or not channels_last
        results[channels_last] = logits, torch.cat([p.grad.flatten() for p in vae.parameters()])
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-3, atol=1e-5)
