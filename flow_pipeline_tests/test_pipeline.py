"""The Dagster pipeline on a real sqlite instance: data assets, partitioned training, metadata read back."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch

from flow_pipeline.core.checkpoint import REQUIRED_KEYS, sha256_file
from flow_pipeline.core.train_config import RECIPE_PRINCIPAL_DIMS, RECIPE_PROTOTYPES
from flow_pipeline.defs.assets import dataset_splits, normalization_stats, trained_checkpoint
from flow_pipeline_tests.helpers import TINY_DATASET, TINY_TRAIN, resources, run_config

pytestmark = pytest.mark.slow

EXPECTED_METADATA = {"checkpoint_path", "sha256", "size_bytes", "best_val_loss", "best_epoch", "epochs_run",
                     "stopped_early", "global_step", "train_seconds", "device", "run_name", "config", "tracking"}


def materialize_data(instance, dataset=TINY_DATASET):
    return dg.materialize([dataset_splits, normalization_stats], instance=instance, resources=resources(),
                          run_config=run_config(dataset=dataset))


def latest_metadata(instance, asset_key: str, partition: str | None = None) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset_key),
                              asset_partitions=[partition] if partition else None), limit=1).records
    assert records, f"no materialization of {asset_key} {partition}"
    return records[0].asset_materialization.metadata


def test_two_partitions_materialize_with_readable_metadata(artifacts_root, tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert materialize_data(instance).success
        splits_meta = latest_metadata(instance, "dataset_splits")
        assert splits_meta["n_train"].value + splits_meta["n_val"].value + splits_meta["n_test"].value == 640
        assert splits_meta["dim"].value == 1024
        stats_meta = latest_metadata(instance, "normalization_stats")
        assert stats_meta["n"].value == splits_meta["n_train"].value
        # The stats come from the train split only: recompute them from the saved train.npy.
        train = np.load(artifacts_root / "data" / "splits" / "train.npy")
        saved = np.load(artifacts_root / "data" / "normalization_stats" / "full-zscore.npz")
        np.testing.assert_allclose(saved["mean"], train.astype(np.float64).mean(0), rtol=1e-6, atol=1e-9)

        for partition in ("mlp-icfm", "dit-fm"):
            result = dg.materialize([trained_checkpoint], instance=instance, resources=resources(),
                                    partition_key=partition, run_config=run_config(train=TINY_TRAIN),
                                    selection=[trained_checkpoint])
            assert result.success
        for partition in ("mlp-icfm", "dit-fm"):
            meta = latest_metadata(instance, "trained_checkpoint", partition)
            assert EXPECTED_METADATA <= set(meta), EXPECTED_METADATA - set(meta)
            path = meta["checkpoint_path"].value
            assert partition in path and path.endswith("best.pt")
            assert sha256_file(path) == meta["sha256"].value
            state = torch.load(path, weights_only=True)
            assert set(REQUIRED_KEYS) <= set(state)
            assert state["best_loss"] == pytest.approx(meta["best_val_loss"].value)
            assert meta["config"].value["arch"] == partition.split("-")[0]
            assert meta["epochs_run"].value == TINY_TRAIN["max_epochs"]
            assert meta["run_name"].value == f"{partition}-full-none-tiny"


def test_invalid_hyperparameters_fail_before_training(artifacts_root, tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert materialize_data(instance).success
        for bad, field in (({"lr": -1.0}, "lr"), ({"batch_size": 0}, "batch_size"), ({"patience": -1}, "patience"),
                           ({"aug": "cutmix"}, "aug"), ({"dataset": "50k"}, "dataset")):
            result = dg.materialize([trained_checkpoint], instance=instance, resources=resources(),
                                    partition_key="mlp-icfm", run_config=run_config(train={**TINY_TRAIN, **bad}),
                                    selection=[trained_checkpoint], raise_on_error=False)
            assert not result.success
            failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
            message = failure.step_failure_data.error.message + str(failure.step_failure_data.user_failure_data)
            assert field in message, message
        assert not (artifacts_root / "checkpoints").exists() or not any((artifacts_root / "checkpoints").rglob("best.pt"))


def test_quickstart_config_trains_through_the_asset_and_principal_dims_is_checked_against_the_data(
        artifacts_root, tmp_path):
    """configs/quickstart.json (the defaults: the shipped recipe), cut to a few steps of a tiny model, trains through
    the asset with the recipe's principal dims and prototypes for its training rows; ``principal_dims`` is bounded by the data's
    dimension, which the asset learns only from the statistics."""
    quickstart = json.loads((Path(__file__).parents[1] / "configs" / "quickstart.json").read_text())
    train = {**quickstart["ops"]["trained_checkpoint"]["config"], "model_size": "tiny", "max_steps": 6,
             "eval_every_steps": 3, "warmup_steps": 2, "batch_size": 64, "device": "cpu"}
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert materialize_data(instance).success
        result = dg.materialize([trained_checkpoint], instance=instance, resources=resources(),
                                partition_key="mlp-icfm", run_config=run_config(train=train),
                                selection=[trained_checkpoint])
        assert result.success
        meta = latest_metadata(instance, "trained_checkpoint", "mlp-icfm")
        config = meta["config"].value
        assert (config["normalization"], config["linear_skip"]) == ("whiten", True)
        # The recipe sized to the data's training rows (80% of TINY_DATASET's rows): a direction per 12, a prototype
        # per 30 (the knobs' descriptions).
        rows = round(TINY_DATASET["n_synthetic"] * (1 - TINY_DATASET["val_fraction"] - TINY_DATASET["test_fraction"]))
        assert config["train_rows"] == rows
        assert (config["principal_dims"], config["prototypes"]) == (min(RECIPE_PRINCIPAL_DIMS, rows // 12),
                                                                    min(RECIPE_PROTOTYPES, rows // 30))
        assert meta["global_step"].value == 6
        too_many = dg.materialize([trained_checkpoint], instance=instance, resources=resources(),
                                  partition_key="mlp-icfm", run_config=run_config(train={**train, "principal_dims": 1025}),
                                  selection=[trained_checkpoint], raise_on_error=False)
        assert not too_many.success
        failure = [e for e in too_many.all_events if e.event_type_value == "STEP_FAILURE"][0]
        assert "principal_dims: 1025 > dim 1024" in failure.step_failure_data.error.message


def test_a_run_with_only_max_epochs_set_trains_on_the_built_in_data(artifacts_root, tmp_path):
    """The first run a person tries: the built-in data at its defaults and ``max_epochs: 2``, every other knob at its
    default. The warmup is not set, so it fits the run: a tenth of its optimizer steps, and the metadata says so."""
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert dg.materialize([dataset_splits, normalization_stats], instance=instance, resources=resources()).success
        result = dg.materialize([trained_checkpoint], instance=instance, resources=resources(),
                                partition_key="mlp-icfm", run_config=run_config(train={"max_epochs": 2}),
                                selection=[trained_checkpoint])
        assert result.success
        meta = latest_metadata(instance, "trained_checkpoint", "mlp-icfm")
        steps = 2 * (latest_metadata(instance, "dataset_splits")["n_train"].value // 256)
        assert meta["global_step"].value == steps > 0
        assert meta["config"].value["warmup_steps"] is None
        assert meta["warmup_steps"].value == min(200, steps // 10)
        assert meta["warmup_from"].value.startswith("default")


def test_unknown_partition_key_is_rejected(artifacts_root, tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        with pytest.raises(Exception, match="transformer-icfm"):
            dg.materialize([trained_checkpoint], instance=instance, resources=resources(),
                           partition_key="transformer-icfm", run_config=run_config(train=TINY_TRAIN))
