"""precision: auto is bf16 where the hardware multiplies bf16 natively (CUDA, CPUs with AVX512-BF16 or AMX)."""

from __future__ import annotations

import pytest
import torch

from flow_pipeline.core import precision
from flow_pipeline.core.precision import native_cpu_bf16_flags, uses_bf16
from flow_pipeline.core.trainer import train
from flow_pipeline_tests.core.trainer_helpers import data, on_trained_model, tiny_config  # noqa: F401

ZEN3 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
ZEN4 = "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "model name\t: Intel(R) Xeon(R)\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
# avx512bw alone is not native bf16: torch would emulate it.
SKYLAKE = "model name\t: Intel(R) Xeon(R)\nflags\t\t: avx2 avx512f avx512bw avx512_vnni\n"


@pytest.mark.parametrize("cpuinfo, expected", [
    (ZEN3, []), (ZEN4, ["avx512_bf16"]), (SAPPHIRE_RAPIDS, ["avx512_bf16", "amx_bf16"]), (SKYLAKE, []),
    ("", []), ("model name\t: something without a flags line\n", []),
])
def test_native_bf16_flags_come_from_the_cpuinfo_flags_line(cpuinfo, expected):
    assert native_cpu_bf16_flags(cpuinfo) == expected


def test_native_bf16_flags_of_this_machine_are_the_cpuinfo_flags_it_lists():
    with open("/proc/cpuinfo") as f:
        listed = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    assert native_cpu_bf16_flags() == [flag for flag in ("avx512_bf16", "amx_bf16") if flag in listed]


@pytest.mark.parametrize("requested, device, flags, expected", [
    ("fp32", "cuda", [], False), ("fp32", "cpu", ["amx_bf16"], False),
    ("bf16", "cpu", [], True), ("bf16", "cuda", [], True),
    ("auto", "cuda", [], True), ("auto", "cpu", [], False),
    ("auto", "cpu", ["avx512_bf16"], True), ("auto", "cpu", ["amx_bf16"], True), ("auto", "mps", ["amx_bf16"], False),
])
def test_uses_bf16(requested, device, flags, expected):
    assert uses_bf16(requested, device, flags) is expected


@pytest.mark.parametrize("flags, expected", [([], "fp32"), (["avx512_bf16"], "bf16")])
def test_auto_trains_in_what_the_cpu_multiplies_natively(flags, expected, data, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "native_cpu_bf16_flags", lambda: flags)
    output_dtypes = set()
    on_trained_model(monkeypatch, lambda model: model.register_forward_hook(
        lambda module, inputs, output: output_dtypes.add(output.dtype) if module.training else None))
    result = train(tiny_config(precision="auto", max_epochs=1), data, tmp_path)
    assert result.precision == expected
    assert output_dtypes == {torch.bfloat16 if expected == "bf16" else torch.float32}
