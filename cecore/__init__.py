"""cecore: fused, numerically stable softmax cross-entropy (loss and gradient in one pass).

The functional API (:mod:`cecore.functional`) and the loss classes (:mod:`cecore.losses`)
follow PyTorch's semantics on numpy arrays; two interchangeable kernel backends (Numba
and Cython + OpenMP) implement one contract (:mod:`cecore._backends`).
"""

from ._backends import available_backends, show_config
from .functional import (
    binary_cross_entropy_with_logits,
    cross_entropy,
    log_softmax,
    logsumexp,
    nll_loss,
    perplexity,
    softmax,
)
from .losses import BCEWithLogitsLoss, CrossEntropyLoss, NLLLoss

__version__ = "0.1.0"

__all__ = [
    "BCEWithLogitsLoss", "CrossEntropyLoss", "NLLLoss",
    "available_backends", "binary_cross_entropy_with_logits", "cross_entropy",
    "log_softmax", "logsumexp", "nll_loss", "perplexity", "show_config", "softmax",
]
