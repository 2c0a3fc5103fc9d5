import glob
import os

import pytest
import yaml

from pipeline import jobs
from pipeline.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = sorted(p for p in glob.glob(os.path.join(ROOT, "jobs", "*.yaml"))
               if (yaml.safe_load(open(p)) or {}).get("kind") == "RayJob")


def test_there_are_job_specs():
    assert any(p.endswith("preprocess.yaml") for p in SPECS)


@pytest.mark.parametrize("path", SPECS, ids=os.path.basename)
def test_every_job_spec_is_a_rayjob_whose_settings_parse(path):
    spec = jobs.load_job_spec(path)
    doc = spec.manifest
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    # its own cluster, or (training) the one RayCluster of cluster/ it names; --manifest inlines that one
    assert ("rayClusterSpec" in doc["spec"]) != ("clusterSelector" in doc["spec"])
    if "clusterSelector" in doc["spec"]:
        assert "shutdownAfterJobFinishes" not in doc["spec"]  # KubeRay refuses it with a selector
    cluster = jobs.standalone_manifest(spec)["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert cluster.get("authOptions", {}).get("mode") == "token"
    assert spec.argv()[0] == "s2"
    jobs.check_entrypoint(spec)  # the stage's own parser and validation accept it


def test_overrides_are_appended_and_checked():
    spec = jobs.load_job_spec(os.path.join(ROOT, "jobs", "preprocess.yaml"))
    over = jobs.with_overrides(spec, ["input=/data/in dir", "resolutions=64,128"])
    assert over.argv()[-4:] == ["--input", "/data/in dir", "--resolutions", "64,128"]
    jobs.check_entrypoint(over)
    with pytest.raises(ConfigError, match="not valid"):
        jobs.check_entrypoint(jobs.with_overrides(spec, ["no_such_setting=1"]))
    with pytest.raises(ConfigError, match="multiple of 8"):
        jobs.check_entrypoint(jobs.with_overrides(spec, ["resolutions=100"]))
    with pytest.raises(ConfigError, match="key=value"):
        jobs.with_overrides(spec, ["novalue"])


@pytest.mark.parametrize("text,msg", [
    ("apiVersion: v1\nkind: Pod\n", "expected apiVersion ray.io/v1 and kind RayJob"),
    ("apiVersion: ray.io/v1\nkind: RayJob\nspec: {}\n", "spec.entrypoint"),
    ("apiVersion: ray.io/v1\nkind: RayJob\nspec:\n  entrypoint: s2 x\n  runtimeEnvYAML: '[1'\n", "runtimeEnvYAML"),
    ("- a\n- b\n", "expected a RayJob manifest"),
    (": : :\n", "not valid YAML"),
])
def test_bad_specs_name_the_file_and_field(tmp_path, text, msg):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=msg) as exc:
        jobs.load_job_spec(p)
    assert "bad.yaml" in str(exc.value)


def test_submit_without_address_is_a_clear_error(monkeypatch):
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    spec = jobs.load_job_spec(os.path.join(ROOT, "jobs", "preprocess.yaml"))
    with pytest.raises(ConfigError, match="no Ray cluster address"):
        jobs.submit(spec)


def test_demo_names_a_cluster_that_already_runs(monkeypatch):
    """`s2 demo` starting its own cluster where one already runs: a one-line error that says what to do."""
    import subprocess

    from pipeline.commands import demo

    said = ("Traceback (most recent call last):\n  ...\nConnectionError: Ray is trying to start at 10.0.0.2:6379, "
            "but is already running at 10.0.0.2:6379. Please specify a different port.")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a[0], 1, "", said))
    with pytest.raises(SystemExit, match="already runs on this machine.*RAY_ADDRESS=.*already running at 10.0.0.2"):
        demo._start_cluster(None, {"RAY_AUTH_MODE": "disabled"})
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a[0], 2, "", "bad flag\n"))
    with pytest.raises(SystemExit, match=r"`ray start` failed \(exit 2\): bad flag"):
        demo._start_cluster(None, {"RAY_AUTH_MODE": "disabled"})


def test_demo_new_views_come_one_per_kind_from_training_meshes_only():
    """The demo's new-view set: training meshes only, one per corpus kind before any kind gets a second."""
    from types import SimpleNamespace

    from pipeline.commands import demo

    def entry(path, valid=True):
        return SimpleNamespace(path=path, valid=valid)

    entries = [entry("a/1.obj"), entry("a/2.obj"), entry("a/3.obj"), entry("b/1.obj"), entry("b/2.obj"),
               entry("c/1.obj", valid=False), entry("d/1.obj")]
    report = SimpleNamespace(entries=entries)
    held = [entries[1]]
    picked = [e.path for e in demo.pick_new_view_meshes(report, held, 3)]
    assert picked == ["a/3.obj", "b/2.obj", "d/1.obj"]
    more = [e.path for e in demo.pick_new_view_meshes(report, held, 10)]
    assert sorted(more) == ["a/1.obj", "a/3.obj", "b/1.obj", "b/2.obj", "d/1.obj"]  # no held-out, no invalid


def test_demo_summary_is_per_set():
    from pipeline.commands import demo

    nan = float("nan")
    rows = [{"name": "x", "set": demo.NEW_VIEW, "trained": 0.1, "untrained": 0.3, "source_structure": nan},
            {"name": "y", "set": demo.NEW_VIEW, "trained": 0.5, "untrained": 0.3, "source_structure": nan},
            {"name": "z", "set": demo.HELD_OUT, "trained": nan, "untrained": 0.4, "source_structure": 0.2}]
    s = demo.summarize(rows)
    assert s[demo.NEW_VIEW]["trained"] == pytest.approx(0.3) and s[demo.NEW_VIEW]["trained_better"] == 1
    assert s[demo.NEW_VIEW]["items"] == 2 and s[demo.NEW_VIEW]["source_structure"] != s[demo.NEW_VIEW]["source_structure"]
    assert s[demo.HELD_OUT]["trained_better"] == 0 and s[demo.HELD_OUT]["source_structure"] == pytest.approx(0.2)


def test_training_jobs_share_one_cluster_and_print_it_whole(tmp_path):
    """The three training jobs name cluster/gpu-kuberay.yaml's RayCluster instead of each carrying a copy;
    `s2 submit --manifest` gives kubectl a RayJob that brings that cluster, with the --set overrides."""
    import subprocess
    import sys

    import yaml

    gpu = yaml.safe_load(open(os.path.join(ROOT, "cluster", "gpu-kuberay.yaml")))
    for name in ("train_vae", "train_structure", "train_dit"):
        spec = jobs.load_job_spec(os.path.join(ROOT, "jobs", f"{name}.yaml"))
        assert spec.manifest["spec"]["clusterSelector"] == {"ray.io/cluster": gpu["metadata"]["name"]}
        assert "rayClusterSpec" not in spec.manifest["spec"]
    s2 = os.path.join(os.path.dirname(sys.executable), "s2")
    out = subprocess.run([s2, "submit", "jobs/train_vae.yaml", "--manifest", "--set", "steps=7"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = yaml.safe_load(out.stdout)
    assert doc["spec"]["rayClusterSpec"] == gpu["spec"] and "clusterSelector" not in doc["spec"]
    assert doc["spec"]["shutdownAfterJobFinishes"] is True and doc["spec"]["entrypoint"].endswith("--steps 7")
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(os.path.join(ROOT, "jobs", "train_vae.yaml")).read().replace("ray.io/cluster: s2-gpu",
                                                                                      "ray.io/cluster: nope"))
    with pytest.raises(ConfigError, match="clusterSelector names the RayCluster 'nope', which no manifest"):
        jobs.standalone_manifest(jobs.load_job_spec(bad))
