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
from .linear import linear_cross_entropy
from .losses import BCEWithLogitsLoss, CrossEntropyLoss, LinearCrossEntropyLoss, NLLLoss

__version__ = "0.1.0"

__all__ = [
    "BCEWithLogitsLoss", "CrossEntropyLoss", "LinearCrossEntropyLoss", "NLLLoss",
    "available_backends", "binary_cross_entropy_with_logits", "cross_entropy",
    "linear_cross_entropy",
    "log_softmax", "logsumexp", "nll_loss", "perplexity", "show_config", "softmax",
]

# scikit-learn is imported only when its part of cecore is first used: `import cecore`
# stays fast for scripts and the CLI that only need the losses.
_LAZY = {"SoftmaxClassifier": ("cecore.classifier", "SoftmaxClassifier"),
         "metrics": ("cecore.metrics", None), "batch": ("cecore.batch", None),
         # torch itself is imported only here, on first use of cecore.torch
         "torch": ("cecore.torch", None)}
__all__ += ["SoftmaxClassifier", "batch", "metrics"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'cecore' has no attribute {name!r}")
    import importlib

    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
