"""The released Direct3D-S2 v1.1 snapshot -> our networks and checkpoint folders.

A snapshot holds ``config.yaml`` (per module: the class it names and its constructor arguments) and
``.ckpt`` files: ``model_dense.ckpt`` {"vae", "dit"}, ``model_sparse_512.ckpt`` and
``model_sparse_1024.ckpt`` {"vae", "dit"}, ``model_refiner.ckpt`` and ``model_refiner_1024.ckpt``
{"refiner"}. Everything is read as data: the YAML with ``safe_load``, the checkpoints with
``torch.load(weights_only=True)``. Each released class maps to one of our networks, whose module file
provides ``<Config>.from_official(params)``, ``official_to_ours`` and ``ours_to_official``. A tensor of
the release that our network does not use, or one of ours that the release does not give, is an error
naming the key: a converted network never holds a randomly initialised weight.
"""
from __future__ import annotations

import importlib
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch

from model.checkpoint import _restore_buffers, load_state_strict, network_classes

# section of config.yaml -> (checkpoint file, key inside it)
SECTIONS: dict[str, tuple[str, str]] = {
    "dense_vae": ("model_dense.ckpt", "vae"),
    "dense_dit": ("model_dense.ckpt", "dit"),
    "sparse_vae_512": ("model_sparse_512.ckpt", "vae"),
    "sparse_dit_512": ("model_sparse_512.ckpt", "dit"),
    "sparse_vae_1024": ("model_sparse_1024.ckpt", "vae"),
    "sparse_dit_1024": ("model_sparse_1024.ckpt", "dit"),
    "refiner": ("model_refiner.ckpt", "refiner"),
    "refiner_1024": ("model_refiner_1024.ckpt", "refiner"),
}
# sections without weights: recorded in the cascade's config, not converted
EXTRA_SECTIONS = ("dense_image_encoder", "sparse_image_encoder",
                  "dense_scheduler", "sparse_scheduler_512", "sparse_scheduler_1024")

# released class (last two dotted parts are enough to tell them apart) -> our network
CLASSES: dict[str, str] = {
    "ss_vae.SparseSDFVAE": "ss_vae",
    "sparse_dit.SparseDiT": "sparse_dit",
    "dense_vae.DenseShapeVAE": "dense_vae",
    "dense_dit.DenseDiT": "dense_dit",
    "unet_refiner.Voxel_RefinerXL": "refiner",
    "unet_refiner.Voxel_RefinerXL_sign": "refiner",  # RefinerConfig(kind="sign"), told by the target
}

# The release's sampling settings that live in its pipeline's call signature, not in config.yaml
# (Direct3DS2Pipeline.__call__ and .inference, HEAD a1cf235).
PIPELINE_DEFAULTS: dict[str, Any] = {
    "dense": {"steps": 50, "guidance": 7.0, "mc_threshold": 0.1},
    "sparse_512": {"steps": 30, "guidance": 7.0, "mc_threshold": 0.2},
    "sparse_1024": {"steps": 15, "guidance": 7.0, "mc_threshold": 0.2},
    # the 512 refiner marches at twice the threshold, the 1024 refiner at the threshold itself
    "refiner_512_threshold_factor": 2.0,
    "remove_interior": True,
}


# The released modules' constructor arguments at paper size (shared/official/README.md; values not in the
# paper are the classes' defaults; the SS-VAE's 1024 chunk_size is not in the paper). The real snapshot's
# config.yaml is what `s2 convert official` reads; these build synthetic snapshots of the released sizes.
PAPER_PARAMS: dict[str, dict[str, Any]] = {
    "dense_vae": dict(embed_dim=8, in_channels=1, out_channels=1, model_channels_encoder=[32, 128, 512],
                      num_res_blocks_encoder=2, num_res_blocks_middle_encoder=2, model_channels_decoder=[512, 128, 64],
                      num_res_blocks_decoder=4, num_res_blocks_middle_decoder=4),
    "dense_dit": dict(resolution=16, in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024,
                      num_blocks=24, num_heads=16, patch_size=1, qk_rms_norm=True, qk_rms_norm_cross=True),
    "sparse_vae_512": dict(embed_dim=16, resolution=64),
    "sparse_dit_512": dict(resolution=64, in_channels=16, model_channels=1024, cond_channels=1024, out_channels=16,
                           num_blocks=24, num_heads=32, num_kv_heads=2, compression_block_size=4,
                           selection_block_size=8, topk=8, window_size=8, qk_rms_norm=True, qk_rms_norm_cross=True,
                           sparse_conditions=True),
    "sparse_vae_1024": dict(embed_dim=16, resolution=128, chunk_size=4),
    "refiner": dict(),
    "refiner_1024": dict(),
}
PAPER_PARAMS["sparse_dit_1024"] = dict(PAPER_PARAMS["sparse_dit_512"], resolution=128)


class OfficialError(ValueError):
    """A snapshot, config section or tensor that cannot be converted; the message names it."""


def network_of_target(target: str, where: str) -> str:
    key = ".".join(str(target).split(".")[-2:])
    if key not in CLASSES:
        raise OfficialError(f"{where}: class {target!r} is not one this converter knows "
                            f"({', '.join(sorted(CLASSES))})")
    return CLASSES[key]


def _module_file(network: str):
    from model.checkpoint import NETWORKS

    return importlib.import_module(NETWORKS[network][0])


def _converters(network: str):
    """(from_official of the config, official_to_ours, ours_to_official) of one network."""
    mod = _module_file(network)
    _, config_cls = network_classes(network)
    names = getattr(mod, "OFFICIAL_CONVERTERS", None)
    to_ours = getattr(mod, names[0]) if names else getattr(mod, "official_to_ours")
    to_official = getattr(mod, names[1]) if names else getattr(mod, "ours_to_official")
    return config_cls.from_official, to_ours, to_official


def config_from_params(network: str, params: dict, where: str, target: str | None = None):
    from_official, _, _ = _converters(network)
    kind = {"kind": "sign"} if str(target or "").endswith("Voxel_RefinerXL_sign") else {}
    try:
        return from_official(dict(params or {}), **kind)
    except (TypeError, ValueError, KeyError) as e:
        raise OfficialError(f"{where}: params do not describe a {network} ({e})") from None


def convert_state(network: str, cfg, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Released tensors -> our state dict, checked both ways: every released key is used."""
    _, to_ours, to_official = _converters(network)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise OfficialError(f"{where}: entry {bad[0]!r} is a {type(state[bad[0]]).__name__}, not a tensor")
    try:
        ours = to_ours(dict(state), cfg)
    except KeyError as e:
        raise OfficialError(f"{where}: released tensor {e.args[0]!r} is missing") from None
    except ValueError as e:
        raise OfficialError(f"{where}: {e}") from None
    # no released tensor left unused: mapping ours back must give exactly the released keys
    with torch.device("meta"):
        back = to_official({k: v.to("meta") for k, v in ours.items()}, cfg)
    unused = sorted(set(state) - set(back))
    if unused:
        raise OfficialError(f"{where}: released tensor(s) not used by our {network}: "
                            f"{unused[:5]}{' ...' if len(unused) > 5 else ''} ({len(unused)})")
    return ours


def convert_module(section: str, params: dict, state_dict: dict[str, torch.Tensor], *,
                   target: str | None = None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """One released module (config.yaml section + its tensors) as our network, strict, in eval mode."""
    where = f"{section}"
    network = network_of_target(target, where) if target else _section_network(section)
    cfg = config_from_params(network, params, where, target)
    module_cls, _ = network_classes(network)
    ours = convert_state(network, cfg, state_dict, where)
    with torch.device("meta"):
        module = module_cls(cfg)
    module = module.to_empty(device="cpu")
    load_state_strict(module, ours, f"{where} (converted)")
    _restore_buffers(module, module_cls, cfg, ours)
    if dtype is not None:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


def _section_network(section: str) -> str:
    base = section.removesuffix("_512").removesuffix("_1024")
    return {"dense_vae": "dense_vae", "dense_dit": "dense_dit", "sparse_vae": "ss_vae",
            "sparse_dit": "sparse_dit", "refiner": "refiner"}.get(base) or _unknown_section(section)


def _unknown_section(section: str):
    raise OfficialError(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")


# -- the snapshot -------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """A released snapshot folder: its parsed config.yaml, checkpoints read on demand."""

    root: str
    config: dict[str, Any]
    _cache: dict[str, dict] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, root: str) -> "Snapshot":
        if not os.path.isdir(root):
            raise OfficialError(f"snapshot {root}: not a folder")
        path = os.path.join(root, "config.yaml")
        if not os.path.isfile(path):
            raise OfficialError(f"snapshot {root}: no config.yaml")
        return cls(root, read_config_yaml(path))

    def section(self, name: str) -> tuple[str, dict]:
        """(target class, params) of a section of config.yaml."""
        if name not in self.config:
            raise OfficialError(f"snapshot {self.root}: config.yaml has no section {name!r}")
        sec = self.config[name]
        if not isinstance(sec, dict) or "target" not in sec:
            raise OfficialError(f"snapshot {self.root}: config.yaml section {name!r} names no 'target'")
        params = sec.get("params") or {}
        if not isinstance(params, dict):
            raise OfficialError(f"snapshot {self.root}: params of section {name!r} are not a mapping")
        return str(sec["target"]), params

    def tensors(self, section: str) -> dict[str, torch.Tensor]:
        fname, key = SECTIONS[section]
        blob = self._cache.get(fname)
        if blob is None:
            blob = read_ckpt(os.path.join(self.root, fname))
            self._cache = {fname: blob}  # one file in memory at a time
        if key not in blob:
            raise OfficialError(f"{fname}: has no {key!r} entry (has {sorted(blob)})")
        state = blob[key]
        if not isinstance(state, dict):
            raise OfficialError(f"{fname}: entry {key!r} is not a state dict")
        return state


def read_config_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise OfficialError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise OfficialError(f"{path}: not a mapping of sections")
    _check_no_interpolation(doc, path, "")
    return doc


def _check_no_interpolation(node, path: str, where: str) -> None:
    """OmegaConf ``${...}`` references are not plain data; the release's file has none."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_no_interpolation(v, path, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_no_interpolation(v, path, f"{where}[{i}]")
    elif isinstance(node, str) and "${" in node:
        raise OfficialError(f"{path}: {where} = {node!r} is an interpolation; write the value itself")


def read_ckpt(path: str) -> dict:
    """A released ``.ckpt`` as plain data (weights_only: tensors and containers, nothing executed)."""
    if not os.path.isfile(path):
        raise OfficialError(f"{os.path.basename(path)}: not found in {os.path.dirname(path)}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OfficialError(f"{os.path.basename(path)}: unreadable as plain tensors ({first[:200]})") from None
    if not isinstance(blob, dict):
        raise OfficialError(f"{os.path.basename(path)}: holds a {type(blob).__name__}, not a dict")
    return blob


def convert_snapshot(root: str, out: str, *, sections: list[str] | None = None, progress=None) -> dict[str, Any]:
    """Convert every weighted section of a snapshot into ``out/<section>/`` and write ``out/cascade.json``.

    Returns the cascade document. ``progress(section, seconds)`` is called after each section."""
    import json
    import time

    from model.checkpoint import save_pretrained

    snap = Snapshot.open(root)
    wanted = list(sections) if sections else [s for s in SECTIONS if s in snap.config]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise OfficialError(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    os.makedirs(out, exist_ok=True)
    doc: dict[str, Any] = {"format": "s2ray-cascade", "version": 1, "source": os.path.abspath(root),
                           "networks": {}, "release": {}}
    for name in wanted:
        t0 = time.perf_counter()
        target, params = snap.section(name)
        network = network_of_target(target, name)
        cfg = config_from_params(network, params, name, target)
        module = convert_module(name, params, snap.tensors(name), target=target)
        meta = {"source": f"{os.path.basename(SECTIONS[name][0])}:{SECTIONS[name][1]}", "release_target": target,
                "release_params": _plain(params)}
        if network == "sparse_dit":
            meta["latent_space"] = f"ss_vae:{name.replace('dit', 'vae')}"
        if network == "dense_dit":
            meta["latent_space"] = "dense_vae:dense_vae"
        save_pretrained(module, cfg, os.path.join(out, name), network=network, meta=meta)
        doc["networks"][name] = {"network": network, "path": name}
        del module
        if progress is not None:
            progress(name, time.perf_counter() - t0)
    for name in EXTRA_SECTIONS:
        if name in snap.config:
            target, params = snap.section(name)
            doc["release"][name] = {"target": target, "params": _plain(params)}
    doc["release"]["pipeline_defaults"] = PIPELINE_DEFAULTS
    with open(os.path.join(out, "cascade.json.tmp"), "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
    os.replace(os.path.join(out, "cascade.json.tmp"), os.path.join(out, "cascade.json"))
    return doc


def _plain(value):
    """YAML values as JSON-ready data."""
    import json

    return json.loads(json.dumps(value, default=str))


def write_synthetic_snapshot(root: str, sections: dict[str, tuple[str, dict]], seed: int = 0,
                             extra: dict[str, dict] | None = None) -> None:
    """A snapshot in the released layout with random weights (tests, parity).

    ``sections``: config.yaml section -> (released target class, its params). Each network is built from
    ``from_official(params)``, its tensors drawn from a seeded generator and written through
    ``ours_to_official`` into ``.ckpt`` files shaped like the release's; ``config.yaml`` names each
    section's target and params; ``extra`` adds sections without weights (encoders, schedulers)."""
    import yaml

    os.makedirs(root, exist_ok=True)
    files: dict[str, dict] = {}
    g = torch.Generator().manual_seed(seed)
    doc: dict[str, Any] = {}
    for section, (target, params) in sections.items():
        network = network_of_target(target, section)
        cfg = config_from_params(network, params, section, target)
        module_cls, _ = network_classes(network)
        _, _, to_official = _converters(network)
        module = module_cls(cfg)
        state = {k: _random_like(v, k, g) for k, v in module.state_dict().items()}
        fname, key = SECTIONS[section]
        files.setdefault(fname, {})[key] = to_official(state, cfg)
        doc[section] = {"target": target, "params": params}
    for section, sec in (extra or {}).items():
        doc[section] = sec
    for fname, blob in files.items():
        torch.save(blob, os.path.join(root, fname))
    with open(os.path.join(root, "config.yaml"), "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)


def _random_like(t: torch.Tensor, name: str, g: torch.Generator) -> torch.Tensor:
    if not t.is_floating_point():
        return t.clone()
    if name.endswith(("weight", "gamma")) and t.ndim == 1:  # norms: around one, not exactly one
        return 1.0 + 0.1 * torch.randn(t.shape, generator=g)
    fan_in = t[0].numel() if t.ndim > 1 else 1
    return torch.randn(t.shape, generator=g) / max(fan_in, 1) ** 0.5
