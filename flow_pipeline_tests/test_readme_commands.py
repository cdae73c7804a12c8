"""The README's commands that the other CLI tests do not run, run as the README writes them (from the repository
root, on a persistent instance): evaluation and report through the CLI, ``flow_pipeline.show`` and ``dagster dev``.
Each line is taken from README.md itself, so a README that drifts from a working command fails here."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flow_pipeline_tests.helpers import (REPO_ROOT, TINY_DATASET, TINY_TRAIN, assert_ok, cli_env, free_port,
                                         materialize, run_config)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def readme_line(pattern: str) -> str:
    """The one README line that matches ``pattern`` (a regex), without its trailing comment."""
    lines = [line for line in (REPO_ROOT / "README.md").read_text().splitlines() if re.search(pattern, line)]
    assert len(lines) == 1, f"README.md: expected one line matching {pattern!r}, found {lines}"
    return lines[0].split("  #")[0].strip()


def activated(line: str) -> list[str]:
    """The line's words with its program taken from this environment, as ``source .venv/bin/activate`` would."""
    words = shlex.split(line)
    return [str(Path(sys.executable).parent / words[0]), *words[1:]]


def run_readme(line: str) -> subprocess.CompletedProcess:
    return subprocess.run(activated(line), cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)


def test_evaluation_report_and_show_run_as_the_readme_writes_them(dagster_home, artifacts_root):
    assert_ok(materialize(REPO_ROOT, "dataset_splits,normalization_stats", run_config(dataset=TINY_DATASET)))
    assert_ok(materialize(REPO_ROOT, "trained_checkpoint", run_config(train=TINY_TRAIN), partition="mlp-icfm"))
    evaluation = run_readme(readme_line(r"--select evaluation --partition mlp-icfm"))
    assert_ok(evaluation)
    assert "test_nll=" in evaluation.stderr + evaluation.stdout  # the run's summary line leads with the likelihood
    assert_ok(run_readme(readme_line(r"--select ablation_report")))
    assert (artifacts_root / "reports" / "ablation_report.md").is_file()
    shown = run_readme(readme_line(r"python -m flow_pipeline.show mlp-icfm"))
    assert_ok(shown)
    assert "best.pt" in shown.stdout and "mlp-icfm" in shown.stdout


def test_dagster_dev_serves_the_ui_as_the_readme_starts_it(dagster_home):
    line = readme_line(r"^dagster dev ")
    port = free_port()
    command = activated(line.replace("-p 3000", f"-p {port}"))
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, answered = time.monotonic() + 180, False
        while time.monotonic() < deadline and not answered:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5) as response:
                    answered = response.status == 200
            except OSError:
                time.sleep(2)
        assert answered, "dagster dev did not answer on /server_info within 180 s"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
