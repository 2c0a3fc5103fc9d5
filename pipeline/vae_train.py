"""Single-process SS-VAE training: shards (or the built-in analytic corpus) -> checkpoint + metrics.

The model (``model.vae``), the loss (``model.vae_loss``) and ``train_step``
(one optimizer step on a batch of samples) are separate callables, so a
distributed trainer can wrap the same step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.sdf_shapes import narrow_band, random_shape
from model.sparse import SparseTensor
from model.vae import SparseSDFVAE, VAEConfig
from model.vae_loss import VAELossWeights, VAETargets, stack_targets, vae_loss, vae_targets
from pipeline import storage


@dataclass
class VAETrainConfig:
    shards: str = ""  # shard root (local path or s3://); empty: the built-in analytic corpus
    resolution: int = 64
    size: str = "tiny"  # VAEConfig size name: tiny, small, paper
    init_from: str = ""  # a vae.pt to start from (its network config replaces size), e.g. 256³ weights for 512³
    steps: int = 200
    time_limit_s: float = 0.0  # stop training after this many seconds (0: run all steps)
    batch_size: int = 2
    lr: float = 1e-3
    warmup_steps: int = 20
    grad_clip: float = 1.0
    holdout: int = 2  # samples kept out of training and used for the before/after evaluation
    max_samples: int = 0  # 0: all
    synthetic_count: int = 16  # size of the analytic corpus when no shards are given
    weight_input: float = 1.0
    weight_extra: float = 0.1
    weight_sharp: float = 1.0
    weight_kl: float = 1e-3
    eval_points: int = 20000
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda
    dtype: str = "float32"  # float32 or bfloat16 (autocast on CUDA)
    threads: int = 0  # torch intra-op threads on the CPU; 0: leave as is
    out_dir: str = "out/vae"
    log_every: int = 10

    def validate(self) -> None:
        VAEConfig.named(self.size)
        if self.resolution % 8 or self.resolution < 16:
            raise ValueError(f"VAETrainConfig.resolution: must be a multiple of 8 and at least 16, got {self.resolution}")
        if self.steps < 0 or self.batch_size < 1 or self.holdout < 0:
            raise ValueError("VAETrainConfig: steps >= 0, batch_size >= 1 and holdout >= 0 are required")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"VAETrainConfig.device: expected auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"VAETrainConfig.dtype: expected float32 or bfloat16, got {self.dtype!r}")

    def loss_weights(self) -> VAELossWeights:
        return VAELossWeights(self.weight_input, self.weight_extra, self.weight_sharp, self.weight_kl)


@dataclass
class SDFSample:
    """One sparse SDF as the VAE sees it."""

    name: str
    coords: torch.Tensor  # (N, 3) int32 sorted by key
    values: torch.Tensor  # (N,) float32
    resolution: int


def load_samples(cfg: VAETrainConfig) -> list[SDFSample]:
    """Samples at ``cfg.resolution`` from the shards, or the analytic corpus (seeded) when none are given."""
    out: list[SDFSample] = []
    if cfg.shards:
        from pipeline.shards import read_samples

        for s in read_samples(cfg.shards, resolution=cfg.resolution, with_views=False):
            if not bool(torch.isfinite(s.values).all()):
                raise ValueError(f"{s.mesh_id} ({s.source_uri}): the SDF holds NaN or infinite values")
            out.append(SDFSample(s.mesh_id, s.coords.clone(), s.values.clone(), s.resolution))
            if cfg.max_samples and len(out) >= cfg.max_samples:
                break
        if not out:
            raise ValueError(f"{cfg.shards}: no samples at resolution {cfg.resolution}")
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        for i in range(cfg.synthetic_count):
            shape = random_shape(g)
            c, v = narrow_band(shape, cfg.resolution)
            out.append(SDFSample(f"{shape.kind}-{i:03d}", c, v, cfg.resolution))
    return out


def make_batch(samples: list[SDFSample], device: torch.device | str = "cpu") -> SparseTensor:
    """Stack samples of one resolution into a SparseTensor with one SDF channel."""
    res = samples[0].resolution
    if any(s.resolution != res for s in samples):
        raise ValueError(f"make_batch: samples of different resolutions {sorted({s.resolution for s in samples})}")
    coords = torch.cat([torch.cat([torch.full((len(s.coords), 1), b, dtype=torch.int32), s.coords.to(torch.int32)], 1)
                        for b, s in enumerate(samples)])
    values = torch.cat([s.values.float() for s in samples])[:, None]
    for s in samples:
        if not bool(torch.isfinite(s.values).all()):
            raise ValueError(f"{s.name}: the SDF holds NaN or infinite values")
    return SparseTensor(coords.to(device), values.to(device), res, len(samples))


def prepare_batch(samples: list[SDFSample], scale: int, device: torch.device | str = "cpu"
                  ) -> tuple[SparseTensor, VAETargets]:
    x = make_batch(samples, device)
    return x, vae_targets(x, scale)


def train_step(model: SparseSDFVAE, optimizer: torch.optim.Optimizer, x: SparseTensor, targets: VAETargets,
               weights: VAELossWeights, grad_clip: float = 1.0, autocast_dtype: torch.dtype | None = None
               ) -> dict[str, float]:
    """One optimizer step on a batch; returns the loss terms."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None and x.feats.is_cuda):
        pred, mean, logvar = model(x)
    terms = vae_loss(pred.replace(pred.feats.float()), targets, mean, logvar, weights)
    terms["total"].backward()
    if grad_clip > 0:
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return {k: float(v.detach()) for k, v in terms.items()}


def save_checkpoint(path: str | Path, model: SparseSDFVAE, train_cfg: VAETrainConfig | None = None,
                    step: int = 0) -> None:
    """State dict and configs as plain types, written to a temporary name then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "model": model.state_dict(),
        "vae_config": dataclasses.asdict(model.config),
        "train_config": dataclasses.asdict(train_cfg) if train_cfg is not None else {},
        "step": step,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[SparseSDFVAE, dict]:
    """Model with its weights (loaded with weights_only=True) and the checkpoint's metadata."""
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path}: not a readable VAE checkpoint ({exc})") from exc
    if not isinstance(blob, dict) or "model" not in blob or "vae_config" not in blob:
        raise ValueError(f"{path}: not a VAE checkpoint (no model / vae_config)")
    model = SparseSDFVAE(VAEConfig.from_dict(blob["vae_config"])).to(device)
    model.load_state_dict(blob["model"])
    return model, {k: v for k, v in blob.items() if k != "model"}


def _evaluate_logged(model, held, cfg: VAETrainConfig, device, when: str) -> dict:
    """Held-out metrics, with a line before and after (an untrained decoder at 512³ can take minutes)."""
    from pipeline.vae_eval import evaluate

    if not held:
        return {}
    t = time.time()
    print(f"evaluating {len(held)} held-out samples at {cfg.resolution}³ {when} ...", flush=True)
    out = evaluate(model, held, cfg.eval_points, device)
    print(f"evaluated in {time.time() - t:.1f} s: Chamfer {out['chamfer']:.5f}", flush=True)
    return out


def lr_factor(cfg: VAETrainConfig, step: int, elapsed: float) -> float:
    """Linear warm-up, then a cosine over the run. With a time limit the run's progress is the larger
    of the step and time fractions, so a run cut short by time still ends at a low rate."""
    done = step / max(1, cfg.steps)
    if cfg.time_limit_s:
        done = max(done, elapsed / cfg.time_limit_s)
    return min(1.0, (step + 1) / max(1, cfg.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def _device(cfg: VAETrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def train_vae(cfg: VAETrainConfig, progress: bool = True) -> dict:
    """Train on one process; evaluate the held-out samples before and after. Returns the metrics."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = _device(cfg)
    samples = load_samples(cfg)
    if len(samples) <= cfg.holdout:
        raise ValueError(f"train_vae: {len(samples)} samples leave none for training after holding out {cfg.holdout}")
    # a seeded shuffle of the samples in name order, so the held-out samples are not just the first
    # shard's and are the same meshes at every resolution (shard order differs between resolutions)
    samples.sort(key=lambda s: s.name)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    samples = [samples[i] for i in order]
    held, train = samples[: cfg.holdout], samples[cfg.holdout:]
    if cfg.init_from:
        model, meta = load_checkpoint(cfg.init_from, str(device))
        if progress:
            print(f"starting from {cfg.init_from} (step {meta.get('step')}, "
                  f"trained at {meta.get('train_config', {}).get('resolution')}³)")
    else:
        model = SparseSDFVAE(VAEConfig.named(cfg.size)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    autocast = torch.bfloat16 if cfg.dtype == "bfloat16" else None
    before = _evaluate_logged(model, held, cfg, device, "before training")
    scale = model.config.downsample
    # targets depend on the input only: build each sample's once, on first use
    per_sample: dict[int, VAETargets] = {}
    g = torch.Generator().manual_seed(cfg.seed + 1)
    history, t0 = [], time.time()
    first_step_s = 0.0
    voxels_seen = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("train VAE", total=cfg.steps)
        for step in range(cfg.steps):
            pick = torch.randperm(len(train), generator=g)[: cfg.batch_size].sort().values.tolist()
            for i in pick:
                if i not in per_sample:
                    per_sample[i] = prepare_batch([train[i]], scale, device)[1]
            x = make_batch([train[i] for i in pick], device)
            targets = stack_targets([per_sample[i] for i in pick])
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, step, time.time() - t0)
            if step == 0 and progress and device.type == "cuda":
                from kernels.sparse_conv.triton_conv import autotune_enabled

                if autotune_enabled():
                    bar.console.print("first step: tuning the sparse-conv kernels per channel pair "
                                      "(minutes for the paper model; S2_CONV_AUTOTUNE=0 skips it)")
            terms = train_step(model, optimizer, x, targets, cfg.loss_weights(), cfg.grad_clip, autocast)
            if step == 0:
                first_step_s = time.time() - t0
            voxels_seen += len(x)
            history.append(terms)
            if progress and (step % cfg.log_every == 0 or step == cfg.steps - 1):
                bar.console.print(f"step {step:5d}  loss {terms['total']:.4f}  input {terms['input']:.4f}  "
                                  f"extra {terms['extra']:.4f}  sharp {terms['sharp']:.4f}  kl {terms['kl']:.2f}")
            bar.advance(task)
            if cfg.time_limit_s and time.time() - t0 > cfg.time_limit_s:
                break
    seconds = time.time() - t0
    peak_gib = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    ckpt = Path(cfg.out_dir) / "vae.pt"
    save_checkpoint(ckpt, model, cfg, len(history))
    after = _evaluate_logged(model, held, cfg, device, f"after {len(history)} steps")
    first = history[0]["total"] if history else float("nan")
    last = sum(h["total"] for h in history[-10:]) / max(1, len(history[-10:])) if history else float("nan")
    later = seconds - first_step_s
    # the network is --size's, or the init_from checkpoint's when one is given
    result = {"checkpoint": str(ckpt), "resolution": cfg.resolution, "vae_config": dataclasses.asdict(model.config),
              "init_from": cfg.init_from,
              "steps": len(history), "train_seconds": seconds, "first_step_seconds": first_step_s,
              "steps_per_second_after_first": (len(history) - 1) / later if len(history) > 1 and later > 0 else None,
              "input_voxels_per_second": voxels_seen / seconds if seconds > 0 else None,
              "peak_gpu_gib": peak_gib, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "train_samples": len(train), "heldout_samples": len(held), "heldout_names": [s.name for s in held],
              "loss_first": first, "loss_last10": last, "before": before, "after": after}
    fs, path = storage.filesystem(str(Path(cfg.out_dir) / "metrics.json"))
    storage.write_atomic(fs, path, json.dumps(result, indent=1, default=float).encode())
    return result
