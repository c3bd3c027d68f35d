"""Linear probe (CLIP protocol) and kNN (DINO protocol) on frozen features."""

from __future__ import annotations

import warnings

import numpy as np
from threadpoolctl import threadpool_limits

from mlcd_jax.config.schema import PROBES  # noqa: F401  (re-exported: the evaluators here)
from mlcd_jax.labels import store


def _fit_score(c, train_x, train_y, test_x, test_y, max_iter):
    return float((_fit_predict(c, train_x, train_y, test_x, max_iter) == test_y).mean())


def _fit_predict(c, train_x, train_y, test_x, max_iter):
    # scikit-learn (and faiss, in knn) imported here, not at the top: every command that
    # validates a config imports this module (PROBES), and they would add ~1 s to each start.
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter)
    # One BLAS thread below 2^24 features: L-BFGS's small matrix products gain nothing from more,
    # and OpenBLAS threads spinning against busy cores made a 1,000 × 64 probe take 384 s, not 1.2.
    threads = 1 if train_x.size < 1 << 24 else None
    # weak regularisation may stop at max_iter; that is the protocol
    with warnings.catch_warnings(), threadpool_limits(threads):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(train_x, train_y)
    return clf.predict(test_x)


def linear_probe(train_x, train_y, test_x, test_y, *, val_fraction: float = 0.2, seed: int = 0,
                 max_iter: int = 500, predictions: bool = False) -> dict:
    """L-BFGS logistic regression; the inverse L2 strength C is searched on a validation split held
    out of train (10^-4 … 10^4 by decades, then ±¼ and ±½ decade around the best), then the model is
    refit on train + validation with that C and scored on test (`predictions`: each test
    example's predicted class too).

    Features are standardised with the train split's mean and std first, so that one C grid suits
    every encoder: a random-init ViT's features vary by ~5e-4 per dimension, which no C ≤ 10^4 fits.
    """
    mean, std = train_x.mean(0), train_x.std(0) + 1e-8
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_x))
    n_val = max(1, int(len(order) * val_fraction))
    val, fit = order[:n_val], order[n_val:]
    score = lambda c: _fit_score(c, train_x[fit], train_y[fit], train_x[val], train_y[val],
                                 max_iter)
    coarse = {c: score(c) for c in 10.0 ** np.arange(-4, 5)}
    best = max(coarse, key=lambda c: (coarse[c], -abs(np.log10(c))))
    fine = {c: score(c) for c in best * 10.0 ** np.array([-0.5, -0.25, 0.25, 0.5])}
    searched = coarse | fine
    best = max(searched, key=lambda c: (searched[c], -abs(np.log10(c))))
    predicted = _fit_predict(best, train_x, train_y, test_x, max_iter)
    result = {"accuracy": float((predicted == test_y).mean()), "C": float(best),
              "val_accuracy": searched[best]}
    return result | ({"predictions": predicted} if predictions else {})


def knn(train_x, train_y, test_x, test_y, *, k: int = 20, temperature: float = 0.07) -> dict:
    """k nearest neighbours by cosine similarity; each votes for its class with weight
    exp(similarity / temperature)."""
    norm = lambda x: np.ascontiguousarray(store.normalize(x))
    import faiss  # here, not at the top: see _fit_score
    index = faiss.IndexFlatIP(train_x.shape[1])
    index.add(norm(train_x))
    sims, idx = index.search(norm(test_x), min(k, len(train_x)))
    classes = int(max(train_y.max(), test_y.max())) + 1
    votes = np.zeros((len(test_x), classes))
    np.add.at(votes, (np.arange(len(test_x))[:, None], train_y[idx]), np.exp(sims / temperature))
    return {"accuracy": float((votes.argmax(1) == test_y).mean()), "k": k,
            "temperature": temperature}
