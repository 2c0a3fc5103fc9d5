"""Job specs: KubeRay ``RayJob`` manifests that also submit to any running Ray cluster.

A file in ``jobs/`` is a valid ``ray.io/v1`` RayJob, so ``kubectl apply -f`` runs
it on Kubernetes. ``s2 submit`` reads the same file, takes ``spec.entrypoint``
and ``spec.runtimeEnvYAML``, checks the stage's settings locally, and submits
them through Ray's job submission API to the cluster at ``--address`` or
``RAY_ADDRESS``, streaming the logs until the job ends.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, read_yaml_mapping

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class JobSpec:
    path: str
    name: str
    entrypoint: str
    runtime_env: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def argv(self) -> list[str]:
        return shlex.split(self.entrypoint)


def load_job_spec(path: str | Path) -> JobSpec:
    """Read and check a RayJob manifest; errors name the file and the field."""
    p = Path(path)
    doc = read_yaml_mapping(p, str(p), "a RayJob manifest (a mapping)")
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayJob":
        raise ConfigError(f"{p}: expected apiVersion ray.io/v1 and kind RayJob, got "
                          f"{doc.get('apiVersion')!r} / {doc.get('kind')!r}")
    spec = doc.get("spec") or {}
    entrypoint = spec.get("entrypoint")
    if not isinstance(entrypoint, str) or not entrypoint.strip():
        raise ConfigError(f"{p}: spec.entrypoint must be a non-empty command")
    runtime_env: dict[str, Any] = {}
    if spec.get("runtimeEnvYAML"):
        try:
            runtime_env = yaml.safe_load(spec["runtimeEnvYAML"]) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: spec.runtimeEnvYAML is not valid YAML ({exc})") from exc
        if not isinstance(runtime_env, dict):
            raise ConfigError(f"{p}: spec.runtimeEnvYAML must be a mapping")
    name = (doc.get("metadata") or {}).get("name") or p.stem
    return JobSpec(path=str(p), name=name, entrypoint=" ".join(entrypoint.split()), runtime_env=runtime_env,
                   manifest=doc)


CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"


def selected_cluster(spec: JobSpec, cluster_dir: str | Path = CLUSTER_DIR) -> tuple[Path, dict[str, Any]] | None:
    """The RayCluster manifest in ``cluster/`` that the job's ``clusterSelector`` names, or None without one."""
    selector = (spec.manifest.get("spec") or {}).get("clusterSelector") or {}
    name = selector.get("ray.io/cluster")
    if not name:
        return None
    for path in sorted(Path(cluster_dir).glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "RayCluster" and (doc.get("metadata") or {}).get(
                    "name") == name:
                return path, doc
    raise ConfigError(f"{spec.path}: spec.clusterSelector names the RayCluster {name!r}, which no manifest in "
                      f"{cluster_dir} defines")


def standalone_manifest(spec: JobSpec) -> dict[str, Any]:
    """The RayJob with its own cluster: a job that runs on a named RayCluster gets a copy of that cluster's spec
    (``rayClusterSpec``), removed when the job ends. What ``s2 submit JOB --manifest`` prints for kubectl."""
    import copy

    doc = copy.deepcopy(spec.manifest)
    found = selected_cluster(spec)
    if found is None:
        return doc
    path, cluster = found
    body = doc["spec"]
    body.pop("clusterSelector")
    body.update(shutdownAfterJobFinishes=True, ttlSecondsAfterFinished=3600,
                rayClusterSpec=copy.deepcopy(cluster["spec"]))
    doc.setdefault("metadata", {}).setdefault("annotations", {})["s2ray/cluster-from"] = f"cluster/{path.name}"
    return doc


def with_overrides(spec: JobSpec, overrides: list[str]) -> JobSpec:
    """Append ``--key value`` for each ``key=value``; later flags win in the stage's parser."""
    extra = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        extra += ["--" + key.strip().replace("_", "-"), value]
    if not extra:
        return spec
    entry = spec.entrypoint + " " + " ".join(shlex.quote(x) for x in extra)
    return JobSpec(path=spec.path, name=spec.name, entrypoint=entry, runtime_env=spec.runtime_env,
                   manifest=spec.manifest)


SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE_KEY", re.I)


def check_no_secrets(spec: JobSpec) -> None:
    """A job's entrypoint and runtime env are shown by Ray's job API and logged: no credential may be in them.

    Secrets reach a job from the cluster's own environment (a Kubernetes secret), a mounted file, or a
    role; the error names the setting, never its value."""
    from pipeline.storage import InlineCredentials, check_no_credentials

    for name in (spec.runtime_env.get("env_vars") or {}):
        if SECRET_NAME.search(str(name)):
            raise InlineCredentials(f"{spec.path}: runtimeEnvYAML env_vars.{name}: a secret in the job's runtime env "
                                    f"is shown by Ray's job API; give it to the cluster's pods (secretRef) instead")
    argv = spec.argv()
    for i, arg in enumerate(argv):
        flag, _, inline = arg.partition("=")
        if flag != "--storage-options":
            continue
        text = inline or (argv[i + 1] if i + 1 < len(argv) else "")
        try:
            options = json.loads(text)
        except json.JSONDecodeError:
            continue  # the stage's own parser names a malformed value
        check_no_credentials(options, f"{spec.path}: --storage-options")


def check_entrypoint(spec: JobSpec) -> None:
    """Parse an ``s2 <stage> ...`` entrypoint with the stage's own parser, so bad settings fail here."""
    check_no_secrets(spec)
    argv = spec.argv()
    if not argv or Path(argv[0]).name != "s2":
        return  # a foreign command: nothing of ours to check
    from pipeline.cli import build_parser

    parser = build_parser()
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as exc:
        raise ConfigError(f"{spec.path}: spec.entrypoint: the flags above are not valid for "
                          f"'{' '.join(argv[:2])}'") from exc
    check = getattr(args, "check", None)
    if callable(check):
        check(args)


def submit(spec: JobSpec, *, address: str | None = None, wait: bool = True, follow_logs: bool = True,
           working_dir: str | None = None, submission_id: str | None = None, timeout_s: float | None = None) -> str:
    """Submit, stream the logs, and return the job's final status (or its id when not waiting)."""
    check_no_secrets(spec)
    from ray.job_submission import JobSubmissionClient

    from pipeline.ray_address import dashboard_url

    address = dashboard_url(address)  # any of Ray's address forms; answers and accepts our token, or one line
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"Ray cluster at {address}: {first}") from None
    runtime_env = dict(spec.runtime_env)
    if working_dir:
        runtime_env["working_dir"] = working_dir
    job_id = client.submit_job(entrypoint=spec.entrypoint, runtime_env=runtime_env or None,
                               submission_id=submission_id, metadata={"s2.job_spec": Path(spec.path).name})
    print(f"submitted {spec.name} as {job_id} to {address}", file=sys.stderr)
    if not wait:
        return job_id
    deadline = time.monotonic() + timeout_s if timeout_s else None
    if follow_logs:
        async def _tail() -> None:
            async for lines in client.tail_job_logs(job_id):
                sys.stdout.write(lines)
                sys.stdout.flush()

        try:
            asyncio.run(asyncio.wait_for(_tail(), timeout=timeout_s))
        except asyncio.TimeoutError:
            pass
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in TERMINAL:
            return status
        if deadline and time.monotonic() > deadline:
            client.stop_job(job_id)
            return "TIMEOUT"
        time.sleep(1.0)
