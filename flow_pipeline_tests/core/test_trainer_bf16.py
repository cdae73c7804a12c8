"""bf16 autocast: the forward passes run in bfloat16 (on the CPU too), the weights stay float32."""

from __future__ import annotations

import torch

from flow_pipeline.core import checkpoint as ckpt
from flow_pipeline.core.trainer import train
from flow_pipeline_tests.core.trainer_helpers import data, on_trained_model, one_thread, tiny_config


def test_bf16_autocast_trains_with_float32_weights(data, tmp_path, monkeypatch):
    """precision: bf16 runs the training forward passes in bfloat16 (on the CPU too) and keeps the weights float32."""
    output_dtypes = set()

    def record(module, inputs, output):
        if module.training:
            output_dtypes.add(output.dtype)

    on_trained_model(monkeypatch, lambda model: model.register_forward_hook(record))
    result = train(tiny_config(precision="bf16"), data, tmp_path)
    assert output_dtypes == {torch.bfloat16}
    assert result.best_loss < 2.0
    weights = ckpt.load_checkpoint(result.checkpoint_path)["model_state_dict"]
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
