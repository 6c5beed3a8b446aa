"""Input validation and canonical layouts: the one place where user input is checked.

Kernels see only the canonical forms produced here: float32/float64 logits viewed as a
C-contiguous ``(N, C, S)`` array, int64 targets of shape ``(N, S)``, float64 weights.
"""

import functools
import math
import numbers
import warnings

import numpy as np

from . import _config

REDUCTIONS = ("none", "mean", "sum")


def _to_numpy(x):
    """Array view of ``x``: ndarray subclasses, memmaps, lists and torch CPU tensors.
    Masked arrays are refused: the kernels would read the values under the mask. A
    subclass is viewed as a plain ndarray (its ``.base`` is ``x``): the checks use
    NumPy's methods, and a subclass's own (a ``max()`` that skips entries) would pass a
    target the kernels then read out of bounds."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError("masked arrays are not supported (their masked values would be used "
                        "as they are): pass a.filled(value), or index the unmasked entries")
    if isinstance(x, np.ndarray):
        return x if type(x) is np.ndarray else x.view(np.ndarray)
    if type(x).__module__.split(".")[0] == "torch":
        # torch tensors expose the array protocol; a tensor that requires grad must be
        # detached first (no copy either way when it is a CPU tensor).
        if getattr(x, "device", None) is not None and x.device.type != "cpu":
            raise TypeError(f"expected a CPU tensor, got one on {x.device}")
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
    return np.asarray(x)


def _on_numpy(fn):
    """``fn`` run with scikit-learn's array API dispatch off: cecore computes on NumPy
    arrays, where with it on ``check_array`` kept a tensor and then failed on NumPy's
    dtypes (scikit-learn's own ``log_loss`` and ``LogisticRegression`` work in that mode).
    Under dispatch, arrays of other namespaces (CPU torch tensors) are first made NumPy
    arrays of their own dtype, as scikit-learn computes in it: with the dispatch off,
    ``check_array`` reads a float32 tensor as float64, which would clip at float64's
    epsilon. The results are NumPy's."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import sklearn  # (not at import: `import cecore` does not import scikit-learn)

        if not sklearn.get_config()["array_api_dispatch"]:
            return fn(*args, **kwargs)
        args = [_as_numpy(a) for a in args]
        kwargs = {k: _as_numpy(v) for k, v in kwargs.items()}
        with sklearn.config_context(array_api_dispatch=False):
            return fn(*args, **kwargs)
    return wrapper


def _as_numpy(a):
    """An array of another array API namespace as a NumPy array of its dtype (a torch
    tensor that requires grad detached, bfloat16 as float32: see ``_to_numpy``)."""
    if hasattr(a, "__dlpack__") and not isinstance(a, np.ndarray):
        return _to_numpy(a)
    return a


_ELEMENTWISE_MEAN = ("reduction='elementwise_mean' is deprecated. Please use reduction='mean' "
                     "instead.")  # torch's words


def check_reduction(reduction, warn=True):
    """``reduction`` checked; torch's old name 'elementwise_mean' is 'mean', with torch's
    deprecation warning (``warn=False``: without it, as while torch.compile traces)."""
    if isinstance(reduction, str) and reduction == "elementwise_mean":
        if warn:
            warnings.warn(_ELEMENTWISE_MEAN, UserWarning,
                          stacklevel=_config.caller_stacklevel())
        return "mean"
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction!r} is not a valid value for reduction: expected 'none', 'mean' or 'sum'")
    return reduction


def float_input(x, name="input"):
    """``x`` as a float16/32/64 ndarray (not copied when it already is one)."""
    x = _to_numpy(x)
    if x.dtype.kind != "f":
        raise TypeError(
            f"{name} must be a floating point array (float16, float32 or float64), got dtype {x.dtype}"
        )
    if x.dtype.itemsize > 8:
        raise TypeError(f"{name} of dtype {x.dtype} is not supported: use float32 or float64")
    if not x.dtype.isnative:  # e.g. big-endian data from a file: one conversion, here
        x = x.astype(x.dtype.newbyteorder("="))
    return x


def class_input(input, weight, target=None):
    """Logits with a class axis: ``(x, class_axis, weight)``.

    ``x`` is the float array (shape (C,), (N, C) or (N, C, d1, ...)), ``class_axis`` is 0
    for unbatched input and 1 otherwise, ``weight`` the float64 class weights. With a
    ``target`` (an array) of another shape than the input's, so class indices, the class
    count is checked (:func:`check_index_classes`) before anything of O(C) is made.
    """
    x = _to_numpy(input)
    if x.ndim == 0:
        raise ValueError(
            "input must have a class dimension: expected shape (C,), (N, C) or (N, C, d1, ...)"
        )
    class_axis = 0 if x.ndim == 1 else 1
    if target is not None and target.shape != x.shape:
        check_index_classes(x.shape[class_axis])
    x = float_input(x)
    return x, class_axis, class_weight(weight, x.shape[class_axis])


def compute_dtype(dtype):
    """float16 is computed in float32; float32 and float64 as they are."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def promoted_dtypes(x_dtype, t_dtype):
    """``(out_dtype, compute_dtype)`` for logits of ``x_dtype`` and floating-point targets
    of ``t_dtype`` (probabilities): as torch, the wider of the two (float32 logits with
    float64 probabilities give a float64 loss; the gradient keeps the logits' dtype), in
    this machine's byte order."""
    out = np.promote_types(np.dtype(x_dtype).newbyteorder("="), np.dtype(t_dtype).newbyteorder("="))
    return out, compute_dtype(out)


def canonical(x, axis, dtype):
    """View ``x`` as a C-contiguous ``(N, C, S)`` array of ``dtype`` with ``C = x.shape[axis]``.

    Returns ``(x3, fortran)``. A Fortran-ordered 2-D array is viewed without a copy
    through its C-ordered transpose, and ``fortran`` is True (outputs must then be
    allocated in Fortran order too, see :func:`empty_canonical`): with ``axis=1`` as
    ``(1, C, N)`` (the kernels' strided-class path), with ``axis=0`` (softmax along
    columns) as ``(N, C, 1)``, rows. Only a non-contiguous or wrongly typed input is copied.
    """
    if x.ndim == 2 and not x.flags.c_contiguous and x.flags.f_contiguous:
        xt = np.asarray(x.T, dtype=dtype)  # C-contiguous
        if axis == 1:
            return xt.reshape(1, x.shape[1], x.shape[0]), True
        return xt.reshape(x.shape[1], x.shape[0], 1), True
    n = int(np.prod(x.shape[:axis], dtype=np.int64))
    s = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
    x3 = np.ascontiguousarray(x, dtype=dtype).reshape(n, x.shape[axis], s)
    return x3, False


def canonical_like(t, x3, fortran):
    """``t`` (an array of the user's input shape, e.g. probability targets) in the layout
    :func:`canonical` gave the input: ``x3``'s shape and dtype, C-contiguous."""
    if fortran:
        t = t.T
    return np.ascontiguousarray(t, dtype=x3.dtype).reshape(x3.shape)


def empty_canonical(shape, canonical_shape, dtype, fortran):
    """A new array of the user's ``shape`` and its view in the canonical layout."""
    out = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
    return out, (out.T if fortran else out).reshape(canonical_shape)


def grad_out_array(grad_out, x, fortran):
    """The caller's gradient buffer, checked before anything is written.

    ``grad_out`` must be an array (or CPU tensor) of the input ``x``'s shape and dtype,
    writeable, and C-contiguous (or Fortran-contiguous when ``x`` is a Fortran-ordered
    2-D array, the layout the kernels then write). Returns it as an ndarray.

    A tensor is written through that ndarray, which autograd does not see: one that
    requires grad is refused (torch refuses in-place writes to such a leaf), and any other
    has its version counter bumped here, so that a backward which saved it raises
    torch's "modified by an inplace operation" instead of using the overwritten values
    (bumped once the checks pass; a later error leaves it bumped, never unbumped).
    """
    is_tensor = type(grad_out).__module__.split(".")[0] == "torch"
    if isinstance(grad_out, np.ma.MaskedArray):
        raise TypeError("grad_out is a masked array, whose mask would hide entries of the "
                        "gradient returned in it: pass a plain ndarray")
    if not (isinstance(grad_out, np.ndarray) or is_tensor) or isinstance(grad_out, np.matrix):
        raise TypeError(
            f"grad_out must be a NumPy array or a CPU torch tensor to write the gradient into, "
            f"got {type(grad_out).__name__}"
        )
    if is_tensor and grad_out.requires_grad:
        raise ValueError("grad_out is a tensor that requires grad, and autograd would not see "
                         "the gradient written into it: pass grad_out.detach() or an array")
    if is_tensor and str(grad_out.dtype) == "torch.bfloat16":
        raise TypeError("grad_out of dtype torch.bfloat16 cannot be written as a NumPy array: "
                        "pass a float32 buffer")
    g = _to_numpy(grad_out)
    if g.dtype != x.dtype:
        if g.dtype.newbyteorder("=") == x.dtype:  # the same type, the other byte order
            raise TypeError(f"grad_out must be a {x.dtype} array in this machine's byte order "
                            f"(the kernels write native values), got byte order {g.dtype.str!r}")
        raise TypeError(f"grad_out must have the input's dtype {x.dtype}, got {g.dtype}")
    if g.shape != x.shape:
        raise ValueError(f"grad_out must have the input's shape {x.shape}, got {g.shape}")
    if not g.flags.writeable:
        raise ValueError("grad_out is read-only: pass a writeable array")
    if not (g.flags.c_contiguous or (fortran and g.flags.f_contiguous)):
        expected = "C- or Fortran-contiguous" if fortran else "C-contiguous"
        raise ValueError(f"grad_out must be {expected} (the layout the gradient is written in)")
    if is_tensor:
        import torch  # imported already: grad_out is one of its tensors

        torch.autograd.graph.increment_version(grad_out)
    return g


def normalize_axis(axis, ndim):
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of bounds for an array of dimension {ndim}")
    return int(axis) % ndim


def class_weight(weight, n_classes):
    """Class weights as float64 of shape (C,), ones when ``weight`` is None."""
    if weight is None:
        return np.ones(n_classes, dtype=np.float64)
    w = _to_numpy(weight)
    if w.dtype.kind not in "fiu":
        raise TypeError(f"weight must be a numeric array, got dtype {w.dtype}")
    if w.ndim != 1 or w.shape[0] != n_classes:
        raise ValueError(
            f"weight should be defined either for all {n_classes} classes or no classes, "
            f"but got weight of shape {w.shape}"
        )
    # A copy, always: a weight file's map (cecore score --weight) would otherwise be read
    # at every chunk, and a file rewritten during the run changed the weights midway.
    return np.array(w, dtype=np.float64)


def check_ignore_index(ignore_index):
    """``ignore_index`` as a Python int: an integer (not a bool, not a float, which torch
    rejects too) that fits int64, where the targets are compared with it."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -2**63 <= int(ignore_index) < 2**63:
        raise ValueError(f"ignore_index {ignore_index} does not fit in int64")
    return int(ignore_index)


def check_int(value, name, low, high=None, allow_none=False):
    """``value`` as a Python int in ``[low, high]`` (``None`` passes through when
    ``allow_none``): a ``TypeError`` for anything but an integer (a bool is not one), a
    ``ValueError`` for an integer out of range."""
    if value is None and allow_none:
        return None
    expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    expected = "None or " + expected if allow_none else expected
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_proba_target(t_dtype, x_shape, ignore_index, name="input"):
    """A target of the input's shape holds class probabilities: it must be floating point
    (float16/32/64), and ``ignore_index`` (checked first, as for index targets) must not
    be asked for."""
    ignore_index = check_ignore_index(ignore_index)
    if np.dtype(t_dtype).kind != "f":
        raise TypeError(f"a target of the same shape as the {name} {tuple(x_shape)} holds class "
                        f"probabilities and must be floating point, got dtype {t_dtype}")
    float_input(np.empty(0, t_dtype), "target")  # float128: refused as float_input does
    if ignore_index >= 0:
        raise ValueError("ignore_index is not supported with class-probability targets")


def check_label_smoothing(label_smoothing):
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    try:
        eps = float(label_smoothing)
    except OverflowError:  # an int beyond float's range
        eps = math.inf
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    return eps


def index_target(target, input_shape, n_classes, ignore_index, probabilities=True):
    """Class-index targets as int64 of shape (N, S), range-checked.

    ``input_shape`` is the user's input shape: ``(C,)`` (unbatched, target 0-d) or
    ``(N, C, d1, ..., dK)`` (target ``(N, d1, ..., dK)``). ``probabilities``: whether
    the caller also takes probability targets (the errors then point to them).
    """
    ignore_index = check_ignore_index(ignore_index)
    t = _to_numpy(target)
    if t.dtype.kind not in "iu":
        kind = "floating point" if t.dtype.kind == "f" else str(t.dtype)
        hint = ("; probability targets must have the same shape as the input"
                if probabilities else "")
        raise TypeError(
            f"class-index targets must be integers, got {kind} (dtype {t.dtype}){hint}")
    if len(input_shape) == 1:
        # torch's forward also takes a (1,) target here, but its backward then fails;
        # cecore accepts only the scalar, for the loss and the gradient alike.
        if t.ndim != 0:
            raise ValueError(
                f"for unbatched input of shape {input_shape} the target must be a scalar "
                f"class index, got shape {t.shape}"
            )
    else:
        expected = (input_shape[0],) + tuple(input_shape[2:])
        if t.ndim != len(expected):
            raise ValueError(
                f"target of shape {t.shape} does not match input of shape {input_shape}: "
                f"expected class indices of shape {expected}"
                + (f" or probabilities of shape {input_shape}" if probabilities else "")
            )
        if t.shape[0] != expected[0]:
            raise ValueError(
                f"Expected input batch_size ({expected[0]}) to match target batch_size ({t.shape[0]})"
            )
        if t.shape != expected:
            raise ValueError(
                f"target spatial shape {t.shape[1:]} does not match input spatial shape {expected[1:]}"
            )
    check_index_classes(n_classes)
    if t.size and not all_class_indices(t, n_classes):
        bad = t[((t < 0) | (t >= n_classes)) & (t != ignore_index)]
        if bad.size:
            raise IndexError(
                f"Target {bad.flat[0]} is out of bounds: expected class indices in "
                f"[0, {n_classes}) or ignore_index ({ignore_index})"
            )
    # Explicit (N, S): reshape(N, -1) cannot infer S when N == 0.
    if len(input_shape) == 1:
        positions = (1, 1)
    else:
        positions = (input_shape[0], int(np.prod(input_shape[2:], dtype=np.int64)))
    return np.ascontiguousarray(t, dtype=np.int64).reshape(positions)


def same_elements(a, b):
    """Whether arrays ``a`` and ``b`` are the same elements in the same places (memory,
    shape, strides and dtype): the one overlap of an output with an input that kernels
    reading each element before writing it allow (an in-place gradient or softmax). The
    stride of an axis of length 1 is never stepped: any value places the same elements."""
    return a.dtype == b.dtype and a.shape == b.shape and all(
        sa == sb for sa, sb, n in zip(a.strides, b.strides, a.shape) if n > 1) and \
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]


def check_index_classes(n_classes):
    """Class indices name at most 2**31 - 1 classes: the kernels count a target's rank and
    name its class in int32 (vector-friendly), which more classes would overflow."""
    if n_classes > 2**31 - 1:
        raise ValueError(f"{n_classes} classes: at most 2**31 - 1 are supported with class "
                         "indices")


def all_class_indices(t, n_classes):
    """Whether every value of the non-empty integer array ``t`` is in ``[0, n_classes)``.

    One pass where it can: viewed as unsigned integers of the same width, negative values
    are at least ``2**(bits - 1)``, so where no class index reaches that the unsigned
    maximum alone decides (a min and a max were two passes over the targets, on one
    thread, before every kernel call). Where one does (int8 targets of more than 128
    classes), the minimum is checked too: the view alone passed -56 as 200 < 250.
    """
    if t.dtype.kind != "i":
        return int(t.max()) < n_classes
    if n_classes <= np.iinfo(t.dtype).max + 1:
        return int(t.view(t.dtype.str.replace("i", "u")).max()) < n_classes
    return int(t.min()) >= 0 and int(t.max()) < n_classes


def loss_shape(input_shape):
    """Shape of the unreduced loss: () for unbatched ``(C,)`` input, else ``(N, d1, ..., dK)``."""
    return tuple(input_shape[:1]) + tuple(input_shape[2:]) if len(input_shape) > 1 else ()


def check_grad_output_use(grad_output, return_grad):
    """A ``grad_output`` only scales a gradient: given without one being asked for, the
    call would return the loss alone, which ``loss, grad = ...`` with reduction='none'
    unpacks as two rows of losses without an error."""
    if grad_output is not None and not return_grad:
        raise ValueError("grad_output scales the gradient, and no gradient was asked for: "
                         "pass return_grad=True (or grad_out=) with it")


def grad_output_array(grad_output, reduction, loss_shape, convert=True):
    """``grad_output`` as float64: a scalar for mean/sum, ``loss_shape`` for 'none' (in its
    own numeric dtype with ``convert=False``, for callers that convert it piece by piece)."""
    if grad_output is None:
        return np.float64(1.0)
    g = _to_numpy(grad_output)
    if g.dtype.kind not in "fiu":
        raise TypeError(f"grad_output must be numeric, got dtype {g.dtype}")
    if reduction == "none":
        if g.shape != tuple(loss_shape):
            raise ValueError(
                f"grad_output must have the loss's shape {tuple(loss_shape)}, got {g.shape}"
            )
        return np.asarray(g, dtype=np.float64) if convert else g
    if g.shape != ():  # as torch's backward: the loss's shape exactly, no broadcasting
        raise ValueError(
            f"grad_output must be a scalar for reduction={reduction!r}, got shape {g.shape}"
        )
    return np.float64(g)


def n_threads(value, n_elements=None, warn=True):
    return _config.resolve_n_threads(value, n_elements, warn)
