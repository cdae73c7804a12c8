"""The core's plain training config, its conversion from the validated pydantic model, and config and data
errors that name the field."""

from __future__ import annotations

import dataclasses
import random
import typing

import pytest
from pydantic import ValidationError

from flow_pipeline.config import TrainConfig, format_validation_error
from flow_pipeline.core.data.batching import AUGMENTATIONS
from flow_pipeline.core.knobs import knobs_of
from flow_pipeline.core.train_config import (DEFAULT_MAX_EPOCHS, DEFAULT_MAX_STEPS, EVALUATIONS_PER_RUN, RECIPE_PRINCIPAL_DIMS,
                                              RECIPE_PROTOTYPES, TrainSettings)
from flow_pipeline.core.trainer import train
from flow_pipeline_tests.core.trainer_helpers import data, one_thread, tiny_config


def test_the_validated_model_exposes_exactly_the_declared_knobs_with_their_defaults_and_bounds():
    declared = knobs_of(TrainSettings)
    assert [knob.name for knob in declared] == list(TrainConfig.model_fields)
    assert {f.name for f in dataclasses.fields(TrainSettings)} - set(TrainConfig.model_fields) == {"run_name"}
    for knob in declared:
        field = TrainConfig.model_fields[knob.name]
        assert field.default == knob.default and field.annotation == knob.annotation, knob.name
        assert field.description.startswith(knob.info.description), knob.name
        constraints = {name: getattr(item, name) for item in field.metadata for name in ("ge", "gt", "le", "lt")
                       if hasattr(item, name)}
        assert constraints == knob.info.bounds(), knob.name
    # A few bounds written out here, independently of the declaration.
    bounds = {knob.name: knob.info.bounds() for knob in declared}
    assert bounds["lr"] == {"gt": 0, "le": 1} and bounds["dropout_p"] == {"ge": 0, "lt": 1}
    assert bounds["batch_size"] == {"ge": 1} and bounds["arch"] == {}


def _outside(bound: str, limit: float, annotation) -> float:
    """A value just outside ``bound`` (ge/gt/le/lt) at ``limit``, of the knob's numeric type."""
    step = 1 if int in (annotation, *typing.get_args(annotation)) else 1e-3
    return {"ge": limit - step, "gt": limit, "le": limit + step, "lt": limit}[bound]


@pytest.mark.parametrize("knob", [k for k in knobs_of(TrainSettings) if k.info.bounds()], ids=lambda k: k.name)
def test_every_declared_bound_is_enforced_naming_the_field(knob):
    for bound, limit in knob.info.bounds().items():
        value = _outside(bound, limit, knob.annotation)
        with pytest.raises(ValidationError) as info:
            TrainConfig(**{knob.name: value})
        assert format_validation_error(info.value).startswith(f"invalid training config: {knob.name}: "), value


@pytest.mark.parametrize("knob", [k for k in knobs_of(TrainSettings) if k.info.choices], ids=lambda k: k.name)
def test_every_declared_choice_is_enforced_listing_the_valid_values(knob):
    for value in knob.info.choices:
        assert getattr(TrainConfig(**{knob.name: value}), knob.name) == value
    with pytest.raises(ValidationError) as info:
        TrainConfig(**{knob.name: "no-such-" + knob.name})
    assert format_validation_error(info.value) == (f"invalid training config: {knob.name}: unknown value "
                                                   f"'no-such-{knob.name}'; valid: {', '.join(knob.info.choices)}")


def test_to_core_carries_every_value_and_the_run_name():
    rng = random.Random(3)
    config = TrainConfig(arch=rng.choice(["mlp", "dit"]), flow="fm", sigma_min=rng.uniform(0, 0.5),
                         lr=rng.uniform(1e-5, 1e-2), batch_size=rng.randint(2, 512), mixup_max=rng.uniform(0, 1),
                         dropout_p=rng.uniform(0, 0.9), min_lr_ratio=rng.uniform(0, 1), seed=rng.randint(0, 99),
                         normalization="whiten", time_sampling="logit_normal", resume=True)
    core = config.to_core()
    assert isinstance(core, TrainSettings)
    unset = {name for name, value in config.model_dump().items() if value is None}
    assert unset == {"principal_dims", "prototypes", "max_epochs", "max_steps", "eval_every_steps", "warmup_steps",
                     "train_rows"}
    assert {name: value for name, value in core.to_dict().items() if name not in unset} == {
        name: value for name, value in config.model_dump().items() if name not in unset}
    assert list(core.to_dict()) == list(config.model_dump())  # same order: checkpoints store the same dict
    # Unset knobs as the run uses them (warmup_steps stays unset: the schedule decides it from the run's steps;
    # train_rows until the data says it, and without it the recipe's full prototype count).
    assert core.train_rows is None
    assert (core.principal_dims, core.prototypes, core.max_steps, core.eval_every_steps, core.max_epochs,
            core.warmup_steps) == (RECIPE_PRINCIPAL_DIMS, RECIPE_PROTOTYPES, DEFAULT_MAX_STEPS,
                                   DEFAULT_MAX_STEPS // EVALUATIONS_PER_RUN, DEFAULT_MAX_EPOCHS, None)
    assert TrainConfig(**core.to_dict()).run_name == config.run_name  # the stored copy keeps the run's name
    assert core.run_name == config.run_name
    assert core.flow_params() == config.flow_params() == {"sigma_min": config.sigma_min}
    with pytest.raises(dataclasses.FrozenInstanceError):
        core.lr = 1.0  # type: ignore[misc]


# --- config and data errors name the field -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_unset_knobs_resolve_from_the_knobs_that_are_set(seed):
    """Each unset knob stands for what its description says, written here from those descriptions."""
    rng = random.Random(seed)
    values = {"dim": rng.choice([8, 64, 300, 1024]), "normalization": rng.choice(["zscore", "whiten"]),
              "linear_skip": rng.choice([True, False]), "batch_size": rng.choice([64, 256, 1000])}
    for name, choices in (("max_steps", [None, 0, rng.randint(1, 5000)]), ("max_epochs", [None, rng.randint(1, 9)]),
                          ("prototypes", [None, 0, rng.randint(1, 99)])):
        values[name] = rng.choice(choices)
    network = values["normalization"] == "whiten" and values["linear_skip"]
    if not network and values["prototypes"]:
        values["prototypes"] = None
    rows = rng.choice([None, rng.randint(1, 40), rng.randint(40, 20_000)])
    core = TrainConfig(**values).to_core(train_rows=rows)
    assert core.train_rows == rows
    one_per_12_rows = min(RECIPE_PRINCIPAL_DIMS, values["dim"], *([] if rows is None else [max(1, rows // 12)]))
    expected_dims = one_per_12_rows if network else 0
    assert core.principal_dims == expected_dims
    one_per_30_rows = RECIPE_PROTOTYPES if rows is None else min(RECIPE_PROTOTYPES, rows // 30)
    assert core.prototypes == (values["prototypes"] if values["prototypes"] is not None
                               else one_per_30_rows if expected_dims else 0)
    # Rows set in the config win over the ones passed in; the stored (resolved) copy keeps the run's name.
    assert TrainConfig(**values, train_rows=7).to_core(train_rows=rows).train_rows == 7
    assert TrainConfig(**core.to_dict()).run_name == TrainConfig(**values, train_rows=rows).run_name
    if values["max_steps"] is not None:
        assert core.max_steps == values["max_steps"]
    else:
        passes_1600 = DEFAULT_MAX_STEPS if rows is None else min(DEFAULT_MAX_STEPS,
                                                                  -(-1600 * rows // values["batch_size"]))
        assert core.max_steps == (0 if values["max_epochs"] is not None else passes_1600)
    assert core.max_epochs == (values["max_epochs"] or DEFAULT_MAX_EPOCHS)
    assert core.eval_every_steps == (max(1, core.max_steps // EVALUATIONS_PER_RUN) if core.max_steps else 0)
    assert core.resolved() == core  # resolving twice changes nothing


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("lr", -1.0), ("lr", 2.0), ("patience", -1),
                                         ("max_epochs", 0), ("ema_decay", 1.0), ("ema_every", 0), ("dim", 0)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        tiny_config(**{field: value})
    assert field in str(info.value)
    formatted = format_validation_error(info.value)
    assert formatted.startswith("invalid training config: ")
    assert f"{field}:" in formatted


@pytest.mark.parametrize("field,value,valid", [("aug", "foo", AUGMENTATIONS),
                                               ("arch", "resnet", ("mlp", "dit", "unet")),
                                               ("flow", "ddpm", ("icfm", "otcfm", "fm", "vp")),
                                               ("dataset", "2k", ("1k", "5k", "10k", "full"))])
def test_unknown_names_list_valid_values(field, value, valid):
    with pytest.raises(ValidationError) as info:
        tiny_config(**{field: value})
    message = format_validation_error(info.value)
    assert field in message and repr(value) in message
    for name in valid:
        assert name in message


def test_unknown_fields_are_rejected():
    with pytest.raises(ValidationError, match="learning_rate"):
        tiny_config(learning_rate=0.1)


def test_dim_mismatch_names_dim(data, tmp_path):
    with pytest.raises(ValueError, match="dim"):
        train(tiny_config(dim=32), data, tmp_path)
