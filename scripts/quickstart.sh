#!/usr/bin/env bash
# README command A: install, then train partition mlp-icfm on the built-in SONAR-like data (CPU, under 10 minutes)
# with the defaults, which are the shipped recipe (whitened data, linear skip path, network on the top 256 principal
# directions with 512 prototype features, logit-normal training times; see RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/dagster_home}"
export FLOW_PIPELINE_ROOT="${FLOW_PIPELINE_ROOT:-$PWD/artifacts}"
dagster=.venv/bin/dagster
# Pools are enforced only with an explicit limit on a persistent instance: one training at a time here.
$dagster instance concurrency set gpu "${GPU_POOL_LIMIT:-1}"
$dagster asset materialize -m flow_pipeline.definitions --select dataset_splits,normalization_stats
$dagster asset materialize -m flow_pipeline.definitions --select trained_checkpoint --partition mlp-icfm
.venv/bin/python -m flow_pipeline.show mlp-icfm
