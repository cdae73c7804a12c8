"""Dagster's current CLI, ``dg``, is installed by the README's command A and sees the project's definitions."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from flow_pipeline_tests.helpers import REPO_ROOT, cli_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DG = str(Path(sys.executable).parent / "dg")


def dg(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([DG, *args, "--target-path", str(REPO_ROOT)], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=300)


def test_dg_is_a_dependency_of_the_plain_install():
    """Command A runs ``pip install -e .`` without extras: dg must come with it."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert any(requirement.startswith("dagster-dg-cli") for requirement in pyproject["project"]["dependencies"])


def test_dg_list_defs_shows_the_pipeline(tmp_path):
    listed = dg("list", "defs", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-3000:]
    defs = json.loads(listed.stdout)
    assets = {asset["asset_key"] for asset in defs["assets"]}
    assert {"dataset_splits", "normalization_stats", "trained_checkpoint", "evaluation", "ablation_report"} <= assets
    assert "retry_failed_training" in {schedule["name"] for schedule in defs["schedules"]}
    assert "fail_orphaned_runs" in {sensor["name"] for sensor in defs["sensors"]}
    assert "trained_checkpoint:checkpoint_file_intact" in {check["key"] for check in defs["asset_checks"]}


def test_dg_check_defs_passes(tmp_path):
    checked = dg("check", "defs", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    assert "loaded successfully" in checked.stdout + checked.stderr
