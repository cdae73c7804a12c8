"""The training process: ``python -m flow_pipeline.train --job <run_dir>/job.json``.

Dagster launches it through Pipes (one process per run, so a crash or kill cannot take the run worker down and GPU
memory is freed at exit); it also runs by hand, and under ``torchrun --nproc_per_node=N`` where every rank reads
the same job file and rank 0 alone reports to Dagster, writes checkpoints and logs to Wandb.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

from flow_pipeline.artifacts import FAILURE_NAME, LOSS_CURVE_NAME, RESULT_NAME, TrainJob, write_json
from flow_pipeline.config import TrainConfig
from flow_pipeline.core.checkpoint import verify
from flow_pipeline.core.data.normalization import load_normalizer
from flow_pipeline.core.data.split_store import load_run_splits
from flow_pipeline.core.distributed import DistInfo
from flow_pipeline.core.tracking import NullTracker
from flow_pipeline.core.trainer import TrainData, TrainResult, train


logger = logging.getLogger("flow_pipeline")


def init_distributed(device: str) -> DistInfo:
    """A ``DistInfo`` for this process: single-process unless started by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device != "cpu" and torch.cuda.is_available():
        local_device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(local_device)
    else:
        local_device, backend = torch.device("cpu"), "gloo"
    torch_dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, device=local_device)


def load_train_data(job: TrainJob) -> TrainData:
    """The training rows of the job's ``dataset`` (that size's own split set, or the first N train rows of one
    set), its val split and the job's normalisation."""
    splits = load_run_splits(job.splits_dir, job.config.get("dataset", "full")).splits
    return TrainData(
        train=torch.from_numpy(np.array(splits.train, dtype=np.float32)),
        val=torch.from_numpy(np.array(splits.val, dtype=np.float32)),
        normalizer=load_normalizer(Path(job.stats_path)),
        identity=dict(job.data_identity),
    )


def config_with_rows(config: TrainConfig, rows: int) -> TrainConfig:
    """``config`` with an unset ``train_rows`` set to ``rows`` (the job's training rows); a config that names other
    rows is returned as it is, and the trainer refuses it."""
    return config if config.train_rows is not None else config.model_copy(update={"train_rows": rows})


def open_tracker(job: TrainJob, config: TrainConfig, dist: DistInfo):
    """(tracker, tracking metadata). Only rank 0 tracks; Wandb is imported only when tracking is on."""
    if not dist.is_main or job.tracking.get("mode", "disabled") == "disabled":
        return NullTracker(), {"tracking": "disabled"}
    from flow_pipeline.tracking_wandb import open_wandb_tracker

    return open_wandb_tracker(job.tracking, config, job.partition_key)


def result_metadata(result: TrainResult, config: TrainConfig, tracking_info: dict, loss_curve: Path,
                    world_size: int = 1, data_identity: dict | None = None, loss_curve_image: str = "") -> dict:
    """Materialization metadata in Dagster Pipes' typed form (``world_size``: training processes of the run;
    ``loss_curve_image``: the curve as a Markdown image, shown above its table)."""
    from flow_pipeline.evaluation.plots import loss_curve_markdown

    def typed(value, kind):
        return {"raw_value": value, "type": kind}

    metadata = {
        "checkpoint_path": typed(str(result.checkpoint_path), "path"),
        "sha256": typed(result.sha256, "text"),
        "size_bytes": typed(result.size_bytes, "int"),
        "best_val_loss": typed(result.best_loss, "float"),
        "zero_predictor_loss": typed(config.zero_predictor_loss(), "float"),
        "best_epoch": typed(result.best_epoch, "int"),
        "epochs_run": typed(result.epochs_run, "int"),
        "stopped_early": typed(result.stopped_early, "bool"),
        "global_step": typed(result.global_step, "int"),
        "train_seconds": typed(round(result.train_seconds, 2), "float"),
        "device": typed(result.device, "text"),
        "precision": typed(result.precision, "text"),
        "warmup_steps": typed(result.warmup_steps, "int"),
        "warmup_from": typed(result.warmup_from, "text"),
        "world_size": typed(world_size, "int"),
        "threads": typed(torch.get_num_threads(), "int"),
        "num_params": typed(result.num_params, "int"),
        "run_name": typed(config.run_name, "text"),
        "config": typed(config.to_core().to_dict(), "json"),  # unset knobs as the run used them
        "loss_curve_png": typed(str(loss_curve), "path"),
        "loss_curve": typed((loss_curve_image + "\n\n" if loss_curve_image else "")
                            + loss_curve_markdown(result.history), "md"),
    }
    if data_identity:
        metadata["dataset_subset"] = typed(str(data_identity.get("subset")), "text")
        metadata["data_identity"] = typed(data_identity, "json")
    for key, value in tracking_info.items():
        kind = "url" if key == "wandb_url" else "text"
        metadata[key] = typed(str(value), kind)
    return metadata


class _ForwardToPipes(logging.Handler):
    """Streams the trainer's log lines (one per epoch) into the Dagster run's log."""

    def __init__(self, pipes):
        super().__init__(logging.INFO)
        self.pipes = pipes

    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno >= logging.WARNING else "info"
        getattr(self.pipes.log, level)(self.format(record))


def run_job(job: TrainJob, pipes=None) -> TrainResult:
    """Train, write ``result.json`` (or ``failure.json``) and, under Pipes, report the materialization."""
    started_at = time.time()
    config = TrainConfig(**job.config)
    dist = init_distributed(config.device)
    run_dir = Path(job.run_dir)
    tracker, failed = NullTracker(), True
    try:
        data = load_train_data(job)
        # The rows are known before the tracker opens, so Wandb and the metadata log the sizes the run resolves
        # from them (the checkpoint's config), also for a hand-written job.json without train_rows.
        config = config_with_rows(config, data.train.shape[0])
        tracker, tracking_info = open_tracker(job, config, dist)
        result = train(config, data, run_dir, tracker, dist)
        tracker.summary(final_epoch=result.epochs_run, best_val_loss=result.best_loss,
                        checkpoint_path=str(result.checkpoint_path), stopped_early=result.stopped_early)
        failed = False
    except BaseException as exc:
        if dist.is_main:
            write_json(run_dir / FAILURE_NAME, {"error": type(exc).__name__, "message": str(exc),
                                                "errno": getattr(exc, "errno", None),
                                                "partition": job.partition_key, "run_name": config.run_name})
        raise
    finally:
        tracker.finish(failed=failed)
        if dist.active:
            torch_dist.destroy_process_group()
    if dist.is_main:
        from flow_pipeline.evaluation.plots import plot_loss_curve  # matplotlib costs seconds: import it when needed

        verify(result.checkpoint_path, result.sha256)  # best.pt is the file reported, and reads back
        figure = plot_loss_curve(result.history, config.run_name, result.best_loss, config.zero_predictor_loss())
        loss_curve = figure.save(run_dir / LOSS_CURVE_NAME)
        metadata = result_metadata(result, config, tracking_info, loss_curve, dist.world_size,
                                   job.data_identity, figure.markdown(f"loss curve of {config.run_name}"))
        process = {"pid": os.getpid(), "started_at": started_at, "finished_at": time.time()}
        write_json(run_dir / RESULT_NAME, {**{key: value["raw_value"] for key, value in metadata.items()},
                                           "process": process})
        (run_dir / FAILURE_NAME).unlink(missing_ok=True)
        if pipes is not None:
            pipes.report_asset_materialization(metadata=metadata)
    return result


def exit_with_parent() -> None:
    """On Linux, have the kernel send SIGTERM to this process when its parent (the Dagster run worker, or torchrun)
    dies: a killed run must not leave a training behind on the GPU its pool slot was given back for."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    parent = os.getppid()
    # The SIGTERM must kill: an ignored disposition survives exec, and Dagster maps SIGTERM to SIGINT's handler,
    # which is SIG_IGN in a process started in the background, so a run worker can hand SIG_IGN down to us.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    # A parent that died before prctl took effect left us to init or a subreaper (tini, systemd): another parent.
    if os.getppid() != parent:
        sys.exit("flow_pipeline.train: parent process is gone; not starting")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flow_pipeline.train", description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="path of the job.json written by the orchestrator")
    args = parser.parse_args(argv)
    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    # Under torchrun the other ranks print only warnings and errors: one set of progress lines per run.
    logging.basicConfig(level=logging.INFO if is_rank0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    exit_with_parent()
    job = TrainJob.load(args.job)
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if is_rank0 and PipesEnvVarParamsLoader().is_dagster_pipes_process():
        with open_dagster_pipes() as pipes:
            handler = _ForwardToPipes(pipes)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            try:
                run_job(job, pipes)
            finally:
                logger.removeHandler(handler)
    else:
        try:
            run_job(job)
        except Exception:
            traceback.print_exc()
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
