"""Classification metrics in plain Python: accuracy, macro-F1 and the confusion matrix."""

from __future__ import annotations

from typing import Any


def classification_metrics(true_ids: list[int], pred_ids: list[int], n_labels: int) -> dict[str, Any]:
    """Rows of the confusion matrix are true labels, columns predictions. Macro-F1 averages the
    F1 of every label that occurs in either list (a label absent from both is not counted)."""
    if len(true_ids) != len(pred_ids):
        raise ValueError(f"{len(true_ids)} true labels but {len(pred_ids)} predictions")
    confusion = [[0] * n_labels for _ in range(n_labels)]
    for t, p in zip(true_ids, pred_ids):
        confusion[t][p] += 1
    n = len(true_ids)
    correct = sum(confusion[i][i] for i in range(n_labels))
    f1s = []
    for i in range(n_labels):
        tp = confusion[i][i]
        fp = sum(confusion[r][i] for r in range(n_labels)) - tp
        fn = sum(confusion[i]) - tp
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "accuracy": correct / n if n else 0.0,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "confusion_matrix": confusion,
    }
