"""The core's plain training config and its conversion from the validated pydantic model."""

from __future__ import annotations

import dataclasses
import random

import pytest

from flow_pipeline.config import TrainConfig
from flow_pipeline.core.train_config import KNOBS, TrainSettings


def test_the_core_dataclass_has_exactly_the_validated_models_knobs_and_defaults():
    assert set(KNOBS) == set(TrainConfig.model_fields)
    core_defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings) if f.name != "run_name"}
    model_defaults = {name: field.default for name, field in TrainConfig.model_fields.items()}
    assert core_defaults == model_defaults


def test_to_core_carries_every_value_and_the_run_name():
    rng = random.Random(3)
    config = TrainConfig(arch=rng.choice(["mlp", "dit"]), flow="fm", sigma_min=rng.uniform(0, 0.5),
                         lr=rng.uniform(1e-5, 1e-2), batch_size=rng.randint(2, 512), mixup_max=rng.uniform(0, 1),
                         dropout_p=rng.uniform(0, 0.9), min_lr_ratio=rng.uniform(0, 1), seed=rng.randint(0, 99),
                         normalization="whiten", time_sampling="logit_normal", resume=True)
    core = config.to_core()
    assert isinstance(core, TrainSettings)
    assert core.to_dict() == config.model_dump()
    assert list(core.to_dict()) == list(config.model_dump())  # same order: checkpoints store the same dict
    assert core.run_name == config.run_name
    assert core.flow_params() == config.flow_params() == {"sigma_min": config.sigma_min}
    with pytest.raises(dataclasses.FrozenInstanceError):
        core.lr = 1.0  # type: ignore[misc]
