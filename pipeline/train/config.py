"""The settings of a training job: one dataclass, filled from the job spec's flags (unknown keys are errors)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from pipeline.config import ConfigError, check_choices

NETWORKS = ("dit", "structure_vae", "structure_dit", "vae")
DITS = ("dit", "structure_dit")  # a field's metadata "networks": the networks that read it (default: all)


@dataclass
class TrainConfig:
    network: Literal["dit", "structure_vae", "structure_dit", "vae"] = field(
        default="dit", metadata={"help": "which network of the cascade to train"})
    shards: str = field(default="synthetic", metadata={
        "help": "dataset root (local path or s3://) written by `s2 preprocess`; 'synthetic' = analytic shapes"})
    resolution: int = field(default=256, metadata={"help": "grid resolution of the shards to read"})
    model: str = field(default="debug", metadata={"help": "named model size: debug | small | paper"})
    attention: Literal["full", "ssa"] = field(default="full", metadata={"help": "DiT self-attention",
                                                                        "networks": ("dit",)})
    steps: int = field(default=1000, metadata={"help": "optimizer steps in total (a resumed run finishes them)"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=0, metadata={"help": "linear learning-rate warm-up"})
    lr_schedule: Literal["constant", "cosine"] = field(default="constant", metadata={
        "help": "after the warm-up: 'constant', or 'cosine' decay to 0.05 × the peak at the last step"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 = off)"})
    token_budget: int = field(default=16384, metadata={"help": "most tokens in one batch on one worker"})
    oversize: Literal["skip", "alone"] = field(default="skip", metadata={
        "help": "an SS-VAE shape with more band voxels than token_budget: 'skip' it (named in the log), or train "
                "it 'alone' in a batch of its own, over the budget (small CPU budgets; the memory guard is off "
                "for it)", "networks": ("vae",)})
    kl_weight: Optional[float] = field(default=None, metadata={
        "help": "SS-VAE: weight of the KL term (default: the release's 1e-3, model/vae_loss.py; the demo's debug "
                "SS-VAE trains at 1e-5, docs/demo.md)", "networks": ("vae",)})
    zero_stage: int = field(default=2, metadata={"help": "DeepSpeed ZeRO stage: 1, 2 or 3"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (one per GPU)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    precision: Literal["auto", "bf16", "fp32"] = field(
        default="auto", metadata={"help": "auto = bf16 on GPUs, fp32 on CPUs"})
    ema_decay: float = field(default=0.999, metadata={"help": "decay of the EMA weights that checkpoints keep"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    report_every: int = field(default=10, metadata={
        "help": "steps between reports to Ray Train (each is a sync of all workers); every step is logged"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept; older ones are deleted"})
    storage: str = field(default="./runs", metadata={"help": "where checkpoints go: local path or s3://"})
    name: str = field(default="s2-train", metadata={"help": "run name; rerunning a name resumes it"})
    init_from: Optional[str] = field(default=None, metadata={
        "help": "checkpoint, or run folder <storage>/<name> (its newest checkpoint), whose EMA weights start "
                "this run: the previous curriculum stage"})
    curriculum: str = field(default="", metadata={
        "help": "comma-separated resolutions (256,512,1024): one run per stage, each from the last"})
    structure_vae: Optional[str] = field(default=None, metadata={
        "help": "checkpoint of a trained structure VAE (needed by network=structure_dit)",
        "networks": ("structure_dit",)})
    latent: str = field(default="pooled", metadata={
        "help": "SS-DiT latents: 'pooled' (fixed sub-cell statistics) or a trained SS-VAE checkpoint",
        "networks": ("dit",)})
    cond_drop: float = field(default=0.1, metadata={"help": "rate of zeroed conditions (classifier-free guidance)",
                                                    "networks": DITS})
    image_encoder: str = field(default="tiny", metadata={
        "help": "'tiny' or 'tiny-pixels' (built in) or a DINOv2 path / hub name", "networks": DITS})
    timestep_shift: float = field(default=1.0, metadata={"help": "time shift of training timesteps",
                                                         "networks": DITS})
    grad_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass (less memory, more time)", "networks": DITS})
    max_failures: int = field(default=3, metadata={"help": "worker-group restarts before the run fails"})
    min_workers: int = field(default=0, metadata={
        "help": "elastic training: after a lost node, go on with as few as this many workers (and grow back to "
                "num_workers when nodes return) instead of waiting for a replacement; 0 = off"})
    resize_check_s: float = field(default=60.0, metadata={
        "help": "elastic training: seconds between checks for returned capacity (a resize restarts the "
                "workers from the last checkpoint)"})
    cache_gb: float = field(default=2.0, metadata={
        "help": "replay a worker's prepared shapes from memory when they fit (small datasets); 0 = off"})
    max_skipped_share: float = field(default=0.05, metadata={
        "help": "stop when more than this share of the rows read are bad (each bad row is skipped and named)"})
    holdout: float = field(default=0.0, metadata={
        "help": "share of shapes (by a hash of their id) kept out of training; their reconstruction before and "
                "after the run goes into the last checkpoint's eval.json", "networks": ("vae",)})
    eval_points: int = field(default=20000, metadata={"help": "surface samples per mesh in the held-out evaluation",
                                                      "networks": ("vae",)})
    synthetic_shapes: int = field(default=16, metadata={"help": "shapes of the analytic dataset (shards=synthetic)"})
    seed: int = field(default=0, metadata={"help": "seed of data order, initialisation and noise"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved per training worker"})
    cpu_conv_precision: Literal["fp32", "bf16", "auto"] = field(default="fp32", metadata={
        "help": "operand type of the sparse convolutions' GEMMs on a CPU: bf16 multiplies bfloat16 operands with "
                "float32 accumulation (1.35-1.5x the SS-VAE step on a CPU with AMX; docs/vae.md), and runs the "
                "structure VAE's dense convolutions under bfloat16 autocast (1.8x its step); auto: bf16 "
                "where the worker's CPU multiplies bfloat16 natively (AMX or AVX-512 BF16), fp32 elsewhere"})
    cpu_dit_precision: Literal["fp32", "bf16", "auto"] = field(default="fp32", metadata={
        "help": "the DiTs' linear layers on a CPU: bf16 runs them under bfloat16 autocast while attention, norms, "
                "the residual stream, the loss and the weights stay float32 (model/cpu_precision.py); auto: bf16 "
                "where the worker's CPU multiplies bfloat16 natively (AMX or AVX-512 BF16), fp32 elsewhere",
        "networks": DITS})
    threads_file: str = field(default="", metadata={
        "help": "a local file holding a number: each worker re-reads it between steps and runs that many CPU "
                "threads (a machine shared by several runs hands one the cores another has freed; the demo)"})

    def validate(self) -> None:
        check_choices(self)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage: must be 0..3, got {self.zero_stage}")
        for key in ("steps", "token_budget", "num_workers", "checkpoint_every", "report_every", "resolution"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.max_skipped_share <= 1:
            raise ConfigError(f"max_skipped_share: must be in [0, 1], got {self.max_skipped_share}")
        if not 0 <= self.min_workers <= self.num_workers:
            raise ConfigError(f"min_workers: must be in [0, num_workers={self.num_workers}], got {self.min_workers}")
        if self.resize_check_s < 0:
            raise ConfigError(f"resize_check_s: must be >= 0, got {self.resize_check_s}")
        if not 0 <= self.holdout < 1:
            raise ConfigError(f"holdout: must be in [0, 1), got {self.holdout}")
        if self.holdout and self.network != "vae":
            raise ConfigError(f"holdout: only network=vae measures held-out shapes, this run trains {self.network}")
        if self.kl_weight is not None and self.kl_weight < 0:
            raise ConfigError(f"kl_weight: must be >= 0, got {self.kl_weight}")
        if not 0 <= self.cond_drop < 1:
            raise ConfigError(f"cond_drop: must be in [0, 1), got {self.cond_drop}")
        stages = [r.strip() for r in self.curriculum.split(",") if r.strip()]
        if any(not r.isdigit() or int(r) < 8 for r in stages):
            raise ConfigError(f"curriculum: expected comma-separated resolutions such as 256,512,1024, "
                              f"got {self.curriculum!r}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints: must be >= 1, got {self.keep_checkpoints}")
        if self.network == "structure_dit" and not self.structure_vae:
            raise ConfigError("structure_vae: network=structure_dit needs a trained structure VAE checkpoint")

    @property
    def elastic(self) -> bool:
        """Ray Train may run this job on min_workers..num_workers workers."""
        return 0 < self.min_workers < self.num_workers

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and self.use_gpu)
