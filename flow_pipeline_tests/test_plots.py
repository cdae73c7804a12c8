"""Figures as PNG files and as Markdown images with a data URI: size limits, what they embed, what they draw."""

from __future__ import annotations

import base64
import io
import math
import re

import matplotlib.image
import numpy as np
import pytest

from flow_pipeline.evaluation import plots
from flow_pipeline.core.data.sonar_like import synthetic_sonar_like
from flow_pipeline.evaluation.report import sort_rows

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI_IMAGE = re.compile(r"!\[((?:\\.|[^\]\\])*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def embedded_png(markdown: str) -> bytes:
    """The bytes of the one data-URI PNG image in ``markdown``."""
    images = DATA_URI_IMAGE.findall(markdown)
    assert len(images) == 1, markdown[:200]
    return base64.b64decode(images[0][1], validate=True)


def decoded(png: bytes) -> np.ndarray:
    image = matplotlib.image.imread(io.BytesIO(png), format="png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    return image


def history(epochs: int = 12) -> list[dict]:
    return [{"epoch": e, "train_loss": 1.8 / e + 0.2, "val_loss": 1.9 / e + 0.25, "ema_val_loss": 1.85 / e + 0.2,
             "lr": 1e-3 * min(1.0, e / 3)} for e in range(1, epochs + 1)]


def test_markdown_embeds_the_same_png_that_is_saved(tmp_path):
    figure = plots.plot_loss_curve(history(), "mlp-icfm-full-none-tiny", best_loss=history()[-1]["ema_val_loss"],
                                  zero_predictor_loss=2.0)
    path = figure.save(tmp_path / "curve.png")
    markdown = figure.markdown("loss [curve] of a run")
    assert embedded_png(markdown) == path.read_bytes() == figure.png
    assert DATA_URI_IMAGE.match(markdown).group(1) == r"loss \[curve\] of a run"  # brackets cannot end the alt
    assert figure.png.startswith(PNG_SIGNATURE) and len(figure.png) <= plots.MAX_INLINE_PNG_BYTES
    decoded(figure.png)


def test_a_figure_over_the_limit_is_drawn_smaller_or_refused():
    import matplotlib.pyplot as plt

    def busy_figure():
        fig, ax = plt.subplots(figsize=(8, 6))
        ax.imshow(np.random.default_rng(0).random((400, 400)))  # noise does not compress
        return fig

    full = plots.render_figure(busy_figure(), max_bytes=10**9)
    smaller = plots.render_figure(busy_figure(), max_bytes=len(full.png) - 1)
    assert len(smaller.png) < len(full.png)
    decoded(smaller.png)
    with pytest.raises(ValueError, match=r"figure too large to embed: .*limit is 1,000 bytes"):
        plots.render_figure(busy_figure(), max_bytes=1000)
    assert not plt.get_fignums()  # every figure was closed, also the refused one


def test_covariance_spectrum_matches_numpys_covariance_eigenvalues():
    x = np.random.default_rng(1).normal(size=(40, 12)) * np.linspace(0.1, 3.0, 12)
    expected = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    np.testing.assert_allclose(plots.covariance_spectrum(x), expected, rtol=1e-9, atol=1e-12)
    # Fewer rows than dimensions: only the n - 1 non-zero eigenvalues.
    wide = np.random.default_rng(2).normal(size=(6, 20))
    expected_wide = np.sort(np.linalg.eigvalsh(np.cov(wide, rowvar=False)))[::-1][:5]
    np.testing.assert_allclose(plots.covariance_spectrum(wide), expected_wide, rtol=1e-9)


def test_headline_lists_the_numeric_metrics_asked_for_in_order():
    metrics = {"fd_ratio": 2.3456, "precision": 0.5, "recall": None, "sampler": "euler:50", "coverage": 0.25}
    assert plots.headline(metrics, ("fd_ratio", "recall", "coverage", "missing")) == "fd_ratio=2.35  coverage=0.25"


def test_evaluation_figure_draws_collapsed_and_diverged_samples(tmp_path):
    real = synthetic_sonar_like(300, dim=64, seed=0)
    collapsed = real.mean(axis=0) + 0.1 * (synthetic_sonar_like(200, dim=64, seed=1) - real.mean(axis=0))
    collapsed[:3] = np.nan  # a diverged sampler: left out, not a crash
    figure = plots.plot_evaluation(collapsed, real, {"fd_ratio": 9.5, "precision": 0.0}, "mlp-icfm (euler:4)")
    decoded(figure.png)
    assert len(figure.png) <= plots.MAX_INLINE_PNG_BYTES


def test_report_rows_carry_their_interval_and_baselines_are_recognised():
    model = {"partition": "mlp-icfm", "arch": "mlp", "flow": "icfm", "kid": 0.5, "kid_ci_low": 0.4,
             "kid_ci_high": 0.7}
    gaussian = {"partition": "gaussian-full", "kind": "baseline", "kid": 0.3}
    real = {"partition": "held-out real", "arch": None, "kid": 0.0}
    assert plots.metric_interval(model, "kid") == (0.4, 0.7)
    assert plots.metric_interval(gaussian, "kid") is None
    assert [plots.is_baseline_row(r) for r in (model, gaussian, real)] == [False, True, True]
    assert plots.is_baseline_row(model, baseline="mlp-icfm")
    assert plots.is_baseline_row({**model, "vs_baseline": "baseline"})  # the study statistics' baseline row

    reference = {"partition": "reference: gaussian-full", "arch": "—", "ranking_kid": 0.2, "kid_ci_low": 0.1,
                 "kid_ci_high": 0.3}
    copies = {"partition": "mlp-fm", "arch": "mlp", "ranking_kid": math.inf, "kid_ci_low": 0.0, "kid_ci_high": 0.1}
    assert plots.is_baseline_row(reference) and not plots.is_baseline_row(copies)
    # A ranking metric takes the interval of the distance it ranks by; an infinite value (copies) has none.
    assert plots.metric_interval(reference, "ranking_kid") == (0.1, 0.3)
    assert plots.metric_interval(copies, "ranking_kid") is None
    replicated = {"partition": "dit-icfm", "arch": "dit", "best_val_loss": 1.5, "best_val_loss_ci95_low": 1.4,
                  "best_val_loss_ci95_high": 1.65}
    assert plots.metric_interval(replicated, "best_val_loss") == (1.4, 1.65)
    decoded(plots.plot_report([reference, copies], {}, metric="ranking_kid").png)

    rows = sort_rows([model, gaussian, real], metric="kid")
    figure = plots.plot_report(rows, {"mlp-icfm": history()}, metric="kid")
    decoded(figure.png)


def test_report_figure_with_missing_values_and_identities():
    rows = [{"partition": "mlp-icfm", "identity": "mlp-icfm-full-none", "arch": "mlp", "fd_ratio": 3.0},
            {"partition": "mlp-icfm", "identity": "mlp-icfm-1k-none", "arch": "mlp", "fd_ratio": 2.0},
            {"partition": "unet-vp", "arch": "unet", "flow": "vp", "fd_ratio": None}]
    assert [plots.row_label(row) for row in rows] == ["mlp-icfm-full-none", "mlp-icfm-1k-none", "unet-vp"]
    figure = plots.plot_report(rows, {"mlp-icfm-full-none": history(), "unet-vp": []}, metric="fd_ratio")
    decoded(figure.png)
