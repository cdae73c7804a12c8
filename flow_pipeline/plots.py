"""Figures and small Markdown renderings of training curves (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from flow_pipeline.artifacts import write_atomic  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
    return path


def plot_loss_curve(history: list[dict], path: Path, title: str, zero_predictor_loss: float) -> Path:
    """Train / val / EMA-val loss per epoch of one run, with the loss of predicting zero for reference (the flow's
    own: 2.0 for icfm, pi^2/4 for vp; see ``Flow.zero_predictor_loss``)."""
    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, label in (("train_loss", "train"), ("val_loss", "val"), ("ema_val_loss", "val (EMA)")):
        ax.plot(epochs, [row[key] for row in history], marker=".", label=label)
    ax.axhline(zero_predictor_loss, color="grey", linestyle=":", label=f"zero predictor ({zero_predictor_loss:.3f})")
    ax.set(xlabel="epoch", ylabel="flow-matching loss", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


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
