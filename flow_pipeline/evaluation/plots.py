"""Figures of runs and evaluations, as PNG files and as Markdown images the Dagster UI shows inline.

matplotlib (Agg backend: no display needed) is imported by the callers only when they draw: it costs ~0.7 s, and
every Dagster process loads the definitions. Each figure function returns a :class:`InlineFigure`: the PNG bytes,
which :meth:`InlineFigure.save` writes atomically and :meth:`InlineFigure.markdown` embeds as a base64 data URI.

Dagster 1.13's UI renders Markdown metadata with ``rehype-sanitize`` extended to allow the ``data:`` protocol in
``src`` (ui-core ``MarkdownWithPlugins.tsx``), so a data-URI PNG shows as an image; a Markdown value of 1,000
characters or more (every image) is shown behind a "[Show Markdown]" button that opens it in a dialog.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from flow_pipeline.artifacts import write_atomic  # noqa: E402
from flow_pipeline.evaluation.report import MISSING, PRIMARY_METRIC, is_missing  # noqa: E402

# Every event's metadata is stored in the instance's event log and sent to each browser that opens the page.
MAX_INLINE_PNG_BYTES = 150_000
# Resolutions tried in turn until the PNG fits under the limit. The UI's dialog does not scale images down: at 90
# dpi a 10-inch figure is 900 pixels wide, which fits it on a 1366-pixel screen.
DPIS = (90, 72, 60)


@dataclass(frozen=True)
class InlineFigure:
    """One rendered figure: PNG bytes of at most :data:`MAX_INLINE_PNG_BYTES`."""

    png: bytes

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    def markdown(self, alt: str) -> str:
        """A Markdown image with the PNG inline (``alt``: the text shown where images are not)."""
        safe_alt = alt.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]").replace("\n", " ")
        return f"![{safe_alt}]({self.data_uri()})"

    def save(self, path: Path) -> Path:
        write_atomic(path, self.png)
        return path


def render_figure(fig, max_bytes: int = MAX_INLINE_PNG_BYTES) -> InlineFigure:
    """The figure as PNG at the highest of :data:`DPIS` that fits in ``max_bytes``; the figure is closed.
    Raises ValueError when even the lowest resolution does not fit."""
    try:
        sizes = []
        for dpi in DPIS:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
            png = buffer.getvalue()
            if len(png) <= max_bytes:
                return InlineFigure(png)
            sizes.append(f"{len(png):,} bytes at dpi {dpi}")
    finally:
        plt.close(fig)
    raise ValueError(f"figure too large to embed: {', '.join(sizes)}; the limit is {max_bytes:,} bytes")


def plot_loss_curve(history: list[dict], title: str, best_loss: float | None = None,
                    zero_predictor_loss: float | None = None) -> InlineFigure:
    """Train, validation and EMA validation loss per evaluation (``history`` rows: epoch, train_loss, val_loss,
    ema_val_loss, lr; epochs are fractional when validation runs every N steps), the LR on a second axis, the
    selected checkpoint marked (the row whose EMA loss is ``best_loss``), and the loss of a model that predicts zero
    (the flow's; None: not drawn) as the level an untrained model reaches."""
    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(epochs, [row["train_loss"] for row in history], marker=".", color="C0", label="train")
    ax.plot(epochs, [row["val_loss"] for row in history], marker=".", color="C1", alpha=0.45, linestyle="--",
            label="val")
    ax.plot(epochs, [row["ema_val_loss"] for row in history], marker=".", color="C2", label="val (EMA)")
    if zero_predictor_loss is not None:
        ax.axhline(zero_predictor_loss, color="grey", linestyle=":", label=f"zero predictor ({zero_predictor_loss:.3g})")
    if best_loss is not None and history:
        # The selected row's EMA loss is best_loss itself; the nearest one also survives a float round trip.
        best = min(history, key=lambda row: abs(row["ema_val_loss"] - best_loss))
        ax.axvline(best["epoch"], color="C2", alpha=0.3, linewidth=4)
        ax.plot([best["epoch"]], [best["ema_val_loss"]], marker="*", markersize=14, color="C2", linestyle="none",
                label=f"best: epoch {best['epoch']:g}, {best['ema_val_loss']:.4f}")
    ax.set(xlabel="epoch", ylabel="flow-matching loss", title=title)
    ax.ticklabel_format(axis="y", useOffset=False)  # "+1" offsets hide how close a loss is to the zero predictor's
    ax.grid(alpha=0.3)
    lr_axis = ax.twinx()
    lr_axis.plot(epochs, [row["lr"] for row in history], color="C7", linewidth=1, label="LR (right axis)")
    lr_axis.set_ylabel("learning rate", color="C7")
    lr_axis.tick_params(axis="y", colors="C7")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    handles, labels = ax.get_legend_handles_labels()
    lr_handles, lr_labels = lr_axis.get_legend_handles_labels()
    # Below the axes: inside, it would hide the start of the LR warm-up or the end of the curves.
    ax.legend(handles + lr_handles, labels + lr_labels, fontsize=7, loc="upper center", ncol=4,
              bbox_to_anchor=(0.5, -0.16), frameon=False)
    return render_figure(fig)


def covariance_spectrum(x: np.ndarray) -> np.ndarray:
    """Eigenvalues of the sample covariance of ``x`` (n, dim), largest first: at most min(n - 1, dim) of them
    (the rest are zero), float64. From the smaller Gram matrix of the centred rows (dim x dim, or n x n when n < dim:
    the same non-zero eigenvalues), a fifth of an SVD's time at n = 5 x dim; round-off below zero is clipped."""
    centred = np.asarray(x, dtype=np.float64)
    centred = centred - centred.mean(axis=0)
    gram = centred.T @ centred if centred.shape[0] >= centred.shape[1] else centred @ centred.T
    eigenvalues = np.linalg.eigvalsh(gram)[::-1].clip(min=0.0) / (centred.shape[0] - 1)
    return eigenvalues[: min(centred.shape[0] - 1, centred.shape[1])]


def headline(metrics: dict, keys: tuple[str, ...]) -> str:
    """``key=value`` for those ``keys`` present and numeric in ``metrics``, e.g. "fd_ratio=2.31  precision=0.41"."""
    parts = []
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{key}={value:.3g}")
    return "  ".join(parts)


def plot_sample_dispersion(generated: np.ndarray, real: np.ndarray, title: str) -> InlineFigure:
    """Dispersion and collapse at a glance, generated vs real rows (each (n, dim), raw space): the covariance
    eigenvalue spectrum (collapse: the generated curve falls below), per-dimension std over dimensions sorted by
    the real std (over- or under-dispersion per dimension), and the histogram of L2 norms. Non-finite generated
    rows are left out and counted in the legend."""
    finite = np.isfinite(generated).all(axis=1)
    gen = np.asarray(generated[finite], dtype=np.float64)
    real = np.asarray(real, dtype=np.float64)
    dropped = f" ({int((~finite).sum())} non-finite left out)" if not finite.all() else ""
    gen_label, real_label = f"generated (n={len(gen)}){dropped}", f"real (n={len(real)})"
    fig, (ax_spec, ax_std, ax_norm) = plt.subplots(1, 3, figsize=(10, 3.4))

    for rows, label, color in ((real, real_label, "C0"), (gen, gen_label, "C3")):
        if len(rows) >= 2:
            spectrum = covariance_spectrum(rows)
            ax_spec.loglog(np.arange(1, len(spectrum) + 1), np.maximum(spectrum, 1e-30), color=color, label=label)
    ax_spec.set(xlabel="rank", ylabel="covariance eigenvalue", title="spectrum (sorted eigenvalues)")
    ax_spec.legend(fontsize=7)

    order = np.argsort(real.std(axis=0))[::-1]
    ax_std.plot(real.std(axis=0)[order], color="C0", label="real")
    if len(gen):
        ax_std.plot(gen.std(axis=0)[order], color="C3", alpha=0.7, linewidth=0.8, label="generated")
    ax_std.set(xlabel="dimension (sorted by real std)", ylabel="std", title="per-dimension std")
    ax_std.legend(fontsize=7)

    real_norms, gen_norms = np.linalg.norm(real, axis=1), np.linalg.norm(gen, axis=1)
    both = np.concatenate([real_norms, gen_norms])
    bins = np.linspace(both.min(), both.max(), 40) if both.max() > both.min() else 10
    ax_norm.hist(real_norms, bins=bins, alpha=0.5, color="C0", label="real")
    if len(gen):
        ax_norm.hist(gen_norms, bins=bins, alpha=0.5, color="C3", label="generated")
    ax_norm.set(xlabel="L2 norm", ylabel="rows", title="norms")
    ax_norm.legend(fontsize=7)
    for ax in (ax_spec, ax_std, ax_norm):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.suptitle(title, fontsize=10, y=1.08)  # above the panels' own titles (the PNG is cropped to fit it)
    return render_figure(fig)


HEADLINE_METRICS = ("fd_inf", "variance_ratio", "norm_ratio", "precision", "recall", "coverage")


def plot_evaluation(generated: np.ndarray, test: np.ndarray, metrics: dict, name: str, seed: int = 0) -> InlineFigure:
    """:func:`plot_sample_dispersion` of ``generated`` (n, dim) against n test rows drawn with ``seed`` (all of
    them when the test split has no more), titled with ``name`` and the headline ``metrics``."""
    n = min(len(generated), len(test))
    rows = np.sort(np.random.default_rng(seed).choice(len(test), size=n, replace=False))
    keys = (PRIMARY_METRIC, *(key for key in HEADLINE_METRICS if key != PRIMARY_METRIC))
    return plot_sample_dispersion(generated, np.asarray(test[rows]), f"{name}\n{headline(metrics, keys)}")


# --- the ablation report ------------------------------------------------------------------------------------

# Where real data sits on a metric, drawn as a reference line in the report figure.
REAL_DATA_LEVEL = {"fd_ratio": 1.0, "kid": 0.0, "ranking_kid": 0.0}
# A ranking metric that is a distance with a rule on top (e.g. ranking_kid: KID, or +inf for copies) takes the
# interval of the distance it ranks by.
RANKING_PREFIX = "ranking_"
REFERENCE_PREFIX = "reference:"


def is_baseline_row(row: dict, baseline: str | None = None) -> bool:
    """A row that is not a trained model of the study (a Gaussian fit, held-out real rows: its ``kind`` or its
    ``reference: ...`` name says so, or it has no architecture) or the baseline the others are compared with (its
    ``vs_baseline`` says "baseline", or its partition or identity is ``baseline``)."""
    if row.get("vs_baseline") == "baseline" or (baseline is not None and baseline in (row.get("partition"),
                                                                                     row.get("identity"))):
        return True
    return (row.get("kind") in ("baseline", "reference") or str(row.get("partition", "")).startswith(REFERENCE_PREFIX)
            or is_missing(row.get("arch")) or row.get("arch") == MISSING)


def metric_interval(row: dict, metric: str) -> tuple[float, float] | None:
    """(low, high) of ``metric``'s confidence interval from the row's ``<metric>_ci_low``/``_ci_high`` (or
    ``_ci95_low``/``_ci95_high``) columns (for ``ranking_<name>``, those of ``<name>``), or None when the row has
    none or its value is missing or infinite."""
    if is_missing(row.get(metric)) or not math.isfinite(float(row[metric])):
        return None
    for name in dict.fromkeys((metric, metric.removeprefix(RANKING_PREFIX))):
        for low_key, high_key in ((f"{name}_ci_low", f"{name}_ci_high"), (f"{name}_ci95_low", f"{name}_ci95_high")):
            if not (is_missing(row.get(low_key)) or is_missing(row.get(high_key))):
                return float(row[low_key]), float(row[high_key])
    return None


def row_label(row: dict) -> str:
    """A report row's name: its run identity where it has one (several identities may share a partition)."""
    return row.get("identity") or row["partition"]


def _plot_curves(ax, curves: dict[str, list[dict]], colors: dict[str, str]) -> None:
    for label, history in sorted(curves.items()):
        if not history:
            continue
        epochs = [entry["epoch"] for entry in history]
        ax.plot(epochs, [entry["ema_val_loss"] for entry in history], color=colors[label], marker=".", label=label)
        ax.plot(epochs, [entry["val_loss"] for entry in history], color=colors[label], marker=".", linestyle="--",
                alpha=0.4)
    ax.axhline(1.0, color="grey", linestyle=":", label="zero predictor")
    ax.set(xlabel="epoch", ylabel="val loss / zero-predictor loss\n(solid: EMA, dashed: raw)", title="validation loss")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _plot_metric(ax, rows: list[dict], colors: dict[str, str], metric: str, baseline: str | None) -> None:
    """One line per row, top to bottom in row order: the metric as a dot, its CI as a bar; baseline rows black
    squares; rows missing the metric say n/a."""
    labels = []
    for position, row in enumerate(rows):
        value, marked = row.get(metric), is_baseline_row(row, baseline)
        shown = not is_missing(value) and math.isfinite(float(value))
        suffix = " (n/a)" if is_missing(value) else "" if shown else f" ({value})"  # e.g. inf: ranked last
        named = marked and not row["partition"].startswith(REFERENCE_PREFIX)
        labels.append(row_label(row) + (" (baseline)" if named else "") + suffix)
        if not shown:
            continue
        interval = metric_interval(row, metric)
        error = None if interval is None else [[float(value) - interval[0]], [interval[1] - float(value)]]
        ax.errorbar([float(value)], [position], xerr=error, capsize=3, linestyle="none",
                    marker="s" if marked else "o", markersize=7 if marked else 6,
                    color="black" if marked else colors[row_label(row)])
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    for tick, row in zip(ax.get_yticklabels(), rows):
        tick.set_fontweight("bold" if is_baseline_row(row, baseline) else "normal")
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top
    finite = [float(r[metric]) for r in rows if not is_missing(r.get(metric)) and math.isfinite(float(r[metric]))]
    if metric in REAL_DATA_LEVEL:
        ax.axvline(REAL_DATA_LEVEL[metric], color="grey", linestyle=":", label="real-data level")
        ax.legend(fontsize=7)
    if finite and min(finite) > 0 and max(finite) / min(finite) > 30:
        ax.set_xscale("log")  # values spanning orders of magnitude would squeeze the good ones together
    has_ci = any(metric_interval(r, metric) for r in rows)
    ax.set(xlabel=metric + (" (bars: 95% CI)" if has_ci else ""), title=f"{metric} per row (sorted)")
    ax.grid(alpha=0.3, axis="x")


def plot_report(rows: list[dict], curves: dict[str, list[dict]], metric: str = PRIMARY_METRIC,
                baseline: str | None = None) -> InlineFigure:
    """The ablation report's figure. Left: EMA (solid) and raw (dashed) validation loss per epoch of every row in
    ``curves`` (label -> history rows with epoch, val_loss, ema_val_loss, divided by the flow's zero-predictor loss,
    so 1.0 is predicting zero for every flow). Right: ``metric`` of every row in row order with its CI
    (:func:`metric_interval`); baseline and reference rows (:func:`is_baseline_row`) are marked."""
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, max(4.0, 1.5 + 0.32 * len(rows))))
    labels = sorted(set(curves) | {row_label(row) for row in rows})
    colors = {label: f"C{index % 10}" for index, label in enumerate(labels)}  # one colour per row in both panels
    _plot_curves(ax_loss, curves, colors)
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    _plot_metric(ax_metric, rows, colors, metric, baseline)
    fig.tight_layout()
    return render_figure(fig)


def loss_curve_markdown(history: list[dict], max_rows: int = 25) -> str:
    """The loss curve as a Markdown table (evenly thinned to ``max_rows`` rows, last epoch always kept)."""
    stride = max(1, -(-len(history) // max_rows))
    rows = history[::stride]
    if history and rows[-1] is not history[-1]:
        rows.append(history[-1])
    lines = ["| epoch | train loss | val loss | EMA val loss | lr |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['epoch']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | {r['ema_val_loss']:.4f} | {r['lr']:.2e} |"
              for r in rows]
    return "\n".join(lines)
