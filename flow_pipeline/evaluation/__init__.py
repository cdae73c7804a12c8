"""Evaluation of trained checkpoints, one job per module:

- :mod:`.samplers`: sampler settings (solver, steps, guidance) parsed from text, and drawing samples with one;
- :mod:`.guidance`: fitting an "auto" guidance to held-out rows' variance;
- :mod:`.evaluate`: :func:`~.evaluate.evaluate_checkpoint`, one checkpoint scored with every sampler;
- :mod:`.results`: what it returns (:class:`~.results.Evaluation`) and how many samples it draws;
- :mod:`.references`: the reference rows (held-out real, Gaussian baselines) scored the same way, and their cache;
- :mod:`.sentences`: the nearest training and test sentences of generated rows;
- :mod:`.report`: the ablation report's rows, tables and files; :mod:`.study_report`: its run identities,
  replicates and comparisons with a baseline row; :mod:`.ablation_report`: the whole report from the evaluations;
- :mod:`.plots`: figures (loss curves, sample dispersion, the report figure), rendered inline.

The EMA model of a checkpoint is loaded by :func:`flow_pipeline.core.checkpoint.load_ema_model`; the metrics are
:mod:`flow_pipeline.core.metrics`.
"""
