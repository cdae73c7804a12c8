"""How much of the built-in data's distance from its Gaussian lies in its top k principal directions?

A model that is exact on the top k whitened coordinates and Gaussian (independent) on the rest, the best a
``principal_dims: k`` recipe can be, has KL(truth || model) = KL(truth || Gaussian) - G_k, where G_k = E[log p_k(y) -
log N_k(y)] is the non-Gaussianity of the truth's marginal p_k on the top k principal coordinates y (whitening
decorrelates, so the Gaussian's k-marginal is N(0, diag(eigenvalues))). The marginal of a Gaussian mixture is the
mixture of its components' marginals, so G_k is computed exactly per row and averaged over rows drawn from the truth.
Principal directions are those of the truth's own covariance (the product whitens with the training rows' estimate).

    python research/principal_ceiling.py            # 4,000 rows, k = 16 ... 512; ~30 s on 2 cores
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import scipy.special

from flow_pipeline.core.data.synthetic import sonar_mixture


def gaussian_log_density(centred: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """log N(centred rows (n, d); 0, covariance (d, d)) per row (n,)."""
    lower = np.linalg.cholesky(covariance)
    z = np.linalg.solve(lower, centred.T)
    return -0.5 * (z * z).sum(0) - np.log(np.diag(lower)).sum() - 0.5 * centred.shape[1] * np.log(2 * np.pi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--ks", default="16,32,64,128,192,256,384")
    args = parser.parse_args()
    truth = sonar_mixture(1024, 0)
    mean, covariance = truth.mean(), truth.covariance()
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    x = truth.sample(args.rows, np.random.default_rng(5))[0].astype(np.float64)
    total = float(np.mean(truth.log_prob(x) - gaussian_log_density(x - mean, covariance)))
    print(json.dumps({"rows": args.rows, "kl_truth_to_gaussian": round(total, 1)}))
    for k in (int(value) for value in args.ks.split(",")):
        basis = eigenvectors[:, :k]
        y = (x - mean) @ basis
        per_component = []
        for weight, component_mean, latent_var in zip(truth.weights, truth.means, truth.latent_var):
            projected = basis.T @ truth.basis
            component_cov = (projected * latent_var) @ projected.T + (basis.T * truth.diag_var) @ basis
            per_component.append(np.log(weight) + gaussian_log_density(y - (component_mean - mean) @ basis, component_cov))
        marginal = scipy.special.logsumexp(np.stack(per_component, axis=1), axis=1)
        gain = float(np.mean(marginal - gaussian_log_density(y, np.diag(eigenvalues[:k]))))
        print(json.dumps({"k": k, "marginal_non_gaussianity": round(gain, 1), "share_of_kl": round(gain / total, 3),
                          "share_of_variance": round(float(eigenvalues[:k].sum() / eigenvalues.sum()), 3)}))


if __name__ == "__main__":
    main()
