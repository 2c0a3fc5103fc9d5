"""One checkpoint format for every network: a folder with ``config.json`` and ``model.safetensors``.

``config.json`` holds the network's name, its typed config (read back with the strict config reader:
an unknown key is an error) and plain metadata (step, latent space, source); ``model.safetensors``
holds the tensors. Nothing in the folder can run code when it is read. A folder is written under a
temporary name and renamed, so a reader never sees half of one.

Networks register here by name; the module and config classes are imported on first use so that
reading this file costs nothing.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import tempfile
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

FORMAT = "s2ray"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# network name -> (module path, module class, config class)
NETWORKS: dict[str, tuple[str, str, str]] = {
    "ss_vae": ("model.vae", "SparseSDFVAE", "VAEConfig"),
    "sparse_dit": ("model.dit", "SparseDiT", "DiTConfig"),
    "dense_vae": ("model.dense_vae", "DenseShapeVAE", "DenseVAEConfig"),
    "dense_dit": ("model.dense_dit", "DenseDiT", "DenseDiTConfig"),
    "refiner": ("model.refiner", "VoxelRefiner", "RefinerConfig"),
}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as the network it claims to be; the message names it."""


def network_classes(network: str) -> tuple[type, type]:
    """(module class, config class) of a registered network."""
    if network not in NETWORKS:
        raise CheckpointError(f"unknown network {network!r}; known: {', '.join(sorted(NETWORKS))}")
    path, module_name, config_name = NETWORKS[network]
    mod = importlib.import_module(path)
    return getattr(mod, module_name), getattr(mod, config_name)


# -- typed configs <-> JSON ----------------------------------------------------------------------------


def config_to_dict(cfg) -> dict[str, Any]:
    """A (possibly nested) config dataclass as JSON-ready data; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _coerce(tp, value, where: str):
    """JSON value -> the field's declared type (nested dataclasses, tuples); strict on unknown keys."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return config_from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return config_from_dict(arg, value, where)
        return tuple(value) if isinstance(value, list) and any(
            typing.get_origin(a) is tuple for a in typing.get_args(tp)) else value
    if (tp is tuple or origin is tuple) and isinstance(value, list):
        args = typing.get_args(tp)
        if args and args[-1] is not Ellipsis and len(args) == len(value):
            return tuple(_coerce(a, v, where) for a, v in zip(args, value))
        inner = args[0] if args else None
        return tuple(_coerce(inner, v, where) if inner is not None else v for v in value)
    return value


def config_from_dict(cls: type, data: dict[str, Any], where: str = "config"):
    """``cls(**data)`` with nested dataclasses rebuilt; an unknown key is an error naming it."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CheckpointError(f"{where}: unknown {cls.__name__} key(s) {', '.join(unknown)} "
                              f"(valid: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints.get(k), v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid {cls.__name__} ({e})") from None


# -- writing -------------------------------------------------------------------------------------------


def _contiguous_unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage or are not contiguous: give each its own copy."""
    out, seen = {}, set()
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"state-dict entry {k!r} is a {type(v).__name__}, not a tensor")
        t = v.detach().to("cpu")
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if not t.is_contiguous() or key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.contiguous().clone()
        if key is not None:
            seen.add(key)
        out[k] = t
    return out


def save_pretrained(module: torch.nn.Module, config, path: str, *, network: str,
                    meta: dict[str, Any] | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """Write ``path/config.json`` and ``path/model.safetensors`` (a local folder; written atomically)."""
    from safetensors.torch import save_file

    if network not in NETWORKS:
        raise CheckpointError(f"unknown network {network!r}; known: {', '.join(sorted(NETWORKS))}")
    state = _contiguous_unshared(state_dict if state_dict is not None else module.state_dict())
    doc = {"format": FORMAT, "version": VERSION, "network": network,
           "config_class": type(config).__name__, "config": config_to_dict(config), "meta": dict(meta or {})}
    json.dumps(doc)  # metadata must be plain data: fail before anything is written
    path = os.path.abspath(path.rstrip("/"))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        save_file(state, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": FORMAT, "network": network})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
        if os.path.isdir(path):
            old = path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# -- reading -------------------------------------------------------------------------------------------


@dataclass
class Pretrained:
    """What ``from_pretrained`` returns: the network in eval mode, its config and metadata."""

    network: str
    module: torch.nn.Module
    config: Any
    source: str
    meta: dict = field(default_factory=dict)


def is_pretrained_folder(path: str, opener: Callable | None = None) -> bool:
    if opener is None:
        return os.path.isfile(os.path.join(path, CONFIG_FILE))
    try:
        with opener(_join(path, CONFIG_FILE)):
            return True
    except (FileNotFoundError, OSError):
        return False


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def read_config(path: str, opener: Callable | None = None) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder, checked for format and version."""
    where = f"checkpoint {path}"
    try:
        if opener is None:
            with open(os.path.join(path, CONFIG_FILE)) as f:
                doc = json.load(f)
        else:
            with opener(_join(path, CONFIG_FILE)) as f:
                doc = json.loads(f.read())
    except FileNotFoundError:
        raise CheckpointError(f"{where}: no {CONFIG_FILE} (not a checkpoint folder)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: {CONFIG_FILE} is unreadable ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{where}: {CONFIG_FILE} is not an {FORMAT} checkpoint config")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{where}: format version {doc.get('version')!r}, this code reads {VERSION}")
    for key in ("network", "config"):
        if key not in doc:
            raise CheckpointError(f"{where}: {CONFIG_FILE} has no {key!r}")
    return doc


def read_weights(path: str, opener: Callable | None = None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    where = f"checkpoint {path}"
    try:
        if opener is None:
            return load_file(os.path.join(path, WEIGHTS_FILE))
        with opener(_join(path, WEIGHTS_FILE)) as f:
            return load(f.read())
    except FileNotFoundError:
        raise CheckpointError(f"{where}: no {WEIGHTS_FILE}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{where}: {WEIGHTS_FILE} is unreadable ({str(e).splitlines()[0]})") from None


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load every tensor into ``module``; a missing, extra or wrong-shape key is an error naming it."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    problems = []
    if missing:
        problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)})")
    if extra:
        problems.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''} ({len(extra)})")
    if shapes:
        k = shapes[0]
        problems.append(f"shape of {k!r} is {tuple(state[k].shape)}, the network has {tuple(own[k].shape)}"
                        + (f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else ""))
    if problems:
        raise CheckpointError(f"{where}: weights do not fit the network: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def from_pretrained(path: str, network: str | None = None, *, opener: Callable | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Pretrained:
    """A network from a checkpoint folder (local path, or any URI ``opener`` opens), in eval mode."""
    path = path.rstrip("/")
    doc = read_config(path, opener)
    where = f"checkpoint {path}"
    if network is not None and doc["network"] != network:
        raise CheckpointError(f"{where}: holds network {doc['network']!r}, expected {network!r}")
    module_cls, config_cls = network_classes(doc["network"])
    if doc.get("config_class", config_cls.__name__) != config_cls.__name__:
        raise CheckpointError(f"{where}: config class {doc.get('config_class')!r}, expected {config_cls.__name__}")
    cfg = config_from_dict(config_cls, doc["config"], f"{where}: config")
    with torch.device("meta"):
        module = module_cls(cfg)
    state = read_weights(path, opener)
    module = module.to_empty(device="cpu")
    load_state_strict(module, state, where)
    _restore_buffers(module, module_cls, cfg, state)
    module = module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
    return Pretrained(doc["network"], module.eval().requires_grad_(False), cfg, path, dict(doc.get("meta") or {}))


def _restore_buffers(module: torch.nn.Module, module_cls: type, cfg, state: dict) -> None:
    """Non-persistent buffers (not in the state dict) were left empty by ``to_empty``: rebuild them."""
    names = {n for n, _ in module.named_buffers()} - set(state)
    if not names:
        return
    fresh = dict(module_cls(cfg).named_buffers())
    owners = dict(module.named_modules())
    for name in names:
        owner, _, leaf = name.rpartition(".")
        owners[owner]._buffers[leaf] = fresh[name]
