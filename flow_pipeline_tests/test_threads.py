"""Each training process gets the cores it may use: the machine's cores divided by the trainings the gpu pool lets
run at once (overridable), so concurrent trainings share the CPU instead of oversubscribing it."""

from __future__ import annotations

import os

import dagster as dg
import pytest

from flow_pipeline.core.precision import native_cpu_bf16_flags
from flow_pipeline.defs.assets import GPU_POOL, gpu_pool_limit, trained_checkpoint
from flow_pipeline.defs.resources import ComputeResource
from flow_pipeline_tests.helpers import TINY_TRAIN, run_config
from flow_pipeline_tests.test_pipeline import materialize_data, resources

CORES = len(os.sched_getaffinity(0))


@pytest.mark.parametrize("concurrent, processes", [(1, 1), (2, 1), (1, 2), (3, 2), (64, 1)])
def test_auto_threads_share_the_cores_between_concurrent_trainings(concurrent, processes):
    expected = CORES // (concurrent * processes) or 1
    assert ComputeResource().threads(concurrent, processes) == expected


def test_an_explicit_thread_count_wins():
    assert ComputeResource(threads_per_training=3).threads(8, 2) == 3
    assert ComputeResource().environment(2)["OMP_NUM_THREADS"] == "2"
    assert "OMP_NUM_THREADS" not in ComputeResource().environment(None)


def test_the_pool_limit_is_read_from_the_instance(tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert gpu_pool_limit(instance) == 1  # no limit set: one training at a time is what a CPU machine has
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, 4)
        assert gpu_pool_limit(instance) == 4


@pytest.mark.slow
def test_a_training_process_runs_with_the_threads_of_its_share(artifacts_root, tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert materialize_data(instance).success
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, 2)
        result = dg.materialize([trained_checkpoint], instance=instance, resources=resources(), partition_key="mlp-icfm",
                                run_config=run_config(train={**TINY_TRAIN, "max_epochs": 1}))
        metadata = result.asset_materializations_for_node("trained_checkpoint")[0].metadata
        assert metadata["threads"].value == max(1, CORES // 2)
        # precision: auto, resolved in the training process from this machine's CPU flags.
        assert metadata["precision"].value == ("bf16" if native_cpu_bf16_flags() else "fp32")
