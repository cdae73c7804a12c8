"""The run config of trained_checkpoint is derived from TrainConfig: every training knob is settable from the
launchpad / --config-json, validated by TrainConfig with the field named."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from flow_pipeline.config import TrainConfig
from flow_pipeline.defs.assets import trained_checkpoint
from flow_pipeline.core.knobs import knobs_of
from flow_pipeline.core.train_config import TrainSettings
from flow_pipeline.defs.run_config import FROM_PARTITION_AND_DATA, RunLevelSettings, TrainRunConfig
from flow_pipeline_tests.test_pipeline import materialize_data, resources
from flow_pipeline_tests.helpers import REPO_ROOT, TINY_TRAIN, run_config

# The knobs a hand-kept copy of the run config once left out.
ONCE_MISSING = {"sigma": 0.05, "sigma_min": 0.001, "noise_std": 0.2, "mixup_max": 0.3, "dropout_p": 0.2,
                "min_lr_ratio": 0.25}


def launchpad_fields() -> set[str]:
    """Field names of the asset's Dagster config schema, as the launchpad shows them."""
    return set(trained_checkpoint.op.config_schema.config_type.fields)


def test_every_declared_knob_is_a_launchpad_field_with_its_description():
    expected = {knob.name: knob for knob in (*knobs_of(TrainSettings), *knobs_of(RunLevelSettings))
                if knob.name not in FROM_PARTITION_AND_DATA}
    assert set(expected) == launchpad_fields()
    assert set(ONCE_MISSING) <= launchpad_fields()
    schema = trained_checkpoint.op.config_schema.config_type.fields
    for name, knob in expected.items():
        assert schema[name].description.startswith(knob.info.description), name


def test_launchpad_defaults_are_train_config_defaults():
    run = TrainRunConfig()
    for name in set(TrainConfig.model_fields) - set(FROM_PARTITION_AND_DATA):
        assert getattr(run, name) == TrainConfig.model_fields[name].default, name


def test_run_values_reach_the_train_config_and_bad_ones_name_their_field():
    config = TrainRunConfig(**ONCE_MISSING).to_train_config("dit-icfm", dim=1024, device="cpu")
    for name, value in ONCE_MISSING.items():
        assert getattr(config, name) == value, name
    assert (config.arch, config.flow, config.dim) == ("dit", "icfm", 1024)
    with pytest.raises(Exception, match="min_lr_ratio"):
        TrainRunConfig(min_lr_ratio=2.0).to_train_config("dit-icfm", dim=1024, device="cpu")


@pytest.mark.slow
def test_a_once_missing_knob_set_through_dagster_reaches_the_checkpoint(artifacts_root, tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert materialize_data(instance).success
        bad = dg.materialize([trained_checkpoint], instance=instance, resources=resources(), partition_key="mlp-icfm",
                             run_config=run_config(train={**TINY_TRAIN, "dropout_p": 1.5}),
                             selection=[trained_checkpoint], raise_on_error=False)
        assert not bad.success
        failure = [e for e in bad.all_events if e.event_type_value == "STEP_FAILURE"][0]
        assert "dropout_p" in failure.step_failure_data.error.message + str(failure.step_failure_data.user_failure_data)
        good = dg.materialize([trained_checkpoint], instance=instance, resources=resources(), partition_key="mlp-icfm",
                              run_config=run_config(train={**TINY_TRAIN, "max_epochs": 1, "sigma": 0.05,
                                                           "min_lr_ratio": 0.25}),
                              selection=[trained_checkpoint])
        assert good.success
        metadata = good.asset_materializations_for_node("trained_checkpoint")[0].metadata
        assert metadata["config"].value["sigma"] == 0.05
        assert metadata["config"].value["min_lr_ratio"] == 0.25


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").glob("*.json")), ids=lambda path: path.name)
def test_every_shipped_config_file_is_a_valid_run_config(path):
    """Each file in configs/ is a `--config-json` for trained_checkpoint whose knobs exist and validate."""
    ops = json.loads(path.read_text())["ops"]
    assert set(ops) == {"trained_checkpoint"}, path.name
    values = ops["trained_checkpoint"]["config"]
    assert set(values) <= launchpad_fields(), path.name
    config = TrainRunConfig(**values).to_train_config("mlp-icfm", dim=1024, device="cpu", train_rows=15_360)
    assert {name: getattr(config, name) for name in values} == values
