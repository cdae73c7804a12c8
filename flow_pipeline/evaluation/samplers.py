"""Sampler settings of an evaluation: which ODE solver, how many steps, what guidance (:class:`SamplerSpec`, parsed
from text such as ``"dopri5@auto"``), and drawing raw-space samples from a checkpoint's EMA model with one."""

from __future__ import annotations

import math
from dataclasses import dataclass

from flow_pipeline.core.checkpoint import EMAModel
from flow_pipeline.core.sampling import SOLVERS, SampleResult, sample

ADAPTIVE_SOLVERS = ("dopri5",)
# Tolerances of the adaptive solver (the primary sampler by default): errors well below the sampling noise of the
# metrics, so no architecture or flow is ranked by a fixed-step solver's discretisation error. 1e-4 rather than 1e-5
# (BENCHMARKS.md, "Evaluation cost"): on the quickstart model it halves the function evaluations (104 -> 50) and moves
# ranking KID by 0.03 of its standard error at n = 5,120 (0.01 on a second model); 1e-3 moved it by 0.7.
DOPRI5_RTOL, DOPRI5_ATOL = 1e-4, 1e-4


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler setting: a fixed-step solver with its number of steps, or an adaptive one (steps 0), and the
    guidance of a skip-path model (:mod:`flow_pipeline.core.guidance`): a number w, 1 for the model as trained, or
    None for one fitted per checkpoint by ``rule``: "likelihood" (the w whose model gives val rows the highest
    likelihood, :mod:`flow_pipeline.core.likelihood_guidance`) or "auto" (the w that matches held-out rows'
    variance, :func:`fit_sampler_guidance`)."""

    solver: str
    steps: int = 0
    guidance: float | None = 1.0
    rule: str = "auto"

    @classmethod
    def parse(cls, text: str) -> "SamplerSpec":
        """``"euler:50"``, ``"midpoint:25"``, ``"rk4:10"`` or ``"dopri5"``, optionally with ``@W`` (a guidance
        number >= 0), ``@likelihood`` or ``@auto``: ``"dopri5@likelihood"``, ``"euler:50@1.3"``. Bad text raises
        ValueError naming it."""
        sampler_text, at, guidance_text = text.strip().partition("@")
        try:
            guidance, rule = parse_guidance(guidance_text) if at else (1.0, "auto")
        except ValueError as exc:
            raise ValueError(f"sampler {text!r}: {exc}") from None
        solver, _, steps_text = sampler_text.strip().partition(":")
        if solver not in SOLVERS:
            raise ValueError(f"sampler {text!r}: unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
        if solver in ADAPTIVE_SOLVERS:
            if steps_text:
                raise ValueError(f"sampler {text!r}: {solver} is adaptive and takes no step count; write {solver!r}")
            return cls(solver, 0, guidance, rule)
        try:
            steps = int(steps_text)
        except ValueError:
            raise ValueError(f"sampler {text!r}: expected '{solver}:STEPS' with an integer STEPS >= 1") from None
        if steps < 1:
            raise ValueError(f"sampler {text!r}: steps must be >= 1")
        return cls(solver, steps, guidance, rule)

    @property
    def label(self) -> str:
        solver = self.solver if self.solver in ADAPTIVE_SOLVERS else f"{self.solver}:{self.steps}"
        if self.guidance is None:
            return f"{solver}@{self.rule}"
        return solver + ("" if self.guidance == 1.0 else f"@{self.guidance:g}")

    def resolved(self, guidance: float | None) -> "SamplerSpec":
        """This setting with its guidance fixed at ``guidance`` (a fitted one once fitted)."""
        return SamplerSpec(self.solver, self.steps, guidance, self.rule)

    def with_guidance(self, text: str) -> "SamplerSpec":
        """This setting with the guidance that ``text`` names (:func:`parse_guidance`)."""
        guidance, rule = parse_guidance(text)
        return SamplerSpec(self.solver, self.steps, guidance, rule)


GUIDANCE_RULES = ("likelihood", "auto")


def parse_guidance(text: str) -> tuple[float | None, str]:
    """``"likelihood"`` / ``"auto"`` -> (None, that rule: fitted per checkpoint), a number w >= 0 -> (w, "auto");
    anything else raises ValueError."""
    if text.strip() in GUIDANCE_RULES:
        return None, text.strip()
    try:
        guidance = float(text)
    except ValueError:
        guidance = float("nan")
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance must be 'likelihood', 'auto' or a number >= 0 (1: the model as trained), got "
                         f"{text!r}")
    return guidance, "auto"


def draw_samples(ema: EMAModel, spec: SamplerSpec, n: int, seed: int, batch_size: int = 1024) -> SampleResult:
    """n samples (n, dim) on the CPU in raw embedding space (denormalised), from noise seeded with ``seed``,
    integrated on the device the model lives on, with the spec's guidance (an "auto" one must be resolved first)."""
    if spec.guidance is None:
        raise ValueError(f"sampler {spec.label}: resolve its guidance with fit_sampler_guidance first")
    device = next(ema.model.parameters()).device
    return sample(ema.model, ema.flow, n=n, dim=ema.config.dim, solver=spec.solver, steps=spec.steps, seed=seed,
                  device=device, batch_size=batch_size, rtol=DOPRI5_RTOL, atol=DOPRI5_ATOL,
                  denormalize=ema.normalizer.denormalize, guidance=spec.guidance)
