"""The Serve app: one ``Generator`` deployment runs the whole cascade per replica with dynamic batching,
and an ``Api`` ingress (FastAPI) answers HTTP.

The cascade stays in one replica: every stage needs the previous stage's tensors on the same device,
and splitting stages into deployments would ship latents through the object store between them while
the GPU memory of each stage's networks sits idle (docs/generate.md).

HTTP:  POST /v1/generate?format=glb|obj|ply&seed=N  (raw image bytes or multipart 'image')  -> mesh
       GET  /healthz            -> {"status": "ok"}, or 503 {"status": "unhealthy", "error": why} (model not loaded)
       GET  /v1/model                                                                          -> networks, limits
       GET  /docs, /openapi.json                                                               -> API description
Every route but /healthz needs the key when one is configured; on a non-loopback host a key is required.
Python: ``serve.get_deployment_handle("Generator", app_name)`` then ``.generate.remote(item)``.
"""

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
import time

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from ray import serve

from pipeline.config import from_dict
from pipeline.serve.config import ServeConfig
from pipeline.serve import uploads

log = logging.getLogger("ray.serve")


def _opener(uri: str):
    from pipeline import storage

    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(uri)
    return fs.open(path, "rb")


def build_cascade(cfg: ServeConfig):
    from model.cascade import Cascade

    gen = cfg.generation_config
    if cfg.random_weights:
        return Cascade.random(gen, cfg.random_weights)
    return Cascade.from_checkpoints(resolve_run_folders(gen), opener=_opener)


LATEST = "latest"


def resolve_run_folders(gen):
    """A checkpoint field naming a training run's folder (``<storage>/<name>``), or that folder followed by
    ``/latest``, takes the run's newest checkpoint (the one of the highest step), read when the replica starts."""
    import dataclasses

    from pipeline import storage
    from pipeline.train.checkpoints import resolve

    fields = ("structure_vae", "structure_dit", "dit", "vae", "dit_refine", "vae_refine")
    fixed = {}
    for key in fields:
        uri = getattr(gen, key)
        if not uri or uri.endswith((".pt", ".pth")):
            continue
        if uri.rstrip("/").rsplit("/", 1)[-1] == LATEST:
            fixed[key] = resolve(uri.rstrip("/")[: -len(LATEST) - 1])
            continue
        fs, path = storage.filesystem(uri.rstrip("/"))
        if fs.exists(path + "/config.json") or fs.exists(path + "/weights.pt"):
            continue
        fixed[key] = resolve(uri)
    return dataclasses.replace(gen, **fixed) if fixed else gen


def run_items(cascade, items: list[dict]) -> list[dict]:
    """Generation items -> answers with mesh bytes; what the Generator runs for each batch."""
    from model.cascade import Request as GenRequest
    from model.postprocess import mesh_bytes

    results = cascade.generate([GenRequest(i["name"], i["image"], int(i.get("seed", 0))) for i in items])
    out = []
    for item, r in zip(items, results):
        ans = {"name": r.name, "seed": r.seed, "error": r.error, "timings": r.timings, "stats": r.stats,
               "format": item.get("format", "glb"), "batch_size": len(items), "mesh": None, "faces": 0, "vertices": 0}
        if r.ok:
            try:
                ans["mesh"] = mesh_bytes(r.vertices, r.faces, ans["format"])
                ans["faces"], ans["vertices"] = int(len(r.faces)), int(len(r.vertices))
            except ValueError as e:
                ans["error"] = f"{r.name}: {e}"
        out.append(ans)
    return out


class ModelNotLoaded(RuntimeError):
    """The replica's networks did not load; the message is the reason in one line."""


HEALTH_TIMEOUT_S = 10.0
STATUS_TTL_S = 2.0
NOT_LOADED = re.compile(r"(?:ModelNotLoaded: |^)(model did not load: [^\n]*)", re.M)


def not_loaded_line(text: str) -> str | None:
    """The 'model did not load: ...' line of an error or a status message (a traceback quotes it too)."""
    found = NOT_LOADED.findall(text or "")
    return found[-1].strip() if found else None


def failure_line(e: BaseException) -> str:
    """One line for a failed call to the Generator: the load failure it names, else its first line."""
    return not_loaded_line(str(e)) or load_error_line(e)


def unavailable(e: BaseException) -> bool:
    """Does this failed call mean the Generator cannot answer (model not loaded, no replica)?"""
    from ray.serve.exceptions import DeploymentUnavailableError

    return isinstance(e, DeploymentUnavailableError) or not_loaded_line(str(e)) is not None


def generator_status_reason(app_name: str) -> str | None:
    """Why Serve reports the app's Generator failed or unhealthy (one line), else None."""
    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - the controller is unreachable: the caller reports its own error
        return None
    dep = app.deployments.get("Generator") if app else None
    state = str(dep.status).split(".")[-1] if dep else ""
    if state not in ("DEPLOY_FAILED", "UNHEALTHY"):  # healthy, or starting / updating: calls wait, then answer
        return None
    found = not_loaded_line(dep.message)
    if state == "UNHEALTHY" and not found:
        # a replica was lost (a node died) while others live: calls go to those, so this is not an outage
        return None
    first = (dep.message or "").strip().splitlines()
    return found if found else f"Generator {state}: " + (
        first[0] if first else "no replica is running")


def load_error_line(e: BaseException) -> str:
    """'Type: first line of the message' of a load failure (the file and the cause, no traceback)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


@serve.deployment(name="Generator")
class Generator:
    """The cascade on one device; ``generate`` takes one item and is batched across concurrent callers."""

    def __init__(self, config: dict):
        import torch

        self.cfg = from_dict(ServeConfig, config, where="ServeConfig")
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        # A model that does not load keeps the replica up with the reason: check_health (which Serve runs as
        # the replica starts and then periodically) fails with it, so `serve status` names it, and calls fail
        # at once instead of waiting for a replica that never comes.
        self.cascade, self.load_error = None, None
        try:
            self.cascade = build_cascade(self.cfg)
        except Exception as e:  # noqa: BLE001 - any failure to load is reported, never a hanging app
            self.load_error = load_error_line(e)
            log.error("model did not load: %s", self.load_error)
        self.generate.set_max_batch_size(self.cfg.max_batch_size)
        self.generate.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.batches: list[int] = []

    def check_health(self) -> None:
        if self.load_error:
            raise ModelNotLoaded(f"model did not load: {self.load_error}")

    def health(self) -> str | None:
        """None when the model is loaded, else the one-line reason it is not."""
        return self.load_error

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def generate(self, items: list[dict]) -> list[dict]:
        if self.load_error:
            raise ModelNotLoaded(f"model did not load: {self.load_error}")
        self.batches.append(len(items))
        # the cascade blocks for seconds; a thread keeps the replica's loop free to queue the next batch
        return await asyncio.to_thread(run_items, self.cascade, items)

    def info(self) -> dict:
        if self.load_error:
            raise ModelNotLoaded(f"model did not load: {self.load_error}")
        return {**self.cascade.info(), "max_batch_size": self.cfg.max_batch_size,
                "batch_wait_timeout_s": self.cfg.batch_wait_timeout_s}

    def batch_sizes(self) -> list[int]:
        """Sizes of the batches this replica ran (tests and benchmarks check dynamic batching with it)."""
        return list(self.batches)


# FastAPI's own /docs and /openapi.json would answer without the key: ours below check it first.
api = FastAPI(title="s2ray", description="image -> mesh (sparse SDF cascade)", docs_url=None, redoc_url=None,
              openapi_url=None)


@serve.deployment(name="Api")
@serve.ingress(api)
class Api:
    def __init__(self, generator, config: dict):
        self.cfg = from_dict(ServeConfig, config, where="ServeConfig")
        self.generator = generator
        self.api_key = uploads.read_api_key(self.cfg.api_key_file, self.cfg.api_key_env, self.cfg.api_key_secret)
        uploads.require_key(self.api_key, self.cfg.host, self.cfg.loopback, self.cfg.insecure_open)
        self.max_bytes = int(self.cfg.max_upload_mb * 2**20)
        # `serve deploy` names the app in the config file, not in args: ask Serve which app this replica is in
        self.app_name = serve.get_replica_context().app_name
        self._status: tuple[float, str | None] = (-STATUS_TTL_S, None)

    def _error(self, e: uploads.UploadError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    async def _down(self) -> str | None:
        """Why Serve reports the Generator unhealthy (a failed deploy: calls to it would wait), or None.
        Asked of the controller at most every STATUS_TTL_S seconds."""
        now = time.monotonic()
        if now - self._status[0] > STATUS_TTL_S:
            self._status = (now, await asyncio.to_thread(generator_status_reason, self.app_name))
        return self._status[1]

    async def _not_ready(self) -> str | None:
        """None when the Generator answers with its model loaded, else why not (one line)."""
        why = await self._down()
        if why:
            return why
        try:
            return await asyncio.wait_for(self.generator.health.remote(), timeout=HEALTH_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - no replica yet, a timeout, a dead actor: all unhealthy
            return failure_line(e)

    def _unavailable(self, why: str) -> JSONResponse:
        return JSONResponse({"status": "unhealthy", "error": why}, status_code=503)

    @api.get("/healthz")
    async def healthz(self):
        why = await self._not_ready()
        return self._unavailable(why) if why else {"status": "ok"}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        try:
            uploads.check_api_key(self.api_key, request.headers)
        except uploads.UploadError as e:
            return self._error(e)
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        try:
            uploads.check_api_key(self.api_key, request.headers)
        except uploads.UploadError as e:
            return self._error(e)
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json", title="s2ray")

    @api.get("/v1/model")
    async def model(self, request: Request):
        try:
            uploads.check_api_key(self.api_key, request.headers)
        except uploads.UploadError as e:
            return self._error(e)
        if why := await self._down():
            return self._unavailable(why)
        try:
            info = await self.generator.info.remote()
        except Exception as e:  # noqa: BLE001 - the model did not load, or no replica: 503 with the reason
            if not unavailable(e):
                raise
            return self._unavailable(failure_line(e))
        return {**info, "limits": {"max_upload_bytes": self.max_bytes, "max_image_side": self.cfg.max_image_side,
                                   "max_image_pixels": self.cfg.max_image_pixels},
                "formats": ["glb", "obj", "ply"], "api_key_required": self.api_key is not None}

    @api.post("/v1/generate")
    async def generate(self, request: Request, format: str | None = None, seed: int = 0):
        from model.postprocess import FORMATS

        fmt = (format or self.cfg.default_format).lower()
        try:
            uploads.check_api_key(self.api_key, request.headers)
            if fmt not in FORMATS:
                raise uploads.UploadError(400, f"format {fmt!r} is not one of {', '.join(FORMATS)}")
            uploads.check_content_type(request.headers)
            uploads.check_declared_size(request.headers, self.max_bytes)
            body = bytearray()
            async for chunk in request.stream():  # a body without Content-Length is cut off at the limit too
                body += chunk
                if len(body) > self.max_bytes:
                    raise uploads.UploadError(413, f"upload exceeds the limit of {self.max_bytes} bytes")
            up = uploads.image_from_body(request.headers, bytes(body))
            name = up.filename or f"upload-{hashlib.sha256(up.data).hexdigest()[:12]}"
            uploads.check_image(up.data, self.cfg.max_image_side, name, self.cfg.max_image_pixels)
        except uploads.UploadError as e:
            return self._error(e)
        if why := await self._down():
            return self._unavailable(why)
        try:
            ans = await self.generator.generate.remote({"name": name, "image": up.data, "seed": seed, "format": fmt})
        except Exception as e:  # noqa: BLE001 - the model did not load, or no replica: 503 with the reason
            if not unavailable(e):
                raise
            return self._unavailable(failure_line(e))
        if ans["error"]:
            return JSONResponse({"error": ans["error"]}, status_code=422)
        headers = {"X-S2-Seed": str(ans["seed"]), "X-S2-Faces": str(ans["faces"]),
                   "X-S2-Batch-Size": str(ans["batch_size"]),
                   "X-S2-Timings": json.dumps({k: round(v, 4) for k, v in ans["timings"].items()})}
        return Response(ans["mesh"], media_type=FORMATS[fmt], headers=headers)


def build_app(cfg: ServeConfig):
    """The bound application: ``serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix)``."""
    cfg.validate()
    config = dataclasses.asdict(cfg)
    gpu = {"num_gpus": cfg.num_gpus} if cfg.num_gpus else {}
    generator = Generator.options(
        num_replicas=cfg.num_replicas, max_ongoing_requests=max(cfg.max_ongoing_requests, cfg.max_batch_size),
        ray_actor_options={"num_cpus": cfg.num_cpus, **gpu}).bind(config)
    return Api.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=cfg.max_ongoing_requests
                       ).bind(generator, config)


def app_builder(args: dict):
    """Entry of a Serve config file (``import_path: pipeline.serve.app:app_builder``); ``args`` are ServeConfig keys."""
    return build_app(from_dict(ServeConfig, dict(args or {}), where="ServeConfig"))


def start(cfg: ServeConfig, blocking: bool = False):
    """Start (or update) the app on the connected Ray cluster; returns the Api handle.

    Serve keeps one HTTP address per cluster: if it already runs on another host or port, Serve would
    ignore the requested one, so this is an error naming both instead of an app on an unexpected port."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    running = _running_http_address()
    if running is not None and running != (cfg.host, cfg.port):
        raise RuntimeError(f"Ray Serve already listens on {running[0]}:{running[1]} on this cluster; the app asked "
                           f"for {cfg.host}:{cfg.port}. Use that port, or stop Serve first (`serve shutdown`).")
    return deploy(cfg, blocking)


def deploy(cfg: ServeConfig, blocking: bool = False):
    """``serve.run`` of the app; a replica that refuses to start (no API key) is one ConfigError line."""
    try:
        return serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix, blocking=blocking)
    except RuntimeError as e:  # a replica that refused to start: its one-line reason, not Serve's traceback
        from pipeline.config import ConfigError

        text = str(e)
        try:  # the replica's own error is in the deployment's status message
            app = serve.status().applications.get(cfg.name)
            text += "\n" + "\n".join(d.message for d in (app.deployments.values() if app else []))
        except Exception:  # noqa: BLE001 - status is best effort; the original error is raised then
            pass
        found = re.search(r"(?:NoApiKey|ValueError): ((?:refusing to serve|api_key_(?:file|secret)) [^\n]*)", text)
        if found is not None:
            raise ConfigError(found.group(1).strip()) from None
        found = not_loaded_line(text)
        if found is not None:
            raise ConfigError(f"Serve app {cfg.name!r}: {found} (`serve status` shows it)") from None
        raise


def _running_http_address() -> tuple[str, int] | None:
    """(host, port) of the cluster's running Serve proxies, or None where this Ray version does not say."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        return http.host, int(http.port)
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


def generator_handle(app_name: str = "s2"):
    """Python handle to a running app's Generator: ``generator_handle().generate.remote(item)``."""
    return serve.get_deployment_handle("Generator", app_name=app_name)
