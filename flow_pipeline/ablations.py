"""The ablation registry: every partition key ``{arch}-{flow}`` and what it means."""

from __future__ import annotations

from dataclasses import dataclass

from flow_pipeline.core.flows import FLOWS
from flow_pipeline.core.models import ARCHITECTURES


@dataclass(frozen=True)
class Ablation:
    arch: str
    flow: str

    @property
    def key(self) -> str:
        return f"{self.arch}-{self.flow}"


ABLATIONS: dict[str, Ablation] = {
    ablation.key: ablation for ablation in (Ablation(arch, flow) for arch in ARCHITECTURES for flow in FLOWS)
}
PARTITION_KEYS: list[str] = list(ABLATIONS)


def ablation_for(partition_key: str) -> Ablation:
    """The ablation of a partition key; unknown keys raise ValueError listing the valid ones."""
    try:
        return ABLATIONS[partition_key]
    except KeyError:
        raise ValueError(f"unknown ablation partition {partition_key!r}; valid: {', '.join(PARTITION_KEYS)}") from None
