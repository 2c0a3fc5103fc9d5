"""cluster/rayservice.yaml: a KubeRay RayService whose Serve config is jobs/serve.yaml's, valid for our app."""
from pathlib import Path

import yaml

from pipeline.serve.config import load_serve_config_file

ROOT = Path(__file__).resolve().parents[1]


def _manifest() -> dict:
    return yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())


def _pods(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def test_rayservice_shape():
    doc = _manifest()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    assert doc["metadata"]["name"] and set(doc["spec"]) >= {"serveConfigV2", "rayClusterConfig"}
    assert isinstance(doc["spec"]["serveConfigV2"], str)  # KubeRay takes the Serve config as a YAML string
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] and cluster["authOptions"] == {"mode": "token"}
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for key, value in cluster["headGroupSpec"]["rayStartParams"].items():
        assert isinstance(value, str), key  # rayStartParams is a map of strings in the CRD


def test_serve_config_is_jobs_serve_yaml_and_valid(tmp_path):
    serve = yaml.safe_load(_manifest()["spec"]["serveConfigV2"])
    reference = yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text())
    assert serve == reference, "cluster/rayservice.yaml's serveConfigV2 differs from jobs/serve.yaml: copy it over"
    path = tmp_path / "serve.yaml"
    path.write_text(_manifest()["spec"]["serveConfigV2"])
    for app in serve["applications"]:
        cfg = load_serve_config_file(path, app["name"])  # our validation: keys, types, checkpoints named
        assert app["import_path"] == "pipeline.serve.app:app_builder"
        assert not cfg.loopback and not cfg.insecure_open and cfg.api_key_env == "S2_API_KEY"


def test_every_pod_gets_the_key_the_image_and_the_models():
    cluster = _manifest()["spec"]["rayClusterConfig"]
    gpu = yaml.safe_load((ROOT / "cluster" / "gpu-kuberay.yaml").read_text())["spec"]
    images = {c["image"] for pod in _pods(gpu) for c in pod["spec"]["containers"]}
    for pod in _pods(cluster):
        for container in pod["spec"]["containers"]:
            refs = [e["secretRef"] for e in container.get("envFrom", []) if "secretRef" in e]
            key = [r for r in refs if r["name"] == "s2-api-key"]
            assert key and not key[0].get("optional", False), container["name"]  # never an open API
            assert container["image"] in images  # the image the other manifests use
            assert {"containerPort": 8000, "name": "serve"} in container["ports"]
    for group in cluster["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for c in spec["containers"] for m in c["volumeMounts"]}
        assert claims[mounts["/models"]] == "s2-models"


def _kube_schema(schema):
    """A CRD's openAPIV3Schema as JSON Schema, strict: int-or-string made explicit, unknown fields refused
    (kubectl apply --validate=strict) wherever the CRD lists the fields."""
    if isinstance(schema, dict):
        if schema.get("x-kubernetes-int-or-string"):
            schema.pop("type", None)
            schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            _kube_schema(value)
    elif isinstance(schema, list):
        for value in schema:
            _kube_schema(value)
    return schema


def test_against_the_kuberay_crd():
    """With S2_KUBERAY_CRDS naming ray.io_rayservices.yaml files of KubeRay releases (colon-separated; not
    shipped, nothing is downloaded), the manifest validates against each one's v1 schema."""
    import os

    import pytest

    paths = [p for p in os.environ.get("S2_KUBERAY_CRDS", "").split(":") if p]
    if not paths:
        pytest.skip("set S2_KUBERAY_CRDS to KubeRay's ray.io_rayservices.yaml (ray-operator/config/crd/bases)")
    jsonschema = pytest.importorskip("jsonschema")
    for path in paths:
        crd = yaml.safe_load(Path(path).read_text())
        assert crd["spec"]["names"]["kind"] == "RayService", path
        schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
                  for e in jsonschema.Draft7Validator(_kube_schema(schema)).iter_errors(_manifest())]
        assert not errors, (path, errors[:5])


def test_every_claim_the_manifests_mount_is_made_by_one():
    """The s2-models volume the GPU pods mount comes from cluster/models-pvc.yaml, not from nowhere."""
    import re

    texts = [p.read_text() for d in ("cluster", "jobs") for p in sorted((ROOT / d).glob("*.yaml"))]
    claims = {c for t in texts for c in re.findall(r"claimName:\s*([\w-]+)", t)}
    made = {doc["metadata"]["name"] for t in texts for doc in yaml.safe_load_all(t)
            if isinstance(doc, dict) and doc.get("kind") == "PersistentVolumeClaim"}
    assert claims and claims <= made, claims - made
