"""Fine-tuning a converted release SS-DiT on our shards (the released loss on the converted SS-VAE's latents)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import release_snapshot
from model.checkpoint import from_pretrained
from model.official import convert_snapshot
from pipeline.shards import write_shard
from pipeline.train.synthetic import synthetic_rows

RES = 64  # the small snapshot's first stage: latent grid 8, SS-VAE x8


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release-ft")
    snap, dino = release_snapshot.write(str(root), seed=2, small=True)
    out = root / "converted"
    convert_snapshot(snap, str(out), sections=["sparse_vae_512", "sparse_dit_512"])
    data = root / "shards"
    write_shard(str(data), synthetic_rows(4, RES, seed=5))
    return out, dino, str(data)


def test_converted_sparse_dit_fine_tunes_and_exports_the_same_format(release, tmp_path):
    out, dino, data = release
    # its own process (python -m pipeline.train, one rank, no Ray): the run's process group is its own
    res = subprocess.run([sys.executable, "-m", "pipeline.train", "dit", "--shards", data,
                          "--resolution", str(RES), "--image-encoder", dino, "--latent", str(out / "sparse_vae_512"),
                          "--init-from", str(out / "sparse_dit_512"), "--steps", "2", "--checkpoint-every", "2",
                          "--token-budget", "4000", "--storage", str(tmp_path), "--name", "ft", "--seed", "0"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (ckpt,) = sorted(Path(tmp_path, "ft").glob("checkpoint_*"))
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["latent_space"] == f"ss_vae:{out / 'sparse_vae_512'}"
    assert meta["started_from"]["checkpoint"] == str(out / "sparse_dit_512")
    # the run's export is the converted network's format and layout: same config, same keys
    tuned = from_pretrained(str(ckpt / "model"), "sparse_dit")
    base = from_pretrained(str(out / "sparse_dit_512"), "sparse_dit")
    assert dataclasses.replace(tuned.config, grad_checkpointing=False) == dataclasses.replace(base.config, grad_checkpointing=False)
    assert set(tuned.module.state_dict()) == set(base.module.state_dict())
    assert tuned.meta["latent_space"] == meta["latent_space"]
    changed = [k for k, v in base.module.state_dict().items() if not torch.equal(v, tuned.module.state_dict()[k])]
    assert changed  # the weights moved from the release's
