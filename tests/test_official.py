"""Released Direct3D-S2 snapshots -> our checkpoint folders: conversion, strict loading, named errors.

The snapshots here are synthetic: narrow networks of the released key layout with random weights,
written the way the release ships them (``.ckpt`` dicts of tensors beside a ``config.yaml``)."""
import json
import os
import pickle

import pytest
import torch
import yaml

from model.checkpoint import CheckpointError, from_pretrained, save_pretrained
from model.official import OfficialError, SECTIONS, convert_snapshot, read_ckpt, write_synthetic_snapshot

DENSE_VAE = ("direct3d_s2.models.autoencoders.dense_vae.DenseShapeVAE",
             dict(embed_dim=8, model_channels_encoder=[8, 16, 32], model_channels_decoder=[32, 16, 8],
                  num_res_blocks_encoder=1, num_res_blocks_middle_encoder=1, num_res_blocks_decoder=1,
                  num_res_blocks_middle_decoder=1, latents_scale=1.5, latents_shift=0.1))
DENSE_DIT = ("direct3d_s2.models.transformers.dense_dit.DenseDiT",
             dict(resolution=16, in_channels=8, out_channels=8, model_channels=64, cond_channels=32, num_blocks=2,
                  num_heads=4, patch_size=1, qk_rms_norm=True, qk_rms_norm_cross=True))
EXTRA = {"dense_scheduler": {"target": "diffusers.FlowMatchEulerDiscreteScheduler",
                             "params": {"num_train_timesteps": 1000, "shift": 3.0}}}


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshot")
    write_synthetic_snapshot(str(root), {"dense_vae": DENSE_VAE, "dense_dit": DENSE_DIT}, seed=3, extra=EXTRA)
    return str(root)


def _forward(network: str, module: torch.nn.Module):
    g = torch.Generator().manual_seed(0)
    if network == "dense_vae":
        occ = (torch.rand(1, 1, 64, 64, 64, generator=g) > 0.7).float()
        z = module.encode(occ, sample=False)
        return module.decode(z[0] if isinstance(z, tuple) else z)
    x = torch.randn(2, 8, 16, 16, 16, generator=g)
    t = torch.tensor([500.0, 20.0])
    cond = torch.randn(2, 7, 32, generator=g)
    return module(x, t, cond)


def test_snapshot_converts_to_folders_that_load_strictly_and_compute_the_same(snapshot, tmp_path):
    out = tmp_path / "converted"
    doc = convert_snapshot(snapshot, str(out))
    assert set(doc["networks"]) == {"dense_vae", "dense_dit"}
    assert doc["release"]["dense_scheduler"]["params"]["shift"] == 3.0
    assert json.loads((out / "cascade.json").read_text())["networks"]["dense_dit"]["network"] == "dense_dit"
    blob = torch.load(os.path.join(snapshot, "model_dense.ckpt"), weights_only=True)
    for section, network in (("dense_vae", "dense_vae"), ("dense_dit", "dense_dit")):
        loaded = from_pretrained(str(out / section))
        assert loaded.network == network and not loaded.module.training
        assert os.path.isfile(out / section / "model.safetensors")
        # same computation as a network built from the released tensors through the module's own mapping
        mod = __import__(f"model.{network}", fromlist=["official_to_ours"])
        cls = type(loaded.module)
        ref = cls(loaded.config)
        ref.load_state_dict(mod.official_to_ours(blob[SECTIONS[section][1]], loaded.config))
        ref.eval()
        with torch.no_grad():
            a, b = _forward(network, loaded.module), _forward(network, ref)
        a = a[0] if isinstance(a, tuple) else a
        b = b[0] if isinstance(b, tuple) else b
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        # every released tensor is in the converted folder, none was left at its random initialisation
        theirs = blob[SECTIONS[section][1]]
        back = mod.ours_to_official(loaded.module.state_dict(), loaded.config)
        assert set(back) == set(theirs)
        for k in theirs:
            torch.testing.assert_close(back[k], theirs[k], rtol=0, atol=0)


def _edit_ckpt(snapshot: str, dst, fn):
    import shutil

    shutil.copytree(snapshot, dst)
    blob = torch.load(os.path.join(dst, "model_dense.ckpt"), weights_only=True)
    fn(blob["dit"])
    torch.save(blob, os.path.join(dst, "model_dense.ckpt"))
    return str(dst)


def test_missing_extra_or_misshapen_tensors_are_named(snapshot, tmp_path):
    key = "blocks.0.attn.to_qkv.weight"
    blob = torch.load(os.path.join(snapshot, "model_dense.ckpt"), weights_only=True)
    if key not in blob["dit"]:
        key = sorted(k for k in blob["dit"] if k.startswith("blocks.0.") and k.endswith("weight"))[0]

    missing = _edit_ckpt(snapshot, tmp_path / "missing", lambda sd: sd.pop(key))
    with pytest.raises((OfficialError, CheckpointError), match=key.replace(".", r"\.")):
        convert_snapshot(missing, str(tmp_path / "o1"), sections=["dense_dit"])

    extra = _edit_ckpt(snapshot, tmp_path / "extra", lambda sd: sd.__setitem__("blocks.0.surprise", torch.zeros(3)))
    with pytest.raises((OfficialError, CheckpointError), match=r"blocks\.0\.surprise"):
        convert_snapshot(extra, str(tmp_path / "o2"), sections=["dense_dit"])

    def reshape(sd):
        sd[key] = torch.zeros(*sd[key].shape[:-1], sd[key].shape[-1] + 1)

    wrong = _edit_ckpt(snapshot, tmp_path / "wrong", reshape)
    with pytest.raises((OfficialError, CheckpointError), match=key.replace(".", r"\.")):
        convert_snapshot(wrong, str(tmp_path / "o3"), sections=["dense_dit"])
    assert not (tmp_path / "o3" / "dense_dit").exists()  # nothing half-written


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo planted > /dev/null",))


def test_a_pickle_in_a_released_checkpoint_is_refused(snapshot, tmp_path):
    path = tmp_path / "model_dense.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"vae": {}, "dit": {}, "x": _Boom()}, f)
    with pytest.raises(OfficialError, match="model_dense.ckpt: unreadable as plain tensors"):
        read_ckpt(str(path))


def test_bad_config_yaml_is_named(snapshot, tmp_path):
    import shutil

    root = tmp_path / "snap"
    shutil.copytree(snapshot, root)
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["dense_dit"]["params"]["num_blokcs"] = 3
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(OfficialError, match="dense_dit: params do not describe a dense_dit.*num_blokcs"):
        convert_snapshot(str(root), str(tmp_path / "o"), sections=["dense_dit"])
    cfg["dense_dit"]["params"].pop("num_blokcs")
    cfg["dense_dit"]["target"] = "direct3d_s2.models.transformers.other.OtherDiT"
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(OfficialError, match="OtherDiT.*not one this converter knows"):
        convert_snapshot(str(root), str(tmp_path / "o"), sections=["dense_dit"])
    (root / "config.yaml").write_text("dense_dit: {target: x, params: {a: '${other.value}'}}\n")
    with pytest.raises(OfficialError, match="interpolation"):
        convert_snapshot(str(root), str(tmp_path / "o"))


def test_checkpoint_folder_round_trip_and_strict_config(tmp_path):
    from model.dense_dit import DenseDiT, DenseDiTConfig

    cfg = DenseDiTConfig.named("debug")
    torch.manual_seed(0)
    net = DenseDiT(cfg)
    path = save_pretrained(net, cfg, str(tmp_path / "dit"), network="dense_dit", meta={"step": 7})
    loaded = from_pretrained(path, "dense_dit")
    assert loaded.config == cfg and loaded.meta == {"step": 7}
    for k, v in net.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="holds network 'dense_dit', expected 'ss_vae'"):
        from_pretrained(path, "ss_vae")
    doc = json.loads((tmp_path / "dit" / "config.json").read_text())
    doc["config"]["widht"] = 3
    (tmp_path / "dit" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="unknown DenseDiTConfig key.*widht"):
        from_pretrained(path)
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(str(tmp_path / "nothing"))
    # safetensors holds no code: a pickle renamed to model.safetensors is unreadable, not executed
    with open(tmp_path / "dit" / "model.safetensors", "wb") as f:
        pickle.dump(_Boom(), f)
    doc["config"].pop("widht")
    (tmp_path / "dit" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="model.safetensors is unreadable"):
        from_pretrained(path)


def test_old_weights_pt_migrates_to_a_checkpoint_folder(tmp_path):
    from model.cascade import load_network, migrate_checkpoint
    from model.dense_dit import DenseDiT, DenseDiTConfig

    cfg = DenseDiTConfig.named("debug")
    net = DenseDiT(cfg)
    old = tmp_path / "ckpt"
    old.mkdir()
    torch.save({"network": "structure_dit", "model_config": repr(cfg), "step": 12,
                "state_dict": {"dit." + k: v for k, v in net.state_dict().items()}}, old / "weights.pt")
    out = migrate_checkpoint(str(old), str(tmp_path / "migrated"))
    loaded = from_pretrained(out, "dense_dit")
    assert loaded.config == cfg and loaded.meta["step"] == 12
    assert all(torch.equal(v, loaded.module.state_dict()[k]) for k, v in net.state_dict().items())
    assert load_network(out, "structure_dit").config == cfg  # generation reads the migrated folder
    torch.save({"network": "something_else"}, old / "weights.pt")
    with pytest.raises(ValueError, match="holds network 'something_else'"):
        migrate_checkpoint(str(old), str(tmp_path / "m2"))
