"""More than two training workers across nodes: three ZeRO-3 ranks, one per worker node of a four-node
cluster (network namespaces, token auth, checkpoints on S3); a worker node SIGKILLed mid-run, the run goes
on on the two nodes left, each parameter's partitions resharded from 3 ranks to 2, every step once."""

from __future__ import annotations

import json

import pytest

from test_multinode_train import cluster_with_s3, run_losing_a_node

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]


@pytest.fixture(scope="module")
def cluster_of_three():
    """Head + three worker nodes of one CPU each: one training worker per node."""
    with cluster_with_s3(4, cpus_per_worker=1) as cluster:
        yield cluster


def test_three_zero3_workers_lose_a_node_and_go_on_with_two(cluster_of_three):
    c = cluster_of_three
    workers = [i for i in c.alive_nodes() if not c.nodes[i].head]
    assert len(workers) == 3, c.status()
    print(json.dumps(run_losing_a_node(c, "zero3-three", workers, 24, cpus_per_worker=1)))
