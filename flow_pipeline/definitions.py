"""The one ``dg.Definitions`` of the project: ``dagster dev`` / ``dagster asset materialize -m flow_pipeline.definitions``."""

import dagster as dg

from flow_pipeline.defs.assets import dataset_splits, normalization_stats, trained_checkpoint
from flow_pipeline.defs.resources import ArtifactsResource, ComputeResource, default_root
from flow_pipeline.defs.tracking import WandbResource

defs = dg.Definitions(
    assets=[dataset_splits, normalization_stats, trained_checkpoint],
    resources={
        "artifacts": ArtifactsResource(root=default_root()),
        "compute": ComputeResource(),
        "wandb": WandbResource(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    },
)
