"""The web UI and the GraphQL API end to end: a real ``dagster-webserver`` + ``dagster-daemon`` on 127.0.0.1 with a
temp DAGSTER_HOME, driven through ``DagsterGraphQLClient`` / GraphQL and a real headless Chromium (Playwright).

One server pair and one chain of runs serve the whole module (on two busy cores a server start costs ~30 s and every
run 30-80 s, mostly Python/torch start-ups):

1. ``dataset_splits`` + ``normalization_stats`` from an embeddings file that is not there yet: the run fails; the file
   appears; the run is re-executed from failure with its own config.
2. ``trained_checkpoint[dit-icfm]`` with a tiny config, its ``evaluation`` and the ``ablation_report``, one run
   submitted with ``DagsterGraphQLClient``; the UI shows each one's figure.
3. A two-partition backfill of ``trained_checkpoint`` launched by clicking in the UI, with a tiny config typed into
   the launch dialog's config editor.

Screenshots and the servers' logs land in ``test-artifacts/ui/`` (git-ignored).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
import yaml

from flow_pipeline.core.data.sonar_like import synthetic_sonar_like
from flow_pipeline.definitions import defs
from flow_pipeline_tests.helpers import REPO_ROOT, TINY_TRAIN, cli_env, run_config, sha256_of
from flow_pipeline_tests.servers import DagsterServers, dagster_servers, prepare_dagster_home

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ARTIFACTS_DIR = REPO_ROOT / "test-artifacts" / "ui"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]

ASSET_JOB = "__ASSET_JOB"
DATA_ASSETS = ["dataset_splits", "normalization_stats"]
PARTITION_TAG = "dagster/partition"
PARTITION = "dit-icfm"
BACKFILL_PARTITIONS = ("mlp-icfm", "unet-fm")
N_ROWS = 640
RUN_TIMEOUT_S = 480
EVALUATION_CONFIG = {"solver": "euler", "steps": 4}
# The trainer's per-epoch line, streamed into the run's log through Pipes.
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) train_loss=(\S+) val_loss=(\S+) ema_val_loss=(\S+)( \*best\*)? lr=(\S+) "
                        r"epoch_s=(\S+) elapsed_s=(\S+) eta_s=(\S+)$")

METADATA_QUERY = """
query ($assetKey: AssetKeyInput!, $partitions: [String!]) { assetOrError(assetKey: $assetKey) { __typename
    ... on Asset { assetMaterializations(partitions: $partitions, limit: 1) { runId partition
        metadataEntries { label __typename
            ... on PathMetadataEntry { path } ... on TextMetadataEntry { text } ... on UrlMetadataEntry { url }
            ... on FloatMetadataEntry { floatValue } ... on IntMetadataEntry { intRepr }
            ... on BoolMetadataEntry { boolValue } ... on JsonMetadataEntry { jsonString }
            ... on MarkdownMetadataEntry { mdStr } } } } } }
"""
LOGS_QUERY = """
query ($runId: ID!) { logsForRun(runId: $runId, limit: 5000) { __typename
    ... on EventConnection { events { __typename
        ... on MessageEvent { message stepKey }
        ... on ExecutionStepFailureEvent { error { message } } } } } }
"""
REEXECUTE_MUTATION = """
mutation ($parentRunId: String!) {
  launchPipelineReexecution(reexecutionParams: {parentRunId: $parentRunId, strategy: FROM_FAILURE}) { __typename
    ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }
"""


# --- helpers -----------------------------------------------------------------------------------------------------


def fast_execution() -> dict:
    """Run config that executes the steps inside the run worker: training already has its own process (Pipes), and
    a process per step costs one more Python + torch start-up (~20 s on two busy cores). Empty when the asset job's
    executor is in-process already."""
    executor = defs.resolve_implicit_global_asset_job_def().executor_def
    if executor.name == dg.multi_or_in_process_executor.name:
        return {"execution": {"config": {"in_process": {}}}}
    return {}


def metadata_value(entry: dict):
    """Plain Python value of one GraphQL metadata entry."""
    kind = entry["__typename"]
    if kind == "IntMetadataEntry":
        return int(entry["intRepr"])
    if kind == "JsonMetadataEntry":
        return json.loads(entry["jsonString"])
    for field in ("path", "text", "url", "floatValue", "boolValue", "mdStr"):
        if field in entry:
            return entry[field]
    raise AssertionError(f"unexpected metadata entry type {kind}: {entry}")


def latest_materialization(servers: DagsterServers, asset: str, partition: str | None = None) -> tuple[str, dict]:
    """(run id, {label: value}) of the latest materialization of ``asset`` (of one partition), read through GraphQL."""
    answer = servers.graphql(METADATA_QUERY, {"assetKey": {"path": [asset]},
                                              "partitions": [partition] if partition else None})["assetOrError"]
    assert answer["__typename"] == "Asset", answer
    records = answer["assetMaterializations"]
    assert records, f"no materialization of {asset} {partition or ''}"
    return records[0]["runId"], {entry["label"]: metadata_value(entry) for entry in records[0]["metadataEntries"]}


def run_events(servers: DagsterServers, run_id: str) -> list[dict]:
    answer = servers.graphql(LOGS_QUERY, {"runId": run_id})["logsForRun"]
    assert answer["__typename"] == "EventConnection", answer
    return answer["events"]


def reexecute_from_failure(servers: DagsterServers, run_id: str) -> str:
    """Launch the UI's "Re-execute from failure" through GraphQL; returns the new run's id."""
    answer = servers.graphql(REEXECUTE_MUTATION, {"parentRunId": run_id})["launchPipelineReexecution"]
    assert answer["__typename"] == "LaunchRunSuccess", answer
    return answer["run"]["runId"]


def tags(run: dict) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in run["tags"]}


def screenshot(page, name: str) -> Path:
    path = ARTIFACTS_DIR / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def metadata_row(page, label: str):
    """The row of the metadata table whose first cell is ``label``."""
    return page.get_by_role("row").filter(has=page.get_by_role("cell", name=label, exact=True))


def open_markdown_figure(page, label: str):
    """Open the Markdown metadata entry ``label`` (the UI shows one of 1,000 characters or more behind a
    "[Show Markdown]" button) and return its dialog once the image in it has loaded and decoded with a width."""
    from playwright.sync_api import expect

    metadata_row(page, label).get_by_text("[Show Markdown]").click()
    dialog = page.get_by_role("dialog").filter(has=page.locator("img"))
    image = dialog.locator("img").first
    expect(image).to_be_visible()
    assert image.get_attribute("src").startswith("data:image/png;base64,")
    # decode() rejects for a broken image; naturalWidth is 0 until an image has really loaded.
    assert image.evaluate("img => img.decode().then(() => img.naturalWidth)") > 0
    image.scroll_into_view_if_needed()  # below a long table, it would be out of the screenshot
    return dialog


# --- fixtures: one server pair and one chain of runs for the module ----------------------------------------------


@dataclass
class Stack:
    servers: DagsterServers
    root: Path  # FLOW_PIPELINE_ROOT of the servers and their runs
    tmp: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("ui_e2e")
    home = prepare_dagster_home(tmp / "dagster_home")
    root = tmp / "artifacts"
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    env = cli_env(FLOW_PIPELINE_ROOT=str(root))  # no WANDB_API_KEY: tracking goes offline, into the root
    env.pop("WANDB_MODE", None)
    with dagster_servers(home, ARTIFACTS_DIR / "logs", env) as servers:
        yield Stack(servers=servers, root=root, tmp=tmp)


@dataclass
class Recovery:
    source: Path
    failed: dict  # the run that found no embeddings file
    failure_messages: list[str]
    reexecution: dict  # its re-execution from failure, after the file appeared


@pytest.fixture(scope="module")
def data_recovery(stack) -> Recovery:
    """The data assets, materialized the hard way: a run fails on a missing file and is re-executed from failure."""
    servers = stack.servers
    source = stack.tmp / "incoming" / "embeddings.npy"
    config = {**run_config(dataset={"source": str(source), "dim": 1024, "seed": 0}), **fast_execution()}
    failed_id = servers.client().submit_job_execution(ASSET_JOB, run_config=config, asset_selection=DATA_ASSETS)
    failed = servers.wait_for_run(failed_id, RUN_TIMEOUT_S)
    messages = [event["error"]["message"] for event in run_events(servers, failed_id)
                if event["__typename"] == "ExecutionStepFailureEvent"]

    source.parent.mkdir()  # the file shows up (a late mount, a slow copy); the same config now works
    np.save(source, synthetic_sonar_like(N_ROWS, dim=1024, seed=0))
    reexecution = servers.wait_for_run(reexecute_from_failure(servers, failed_id), RUN_TIMEOUT_S)
    return Recovery(source=source, failed=failed, failure_messages=messages, reexecution=reexecution)


@pytest.fixture(scope="module")
def dit_icfm_run(stack, data_recovery) -> dict:
    """trained_checkpoint[dit-icfm] (tiny config), its evaluation and the ablation report in one run (one start-up
    of the run worker), submitted like a script would: DagsterGraphQLClient."""
    assert data_recovery.reexecution["status"] == "SUCCESS", "the data assets did not materialize"
    config = run_config(train=TINY_TRAIN)
    config["ops"]["evaluation"] = {"config": EVALUATION_CONFIG}
    run_id = stack.servers.client().submit_job_execution(
        ASSET_JOB, run_config={**config, **fast_execution()},
        tags={PARTITION_TAG: PARTITION}, asset_selection=["trained_checkpoint", "evaluation", "ablation_report"],
    )
    return stack.servers.wait_for_run(run_id, RUN_TIMEOUT_S)


@pytest.fixture(scope="module")
def browser_context(stack):
    """Headless Debian Chromium with a fresh profile, shared by the UI tests of the module."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (Debian package chromium; scripts/install.sh test installs it)")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)  # the UI is slow to render while runs use both cores
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000},
        )
        context.set_default_timeout(60_000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser_context, request):
    """A new tab; the first-visit "Join the Dagster community" dialog is skipped whenever it gets in the way; the
    last state of the tab is saved as ``<test name>-last.png``."""
    page = browser_context.new_page()
    page.add_locator_handler(page.get_by_text("Join the Dagster community"),
                             lambda: page.get_by_role("button", name="Skip").click())
    yield page
    try:
        screenshot(page, f"{request.node.name}-last")
    finally:
        page.close()


# --- tests -------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_ui_shows_asset_graph_with_definitions(stack, page):
    from playwright.sync_api import expect

    url = stack.servers.url
    page.goto(f"{url}/assets/ablation_report?view=lineage&lineageScope=upstream&lineageDepth=5")
    for name in ("dataset_splits", "normalization_stats", "trained_checkpoint", "evaluation", "ablation_report"):
        expect(page.get_by_text(name, exact=True).first).to_be_visible()
    for group in ("data", "training", "evaluation"):
        expect(page.get_by_text(group, exact=True).first).to_be_visible()
    expect(page.get_by_text("Weights & Biases").first).to_be_visible()
    expect(page.get_by_text("12 partitions").first).to_be_visible()
    screenshot(page, "asset-graph")

    page.goto(f"{url}/assets/trained_checkpoint")
    expect(page.get_by_text("trained in its own process via Dagster Pipes")).to_be_visible()  # the description
    expect(page.get_by_text("flow-matching", exact=True)).to_be_visible()  # owner team:flow-matching
    for kind in ("PyTorch", "Weights & Biases"):
        expect(page.get_by_text(kind, exact=True).first).to_be_visible()
    page.get_by_role("button", name="Compute details").click()
    pool = page.get_by_text("Pool", exact=True).locator("xpath=..")
    expect(pool).to_contain_text("gpu")
    screenshot(page, "trained_checkpoint-definition")


@pytest.mark.timeout(900)
def test_reexecute_from_failure_materializes_data_after_the_file_appears(stack, data_recovery):
    failed, child = data_recovery.failed, data_recovery.reexecution
    assert failed["status"] == "FAILURE"
    assert {s["stepKey"]: s["status"] for s in failed["stepStats"]}.get("dataset_splits") == "FAILURE"
    assert any("source not found" in m and str(data_recovery.source) in m for m in data_recovery.failure_messages), \
        data_recovery.failure_messages

    assert child["status"] == "SUCCESS", stack.servers.log_tail()
    assert child["parentRunId"] == failed["runId"] and child["rootRunId"] == failed["runId"]
    assert yaml.safe_load(child["runConfigYaml"]) == yaml.safe_load(failed["runConfigYaml"])
    # From failure: the failed step and the step that never ran, nothing else.
    assert {s["stepKey"]: s["status"] for s in child["stepStats"]} == {name: "SUCCESS" for name in DATA_ASSETS}

    run_id, splits = latest_materialization(stack.servers, "dataset_splits")
    assert run_id == child["runId"]
    assert splits["source"] == str(data_recovery.source)
    assert splits["n_train"] + splits["n_val"] + splits["n_test"] == N_ROWS
    run_id, stats = latest_materialization(stack.servers, "normalization_stats")
    assert run_id == child["runId"] and stats["n"] == splits["n_train"]


@pytest.mark.timeout(1200)
def test_graphql_run_trains_partition_and_reports_metadata(stack, dit_icfm_run):
    run = dit_icfm_run
    assert run["status"] == "SUCCESS", stack.servers.log_tail()
    assert tags(run)[PARTITION_TAG] == PARTITION

    run_id, meta = latest_materialization(stack.servers, "trained_checkpoint", PARTITION)
    assert run_id == run["runId"]
    path = Path(meta["checkpoint_path"])
    assert path == stack.root / "checkpoints" / f"{PARTITION}-full-none-tiny" / "best.pt"
    assert meta["sha256"] == sha256_of(path)
    assert torch.load(path, weights_only=True)["best_loss"] == pytest.approx(meta["best_val_loss"], rel=1e-6)
    assert meta["epochs_run"] == TINY_TRAIN["max_epochs"]
    assert meta["config"]["model_size"] == "tiny" and meta["config"]["arch"] == "dit"
    assert meta["tracking"] == "offline"  # no WANDB_API_KEY in the servers' environment
    assert Path(meta["wandb_run_dir"]).is_dir()
    assert Path(meta["loss_curve_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # One log line per epoch streamed into the run via Pipes; the best EMA loss they show is the reported one.
    lines = [EPOCH_LINE.match(event["message"]) for event in run_events(stack.servers, run["runId"])
             if event.get("stepKey") == "trained_checkpoint" and event.get("message", "").startswith("epoch ")]
    epochs = [m for m in lines if m]
    assert [int(m.group(1)) for m in epochs] == list(range(1, TINY_TRAIN["max_epochs"] + 1)), lines
    assert min(float(m.group(5)) for m in epochs) == pytest.approx(meta["best_val_loss"], abs=6e-5)


@pytest.mark.timeout(1200)
def test_ui_shows_partition_metadata(stack, dit_icfm_run, page):
    from playwright.sync_api import expect

    assert dit_icfm_run["status"] == "SUCCESS"
    _, meta = latest_materialization(stack.servers, "trained_checkpoint", PARTITION)

    page.goto(f"{stack.servers.url}/assets/trained_checkpoint")
    page.get_by_role("tab", name="Partitions").click()
    page.get_by_text(PARTITION, exact=True).locator("visible=true").click()
    expect(page).to_have_url(re.compile(rf"partition={PARTITION}"))
    expect(page.get_by_text("Materialized", exact=True).first).to_be_visible()

    expect(metadata_row(page, "checkpoint_path")).to_contain_text(meta["checkpoint_path"])
    expect(metadata_row(page, "sha256")).to_contain_text(meta["sha256"])
    shown_loss = metadata_row(page, "best_val_loss").get_by_role("cell").nth(1).inner_text()
    assert float(shown_loss) == pytest.approx(meta["best_val_loss"], rel=1e-9)
    expect(metadata_row(page, "tracking")).to_contain_text("offline")
    expect(metadata_row(page, "wandb_sync_command")).to_contain_text(f"wandb sync {meta['wandb_run_dir']}")
    dialog = open_markdown_figure(page, "loss_curve")
    expect(dialog).to_contain_text("EMA val loss")  # the Markdown table below the curve, rendered
    screenshot(page, f"trained_checkpoint-{PARTITION}")


@pytest.mark.timeout(1200)
def test_ui_shows_evaluation_and_report_figures(stack, dit_icfm_run, page):
    from playwright.sync_api import expect

    assert dit_icfm_run["status"] == "SUCCESS"
    run_id, meta = latest_materialization(stack.servers, "evaluation", PARTITION)
    assert run_id == dit_icfm_run["runId"]
    assert Path(meta["samples_figure_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    page.goto(f"{stack.servers.url}/assets/evaluation?view=partitions&partition={PARTITION}")
    expect(page.get_by_text("Materialized", exact=True).first).to_be_visible()
    expect(metadata_row(page, "run_name")).to_contain_text(meta["run_name"])
    # The page leads with the answer: the held-out likelihood against each baseline, with its verdict.
    assert list(meta)[:2] == ["summary", "samples_figure"]
    assert "| gaussian-full |" in meta["summary"] and meta["loglik_vs_gaussian_full_verdict"] in meta["summary"]
    open_markdown_figure(page, "samples_figure")
    screenshot(page, f"evaluation-{PARTITION}")

    run_id, report = latest_materialization(stack.servers, "ablation_report")
    assert run_id == dit_icfm_run["runId"] and report["partitions"] == [PARTITION]
    assert report["primary_metric"] == "test_nll" and "Sorted by **test_nll**" in report["report"]
    page.goto(f"{stack.servers.url}/assets/ablation_report")
    expect(metadata_row(page, "best_partition")).to_contain_text(PARTITION)
    dialog = open_markdown_figure(page, "summary")
    expect(dialog).to_contain_text(PARTITION)  # the summary table above the figure
    expect(dialog).to_contain_text("test NLL")
    screenshot(page, "ablation_report")


@pytest.mark.timeout(1500)
def test_ui_launches_backfill_with_typed_config(stack, data_recovery, page):
    from playwright.sync_api import expect

    assert data_recovery.reexecution["status"] == "SUCCESS"
    typed_config = {**fast_execution(), **run_config(train={"model_size": "tiny", "max_epochs": 2, "batch_size": 64,
                                                            "warmup_steps": 4, "device": "cpu"})}
    page.goto(f"{stack.servers.url}/assets/trained_checkpoint")
    page.get_by_role("button", name=re.compile(r"Materialize…$")).click()  # "materialization" icon + label
    dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize trained_checkpoint")

    # Config: the launch dialog's editor, typed like a person would (the server validates it as you type).
    dialog.get_by_text("Config", exact=True).click()
    dialog.get_by_role("button", name="Add config").click()
    editor = page.get_by_role("dialog").filter(has_text="Config Editor")
    editor.locator(".CodeMirror").click()
    page.keyboard.insert_text(yaml.safe_dump(typed_config, sort_keys=False))
    expect(editor.get_by_text("No errors")).to_be_visible()
    screenshot(page, "launch-config-editor")
    editor.get_by_role("button", name="Save config").click()

    dialog.get_by_text("Select a partition or create one").click()
    for partition in BACKFILL_PARTITIONS:
        page.get_by_role("menuitem").filter(has=page.get_by_text(partition, exact=True)).click()
    page.keyboard.press("Escape")  # close the partition menu, not the dialog
    expect(dialog.get_by_text(f"{len(BACKFILL_PARTITIONS)} partitions")).to_be_visible()
    screenshot(page, "launch-dialog")
    dialog.get_by_role("button", name="Launch backfill").click()

    toast = page.get_by_text(re.compile(r"Created backfill \w+"))
    backfill_id = re.search(r"Created backfill (\w+)", toast.inner_text()).group(1)
    backfill = stack.servers.wait_for_backfill(backfill_id, 2 * RUN_TIMEOUT_S)

    page.goto(f"{stack.servers.url}/runs/b/{backfill_id}")
    expect(page.get_by_text("Succeeded", exact=True).first).to_be_visible()
    screenshot(page, "backfill")

    assert backfill["status"] == "COMPLETED_SUCCESS", backfill
    assert sorted(backfill["partitionNames"]) == sorted(BACKFILL_PARTITIONS)
    runs = {tags(run)[PARTITION_TAG]: run for run in backfill["runs"]}
    assert sorted(runs) == sorted(BACKFILL_PARTITIONS) and all(r["status"] == "SUCCESS" for r in runs.values())
    processes = []
    for partition, run in runs.items():
        record = stack.servers.run(run["runId"])
        assert yaml.safe_load(record["runConfigYaml"]) == typed_config  # the typed config reached the run
        assert tags(record)["dagster/from_ui"] == "true" and tags(record)["dagster/backfill"] == backfill_id
        run_id, meta = latest_materialization(stack.servers, "trained_checkpoint", partition)
        assert run_id == run["runId"]
        assert meta["run_name"] == f"{partition}-full-none-tiny" and meta["epochs_run"] == 2
        assert meta["sha256"] == sha256_of(meta["checkpoint_path"])
        result = json.loads((Path(meta["checkpoint_path"]).parent / "result.json").read_text())
        processes.append((result["process"]["started_at"], result["process"]["finished_at"]))
    # Pool "gpu" has one slot: the two training processes never overlapped.
    (first_start, first_end), (second_start, second_end) = sorted(processes)
    assert first_end <= second_start, processes
