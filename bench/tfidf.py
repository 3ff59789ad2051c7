"""TF-IDF + logistic regression: the classical baseline ``bench.quality`` compares adapters with.

Word unigrams and bigrams (lower-cased, sublinear tf, l2-normalised rows) and a multinomial
logistic regression whose ``C`` is chosen on the validation set (the same one the trainer stops
on) from ``C_GRID``, then kept: the model never sees the test set. Deterministic (lbfgs), so one
run stands for every seed. It runs on one BLAS thread: on a busy 2-core machine two OpenBLAS
threads made each fit ~50x slower (5.8 s instead of 0.1 s for 300 tweets). scikit-learn (the
``dev`` extra) is imported only when it is used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


@dataclass
class TfidfResult:
    predictions: list[int]  # for the test texts
    seconds: float  # vectorising and fitting every C, choosing one
    trainable_params: int  # coefficients + intercepts of the chosen model
    c: float
    val_accuracy: dict[str, float]  # per C tried


def tfidf_baseline(fit_texts: list[str], fit_y: list[int], val_texts: list[str], val_y: list[int],
                   test_texts: list[str]) -> TfidfResult:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        t0 = time.perf_counter()
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, lowercase=True)
        x_fit, x_val = vec.fit_transform(fit_texts), vec.transform(val_texts)
        best, best_acc, scores = None, -1.0, {}
        for c in C_GRID:
            clf = LogisticRegression(C=c, max_iter=3000).fit(x_fit, fit_y)
            acc = float((clf.predict(x_val) == val_y).mean())
            scores[f"{c:g}"] = acc
            if acc > best_acc:  # ties keep the smaller C (the simpler model)
                best, best_acc = clf, acc
        assert best is not None
        seconds = time.perf_counter() - t0
        preds = best.predict(vec.transform(test_texts)).tolist()
    return TfidfResult(predictions=[int(p) for p in preds], seconds=seconds,
                       trainable_params=int(best.coef_.size + best.intercept_.size), c=float(best.C),
                       val_accuracy=scores)
