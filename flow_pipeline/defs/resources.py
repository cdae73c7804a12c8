"""Resources: where files go, which device trains, how runs are tracked. Swapped per environment, not in code."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import torch
from pydantic import Field

from flow_pipeline.artifacts import ArtifactLayout

ROOT_ENV_VAR = "FLOW_PIPELINE_ROOT"
DEFAULT_ROOT = "artifacts"


class ArtifactsResource(dg.ConfigurableResource):
    """Root directory of every file the pipeline writes (splits, stats, checkpoints, Wandb, reports).

    Point it at a shared volume or a mounted bucket to share checkpoints between machines.
    """

    root: str = DEFAULT_ROOT

    @property
    def layout(self) -> ArtifactLayout:
        return ArtifactLayout(Path(self.root).expanduser().resolve())


class ComputeResource(dg.ConfigurableResource):
    """Which device the training processes of a run use.

    device: ``auto`` (CUDA when present, else CPU with a warning), ``cpu`` or ``cuda``.
    visible_devices: passed to the training process as ``CUDA_VISIBLE_DEVICES`` (e.g. ``"0"`` or ``"2,3"``);
    empty keeps the inherited value. The ``gpu`` pool limit should equal the number of GPUs shared this way.
    """

    device: str = "auto"
    visible_devices: str = ""
    threads_per_training: int = Field(
        default=0, ge=0,
        description="torch intra-op threads of each training process; 0: the cores this machine gives the run "
        "worker divided by the trainings that may run at once (the gpu pool limit x processes per run)",
    )

    def resolve_device(self, log) -> str:
        if self.device == "auto":
            if torch.cuda.is_available():
                return "cuda"
            log.warning("compute.device=auto and no CUDA device is visible: training on the CPU")
            return "cpu"
        if self.device not in ("cpu", "cuda"):
            raise dg.Failure(f"compute.device: unknown value {self.device!r}; valid: auto, cpu, cuda")
        return self.device

    def threads(self, concurrent_trainings: int, processes_per_run: int = 1) -> int:
        """Threads of one training process when ``concurrent_trainings`` runs of ``processes_per_run`` processes
        each may train at once on this machine: two 1-thread trainings do more work together than one 2-thread
        training (BENCHMARKS.md), so the cores are shared out rather than oversubscribed."""
        if self.threads_per_training:
            return self.threads_per_training
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // max(1, concurrent_trainings * processes_per_run))

    def environment(self, threads: int | None = None) -> dict[str, str]:
        """Environment overrides for the training process (``threads``: its OpenMP/torch intra-op threads)."""
        env = {"CUDA_VISIBLE_DEVICES": self.visible_devices} if self.visible_devices else {}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op pool reads it at start-up; torchrun too
        return env


def default_root() -> str:
    return os.environ.get(ROOT_ENV_VAR, DEFAULT_ROOT)
