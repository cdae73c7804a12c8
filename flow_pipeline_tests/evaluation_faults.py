"""Evaluation and report under SIGKILL: the harness behind ``benchmarks/evaluation_faults.py`` and
test_evaluation_faults.py.

On a persistent SQLite instance it trains two tiny partitions, then runs three targets once uninterrupted (their
results are the old results) and then again and again, each run in a process forked from a server that imported the
pipeline once, SIGKILLing every run: ``evaluate-new`` (the second partition, with the reference rows and their
cache), ``evaluate-again`` (the first, without reference rows) and ``report``. A run dies at a random moment of its
run, or at one of its atomic file writes (by the file it writes), just before the temp file is renamed into place or
just after; a kill at a reference-cache write evaluates with a new seed, so that the cache entry has to be written.

After every kill: no result or cache file on disk is torn (every evaluation JSON names its run's checkpoint, every
cache entry, npz, PNG, Markdown and CSV reads back whole); every old file is byte for byte what it was, except the
files the killed target itself rewrites (its partition's evaluation.json and samples.png, or the report's files),
which may instead be complete new ones; and a run killed at a write left no materialization (a random moment may
come after the run recorded its materialization, while it shuts down: counted apart, its results are then the old
ones). At the end each target runs to completion, and removes the temp files the kills left once they are older
than ``STALE_TEMP_AGE_S``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dagster as dg

from flow_pipeline.artifacts import EVALUATION_JSON, EVALUATION_PNG, STALE_TEMP_AGE_S, ArtifactLayout
from flow_pipeline.core.atomic import TEMP_PREFIX
from flow_pipeline.core.checkpoint import sha256_file
from flow_pipeline.evaluation.references import read_cached, read_side_statistics
from flow_pipeline_tests.helpers import REPO_ROOT, TINY_DATASET, TINY_TRAIN, resources, run_config

PARTITIONS = ("mlp-icfm", "unet-fm")  # evaluate-again evaluates the first, evaluate-new the second
EVALUATE = {"solver": "euler", "steps": 4, "n_sentences": 0, "likelihood_rows": 32, "seed": 1}
EVALUATE_AGAIN = {**EVALUATE, "references": False}  # cheaper: the cache is evaluate-new's part
PNG_START, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"
TARGETS = ("evaluate-new", "evaluate-again", "report")
WRITE_POINTS = ("before-rename", "after-rename")


@dataclass
class FaultSettings:
    random_kills: int = 6  # per target, at a uniform moment of an uninterrupted run's duration
    write_points: tuple[str, ...] = WRITE_POINTS  # also at every atomic write of every target, at these points
    targets: tuple[str, ...] = TARGETS
    seed: int = 0


@dataclass
class FaultReport:
    kills: list[dict] = field(default_factory=list)  # target, point, seconds, files replaced
    finished_before_the_kill: int = 0  # random moments the run had already finished by (not counted as kills)
    killed_after_materializing: int = 0  # random moments after the run recorded its materialization
    writes: dict = field(default_factory=dict)  # target -> the files an uninterrupted run writes, in order
    files_checked: int = 0
    torn_files: list = field(default_factory=list)
    old_files_changed: list = field(default_factory=list)
    new_materializations: list = field(default_factory=list)  # by runs killed at a write: there must be none
    temp_files_left: int = 0  # by the kills: never read
    temp_files_after_reruns: int = 0  # those aged past STALE_TEMP_AGE_S first: the re-runs remove them
    reruns_succeeded: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# --- the targets, run in a forked process --------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a forked process runs: ``name`` (one of TARGETS) on the instance in ``home`` and the artifacts in
    ``root``; ``die_at_write`` (label, point): SIGKILL itself at the first atomic write of that :func:`write_label`;
    ``log_writes``: append every atomic write's label there."""

    name: str
    home: str
    root: str
    seed: int = EVALUATE["seed"]  # of evaluate-new: a new one scores (and caches) the reference rows anew
    die_at_write: tuple[str, str] | None = None
    log_writes: str | None = None


def run_target(target: Target) -> None:
    """The body of a forked process: materialize the target on the persistent instance."""
    from flow_pipeline.defs.evaluation_assets import ablation_report, evaluation

    _hook_atomic_renames(target)
    with dg.DagsterInstance.from_config(target.home) as instance:
        if target.name == "report":
            dg.materialize([ablation_report], instance=instance, resources=resources(target.root))
            return
        partition = PARTITIONS[1] if target.name == "evaluate-new" else PARTITIONS[0]
        config = {**EVALUATE, "seed": target.seed} if target.name == "evaluate-new" else EVALUATE_AGAIN
        dg.materialize([evaluation], instance=instance, resources=resources(target.root), partition_key=partition,
                       run_config={"ops": {"evaluation": {"config": config}}})


def write_label(destination: str | os.PathLike) -> str:
    """``<directory>/<file>`` of an atomic write; a reference-cache key, which depends on the seed, reads ``<key>``."""
    path = Path(destination)
    return f"{path.parent.name}/{re.sub('^[0-9a-f]{64}', '<key>', path.name)}"


def _hook_atomic_renames(target: Target) -> None:
    """Watch the renames of atomic writes (a temp file ``.tmp-*`` into place); log or die at them as asked."""
    if target.die_at_write is None and target.log_writes is None:
        return
    rename = os.replace

    def replace(source, destination, *args, **kwargs):
        if not Path(source).name.startswith(TEMP_PREFIX):
            return rename(source, destination, *args, **kwargs)
        label = write_label(destination)
        if target.log_writes:
            with open(target.log_writes, "a") as log:
                log.write(f"{label}\n")
        if target.die_at_write == (label, "before-rename"):
            os.kill(os.getpid(), signal.SIGKILL)
        rename(source, destination, *args, **kwargs)
        if target.die_at_write == (label, "after-rename"):
            os.kill(os.getpid(), signal.SIGKILL)
        return None

    os.replace = replace


def target_server() -> Callable[[Target], multiprocessing.Process]:
    """Starts :func:`run_target` processes forked from a server that imported the pipeline once (a start costs
    milliseconds, not the seconds of importing torch, Dagster and matplotlib)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["flow_pipeline.definitions", "flow_pipeline.evaluation.ablation_report",
                                    __name__])

    def start(target: Target) -> multiprocessing.Process:
        process = context.Process(target=run_target, args=(target,))
        process.start()
        return process

    return start


# --- what is on disk -----------------------------------------------------------------------------------------------


def result_files(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under evaluation/ and reports/ but temp files."""
    found = {}
    for top in ("evaluation", "reports"):
        for path in sorted((root / top).rglob("*")):
            if path.is_file() and not path.name.startswith(TEMP_PREFIX):
                found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def temp_files(root: Path) -> list[Path]:
    return [path for top in ("evaluation", "reports") for path in (root / top).rglob(f"{TEMP_PREFIX}*")]


def torn_reason(path: Path, layout: ArtifactLayout) -> str | None:
    """Why the file does not read back whole (None: it does), by what a reader of it checks."""
    data = path.read_bytes()
    if path.suffix == ".png":
        return None if data.startswith(PNG_START) and data.endswith(PNG_END) else "PNG without its end chunk"
    if path.suffix == ".npz":
        return None if read_side_statistics(path.parent, path.name.split(".")[0]) else "npz does not load"
    if path.suffix == ".json" and path.parent == layout.reference_cache_dir:
        return None if read_cached(path.parent, path.stem) else "reference cache entry not complete"
    try:
        if path.suffix == ".json":
            return None if _names_its_checkpoint(path, layout) else "evaluation JSON not of its run's checkpoint"
        if path.suffix == ".csv":
            rows = list(csv.DictReader(data.decode().splitlines()))
            return None if rows and all(None not in row.values() for row in rows) else "CSV rows incomplete"
        return None if data.decode().strip() else "empty file"
    except (ValueError, UnicodeDecodeError) as exc:
        return f"does not parse: {exc}"


def _names_its_checkpoint(path: Path, layout: ArtifactLayout) -> bool:
    """An evaluation.json names its run and that run's best.pt sha256."""
    content = json.loads(path.read_text())
    best = layout.run_dir(content["run_name"]) / "best.pt"
    return path.parent.name == content["run_name"] and content["sha256"] == sha256_file(best)


def torn_files(root: Path) -> tuple[int, list[str]]:
    """(files checked, the torn ones with why) under evaluation/ and reports/."""
    layout, files = ArtifactLayout(root), result_files(root)
    torn = [f"{relative}: {reason}" for relative in files if (reason := torn_reason(root / relative, layout))]
    return len(files), torn


def rewritten_by(target: str, root: Path) -> set[str]:
    """The old files a run of ``target`` replaces (relative paths under ``root``)."""
    if target == "report":
        return {str(path.relative_to(root)) for path in (root / "reports").glob("ablation_report.*")}
    partition = PARTITIONS[1] if target == "evaluate-new" else PARTITIONS[0]
    run_dir = Path("evaluation") / f"{partition}-full-none-tiny"
    return {str(run_dir / EVALUATION_JSON), str(run_dir / EVALUATION_PNG)}


def materialization_ids(instance: dg.DagsterInstance) -> set[int]:
    records = []
    for key in ("evaluation", "ablation_report"):
        records += instance.fetch_materializations(dg.AssetKey(key), limit=1000).records
    return {record.storage_id for record in records}


# --- the harness ---------------------------------------------------------------------------------------------------


def prepare(workdir: Path) -> tuple[Path, Path]:
    """(DAGSTER_HOME, artifact root) of a persistent SQLite instance with two trained partitions."""
    from flow_pipeline.defs.assets import dataset_splits, normalization_stats, trained_checkpoint

    home, root = workdir / "dagster_home", workdir / "artifacts"
    home.mkdir(parents=True)
    shutil.copyfile(REPO_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        done = [dg.materialize([dataset_splits, normalization_stats], instance=instance, resources=resources(root),
                               run_config=run_config(dataset=TINY_DATASET))]
        done += [dg.materialize([trained_checkpoint], instance=instance, resources=resources(root),
                                partition_key=partition, run_config=run_config(train=TINY_TRAIN))
                 for partition in PARTITIONS]
    if not all(result.success for result in done):
        raise RuntimeError("preparing the trained partitions failed")
    return home, root


def measure(start, target: Target, log: Path) -> tuple[float, list[str]]:
    """Run the target twice uninterrupted: (the second run's seconds, the files the first one writes, in order). The
    first writes the reference cache; the second, like the runs to be killed, reads it."""
    log.unlink(missing_ok=True)
    seconds = []
    for logged in (str(log), None):
        began = time.monotonic()
        process = start(Target(target.name, target.home, target.root, log_writes=logged))
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"an uninterrupted {target.name} failed (exit code {process.exitcode})")
        seconds.append(time.monotonic() - began)
    return seconds[-1], log.read_text().splitlines()


def kill_plan(settings: FaultSettings, durations: dict[str, float], writes: dict[str, list[str]]) -> list[dict]:
    """Every kill to make: random moments of each target's run, then each of its writes before and after the rename."""
    rng = random.Random(settings.seed)
    plan = [{"target": name, "after_s": round(rng.uniform(0.0, durations[name]), 3)}
            for name in settings.targets for _ in range(settings.random_kills)]
    return plan + [{"target": name, "write": label, "point": point} for name in settings.targets
                   for label in writes[name] for point in settings.write_points]


def kill_once(start, kill: dict, home: Path, root: Path) -> bool:
    """Run the target and kill it as ``kill`` says (``kill["seconds"]``: from the start to its end); whether it died
    (False: it finished before the random moment came)."""
    die_at = (kill["write"], kill["point"]) if "write" in kill else None
    began = time.monotonic()
    process = start(Target(kill["target"], str(home), str(root), seed=kill["seed"], die_at_write=die_at))
    if die_at is None:
        process.join(timeout=kill["after_s"])
        if process.is_alive():
            process.kill()
    process.join()
    kill["seconds"] = round(time.monotonic() - began, 2)
    if process.exitcode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"{kill['target']} failed on its own (exit code {process.exitcode}): {kill}")
    return process.exitcode == -signal.SIGKILL


def check_after_kill(root: Path, old: dict[str, str], old_ids: set[int], home: Path, report: FaultReport,
                     kill: dict) -> None:
    """Record torn files, changed old files and new materializations after a kill (see the module doc)."""
    checked, torn = torn_files(root)
    report.files_checked += checked
    report.torn_files += [f"{line} (after {kill})" for line in torn]
    now = result_files(root)
    changed = sorted(relative for relative, digest in old.items() if now.get(relative) != digest)
    kill["files_replaced"] = changed
    allowed = rewritten_by(kill["target"], root)
    report.old_files_changed += [f"{relative} (after {kill})" for relative in changed
                                 if relative not in allowed or relative not in now]
    old.update({relative: now[relative] for relative in changed if relative in allowed and relative in now})
    with dg.DagsterInstance.from_config(str(home)) as instance:
        new = materialization_ids(instance) - old_ids
    if new and "write" in kill:  # it died at a write, before its asset could return: never materialized
        report.new_materializations.append(f"{sorted(new)} (after {kill})")
    elif new:  # a random moment after the materialization was recorded, while the process shut down
        kill["materialized"] = True
        report.killed_after_materializing += 1


def snapshot(root: Path, home: Path) -> tuple[dict[str, str], set[int]]:
    """(the result files' sha256, the materializations' ids): what the next kill must leave as it is."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return result_files(root), materialization_ids(instance)


def run_faults(settings: FaultSettings, workdir: Path) -> FaultReport:
    """Prepare two trained partitions in ``workdir``; run each target once uninterrupted (its results are the old
    ones), make every kill of the plan, check after each, then re-run each target."""
    report = FaultReport()
    home, root = prepare(workdir)
    start = target_server()
    durations = {}
    for name in TARGETS:  # in this order: the report needs an evaluation
        durations[name], report.writes[name] = measure(start, Target(name, str(home), str(root)),
                                                       workdir / f"writes-{name}.log")
    old, old_ids = snapshot(root, home)
    for seed, kill in enumerate(kill_plan(settings, durations, report.writes), start=100):
        # A new seed where the kill is at a reference-cache write (the cache holds seed 1's): it must be written.
        kill["seed"] = seed if kill.get("write", "").startswith("references/") else EVALUATE["seed"]
        if not kill_once(start, kill, home, root):
            report.finished_before_the_kill += 1
            old, old_ids = snapshot(root, home)  # a finished run: its results are the old ones now
            continue
        check_after_kill(root, old, old_ids, home, report, kill)
        report.kills.append(kill)
        if kill.get("materialized"):  # its results are the old ones now
            old, old_ids = snapshot(root, home)
    left = temp_files(root)
    report.temp_files_left = len(left)
    aged = time.time() - STALE_TEMP_AGE_S - 60
    for path in left:
        os.utime(path, (aged, aged))
    for name in settings.targets:
        process = start(Target(name, str(home), str(root)))
        process.join()
        if process.exitcode == 0:
            report.reruns_succeeded.append(name)
    report.temp_files_after_reruns = len(temp_files(root))
    checked, torn = torn_files(root)
    report.files_checked += checked
    report.torn_files += [f"{line} (after the re-runs)" for line in torn]
    return report
