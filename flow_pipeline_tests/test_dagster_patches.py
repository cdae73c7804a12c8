"""The private Dagster code the project patches is the code the patches were written for.

``defs/pool_claims.py`` and ``defs/pool_wait.py`` replace or wrap methods of private Dagster classes, and rely on how
the methods around them work. Each of those definitions is pinned here by the sha256 of its source text in the
installed package (read from the file, so a patch applied at import does not hide the original). A Dagster upgrade
that changes one fails its test, naming the patch and what to re-check; once re-checked, record the new hash.
A test also fails when project code imports a private Dagster module that nothing here pins.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import re
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "flow_pipeline"
WRITTEN_FOR = "dagster 1.13.27, dagster-postgres 0.29.27"

SQL_STORAGE = "dagster._core.storage.event_log.sql_event_log:SqlEventLogStorage"
CLAIMS_RECHECK = ("defs/pool_claims.py: do simultaneous claims still share a slot on SQLite and PostgreSQL "
                  "(test_pool_claims.py's tests without the lock), and does no wrapped method call another (the "
                  "locks are not re-entrant)?")
WAIT_RECHECK = ("defs/pool_wait.py: is the interval to the next claim check still never positive (the run worker "
                "spins), and do claim() and __init__ still keep the back-offs in _pending_claims/_pending_timeouts?")

# "module:Class.method" -> (first 16 hex digits of the sha256 of its source, what to re-check when it changes)
PINNED = {
    f"{SQL_STORAGE}.claim_concurrency_slot": ("2a7dd34522a63266", CLAIMS_RECHECK),
    f"{SQL_STORAGE}._claim_concurrency_slot": ("bc060026889ef6cc", CLAIMS_RECHECK),
    f"{SQL_STORAGE}.has_unassigned_slots": ("6175b7495d7f4468", CLAIMS_RECHECK),
    f"{SQL_STORAGE}.add_pending_step": ("a156da42aae356d1", CLAIMS_RECHECK),
    f"{SQL_STORAGE}.check_concurrency_claim": ("7c0bf5431e99fe35", CLAIMS_RECHECK),
    f"{SQL_STORAGE}.free_concurrency_slot_for_step": ("6c838c1a56f43064", CLAIMS_RECHECK),
    f"{SQL_STORAGE}.free_concurrency_slots_for_run": ("b3c517243770e0ad", CLAIMS_RECHECK),
    f"{SQL_STORAGE}._free_concurrency_slots": ("e40ea16cb4782124", CLAIMS_RECHECK),
    f"{SQL_STORAGE}._remove_pending_steps": ("634835528b4cae16", CLAIMS_RECHECK),
    f"{SQL_STORAGE}.assign_pending_steps": ("772c72492b901a4a", CLAIMS_RECHECK),
    "dagster._core.storage.event_log.sqlite.sqlite_event_log:SqliteEventLogStorage.__init__": (
        "287b313fe626c473", "defs/pool_claims.py: is _base_dir still the directory of the instance's event log?"),
    "dagster_postgres.event_log.event_log:PostgresEventLogStorage.__init__": (
        "f62babba1d43bfdd", CLAIMS_RECHECK + " Is the engine still autocommit?"),
    "dagster_postgres.event_log.event_log:PostgresEventLogStorage.index_connection": ("ae701f47b4ea9ea0",
                                                                                     CLAIMS_RECHECK),
    "dagster_postgres.event_log.event_log:PostgresEventLogStorage.index_transaction": (
        "3d63ada040d77040", "defs/pool_claims.py: does index_transaction still open a transaction on a connection "
                            "of its own (the advisory lock lasts as long as that transaction)?"),
    "dagster._core.execution.plan.instance_concurrency_context:InstanceConcurrencyContext.__init__": (
        "fe9188a79e86d25e", WAIT_RECHECK),
    "dagster._core.execution.plan.instance_concurrency_context:InstanceConcurrencyContext.claim": (
        "65fa7b9f2a47a5e8", WAIT_RECHECK),
    ("dagster._core.execution.plan.instance_concurrency_context:"
     "InstanceConcurrencyContext.interval_to_next_pending_claim_check"): ("761b93cb3539185c", WAIT_RECHECK),
    "dagster._core.execution.plan.active:ActiveExecution.sleep_interval": (
        "add8c958182658d6", WAIT_RECHECK + " Does the executor loop still sleep that interval?"),
}


def source_of(target: str) -> str:
    """The source lines of ``module:Class.method``, decorators included, as the installed package's file has them."""
    module, qualname = target.split(":")
    path = importlib.util.find_spec(module).origin
    lines = Path(path).read_text().splitlines()
    nodes = ast.parse("\n".join(lines)).body
    node = None
    for name in qualname.split("."):
        node = next((n for n in nodes if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name), None)
        if node is None:
            raise LookupError(f"{target}: no {name!r} in {path}")
        nodes = node.body
    first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
    return "\n".join(lines[first - 1 : node.end_lineno])


def source_hash(target: str) -> str:
    return hashlib.sha256(source_of(target).encode()).hexdigest()[:16]


def installed_versions() -> str:
    return ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("dagster", "dagster-postgres"))


@pytest.mark.parametrize("target", sorted(PINNED), ids=lambda target: target.split(":")[1])
def test_patched_dagster_code_is_what_the_patches_were_written_for(target):
    expected, recheck = PINNED[target]
    try:
        actual = source_hash(target)
    except LookupError as exc:
        pytest.fail(f"{exc}: Dagster moved or removed code a patch relies on ({installed_versions()}; written for "
                    f"{WRITTEN_FOR}). Re-check {recheck}")
    assert actual == expected, (
        f"{target} changed ({installed_versions()}; the patches were written for {WRITTEN_FOR}). Re-check "
        f"{recheck} Then record its new hash {actual} in PINNED ({Path(__file__).name}).")


def private_dagster_imports() -> dict[str, list[str]]:
    """Private Dagster modules imported by the project's code: module -> the files importing it."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        for module in re.findall(r"^\s*(?:from|import)\s+(dagster\._[\w.]*)", path.read_text(), re.MULTILINE):
            found.setdefault(module, []).append(str(path.relative_to(PACKAGE_ROOT.parent)))
    return found


def test_every_private_dagster_module_the_project_imports_is_pinned():
    pinned_modules = {target.split(":")[0] for target in PINNED}
    unpinned = {module: files for module, files in private_dagster_imports().items()
                if module not in pinned_modules}
    assert private_dagster_imports(), "the scan found no private import at all: is the pattern still right?"
    assert not unpinned, (f"private Dagster modules imported but not pinned: {unpinned}; pin the definitions the "
                          f"code relies on in PINNED ({Path(__file__).name})")


def test_source_of_reads_the_file_not_the_patched_class():
    import flow_pipeline.definitions  # noqa: F401  (applies the patches)
    from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext

    text = source_of("dagster._core.execution.plan.instance_concurrency_context:"
                     "InstanceConcurrencyContext.interval_to_next_pending_claim_check")
    assert text.lstrip().startswith("def interval_to_next_pending_claim_check(self)")
    assert InstanceConcurrencyContext.interval_to_next_pending_claim_check.__module__ == "flow_pipeline.defs.pool_wait"
