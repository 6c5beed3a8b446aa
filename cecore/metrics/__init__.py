"""Metrics for scikit-learn users, in O(n_samples) extra memory.

- :func:`log_loss`: a drop-in for ``sklearn.metrics.log_loss`` (same values to the last
  bit, same warnings and errors) that never builds the one-hot labels or clipped copies;
- :func:`log_loss_from_logits`: the exact log loss of ``decision_function`` output;
- :func:`classification_report_from_logits`: loss, accuracy, top-k accuracy, entropy,
  calibration error and Brier score of logits from one pass (what ``cecore score``
  reports);
- :data:`neg_log_loss_scorer` and :func:`make_cross_entropy_scorer`: ``scoring=`` for
  ``cross_val_score`` / ``GridSearchCV`` that use the fitted model's ``classes_``.
"""

import importlib

# Imported on first use: the scikit-learn drop-ins import scikit-learn, which batch
# scoring (a user of ._report) does not need.
_WHERE = {"log_loss": "._log_loss", "log_loss_from_logits": "._log_loss",
          "classification_report_from_logits": "._report",
          "make_cross_entropy_scorer": "._scorers", "neg_log_loss_scorer": "._scorers"}

__all__ = ["classification_report_from_logits", "log_loss", "log_loss_from_logits",
           "make_cross_entropy_scorer", "neg_log_loss_scorer"]


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'cecore.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
