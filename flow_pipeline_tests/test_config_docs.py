"""docs/configuration.md is generated from the knob declarations and is never stale."""

from __future__ import annotations

import subprocess
import sys

from flow_pipeline.config_docs import COMMAND, configuration_markdown
from flow_pipeline.core.knobs import knobs_of
from flow_pipeline.core.train_config import TrainSettings
from flow_pipeline.defs.run_config import RunLevelSettings
from flow_pipeline_tests.conftest import REPO_ROOT

COMMITTED = REPO_ROOT / "docs" / "configuration.md"


def test_the_committed_reference_is_what_the_generator_writes():
    generated = subprocess.run([sys.executable, "-m", "flow_pipeline.config_docs"], cwd=REPO_ROOT, check=True,
                               capture_output=True, text=True).stdout
    assert generated == configuration_markdown()
    assert COMMITTED.read_text() == generated, f"docs/configuration.md is stale: run `{COMMAND}`"


def test_every_declared_knob_has_one_row_with_its_default_and_meaning():
    lines = configuration_markdown().splitlines()
    for knob in (*knobs_of(TrainSettings), *knobs_of(RunLevelSettings)):
        rows = [line for line in lines if line.startswith(f"| `{knob.name}` |")]
        assert len(rows) == 1, knob.name
        cells = [cell.strip() for cell in rows[0].strip("|").split(" | ")]
        assert cells[3] == knob.info.description, knob.name
        assert cells[1].strip("`") == ("null" if knob.default is None else str(knob.default).lower()
                                       if isinstance(knob.default, bool) else str(knob.default)), knob.name
