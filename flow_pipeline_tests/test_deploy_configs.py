"""The deployment files under deploy/, checked as far as this machine allows (no Docker engine, no cluster):

- deploy/dagster-postgres.yaml loads as a Dagster instance config; its storage resolves from DAGSTER_PG_* to a
  psycopg2 URL (the installed driver).
- deploy/k8s/values.yaml: the instance config the dagster chart renders from it (a mirror of the chart templates for
  the keys it sets) passes Dagster's schema and dagster-k8s's K8sRunLauncher schema, and the Kubernetes Job that
  launcher builds for a training run tagged with ``k8s_gpu_run_tags(2)`` asks for 2 GPUs and mounts the shared volume
  at FLOW_PIPELINE_ROOT (skipped without the ``k8s`` extra).
- deploy/Dockerfile installs the package the README's install does (the image itself is not built here).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config

from flow_pipeline.defs.assets import K8S_CONFIG_TAG, k8s_gpu_run_tags, training_command
from flow_pipeline_tests.helpers import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
PG_ENV = {"DAGSTER_PG_HOST": "db.internal", "DAGSTER_PG_PORT": "6543", "DAGSTER_PG_USERNAME": "flow",
          "DAGSTER_PG_PASSWORD": "s3cr:t@", "DAGSTER_PG_DB": "dagster_flow"}


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def instance_config(tmp_path: Path, config: dict | str) -> dict:
    """Validate ``config`` as $DAGSTER_HOME/dagster.yaml with Dagster's own instance schema."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    text = config if isinstance(config, str) else yaml.safe_dump(config)
    (home / "dagster.yaml").write_text(text)
    return dagster_instance_config(str(home))[0]


# --- deploy/dagster-postgres.yaml ---------------------------------------------------------------------------------


def test_postgres_instance_yaml_loads_with_credentials_from_the_environment(tmp_path, monkeypatch):
    from dagster_postgres import DagsterPostgresStorage
    from dagster_postgres.utils import pg_url_from_config
    from sqlalchemy.engine import make_url

    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    text = (DEPLOY / "dagster-postgres.yaml").read_text()
    for value in PG_ENV.values():
        assert value not in text
    config = instance_config(tmp_path, text)
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["pools"]["granularity"] == "op"

    storage = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert storage.success, storage.errors
    url = make_url(pg_url_from_config(storage.value))
    assert (url.host, url.port, url.username, url.password, url.database) == (
        "db.internal", 6543, "flow", "s3cr:t@", "dagster_flow")
    # The driver must be the installed psycopg2: SQLAlchemy >= 2.1 maps a bare "postgresql" scheme to psycopg 3.
    assert url.get_dialect().driver == "psycopg2"
    url.get_dialect().import_dbapi()


def test_postgres_instance_yaml_names_the_missing_variable(tmp_path, monkeypatch):
    from dagster_postgres import DagsterPostgresStorage

    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DAGSTER_PG_PASSWORD")
    config = instance_config(tmp_path, (DEPLOY / "dagster-postgres.yaml").read_text())
    result = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert not result.success
    assert "DAGSTER_PG_PASSWORD" in str([error.message for error in result.errors])


# --- deploy/k8s/values.yaml ----------------------------------------------------------------------------------------

# Keys of runLauncher.config.k8sRunLauncher the chart's template (helpers/_instance.tpl, "dagsterYaml.runLauncher.k8s")
# turns into K8sRunLauncher config, and their instance-config names.
K8S_LAUNCHER_KEYS = {
    "imagePullPolicy": "image_pull_policy", "jobNamespace": "job_namespace", "kubeconfigFile": "kubeconfig_file",
    "loadInclusterConfig": "load_incluster_config", "envVars": "env_vars", "volumeMounts": "volume_mounts",
    "volumes": "volumes", "labels": "labels", "resources": "resources", "failPodOnRunFailure": "fail_pod_on_run_failure",
    "schedulerName": "scheduler_name", "securityContext": "security_context",
}
RUN_K8S_CONFIG_KEYS = {"containerConfig": "container_config", "podSpecConfig": "pod_spec_config",
                       "podTemplateSpecMetadata": "pod_template_spec_metadata", "jobSpecConfig": "job_spec_config",
                       "jobMetadata": "job_metadata"}
RELEASE_NAMESPACE = "flow-pipeline"


def chart_instance_config(values: dict) -> dict:
    """The dagster.yaml the chart renders from ``values`` (release ``dagster``), for the sections this project sets.
    Any key of ours the mirror does not know fails the test instead of being dropped silently."""
    launcher_values = values["runLauncher"]["config"]["k8sRunLauncher"]
    unknown = set(launcher_values) - set(K8S_LAUNCHER_KEYS) - {"envConfigMaps", "envSecrets", "runK8sConfig"}
    assert not unknown, f"keys the chart mirror does not know: {unknown}"
    launcher = {"dagster_home": "/opt/dagster/dagster_home", "instance_config_map": "dagster-instance",
                "postgres_password_secret": values["global"]["postgresqlSecretName"],
                "service_account_name": "dagster", "job_namespace": RELEASE_NAMESPACE}
    launcher.update({K8S_LAUNCHER_KEYS[key]: value for key, value in launcher_values.items() if key in K8S_LAUNCHER_KEYS})
    launcher["env_config_maps"] = [item["name"] for item in launcher_values.get("envConfigMaps", [])]
    launcher["env_secrets"] = [item["name"] for item in launcher_values.get("envSecrets", [])]
    run_k8s = launcher_values.get("runK8sConfig", {})
    assert set(run_k8s) <= set(RUN_K8S_CONFIG_KEYS), set(run_k8s) - set(RUN_K8S_CONFIG_KEYS)
    launcher["run_k8s_config"] = {RUN_K8S_CONFIG_KEYS[key]: value for key, value in run_k8s.items()}

    pg = values["postgresql"]
    postgres = {"postgres_db": {"username": pg["postgresqlUsername"], "password": {"env": "DAGSTER_PG_PASSWORD"},
                                "hostname": pg["postgresqlHost"], "db_name": pg["postgresqlDatabase"],
                                "port": pg["service"]["port"], "params": pg["postgresqlParams"],
                                "scheme": pg["postgresqlScheme"]}}
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == "QueuedRunCoordinator"
    queued = coordinator["config"]["queuedRunCoordinator"]
    assert set(queued) <= {"dequeueIntervalSeconds"}, "run limits belong in `concurrency:` (the chart rejects both)"
    monitoring = values["dagsterDaemon"]["runMonitoring"]
    concurrency = values["concurrency"]
    assert concurrency["enabled"]
    pools, runs = concurrency["pools"], concurrency["runs"]
    return {
        "run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage", "config": postgres},
        "event_log_storage": {"module": "dagster_postgres.event_log", "class": "PostgresEventLogStorage",
                              "config": postgres},
        "schedule_storage": {"module": "dagster_postgres.schedule_storage", "class": "PostgresScheduleStorage",
                             "config": postgres},
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": launcher},
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": {"dequeue_interval_seconds": queued["dequeueIntervalSeconds"]}},
        "run_monitoring": {"enabled": monitoring["enabled"], "start_timeout_seconds": monitoring["startTimeoutSeconds"],
                           "poll_interval_seconds": monitoring["pollIntervalSeconds"]},
        "concurrency": {
            "pools": {"default_limit": pools["defaultLimit"], "granularity": pools["granularity"],
                      "op_granularity_run_buffer": pools["opGranularityRunBuffer"]},
            "runs": {"max_concurrent_runs": runs["maxConcurrentRuns"]},
        },
    }


@pytest.fixture
def k8s_values() -> dict:
    return load_yaml(DEPLOY / "k8s" / "values.yaml")


def test_helm_values_render_an_instance_config_dagster_accepts(k8s_values, tmp_path, monkeypatch):
    pytest.importorskip("dagster_k8s", reason="the `k8s` extra (dagster-k8s) is not installed")
    from dagster_k8s import K8sRunLauncher
    from dagster_postgres import PostgresRunStorage

    rendered = chart_instance_config(k8s_values)
    config = instance_config(tmp_path, rendered)  # the instance schema: storages, coordinator, concurrency
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "from-the-secret")
    storage = process_config(PostgresRunStorage.config_type(), config["run_storage"]["config"])
    assert storage.success, storage.errors
    launcher = process_config(K8sRunLauncher.config_type(), config["run_launcher"]["config"])
    assert launcher.success, launcher.errors
    assert launcher.value["image_pull_policy"] == "IfNotPresent"


def test_the_code_server_and_the_run_pods_share_the_artifacts_volume(k8s_values):
    deployment = k8s_values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "flow_pipeline.definitions"]
    launcher = k8s_values["runLauncher"]["config"]["k8sRunLauncher"]
    root = {item["name"]: item["value"] for item in deployment["env"]}["FLOW_PIPELINE_ROOT"]
    assert f"FLOW_PIPELINE_ROOT={root}" in launcher["envVars"]
    for where in (deployment, launcher):
        mount = next(m for m in where["volumeMounts"] if m["mountPath"] == root)
        volume = next(v for v in where["volumes"] if v["name"] == mount["name"])
        assert volume["persistentVolumeClaim"]["claimName"] == "flow-pipeline-artifacts"
    pvc = load_yaml(DEPLOY / "k8s" / "artifacts-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "flow-pipeline-artifacts"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # run pods on several nodes at once


KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: nowhere, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: nobody, user: {token: not-a-token}}]
contexts: [{name: here, context: {cluster: nowhere, user: nobody}}]
current-context: here
"""


def run_pod_job(k8s_values, tmp_path, tags: dict[str, str]):
    """The Kubernetes Job that K8sRunLauncher, configured as the chart configures it, would create for a run with
    ``tags`` — built the way ``K8sRunLauncher._launch_k8s_job_with_args`` builds it, without a cluster."""
    from dagster import DagsterRun
    from dagster_k8s import K8sRunLauncher
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import construct_dagster_k8s_job

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    config = process_config(K8sRunLauncher.config_type(), chart_instance_config(k8s_values)["run_launcher"]["config"])
    assert config.success, config.errors
    launcher = K8sRunLauncher.from_config_value(
        None, {**config.value, "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)})
    run = DagsterRun(job_name="retrain_trained_checkpoint", run_id="0f1e2d3c-0000-4000-8000-000000000000", tags=tags)
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=True)
    return construct_dagster_k8s_job(
        job_config=context.get_k8s_job_config(job_image="registry.example.com/flow-pipeline:0.1.0",
                                              run_launcher=launcher),
        args=["dagster", "api", "execute_run", "{}"], job_name="dagster-run-0f1e2d3c", pod_name="dagster-run-0f1e2d3c",
        component="run_worker", user_defined_k8s_config=context.run_k8s_config)


def test_gpu_run_tag_gives_the_run_pod_its_gpus(k8s_values, tmp_path):
    pytest.importorskip("dagster_k8s", reason="the `k8s` extra (dagster-k8s) is not installed")
    job = run_pod_job(k8s_values, tmp_path, {"dagster/partition": "dit-icfm", **k8s_gpu_run_tags(2)})
    pod = job.spec.template.spec
    container = pod.containers[0]
    assert container.resources.limits == {"nvidia.com/gpu": "2"}
    assert container.resources.requests == {"cpu": "2", "memory": "8Gi"}  # the chart's default, merged with the tag
    assert any(t.key == "nvidia.com/gpu" and t.operator == "Exists" for t in pod.tolerations)
    root = "/mnt/flow-pipeline"
    assert {"name": "FLOW_PIPELINE_ROOT", "value": root} in [{"name": e.name, "value": e.value} for e in container.env]
    mount = next(m for m in container.volume_mounts if m.mount_path == root)
    volume = next(v for v in pod.volumes if v.name == mount.name)
    assert volume.persistent_volume_claim.claim_name == "flow-pipeline-artifacts"
    assert "flow-pipeline-wandb" in [source.secret_ref.name for source in container.env_from if source.secret_ref]

    untagged = run_pod_job(k8s_values, tmp_path, {"dagster/partition": "dit-icfm"}).spec.template.spec
    assert not (untagged.containers[0].resources.limits or {})  # data and report runs get no GPU


def test_gpu_run_tags_are_the_k8s_config_tag():
    tags = k8s_gpu_run_tags(4)
    assert list(tags) == [K8S_CONFIG_TAG] == ["dagster-k8s/config"]
    config = json.loads(tags[K8S_CONFIG_TAG])
    assert config["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    with pytest.raises(ValueError, match="gpus"):
        k8s_gpu_run_tags(0)


def test_training_command_uses_torchrun_for_several_processes(tmp_path):
    job = tmp_path / "job.json"
    assert training_command(job, 1)[1:] == ["-m", "flow_pipeline.train", "--job", str(job)]
    command = training_command(job, 4)
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m"]
    assert command[6:] == ["flow_pipeline.train", "--job", str(job)]


# --- deploy/Dockerfile ---------------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and backslash continuations joined."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def pip_installs(command: str) -> list[list[str]]:
    """The argument lists of every ``pip install`` in a shell command line (``--flag value`` pairs removed)."""
    found = []
    for part in re.split(r"&&|;|\n", command):
        if "pip" not in part or "install" not in part:
            continue
        words = shlex.split(part, comments=True)
        if "pip" in [Path(w).name for w in words] and "install" in words:
            args, skip = [], False
            for word in words[words.index("install") + 1:]:
                if skip:
                    skip = False
                elif word in ("--index-url", "--extra-index-url", "-i", "-c", "-r"):
                    skip = True
                elif not word.startswith("-") or word == "-e":
                    args.append(word)
            found.append(args)
    return found


def project_target(args: list[str]) -> tuple[str, set[str]] | None:
    """("." , extras) when the pip arguments install the project in the current directory, else None."""
    for word in args:
        match = re.fullmatch(r"\.(?:\[([\w,\s-]*)\])?", word)
        if match:
            return ".", {extra.strip() for extra in (match.group(1) or "").split(",") if extra.strip()}
    return None


def test_dockerfile_installs_the_package_the_readme_installs():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    torch_pin = next(req for req in pyproject["project"]["dependencies"] if req.startswith("torch=="))
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile")
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("python:3.11")

    installs = [args for kind, arguments in instructions if kind == "RUN" for args in pip_installs(arguments)]
    assert [torch_pin] in installs  # torch pinned exactly as the package pins it (CPU or CUDA build of it)
    targets = [project_target(args) for args in installs if project_target(args)]
    assert len(targets) == 1
    _, extras = targets[0]
    assert {"postgres", "k8s"} <= extras <= set(pyproject["project"]["optional-dependencies"])
    copies = [arguments.split() for kind, arguments in instructions if kind == "COPY"]
    assert any("pyproject.toml" in copy[:-1] for copy in copies)
    assert any(copy[0] == pyproject["tool"]["dagster"]["module_name"].split(".")[0] for copy in copies)
    env = " ".join(arguments for kind, arguments in instructions if kind == "ENV")
    assert "FLOW_PIPELINE_ROOT=/mnt/flow-pipeline" in env  # where deploy/k8s mounts the shared volume

    # The README's install (scripts/install.sh, and any pip line in README.md) installs the same project.
    readme_side = pip_installs((REPO_ROOT / "scripts" / "install.sh").read_text())
    readme_side += [args for line in (REPO_ROOT / "README.md").read_text().splitlines() if "pip install" in line
                    for args in pip_installs(line.strip().strip("`$ "))]
    readme_targets = [project_target(args) for args in readme_side if project_target(args)]
    assert readme_targets, "the README's install does not install the project"
    # Every extra the image installs is one the README's install (and so the test suite) installs too.
    readme_extras = set().union(*(target_extras for _, target_extras in readme_targets))
    assert extras <= readme_extras, f"the image installs extras the README's install never does: {extras - readme_extras}"


def test_dockerignore_sends_only_what_the_image_installs():
    patterns = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!flow_pipeline/"} <= set(patterns)
