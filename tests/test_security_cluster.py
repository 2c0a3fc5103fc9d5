"""`s2 cluster down` ends the cluster `s2 cluster up` started and nothing else (another cluster runs beside it)."""
import os
import subprocess
import sys

import pytest

from pipeline.commands.cluster import RECORD, own_processes, temp_dir_for
from servers import free_port, start_ray

S2 = os.path.join(os.path.dirname(sys.executable), "s2")


@pytest.mark.integration
def test_cluster_down_ends_only_its_own_cluster(tmp_path):
    other = start_ray(num_cpus=1)  # someone else's cluster on the same machine
    try:
        before = {p.pid for p in other.processes()}
        assert before
        dash = free_port()
        env = {**os.environ, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token"), "RAY_USAGE_STATS_ENABLED": "0"}
        up = subprocess.run([S2, "cluster", "up", "--num-cpus", "1", "--port", str(free_port()), "--dashboard-port",
                             str(dash)], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        ours = temp_dir_for(dash)
        assert own_processes(ours) and os.path.exists(os.path.join(ours, RECORD))
        down = subprocess.run([S2, "cluster", "down", "--dashboard-port", str(dash)], env=env, capture_output=True,
                              text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        assert own_processes(ours) == []
        assert {p.pid for p in other.processes()} >= before, "the other cluster lost processes"
        again = subprocess.run([S2, "cluster", "down", "--dashboard-port", str(dash)], env=env, capture_output=True,
                               text=True, timeout=120)
        assert again.returncode == 1 and "nothing stopped (other Ray clusters are left alone)" in again.stderr
    finally:
        other.stop()
