"""Settings of the Serve app: one dataclass (unknown keys are errors), also read from a Serve config file."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pipeline.config import ConfigError, from_dict


@dataclass
class ServeConfig:
    name: str = field(default="s2", metadata={"help": "Serve application name"})
    route_prefix: str = "/"
    host: str = field(default="127.0.0.1", metadata={"help": "HTTP proxy address (0.0.0.0 to expose it)"})
    port: int = 8000
    generation: dict = field(default_factory=dict, metadata={
        "help": "GenerationConfig keys (model/cascade.py): checkpoints, resolution, steps, guidance, post-processing"})
    random_weights: str = field(default="", metadata={
        "help": "'' loads the checkpoints; 'debug' or 'paper' serves untrained networks of that size (benchmarks)"})
    num_replicas: int = 1
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per generator replica (0: CPU replicas)"})
    num_cpus: float = 1.0
    max_batch_size: int = field(default=4, metadata={"help": "most images one replica generates together"})
    batch_wait_timeout_s: float = field(default=0.05, metadata={"help": "how long a replica waits to fill a batch"})
    max_ongoing_requests: int = 32
    max_upload_mb: float = 16.0
    max_image_side: int = 4096
    max_image_pixels: int = field(default=4096 * 4096, metadata={
        "help": "largest width x height accepted (a larger image is refused with 413 before it is decoded)"})
    api_key_file: str = field(default="", metadata={
        "help": "file holding the API key; requests must send it (Authorization: Bearer KEY or X-API-Key)"})
    api_key_env: str = field(default="S2_API_KEY", metadata={
        "help": "environment variable holding the API key when no file or secret is given"})
    api_key_secret: str = field(default="", metadata={
        "help": "Kubernetes secret NAMESPACE/NAME/KEY (or NAME/KEY in the pod's namespace) holding the API key, "
                "read through the cluster API with the pod's service account"})
    insecure_open: bool = field(default=False, metadata={
        "help": "serve without an API key on a non-loopback host (refused otherwise; not recommended)"})
    default_format: Literal["glb", "obj", "ply"] = "glb"
    torch_threads: int = field(default=0, metadata={"help": "intra-op threads per CPU replica (0: torch default)"})

    def validate(self) -> None:
        from model.cascade import GenerationConfig

        for key in ("num_replicas", "max_batch_size", "max_ongoing_requests", "max_image_side", "max_image_pixels",
                    "port"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_upload_mb <= 0 or self.batch_wait_timeout_s < 0 or self.num_gpus < 0 or self.num_cpus < 0:
            raise ConfigError("max_upload_mb > 0, batch_wait_timeout_s >= 0, num_gpus >= 0 and num_cpus >= 0 are required")
        if self.random_weights not in ("", "debug", "small", "paper"):
            raise ConfigError(f"random_weights: expected '', debug, small or paper, got {self.random_weights!r}")
        try:
            gen = from_dict(GenerationConfig, self.generation, where="generation")
            gen.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not self.random_weights and not gen.pretrained:  # a converted release folder names them itself
            missing = [k for k in ("structure_vae", "structure_dit", "dit") if not getattr(gen, k)]
            if missing:
                raise ConfigError(f"generation: checkpoint(s) {', '.join(missing)} not set (or set random_weights)")

    @property
    def loopback(self) -> bool:
        """Is the HTTP address reachable from this machine only?"""
        import ipaddress

        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def generation_config(self):
        from model.cascade import GenerationConfig

        return from_dict(GenerationConfig, self.generation, where="generation")


def load_serve_config_file(path: str | Path, app_name: str | None = None) -> ServeConfig:
    """The ServeConfig of one application of a Serve config file (``serve run`` / ``serve deploy`` format)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    apps = (doc or {}).get("applications") or []
    if app_name:
        apps = [a for a in apps if a.get("name") == app_name]
    if not apps:
        raise ConfigError(f"{path}: no application{' named ' + repr(app_name) if app_name else ''}")
    app = apps[0]
    http = (doc or {}).get("http_options") or {}
    args = dict(app.get("args") or {})
    args.setdefault("name", app.get("name", "s2"))
    args.setdefault("route_prefix", app.get("route_prefix", "/"))
    for key in ("host", "port"):
        if key in http:
            args.setdefault(key, http[key])
    cfg = from_dict(ServeConfig, args, where=f"{path}:{args['name']}")
    return cfg
