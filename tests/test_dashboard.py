"""Named actors and custom metrics on a real local Ray cluster, scraped like Prometheus."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
import ray
from conftest import free_port

from common.config import RunConfig
from common.datasets import load_dataset
from deploy.cluster import Cluster
from deploy.training import stream_and_gather

pytestmark = pytest.mark.cluster

ARM_METRICS = [
    "ray_octopusnet_arm_ff_loss",
    "ray_octopusnet_arm_goodness_pos",
    "ray_octopusnet_arm_goodness_neg",
    "ray_octopusnet_arm_images_per_s",
    "ray_octopusnet_arm_epoch",
]
BRAIN_METRICS = [
    "ray_octopusnet_brain_batches_total",
    "ray_octopusnet_brain_batch_latency_ms_bucket",
    "ray_octopusnet_brain_live_arms",
]


def scrape(port: int) -> str:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/metrics", timeout=10
    ) as response:
        return response.read().decode()


def arm_ids_with(metric: str, text: str) -> set[str]:
    return set(re.findall(rf'^{metric}\{{[^}}]*arm_id="(\d+)"', text, re.M))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, data_dir):
    config = RunConfig(
        data_dir=str(data_dir),
        train_limit=640,
        val_size=256,
        test_limit=256,
        dashboard_port=free_port(),
        epochs=1,
    )
    data = load_dataset(config.dataset, config.data_dir)
    with Cluster(config) as running:
        running.start()
        running.create_actors(data, str(tmp_path_factory.mktemp("run")))
        ray.get([arm.train_epoch.remote(1) for arm in running.arms])
        stream_and_gather(running, "val", "val:1", 1)
        yield running


@pytest.mark.parametrize("name", ["brain", "arm-0", "arm-1", "arm-2", "arm-3"])
def test_actor_named(cluster, name):
    actor = ray.get_actor(name)
    assert ray.get(actor.process_id.remote()) == cluster.process_ids[name]


def test_custom_metrics_scraped(cluster):
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline = time.monotonic() + 90
    missing = ARM_METRICS + BRAIN_METRICS
    while missing and time.monotonic() < deadline:
        time.sleep(3)
        text = scrape(port)
        missing = [
            m for m in ARM_METRICS if arm_ids_with(m, text) != {"0", "1", "2", "3"}
        ]
        missing += [m for m in BRAIN_METRICS if not re.search(rf"^{m}\b", text, re.M)]
    assert missing == []
