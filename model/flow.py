"""Rectified flow (DESIGN.md): the training target, timestep sampling with shift, and the Euler sampler.

Convention of the paper: x_t = (1 - t)·x0 + t·ε, t = 0 is data and t = 1 is noise, and the network
predicts the velocity v = ε - x0. The sampler integrates from t = 1 to t = 0. The network is passed in
(as a callable), so the sampling math never lives inside a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

# Paper defaults (DESIGN.md): steps and time shift per stage.
STAGE_DEFAULTS = {
    "dense": {"steps": 50, "shift": 1.0},
    "512": {"steps": 30, "shift": 6.0},
    "1024": {"steps": 15, "shift": 8.0},
}


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Move timesteps towards noise for larger token counts: t' = s·t / (1 + (s - 1)·t)."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t)·x0 + t·ε; t broadcasts against x0 (per token or per sample)."""
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow target v = ε - x0."""
    return noise - x0


@dataclass
class TimestepSampler:
    """Training timesteps: logit-normal(mean, std) then the time shift of the stage."""

    shift: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __call__(self, n: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        z = torch.randn(n, generator=generator, device=device) * self.logit_std + self.logit_mean
        return time_shift(torch.sigmoid(z), self.shift)


def flow_loss(velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the predicted velocity and ε - x0."""
    return torch.mean((velocity.float() - velocity_target(x0, noise).float()) ** 2)


@dataclass(frozen=True)
class ReleaseSchedule:
    """The released generator's discrete flow-matching Euler schedule, from its config.yaml section.

    The release samples with diffusers' ``FlowMatchEulerDiscreteScheduler``. Its noise levels: a training
    grid t_i = i/N (i = N..1) shifted once, s·t / (1 + (s - 1)·t), gives σ_max = 1 and σ_min = shift(1/N);
    ``steps`` points spaced evenly between σ_max and σ_min are shifted again, and 0 is appended. The
    network sees the timestep σ·N (0..1000 for N = 1000), not σ."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    # accepted and recorded; the release's values leave them inactive
    extra: dict = field(default_factory=dict)

    _INACTIVE = {"use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None,
                 "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
    _UNUSED = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")

    @classmethod
    def from_official(cls, params: dict[str, Any]) -> "ReleaseSchedule":
        params = dict(params)
        target = params.pop("target", "")
        if target and not str(target).endswith("FlowMatchEulerDiscreteScheduler"):
            raise ValueError(f"scheduler {target!r}: only FlowMatchEulerDiscreteScheduler is supported")
        known = {"num_train_timesteps", "shift", *cls._INACTIVE, *cls._UNUSED}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown scheduler parameter(s) {unknown}")
        for key, off in cls._INACTIVE.items():
            if key in params and params[key] not in (off, None, False, 0):
                raise ValueError(f"scheduler {key}={params[key]!r} is not supported (the release leaves it off)")
        extra = {k: params[k] for k in (*cls._INACTIVE, *cls._UNUSED) if k in params}
        return cls(int(params.get("num_train_timesteps", 1000)), float(params.get("shift", 1.0)), extra)

    def _shifted(self, t):
        return self.shift * t / (1 + (self.shift - 1) * t)

    def sigmas(self, steps: int, device=None) -> torch.Tensor:
        """steps + 1 noise levels from 1 down to 0 (float32)."""
        if steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {steps}")
        n = self.num_train_timesteps
        grid = self._shifted(torch.arange(n, 0, -1, dtype=torch.float32) / n)
        sig_max, sig_min = grid[0].item(), grid[-1].item()
        ts = np.linspace(sig_max * n, sig_min * n, steps) / n
        sig = torch.from_numpy(self._shifted(ts)).to(torch.float32)
        return torch.cat([sig, torch.zeros(1)]).to(device)


VelocityFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


@dataclass
class FlowEulerSampler:
    """Euler integration of dx/dt = v from t = 1 to t = 0 with time shift and classifier-free guidance.

    ``velocity(x_t, t, cond)`` is the network; ``t`` is a scalar tensor for the whole batch.
    Guidance: v = v_uncond + g·(v_cond - v_uncond), where the unconditional branch gets ``uncond``
    (the zero condition the network was trained with at the drop rate).
    """

    steps: int = 50
    shift: float = 1.0
    guidance: float = 7.0
    # the release's discrete schedule (its config.yaml); None: the continuous shifted schedule above
    schedule: Optional[ReleaseSchedule] = None

    @classmethod
    def for_stage(cls, stage: str, guidance: float = 7.0) -> "FlowEulerSampler":
        if stage not in STAGE_DEFAULTS:
            raise ValueError(f"unknown sampler stage {stage!r}; expected one of {sorted(STAGE_DEFAULTS)}")
        return cls(guidance=guidance, **STAGE_DEFAULTS[stage])

    def timesteps(self, device=None) -> torch.Tensor:
        """steps + 1 shifted times from 1 down to 0."""
        if self.schedule is not None:
            return self.schedule.sigmas(self.steps, device)
        if self.steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {self.steps}")
        return time_shift(torch.linspace(1.0, 0.0, self.steps + 1, device=device), self.shift)

    def guided_velocity(self, velocity: VelocityFn, x: torch.Tensor, t: torch.Tensor, cond, uncond) -> torch.Tensor:
        v_cond = velocity(x, t, cond)
        if uncond is None or self.guidance == 1.0:
            return v_cond
        v_uncond = velocity(x, t, uncond)
        return v_uncond + self.guidance * (v_cond - v_uncond)

    def step(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """One Euler step from t to t_next (< t)."""
        return x + (t_next - t) * v

    @torch.no_grad()
    def sample(self, velocity: VelocityFn, noise: torch.Tensor, cond=None, uncond=None) -> torch.Tensor:
        x = noise
        ts = self.timesteps(noise.device)
        for i in range(self.steps):
            v = self.guided_velocity(velocity, x, ts[i], cond, uncond)
            x = self.step(v.to(x.dtype), x, ts[i], ts[i + 1])
        return x
