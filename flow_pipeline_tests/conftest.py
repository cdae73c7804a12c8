"""Shared fixtures: temp artifact roots and Dagster instances, offline Wandb (helpers: helpers.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from flow_pipeline_tests.helpers import REPO_ROOT, dagster_cli
from flow_pipeline_tests.postgres_server import PostgresUnavailable, start_postgres


@pytest.fixture(scope="session")
def adversary_scores() -> dict[str, dict[str, float]]:
    """evaluate_samples of held-out real rows and the sets built to fool it (core/test_adversaries.py)."""
    from flow_pipeline_tests.core.test_adversaries import score_adversaries

    return score_adversaries()



@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch):
    """No test talks to a real Wandb server, even when the developer's shell holds an API key."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")



@pytest.fixture
def artifacts_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "artifacts"
    monkeypatch.setenv("FLOW_PIPELINE_ROOT", str(root))
    return root



@pytest.fixture
def dagster_home(tmp_path, monkeypatch) -> Path:
    """A persistent sqlite instance in a temp DAGSTER_HOME, with the project's dagster.yaml and gpu pool limit 1."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO_ROOT / "dagster_home" / "dagster.yaml").read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    subprocess.run([dagster_cli(), "instance", "concurrency", "set", "gpu", "1"], check=True, cwd=REPO_ROOT,
                   capture_output=True)
    return home



@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server for the module (postgres_server.py); the test is skipped without the binaries."""
    try:
        server = start_postgres()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture
def postgres_home(postgres, tmp_path, monkeypatch) -> Path:
    """DAGSTER_HOME holding deploy/dagster-postgres.yaml verbatim, its DAGSTER_PG_* variables pointing at the server."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO_ROOT / "deploy" / "dagster-postgres.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    for name, value in postgres.dagster_env().items():
        monkeypatch.setenv(name, value)
    return home
