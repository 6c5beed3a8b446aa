"""Loss classes with ``torch.nn`` constructors: ``CrossEntropyLoss``, ``NLLLoss``, ``BCEWithLogitsLoss``,
``LinearCrossEntropyLoss``.

Calling an instance returns the loss; :meth:`loss_and_grad` returns ``(loss, grad)`` from
the same fused pass. Options are stored as given and passed to :mod:`cecore.functional`.
"""

from . import functional as F
from .linear import linear_cross_entropy


def _legacy_reduction(size_average, reduce, reduction):
    # torch's deprecated size_average/reduce flags, when given, override `reduction`.
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        return "none"
    return "mean" if size_average else "sum"


class _Loss:
    _function = None
    _options = ()

    def __call__(self, input, target):
        return self.forward(input, target)

    def forward(self, input, target):
        """The loss of ``input`` against ``target``."""
        return type(self)._function(input, target, **self._kwargs())

    def loss_and_grad(self, input, target, grad_output=None, grad_out=None):
        """``(loss, grad)``: the loss and d(sum(grad_output * loss))/d input.

        ``grad_out``: an array of the input's shape and dtype to write the gradient into
        (returned as ``grad``; may be ``input`` itself), as in :func:`cecore.cross_entropy`.
        """
        return type(self)._function(input, target, return_grad=True, grad_output=grad_output,
                                    grad_out=grad_out, **self._kwargs())

    def _kwargs(self):
        kwargs = {name: getattr(self, name) for name in self._options}
        kwargs.update(backend=self.backend, n_threads=self.n_threads)
        return kwargs

    def __repr__(self):
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._options)
        return f"{type(self).__name__}({args})"


class CrossEntropyLoss(_Loss):
    """Softmax cross-entropy criterion; see :func:`cecore.cross_entropy` for the options.

    Examples
    --------
    >>> import numpy as np, cecore
    >>> criterion = cecore.CrossEntropyLoss()
    >>> float(criterion(np.array([[1.0, 2.0, 0.5], [0.5, 1.5, 2.5]]), np.array([1, 2])))  # doctest: +ELLIPSIS
    0.4359...
    """

    _function = staticmethod(F.cross_entropy)
    _options = ("weight", "ignore_index", "reduction", "label_smoothing")

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, backend="auto", n_threads=None):
        self.weight = weight
        self.ignore_index = ignore_index
        self.reduction = _legacy_reduction(size_average, reduce, reduction)
        self.label_smoothing = label_smoothing
        self.backend = backend
        self.n_threads = n_threads


class NLLLoss(_Loss):
    """Negative log-likelihood criterion on log-probabilities; see :func:`cecore.nll_loss`."""

    _function = staticmethod(F.nll_loss)
    _options = ("weight", "ignore_index", "reduction")

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", *, backend="auto", n_threads=None):
        self.weight = weight
        self.ignore_index = ignore_index
        self.reduction = _legacy_reduction(size_average, reduce, reduction)
        self.backend = backend
        self.n_threads = n_threads


class BCEWithLogitsLoss(_Loss):
    """Binary cross-entropy on logits; see :func:`cecore.binary_cross_entropy_with_logits`."""

    _function = staticmethod(F.binary_cross_entropy_with_logits)
    _options = ("weight", "reduction", "pos_weight")

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean",
                 pos_weight=None, *, backend="auto", n_threads=None):
        self.weight = weight
        self.reduction = _legacy_reduction(size_average, reduce, reduction)
        self.pos_weight = pos_weight
        self.backend = backend
        self.n_threads = n_threads


class LinearCrossEntropyLoss(_Loss):
    """Cross-entropy of a linear layer's logits; see :func:`cecore.linear_cross_entropy`.

    Unlike ``torch.nn.LinearCrossEntropyLoss``, which owns its ``nn.Linear`` (hence its
    ``in_features`` and ``num_classes`` arguments), this criterion is given the layer's
    ``linear_weight`` (and ``linear_bias``) at each call; its options are keyword-only.

    Examples
    --------
    >>> import numpy as np, cecore
    >>> criterion = cecore.LinearCrossEntropyLoss()
    >>> x, w = np.array([[1.0, 0.5], [0.0, 2.0]]), np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> loss, (grad_x, grad_w, grad_b) = criterion.loss_and_grad(x, w, np.array([2, 1]))
    >>> float(loss), grad_w.shape, grad_b  # doctest: +ELLIPSIS
    (0.7194..., (3, 2), None)
    """

    _options = ("weight", "ignore_index", "reduction", "label_smoothing", "chunk_size")

    def __init__(self, *, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                 chunk_size=None, backend="auto", n_threads=None):
        self.weight = weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size
        self.backend = backend
        self.n_threads = n_threads

    def __call__(self, input, linear_weight, target, linear_bias=None):
        return self.forward(input, linear_weight, target, linear_bias)

    def forward(self, input, linear_weight, target, linear_bias=None):
        """The loss of ``input @ linear_weight.T + linear_bias`` against ``target``."""
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                    **self._kwargs())

    def loss_and_grad(self, input, linear_weight, target, linear_bias=None, grad_output=None):
        """``(loss, (grad_input, grad_linear_weight, grad_linear_bias))`` from one pass."""
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                    return_grad=True, grad_output=grad_output,
                                    **self._kwargs())
