"""Where training metrics go: a small protocol, so the trainer never knows about Wandb or Dagster."""

from __future__ import annotations

from typing import Any, Protocol


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record scalar metrics at a global optimizer step (monotonically non-decreasing across resumes)."""

    def summary(self, **values: Any) -> None:
        """Record final values of the run (best loss, checkpoint path, ...)."""

    def finish(self, failed: bool = False) -> None:
        """Close the run; ``failed`` marks it as crashed."""


class NullTracker:
    """Discards everything."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, **values: Any) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class RecordingTracker:
    """Keeps everything in memory; for tests and for callers that want the curves."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.summaries: dict[str, Any] = {}
        self.finished: bool | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def summary(self, **values: Any) -> None:
        self.summaries.update(values)

    def finish(self, failed: bool = False) -> None:
        self.finished = not failed


class MultiTracker:
    """Fans out to several trackers (e.g. Wandb and a log-line progress view)."""

    def __init__(self, *trackers: Tracker) -> None:
        self.trackers = trackers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def summary(self, **values: Any) -> None:
        for tracker in self.trackers:
            tracker.summary(**values)

    def finish(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.finish(failed)
