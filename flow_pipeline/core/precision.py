"""Which training precision ``precision: auto`` means on the device at hand.

bf16 autocast pays off where the hardware multiplies bf16 natively: CUDA GPUs, and CPUs with AVX512-BF16 or AMX
(``avx512_bf16`` / ``amx_bf16`` in /proc/cpuinfo); elsewhere a CPU emulates bf16 and is slower than fp32.
"""

from __future__ import annotations

from pathlib import Path

PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def native_cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bf16 flags among the CPU's /proc/cpuinfo flags (``cpuinfo``: that file's text; read when None).
    Empty where the file is missing (not Linux) or lists none."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            return [flag for flag in NATIVE_BF16_CPU_FLAGS if flag in flags]
    return []


def uses_bf16(precision: str, device_type: str, cpu_bf16_flags: list[str] | None = None) -> bool:
    """Whether a run of ``precision`` (``auto`` | ``fp32`` | ``bf16``) trains under bf16 autocast on ``device_type``.

    ``auto`` is bf16 on CUDA and on a CPU with native bf16 (``cpu_bf16_flags``: :func:`native_cpu_bf16_flags`,
    read when None), where it trained as well as fp32 at three seeds and faster (BENCHMARKS.md, CPU bf16); fp32 on
    any other device."""
    if precision != "auto":
        return precision == "bf16"
    if device_type == "cuda":
        return True
    if device_type == "cpu":
        return bool(native_cpu_bf16_flags() if cpu_bf16_flags is None else cpu_bf16_flags)
    return False
