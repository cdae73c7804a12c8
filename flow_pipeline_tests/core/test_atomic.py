"""The one atomic writer: a full disk (a real tmpfs of a few KB) or a failing writer leaves the old file byte for
byte, no temp file, and an OSError with errno ENOSPC whose message names the file — for every caller."""

from __future__ import annotations

import errno
import os
import time

import numpy as np
import pytest
import torch

from flow_pipeline.artifacts import write_json
from flow_pipeline.core.atomic import (TEMP_PREFIX, AtomicWriteError, remove_stale_temp_files, write_atomic_with,
                                       write_bytes_atomic)
from flow_pipeline.core.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from flow_pipeline.core.data.normalization import Normalizer, save_normalizer
from flow_pipeline_tests.helpers import fill, small_disk


def checkpoint_state(numbers: int) -> dict:
    tensor = torch.randn(numbers)
    return {"epoch": 1, "model_state_dict": {"w": tensor}, "ema_shadow": {"w": tensor.clone()},
            "optimizer_state_dict": {}, "scheduler_state_dict": {}, "best_loss": 1.0, "config": {},
            "normalization_stats": {}}


WRITERS = {
    "checkpoint": lambda path: save_checkpoint(checkpoint_state(16 * 1024), path),
    "json": lambda path: write_json(path, {"values": list(range(20_000))}),
    "normalization stats": lambda path: save_normalizer(path, Normalizer.fit(np.random.rand(9, 30_000))),
    "bytes": lambda path: write_bytes_atomic(path, os.urandom(300_000)),
}


@pytest.mark.parametrize("caller", sorted(WRITERS))
def test_a_full_disk_keeps_the_old_file_and_names_the_new_one(tmp_path, caller):
    with small_disk(tmp_path / "disk", size_kb=512) as disk:
        target = disk / "artifact.bin"
        target.write_bytes(b"the previous version")
        fill(disk)
        with pytest.raises(OSError) as raised:
            WRITERS[caller](target)
        assert isinstance(raised.value, AtomicWriteError)
        assert raised.value.errno == errno.ENOSPC
        assert str(target) in str(raised.value)
        assert target.read_bytes() == b"the previous version"
        assert not list(disk.glob(TEMP_PREFIX + "*"))
        # Space back: the same write succeeds.
        (disk / "filler").unlink()
        WRITERS[caller](target)
        assert target.read_bytes() != b"the previous version"


def test_checkpoint_sha256_is_that_of_the_file_written(tmp_path):
    path = tmp_path / "best.pt"
    digest = save_checkpoint(checkpoint_state(1000), path)
    assert digest == sha256_file(path)
    assert load_checkpoint(path)["model_state_dict"]["w"].shape == (1000,)


def test_a_writer_that_raises_leaves_the_old_file_and_its_error(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")

    def half_then_fail(handle):
        handle.write(b"new but not finished")
        raise ValueError("the writer broke")

    with pytest.raises(ValueError, match="the writer broke"):
        write_atomic_with(target, half_then_fail)
    assert target.read_text() == "old"
    assert not list(tmp_path.glob(TEMP_PREFIX + "*"))


def test_an_unwritable_directory_is_named(tmp_path):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where a directory should be")
    with pytest.raises(AtomicWriteError, match=str(blocked / "x.json")):
        write_json(blocked / "x.json", {"a": 1})


def test_only_temp_files_older_than_the_age_are_removed(tmp_path):
    rng = np.random.default_rng()
    now = time.time()
    # Young or old by far more than the test takes to run: which side of the hour each is on cannot be in doubt.
    ages = {f"{TEMP_PREFIX}result-{i}.json.x{i}": float(rng.choice([rng.uniform(0, 3500), rng.uniform(3700, 7200)]))
            for i in range(12)}
    for name, age in ages.items():
        (tmp_path / name).write_bytes(b"part of a write")
        os.utime(tmp_path / name, (now - age, now - age))
    (tmp_path / "result.json").write_text("{}")  # a finished file is never touched, however old
    os.utime(tmp_path / "result.json", (now - 9999, now - 9999))
    removed = remove_stale_temp_files(tmp_path, older_than_s=3600)
    assert sorted(path.name for path in removed) == sorted(name for name, age in ages.items() if age > 3600)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["result.json", *(name for name, age in ages.items() if age < 3600)])
    assert remove_stale_temp_files(tmp_path) and [path.name for path in tmp_path.iterdir()] == ["result.json"]
