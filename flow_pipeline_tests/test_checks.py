"""Asset checks on trained_checkpoint: each verdict fails on a planted fault and passes otherwise (on a best.pt written
by the real trainer), the zero-predictor baselines match the flows, and in Dagster the checks run per partition with
the asset and a failed blocking check fails the run."""

import math
import shutil
from pathlib import Path

import dagster as dg
import pytest
import torch

from flow_pipeline.config import zero_predictor_loss_of
from flow_pipeline.core.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from flow_pipeline.core.data.normalization import Normalizer
from flow_pipeline.core.data.sonar_like import synthetic_sonar_like
from flow_pipeline.core.flows import FLOWS, get_flow
from flow_pipeline.core.trainer import TrainData, train
from flow_pipeline.definitions import defs
from flow_pipeline.defs.assets import TrainRunConfig, dataset_splits, normalization_stats, trained_checkpoint
from flow_pipeline.defs.checks import (BEATS_ZERO_PREDICTOR, FILE_INTACT, WEIGHTS_FINITE, combine_replicates,
                                       verify_checkpoint, verify_trained_checkpoint)
from flow_pipeline.defs.resources import ArtifactsResource
from flow_pipeline_tests.helpers import TINY_DATASET, TINY_TRAIN, run_config

PARTITION = "unet-icfm"  # the fastest tiny model; it beats the zero predictor in 2 epochs (best loss ~1.92)


@pytest.fixture(scope="module")
def real_best(tmp_path_factory) -> tuple[Path, str]:
    """(best.pt, its sha256) of a tiny model trained here by the real trainer on SONAR-like data."""
    embeddings = torch.from_numpy(synthetic_sonar_like(640, dim=1024, seed=0))
    train_rows, val_rows = embeddings[:512], embeddings[512:576]
    data = TrainData(train_rows, val_rows, Normalizer(train_rows.mean(0), train_rows.std(0)))  # z-scores
    config = TrainRunConfig(**TINY_TRAIN, normalization="zscore").to_train_config(PARTITION, dim=1024, device="cpu")
    result = train(config, data, tmp_path_factory.mktemp("real_best"))
    return result.checkpoint_path, result.sha256


def verdicts(path, sha256) -> dict[str, dg.AssetCheckResult]:
    return {result.check_name: result for result in verify_checkpoint(path, sha256)}


def passed(path, sha256) -> dict[str, bool]:
    return {name: result.passed for name, result in verdicts(path, sha256).items()}


ALL_PASS = {FILE_INTACT: True, WEIGHTS_FINITE: True, BEATS_ZERO_PREDICTOR: True}


@pytest.fixture
def copy(real_best, tmp_path) -> Path:
    """A copy of the real best.pt to plant faults in."""
    path = tmp_path / "best.pt"
    shutil.copyfile(real_best[0], path)
    return path


# --- verdicts on planted faults ----------------------------------------------------------------------------------


def test_a_good_checkpoint_passes_every_check(real_best, copy):
    assert passed(copy, real_best[1]) == ALL_PASS
    results = verdicts(copy, real_best[1])
    assert results[FILE_INTACT].metadata["actual_sha256"].value == real_best[1]
    assert results[WEIGHTS_FINITE].metadata["n_nonfinite_values"].value == 0
    assert results[BEATS_ZERO_PREDICTOR].metadata["best_ema_val_loss"].value == load_checkpoint(copy)["best_loss"]


def test_a_flipped_byte_fails_the_file_check(real_best, copy):
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    results = verdicts(copy, real_best[1])
    assert not results[FILE_INTACT].passed
    assert "changed since it was materialized" in results[FILE_INTACT].metadata["error"].value


def test_a_deleted_file_fails_every_check(real_best, copy):
    copy.unlink()
    results = verdicts(copy, real_best[1])
    assert not any(result.passed for result in results.values())
    assert "checkpoint not found" in results[FILE_INTACT].metadata["error"].value
    assert str(copy) in results[WEIGHTS_FINITE].metadata["error"].value


def test_a_check_over_replicates_fails_when_one_replicate_fails(real_best, copy, tmp_path):
    good = tmp_path / "good" / "best.pt"
    good.parent.mkdir()
    shutil.copyfile(real_best[0], good)
    copy.write_bytes(copy.read_bytes()[:-10])  # replicate 1: truncated
    combined = {r.check_name: r for r in combine_replicates([verify_checkpoint(good, real_best[1]),
                                                            verify_checkpoint(copy, real_best[1])])}
    assert {name: r.passed for name, r in combined.items()} == {name: False for name in ALL_PASS}
    assert combined[FILE_INTACT].metadata["failed_replicates"].value == "1"
    assert str(copy) in combined[FILE_INTACT].metadata["path"].value
    both_good = combine_replicates([verify_checkpoint(good, real_best[1])] * 2)
    assert all(r.passed for r in both_good) and both_good[0].metadata["n_replicates"].value == 2


def test_a_wrong_reported_sha256_fails_only_the_file_check(copy):
    assert passed(copy, "0" * 64) == {**ALL_PASS, FILE_INTACT: False}


def test_an_unloadable_file_with_a_matching_sha256_fails(copy):
    copy.write_bytes(b"not a torch file")
    assert passed(copy, sha256_file(copy)) == {FILE_INTACT: False, WEIGHTS_FINITE: False, BEATS_ZERO_PREDICTOR: False}


@pytest.mark.parametrize("group", ["model_state_dict", "ema_shadow"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_weight_fails_the_finite_check(copy, group, bad):
    state = load_checkpoint(copy)
    name = sorted(state[group])[-1]
    state[group][name].view(-1)[3] = bad
    sha256 = save_checkpoint(state, copy)  # reported as materialized: only the weights are at fault
    results = verdicts(copy, sha256)
    assert {name: result.passed for name, result in results.items()} == {**ALL_PASS, WEIGHTS_FINITE: False}
    assert results[WEIGHTS_FINITE].metadata["n_nonfinite_values"].value == 1
    assert results[WEIGHTS_FINITE].metadata["nonfinite_tensors"].value == f"{group}/{name}"


@pytest.mark.parametrize(("flow", "best_loss", "ok"), [
    ("icfm", 2.0, False), ("icfm", 1.99, True), ("icfm", math.nan, False),
    ("vp", 2.3, True), ("vp", 2.5, False),  # vp's zero predictor: pi^2/4 = 2.467
])
def test_the_learning_check_compares_best_loss_with_the_flows_zero_predictor(copy, flow, best_loss, ok):
    state = load_checkpoint(copy)
    state["best_loss"] = best_loss
    state["config"]["flow"] = flow
    sha256 = save_checkpoint(state, copy)
    assert passed(copy, sha256) == {**ALL_PASS, BEATS_ZERO_PREDICTOR: ok}


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_zero_predictor_losses_match_the_flows(flow):
    """E||target||^2 / dim on z-scored data, measured with the flow's own sampler (independently of the table)."""
    generator = torch.Generator().manual_seed(0)
    x_0, x_1 = torch.randn(256, 1024, generator=generator), torch.randn(256, 1024, generator=generator)
    t = torch.rand(256, generator=generator)
    measured = float(get_flow(flow).sample(x_0, x_1, t, generator=generator).target.pow(2).mean())
    reference = zero_predictor_loss_of({"flow": flow})
    assert reference == pytest.approx(math.pi**2 / 4 if flow == "vp" else 2.0, rel=1e-3)
    if flow == "otcfm":  # minibatch OT pairs nearer points: the independent-coupling 2.0 is an upper bound
        assert measured < reference
    else:
        assert measured == pytest.approx(reference, rel=0.02)


# --- in Dagster --------------------------------------------------------------------------------------------------


def check_records(instance, name: str):
    key = dg.AssetCheckKey(trained_checkpoint.key, name)
    return instance.event_log_storage.get_asset_check_execution_history(key, limit=10)


@pytest.mark.slow
def test_checks_run_with_the_asset_per_partition_and_a_failed_check_fails_the_run(tmp_path):
    resources = {**defs.resources, "artifacts": ArtifactsResource(root=str(tmp_path / "artifacts"))}
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert dg.materialize([dataset_splits, normalization_stats], instance=instance, resources=resources,
                              run_config=run_config(dataset=TINY_DATASET)).success
        result = dg.materialize([trained_checkpoint, verify_trained_checkpoint], instance=instance,
                                resources=resources, partition_key=PARTITION, run_config=run_config(train=TINY_TRAIN))
        metadata = result.asset_materializations_for_node("trained_checkpoint")[0].metadata
        path, sha256 = Path(metadata["checkpoint_path"].value), metadata["sha256"].value
        evaluations = {evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()}
        assert set(evaluations) == {FILE_INTACT, WEIGHTS_FINITE, BEATS_ZERO_PREDICTOR}
        assert all(evaluation.passed for evaluation in evaluations.values())
        assert evaluations[FILE_INTACT].metadata["actual_sha256"].value == sha256
        assert [record.partition for record in check_records(instance, FILE_INTACT)] == [PARTITION]

        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # flip one byte of the materialized best.pt
        path.write_bytes(bytes(data))
        # Checks alone, for the partition (the UI's "Execute checks"): the blocking check fails the run.
        rerun = dg.materialize([trained_checkpoint, verify_trained_checkpoint], instance=instance, resources=resources,
                               selection=dg.AssetSelection.checks_for_assets(trained_checkpoint),
                               tags={"dagster/partition": PARTITION}, raise_on_error=False)
        assert not rerun.success
        failure = [event for event in rerun.all_events if event.event_type_value == "STEP_FAILURE"][0]
        assert "blocking asset check failed" in failure.step_failure_data.error.message
        failed = {evaluation.check_name: evaluation for evaluation in rerun.get_asset_check_evaluations()}
        assert not failed[FILE_INTACT].passed
        assert "changed since it was materialized" in failed[FILE_INTACT].metadata["error"].value
        latest = check_records(instance, FILE_INTACT)[0]
        assert (latest.partition, latest.status.value) == (PARTITION, "FAILED")
