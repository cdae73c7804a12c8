"""Sample-quality metrics between generated and real embeddings, one job per module:

- :mod:`.distances`: Fréchet distance, KID, FD∞, dispersion, the train-normalised space;
- :mod:`.prdc`: nearest-neighbour distances, precision/recall/density/coverage, norm and cosine diagnostics;
- :mod:`.copies`: memorisation (copy threshold, train-copy fraction, memorisation ratio);
- :mod:`.reference_stats`: the real halves of FD and KID, computed once;
- :mod:`.real_side`: the prepared real side (:class:`~.real_side.RealSide`) and :func:`~.real_side.evaluate_samples`;
- :mod:`.ranking`: the ranking rule and the space each metric is computed in.


All inputs are numpy arrays (n, dim), converted to float64. Distances are Euclidean, computed in row chunks with
``torch.cdist`` so that memory stays at (chunk, m) whatever n is.

The metrics are chosen so that no single degenerate generator can game them: the ranking metric ``ranking_kid``
(unbiased KID in train-normalised space, :mod:`.distances`, with a rule that ranks sets copying
training rows below every other set), FD∞ and the dispersion ratios, the Fréchet distance relative to the floor of
two real sets of the same size, precision/recall/density/coverage (Naeem et al. 2020), two memorisation measures, and
norm / nearest-neighbour cosine diagnostics. There is deliberately no "distribution MSE" that mode collapse would
win. The adversary tests (flow_pipeline_tests/core/test_adversaries.py) hold the ranking against shrunk, inflated,
collapsed and copied sample sets.
"""
