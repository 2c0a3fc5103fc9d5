"""DeepSpeed from the job's settings, and EMA weights that work under every ZeRO stage."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from pipeline.train.checkpoints import guard_engine
from pipeline.train.config import TrainConfig


def deepspeed_config(cfg: TrainConfig) -> dict:
    """ZeRO stage and precision from the job; bf16 on GPUs, fp32 on CPUs (gloo has no bf16 speed-up)."""
    zero = {"stage": cfg.zero_stage, "overlap_comm": cfg.use_gpu, "contiguous_gradients": True}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        # The loop feeds one token-budget batch per step; DeepSpeed's own batching is unused.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16},
        # AdamW from torch: DeepSpeed's fused/CPU Adam would need a compiled op.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def skip_shm_op() -> None:
    """Tell DeepSpeed not to JIT-build its shared-memory all-reduce op (CPU accelerator only).

    Only ``inference_all_reduce`` uses that op; training goes through torch.distributed either way.
    Without it nothing is compiled at run time: no shared build folder, no build lock that a killed run
    leaves behind for the next one to wait on, or for a second run to delete under a live build.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning rate at optimizer step ``step`` as a share of ``cfg.lr``: linear warm-up, then constant or
    cosine down to 5% at ``cfg.steps``."""
    f = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    if cfg.lr_schedule == "cosine":
        f *= 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(cfg.steps, 1))))
    return f


def fused_adamw_ok(params, zero_stage: int = 0) -> bool:
    """torch's one-kernel AdamW (``fused=True``) serves these parameters: floating, all on one device of a
    kind it has the kernel for (CPU and CUDA here). It reads and writes each tensor once a step where torch's
    default makes a pass per operation: the demo SS-DiT's `engine.step()` 139 -> 71 ms on one CPU thread
    (benchmarks/RESULTS.md). Not on a CPU under ZeRO-3: there the kernel's result for an element depends on
    its place in the tensor (shifted by three places, one of 997 second moments differs in its last bit: the
    vector body and the tail round differently), and a ZeRO-3 checkpoint resharded to another worker count
    moves elements, where it must continue bit for bit (tests/test_train_elastic.py)."""
    devices = {p.device.type for p in params}
    return (len(devices) == 1 and devices <= {"cpu", "cuda"} and not (devices == {"cpu"} and zero_stage == 3)
            and all(torch.is_floating_point(p) for p in params))


def make_engine(module: nn.Module, cfg: TrainConfig, fused: bool | None = None):
    """DeepSpeed engine, AdamW and its schedule; ``fused`` None picks the one-kernel AdamW where it runs."""
    import deepspeed

    skip_shm_op()
    params = [p for p in module.parameters() if p.requires_grad]
    fused = fused_adamw_ok(params, cfg.zero_stage) if fused is None else fused
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99), fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    engine, opt, _, sched = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched,
                                                 config=deepspeed_config(cfg), dist_init_required=False)
    guard_engine(engine)
    return engine, opt, sched


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: the partition under ZeRO-3, the whole tensor otherwise."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def full_tensor(local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Collective under ZeRO-3: the flattened partitions of every rank, joined and reshaped."""
    if not hasattr(p, "ds_tensor"):
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat([x.flatten() for x in parts])[: p.ds_numel].view(p.ds_shape)


def local_part(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Inverse of ``full_tensor``: this rank's slice of a full tensor."""
    if not hasattr(p, "ds_tensor"):
        return full
    n = p.ds_tensor.numel()
    flat = full.flatten()
    flat = torch.nn.functional.pad(flat, (0, n * dist.get_world_size() - flat.numel()))
    return flat[dist.get_rank() * n:(dist.get_rank() + 1) * n]


class EMA:
    """Exponential moving average of the trainable weights, kept in fp32 on each rank's own part.

    With ``warmup`` (a run that starts from random weights) the decay at update ``t`` is
    min(decay, (1 + t) / (10 + t)): the average follows the weights closely at first, so a short run
    exports trained weights rather than ones still ~decay^steps initial (0.999^150 = 86%). A run that
    starts from another run's EMA (``init_from``) keeps the full decay from its first step."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = False):
        self.decay, self.warmup = decay, warmup
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.shadow = {n: _local(p).detach().float().clone() for n, p in self.params}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int = 0) -> None:
        """Fold in the current weights; ``step`` counts the updates before this one (it continues on resume)."""
        decay = self.decay_at(step)
        for n, p in self.params:
            self.shadow[n].lerp_(_local(p).float(), 1 - decay)

    def full_state_dict(self) -> dict:
        """Collective: EMA weights of the whole model (every rank gets them)."""
        return {n: full_tensor(self.shadow[n], p).cpu() for n, p in self.params}

    def load_full_state_dict(self, sd: dict) -> None:
        for n, p in self.params:
            self.shadow[n] = local_part(sd[n].float(), p).to(_local(p).device).clone()


def full_weights(module: nn.Module) -> dict:
    """Collective: the current (non-EMA) weights of the whole model."""
    return {n: full_tensor(_local(p), p).float().cpu() for n, p in module.named_parameters()}


def load_full_weights(module: nn.Module, sd: dict) -> None:
    """Copy full weights into a module that may be ZeRO-3 partitioned."""
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n in sd:
                _local(p).copy_(local_part(sd[n], p).to(_local(p).dtype))


def grad_norm_finite(loss: torch.Tensor) -> bool:
    return math.isfinite(float(loss))
