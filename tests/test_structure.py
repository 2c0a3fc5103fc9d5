import torch

from model.structure import (StructureVAE, StructureVAEConfig, latent_grid_coords, latent_to_tokens,
                             occupancy_grid, occupancy_to_latent_coords, tokens_to_latent)


def test_shapes_and_token_roundtrip():
    vae = StructureVAE(StructureVAEConfig.named("debug"))
    occ = torch.rand(2, 1, 64, 64, 64) < 0.05
    z, mean, logvar = vae.encode(occ)
    assert z.shape == (2, 8, 16, 16, 16)
    assert vae.decode(z).shape == (2, 1, 64, 64, 64)
    tok = latent_to_tokens(z)
    assert tok.shape == (2 * 4096, 8)
    assert torch.equal(tokens_to_latent(tok, 2), z)
    coords = latent_grid_coords()
    # token i of the latent sits at coords[i]
    assert torch.equal(tok[:4096][5 * 256 + 3 * 16 + 7], z[0, :, 5, 3, 7])
    assert torch.equal(coords[5 * 256 + 3 * 16 + 7], torch.tensor([5, 3, 7]))


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


def test_structure_vae_overfits_one_shape():
    torch.manual_seed(0)
    # Narrow network on a 32³ grid (the convolutions take any multiple of 4): 64³ is costly on a CPU.
    vae = StructureVAE(StructureVAEConfig.named("debug", channels=(4, 8, 8)))
    r = torch.arange(32).float()
    p = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), 0)
    shell = ((p - 15.5).norm(dim=0) - 10).abs() < 1.5
    occ = shell[None, None].float()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss, parts = vae.loss(occ)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
