"""The SS-DiT on a frozen SS-VAE's latents: the training batch is the VAE's encoding, and the cascade decodes it."""
import pytest
import torch

from model.sparse import SparseTensor
from model.vae import SparseSDFVAE, VAEConfig
from pipeline.shards import rows_to_table
from pipeline.train import checkpoints
from pipeline.train.config import TrainConfig
from pipeline.train.data import Skipped, iter_samples
from pipeline.train.synthetic import synthetic_rows
from pipeline.train.tasks import build_task


def _vae_checkpoint(folder) -> SparseSDFVAE:
    torch.manual_seed(3)
    vae = SparseSDFVAE(VAEConfig.named("tiny"))
    folder.mkdir()
    torch.save({**checkpoints.describe("vae", vae.config), "step": 1,
                "state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, folder / "weights.pt")
    return vae


def test_dit_trains_on_the_frozen_vae_latents(tmp_path):
    vae = _vae_checkpoint(tmp_path / "vae")
    samples = list(iter_samples([rows_to_table(synthetic_rows(2, 32))], Skipped()))
    task = build_task(TrainConfig(network="dit", latent=str(tmp_path / "vae")), seed=0)
    assert task.model_config.in_channels == vae.config.latent_channels
    items = [task.prepare(s) for s in samples]
    batch = task.collate(items, torch.device("cpu"), torch.float32)
    # the batch holds exactly the VAE's posterior means, shape after shape, and the token budget counted them
    start = 0
    for item, s in zip(items, samples):
        c4 = torch.cat([torch.zeros_like(s.coords[:, :1]), s.coords], 1).int()
        z, mean, _ = vae.eval().encode(SparseTensor.from_unsorted(c4, s.values.float()[:, None], s.resolution, 1),
                                       sample=False)
        n = len(z.coords)
        assert item.tokens == n
        torch.testing.assert_close(batch["x0"].feats[start:start + n], mean)
        assert torch.equal(batch["x0"].coords[start:start + n, 1:], z.coords[:, 1:])
        start += n
    assert start == len(batch["x0"]) == int(batch["x0"].cu_seqlens[-1])
    loss, _ = task.module(**batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in task.vae.parameters())  # frozen


def test_latent_checkpoint_of_another_network_is_refused(tmp_path):
    folder = tmp_path / "not_vae"
    folder.mkdir()
    torch.save({"network": "dit", "model_config": "x", "state_dict": {}}, folder / "weights.pt")
    with pytest.raises(checkpoints.CheckpointMismatch, match="expected 'vae'"):
        build_task(TrainConfig(network="dit", latent=str(folder)), seed=0)
