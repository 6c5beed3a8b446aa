"""cecore's losses inside torch autograd: ``torch.nn.functional``'s losses for CPU training.

``cecore.torch.cross_entropy``, ``nll_loss``, ``binary_cross_entropy_with_logits`` and
``linear_cross_entropy``, and the modules ``CrossEntropyLoss``, ``NLLLoss``,
``BCEWithLogitsLoss`` and ``LinearCrossEntropyLoss``, take exactly torch's arguments (plus
keyword-only ``backend`` and ``n_threads``) and return a tensor loss that ``backward()``
flows through: swapping the import is the whole migration::

    from cecore.torch import CrossEntropyLoss   # was: from torch.nn import CrossEntropyLoss

Importing this module imports torch; ``import cecore`` alone never does.

How it works
------------
Each loss is a torch custom operator (``torch.ops.cecore.cross_entropy`` and so on, made
with :func:`torch.library.custom_op`) that returns the loss *and* its gradient from one
fused pass of cecore's kernels. The logits reach the kernels as a NumPy view of the
tensor's memory (no copy) and the gradient is written into a tensor that torch allocated.
The forward pass computes that gradient for ``grad_output = 1`` (ones for
``reduction='none'``); backward only scales it by the real ``grad_output``, which is exact
because the gradient is linear in ``grad_output`` at each position. The scaling is done in
place when the graph is freed after backward, and skipped when ``grad_output`` is 1 (as
after ``loss.backward()``): the saved gradient is then handed on as it is.

Each operator has a fake implementation, so ``torch.compile`` (fullgraph included)
traces it as one opaque node, and ``torch.library.opcheck`` passes on it.

Fallback to torch
-----------------
cecore computes contiguous float32/float64 CPU tensors directly, and float16/bfloat16 in
float32 (returned in the input's dtype, like :mod:`cecore.functional` does for float16).
Everything else is computed by torch's own function, after one
:class:`CecoreFallbackWarning` per process and reason: tensors on another device, other
dtypes, non-contiguous or sparse input, a target (or class/pos weight) that requires
grad, and calls under ``torch.func`` transforms. Under ``torch.func.grad``, ``vmap``,
``jacrev``, ... the losses therefore work, with torch's implementation and speed.

Errors are torch's: when cecore rejects an argument, the exception raised is the one
torch's own function raises for it (cecore's message chained as its cause); where torch
would accept what cecore rejects, cecore's error is raised. cecore is more lenient in two
ways (class-index targets of any integer dtype, not only int64/uint8; class weights of any
float dtype, where an integer one gets torch's error) and stricter in two (unbatched
input of shape (C,) needs a 0-d target: torch's forward also takes shape (1,), but its
backward then fails; ``label_smoothing`` must be a float in [0, 1], where torch 2.13
also takes ``True``, as 1.0, and a negative or NaN value, which it ignores).

The losses are differentiable once. Backpropagating through their gradient (second
derivatives: ``create_graph=True`` followed by another backward, Hessians, gradient
penalties, ``torch.autograd.functional.hessian`` and ``hvp``) raises a ``RuntimeError``
instead of silently missing the second-order term; use torch's functions for that. A
backward with ``create_graph=True`` raises at once if the tensor it differentiates no
longer exists (nothing could then differentiate the gradient it returns).
"""

import ctypes
import math
import mmap
import numbers
import sys
import warnings
import weakref
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as TF
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import _config
from . import _validation as V
from . import functional as _F
from . import linear as _L
from .losses import _legacy_reduction

__all__ = [
    "BCEWithLogitsLoss", "CecoreFallbackWarning", "CrossEntropyLoss", "LinearCrossEntropyLoss",
    "NLLLoss", "binary_cross_entropy_with_logits", "cross_entropy", "linear_cross_entropy",
    "nll_loss",
]

_NATIVE_DTYPES = (torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)  # computed in float32


class CecoreFallbackWarning(UserWarning):
    """A loss of :mod:`cecore.torch` was computed by torch's own function (the message says why)."""


_warned = set()


def _reduction(reduction):
    """``reduction`` checked, warning about 'elementwise_mean' except while torch.compile
    traces (Dynamo cannot trace warnings.warn, see :func:`_warn_fallback`; torch's own
    function compiles with it)."""
    return V.check_reduction(reduction, warn=not torch.compiler.is_compiling())


def _warn_fallback(function_name, reason):
    # Once per process and reason: a training loop would otherwise warn at every step.
    # Not while torch.compile traces: Dynamo cannot trace warnings.warn, so under
    # fullgraph=True every fallback failed to compile (unless it had warned in eager mode
    # before); the eager call warns.
    if reason in _warned or torch.compiler.is_compiling():
        return
    warnings.warn(
        f"cecore.torch.{function_name}: {reason}; computing with torch's own implementation "
        "(this warning is shown once per process)",
        CecoreFallbackWarning, stacklevel=3,
    )
    # Only once shown: with warnings turned into errors, every fallback call raises.
    _warned.add(reason)


def _fallback_reason(inputs, others):
    """Why these arguments go to torch's implementation, or None when cecore computes them.

    ``inputs`` are the tensors cecore differentiates (the logits; for the linear loss also
    its weight and bias), ``others`` the target and the optional weights (None when absent).
    """
    # torch.func transforms cannot run the operators' autograd (torch generates it as an
    # autograd.Function without setup_context). Dynamo evaluates this check while it
    # traces, without a graph break: torch.compile of a transform (per-sample gradients:
    # compile(vmap(grad(...)))) failed when it was skipped there.
    if torch._C._are_functorch_transforms_active():
        return "torch.func transforms (grad, vmap, ...) are active"
    inputs = [t for t in inputs if t is not None]
    others = [t for t in others if t is not None]
    for t in inputs + others:
        if t.device.type != "cpu":
            return f"a tensor is on device '{t.device}' (cecore computes on the CPU only)"
    for t in inputs:
        if t.dtype not in _NATIVE_DTYPES + _HALF_DTYPES:
            return f"input dtype {t.dtype} (cecore computes float16/32/64 and bfloat16)"
        if t.layout != torch.strided or not t.is_contiguous():
            return "an input is not a contiguous (dense, row-major) tensor"
    if any(t.layout != torch.strided for t in others):
        return "the target or a weight is not a dense tensor"
    if any(t.requires_grad for t in others):
        return "the target or a class weight requires grad (cecore differentiates the input only)"
    if _forward_ad._current_level >= 0 and any(
            _forward_ad.unpack_dual(t).tangent is not None for t in inputs + others):
        # the operators have no forward-mode derivative: the tangent was silently dropped
        return "forward-mode AD (a dual tensor; cecore's operators have no jvp)"
    return None


def _integer_class_weight(weight, target):
    """Whether ``weight`` is an integer (or bool) class weight of class-index targets,
    which torch refuses ("expected scalar type Float but found Long"): the call goes to
    torch for its error. (Probability targets and BCE take such weights, in torch too.)"""
    return (weight is not None and not target.is_floating_point()
            and not (weight.is_floating_point() or weight.is_complex()))


def _autocast(*tensors):
    """``tensors`` as CPU autocast gives them to these losses: float16/bfloat16 as float32
    (torch computes and returns the loss in float32 there, whatever the autocast dtype;
    a half loss overflowed where torch's did not, and GradScaler's scaled grad_output
    with it). Outside autocast, as they are."""
    if not torch.is_autocast_enabled("cpu"):
        return tensors
    return tuple(t.float() if t is not None and t.dtype in _HALF_DTYPES else t for t in tensors)


def _all_tensors(*args):
    return all(a is None or isinstance(a, Tensor) for a in args)


def _with_grad(input):
    """Whether the forward pass must also compute the input's gradient: always under
    ``torch.jit.trace`` and ``torch.export``, which record the value as a constant (a
    program traced or exported under ``no_grad`` then raised at every backward)."""
    return (torch.jit.is_tracing() or torch.compiler.is_exporting()
            or (torch.is_grad_enabled() and input.requires_grad))


# ----------------------------------------------------------- calling cecore.functional
def _numpy(t):
    """A NumPy view of the CPU tensor ``t`` (no copy), None for None; half types in float32."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype in _HALF_DTYPES:  # NumPy has no bfloat16; cecore computes float16 in float32
        t = t.float()
    return t.numpy()


def _load_madvise():
    """libc's ``madvise`` on Linux, None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


def _empty(shape, dtype):
    """A new contiguous CPU tensor, advised to Linux as huge-page memory when large.

    See ``cecore._config.HUGEPAGE_MIN_BYTES``: torch's allocator gives 4 kB pages unless
    the process sets THP_MEM_ALLOC_ENABLE=1. The advice runs from the first page boundary
    in the buffer to its end; where Linux cannot follow it, nothing changes but the speed.
    """
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if _madvise is not None and nbytes >= _config.HUGEPAGE_MIN_BYTES:
        start = -(-t.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
        _madvise(start, t.data_ptr() + nbytes - start, _MADV_HUGEPAGE)
    return t


def _logits(input, with_grad):
    """``(x, grad)``: the logits as a NumPy array and the tensor the gradient goes into.

    ``x`` is a view of ``input`` when it is a contiguous float32/float64 tensor; ``grad`` is
    a new contiguous tensor of ``x``'s dtype and shape, or None for the loss alone.
    """
    x = input.detach()
    if x.dtype in _HALF_DTYPES:
        x = x.float()
    # A no-op on the fast path; a custom operator can still be called with other layouts.
    x = x.contiguous()
    grad = _empty(x.shape, x.dtype) if with_grad else None
    return x.numpy(), grad


def _threads(n_threads, n_elements):
    """cecore's threads for a call: ``n_threads`` when given, else cecore's default capped
    at ``torch.get_num_threads()``, so that ``torch.set_num_threads`` limits the loss too."""
    if n_threads is not None:
        return n_threads
    return min(torch.get_num_threads(), V.n_threads(None, n_elements))


def _fused(function, grad, *args, **kwargs):
    """The loss from a :mod:`cecore.functional` loss, its gradient written into ``grad``.

    ``grad`` is a contiguous tensor of the input's shape (torch owns the memory), or None
    for the loss alone.
    """
    if grad is None:
        return function(*args, **kwargs)
    return function(*args, grad_out=grad.numpy(), **kwargs)[0]


def _loss_dtype(input, target, class_weight=None):
    """torch's loss dtype: the input's, or a floating-point target's where that is wider
    (float32 logits, float64 probabilities: a float64 loss), and with probabilities
    ``cross_entropy``'s ``class_weight``'s where that is wider (torch multiplies the
    log-probabilities by it; BCE's weights, which torch casts, are not passed)."""
    if not target.is_floating_point():
        return input.dtype
    if class_weight is None:
        return torch.promote_types(input.dtype, target.dtype)
    return torch.promote_types(torch.promote_types(input.dtype, target.dtype),
                               class_weight.dtype)


def _outputs(loss, grad, input, target, class_weight=None):
    """The operator's ``(loss, grad)`` tensors: the loss in :func:`_loss_dtype`, the
    gradient in the dtype it was computed in (empty when None): float32 for half inputs,
    so that backward scales it by ``grad_output`` before rounding it to the input's dtype
    (rounded first, a loss-scaled float16 gradient lost its small entries to zero)."""
    loss = torch.from_numpy(np.asarray(loss)).to(_loss_dtype(input, target, class_weight))
    if grad is None:
        return loss, torch.empty(0, dtype=_grad_dtype(input))
    return loss, grad


def _grad_dtype(input):
    return torch.float32 if input.dtype in _HALF_DTYPES else input.dtype


def _fake_outputs(input, target, loss_shape, with_grad, class_weight=None):
    return (input.new_empty(loss_shape, dtype=_loss_dtype(input, target, class_weight)),
            input.new_empty(input.shape if with_grad else (0,), dtype=_grad_dtype(input)))


def _scalars(torch_call, ignore_index=-100, label_smoothing=0.0, n_threads=None,
             backend="auto"):
    """``(ignore_index, label_smoothing, n_threads)`` checked as cecore checks them, before
    the operator's schema would coerce them (1.5 to 1, "0.1" to 0.1, True to 1) or fail
    with its own message: where they are wrong, the error ``torch_call()`` raises (see
    :func:`_raise_torch_error`). ``n_threads`` beyond the schema's int32 is capped at the
    CPUs here, with cecore's warning; ``backend`` must be a string (its value is checked
    where the kernels are chosen)."""
    # torch takes one-element tensors for these (an integer ignore_index of any number
    # of dimensions, a 0-d non-bool label_smoothing that does not require grad), as
    # Python numbers
    if isinstance(ignore_index, Tensor) and ignore_index.numel() == 1 and \
            not ignore_index.is_floating_point() and ignore_index.dtype != torch.bool:
        ignore_index = int(ignore_index.item())
    if isinstance(label_smoothing, Tensor) and label_smoothing.dim() == 0 and \
            label_smoothing.dtype != torch.bool and not label_smoothing.requires_grad:
        label_smoothing = float(label_smoothing.item())  # (torch refuses one that requires grad)
    try:
        if n_threads is not None and (isinstance(n_threads, bool)
                                      or not isinstance(n_threads, numbers.Integral)):
            raise TypeError(f"n_threads must be None or an int, got {type(n_threads).__name__}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be 'auto', 'cython' or 'numba', got {backend!r}")
        if n_threads is not None and int(n_threads) >= 2**31:  # past the schema's int32:
            # capped now, the warning naming the request (Dynamo cannot trace the CPU
            # count or a warning: compiled, capped to int32, and the operator warns)
            n_threads = (2**31 - 1 if torch.compiler.is_compiling()
                         else V.n_threads(n_threads))
        return (V.check_ignore_index(ignore_index), V.check_label_smoothing(label_smoothing),
                None if n_threads is None else int(n_threads))
    except (TypeError, ValueError) as error:
        _raise_torch_error(error, torch_call)


def _raise_torch_error(error, torch_function, *args, **kwargs):
    """Raise what ``torch_function`` raises for these arguments, with cecore's ``error`` as cause.

    cecore and torch reject the same bad arguments, not always with the same exception type
    (a weight of the wrong size is a ValueError in cecore, a RuntimeError in torch), and
    code that catches torch's errors must keep working. Where torch accepts the
    arguments, cecore's error stands, and so it does where torch fails to format its own
    message (torch 2.13 raises UnicodeDecodeError for a uint8 target of 255 with
    ``reduction='none'``, in place of its "out of bounds" IndexError).
    """
    if torch_function is None:  # nothing of torch's to compare with
        raise error
    if isinstance(error, IndexError) and args and isinstance(args[0], Tensor):
        # A target out of range, which torch reports as an IndexError too, once the
        # arguments are in dtypes it takes: cecore takes integer targets of any width and
        # weights of any float dtype, which torch would blame first ("expected target
        # dtype to be Long"). Other errors replay the arguments as given, so that a
        # dtype torch refuses is named as the caller passed it. A uint64 target beyond
        # int64 would be replayed wrapped (2**63 + 5 as -2**63 + 5): cecore's error names it.
        if any(isinstance(a, Tensor) and a.dtype == torch.uint64
               and bool((a.view(torch.int64) < 0).any()) for a in args):
            raise error
        args = tuple(_torch_dtype(a, args[0]) for a in args)
        kwargs = {k: _torch_dtype(a, args[0]) for k, a in kwargs.items()}
    try:
        torch_function(*args, **kwargs)
    except UnicodeError:
        raise error from None
    except Exception as torch_error:
        raise torch_error from error
    raise error


def _torch_dtype(a, input):
    """``a`` (an argument besides ``input``) in a dtype torch's losses take: int64 for an
    integer tensor, ``input``'s dtype for a floating one."""
    if not isinstance(a, Tensor) or a is input:
        return a
    if not (a.is_floating_point() or a.is_complex() or a.dtype == torch.bool):
        return a.long()
    if a.is_floating_point() and input.is_floating_point() and a.dtype != input.dtype:
        return a.to(input.dtype)
    return a


# ------------------------------------------------------------------------- autograd
class _SecondOrderGuard(torch.autograd.Function):
    """A 0-d zero that depends on ``sources`` (the tensors a gradient is taken with respect
    to) and whose backward raises: added to a gradient computed under create_graph=True,
    it puts a node on the graph's paths to the sources only. A second derivative with
    respect to them (Hessians, gradient penalties) reaches it and raises; autograd runs a
    node only on a path to the tensors being differentiated, so hanging off a fresh leaf
    it was pruned and the second derivative came out as zero. The gradient stays
    differentiable with respect to ``grad_output``, of which it is a linear function:
    the double-backward trick for Jacobian-vector products
    (``torch.autograd.functional.jvp``) gets the right answer, where a detached gradient
    gave 0."""

    @staticmethod
    def forward(ctx, *sources):
        return sources[0].new_zeros(())

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(_ONCE_MESSAGE)


_ONCE_MESSAGE = ("cecore.torch losses are differentiable once: their gradient has no gradient "
                 "of its own (second derivatives, Hessians, gradient penalties). Use the loss "
                 "from torch.nn.functional for this computation.")


def _once(grads, sources):
    """``grads`` (computed under create_graph=True, linear in grad_output) with a
    :class:`_SecondOrderGuard` of ``sources`` added: the anchors of :func:`_anchors`, or
    weak references to the tensors ``grads`` are the gradients of (an operator called
    directly, or under torch.compile); if such a tensor is gone, nothing could reach it:
    raise now."""
    alive = [s() if isinstance(s, weakref.ref) else s for s in sources]
    if any(t is None for t in alive):
        raise RuntimeError(_ONCE_MESSAGE)
    guard = _SecondOrderGuard.apply(*alive)
    return [None if g is None else g + guard.to(g.dtype) for g in grads]


def _opaque(grad_output):
    """Whether the value of ``grad_output`` cannot be read: traced (a subclass, a dispatch
    mode, compiling) or batched (functorch's vmap, or the legacy batching of
    ``autograd.grad(..., is_grads_batched=True)``)."""
    return (type(grad_output) is not Tensor or is_in_torch_dispatch_mode()
            or torch.compiler.is_compiling()
            or torch._C._functorch.is_batchedtensor(grad_output)
            or torch._C._functorch.is_legacy_batchedtensor(grad_output))


def _traced(grad_output):
    """Whether ``grad_output`` may be more than a plain tensor: :func:`_opaque`, or
    differentiable (create_graph=True: products must stay on the graph)."""
    return _opaque(grad_output) or torch.is_grad_enabled()


def _finite_scalar(grad_output):
    """Whether ``grad_output`` is a plain 0-d tensor holding a finite value."""
    return (grad_output.dim() == 0 and not _traced(grad_output)
            and math.isfinite(grad_output.item()))


def _skip_ignored(grad_output, target, ignore_index):
    """``grad_output`` with 0 at the positions whose target is ``ignore_index``.

    torch skips those positions, so their gradient is 0 (NaN where the softmax is)
    whatever ``grad_output`` holds there; the saved gradient times an infinite or NaN
    ``grad_output`` (the loss's ``sqrt`` or ``log`` at an ignored position, whose loss is
    0) made it NaN. A finite scalar needs nothing (no pass over the positions then)."""
    if _finite_scalar(grad_output):
        return grad_output
    return torch.where(_ignored(target, ignore_index), 0, grad_output)


def _ignored(target, ignore_index):
    """The positions whose target is ``ignore_index``, compared in int64: torch compares a
    narrow target with a Python int in the target's own dtype, so -100 would pick out
    class 156 of a uint8 target."""
    return target.to(torch.int64) == ignore_index


def _scaled(ctx, grad, grad_output):
    """The saved gradient ``grad`` (computed for grad_output = 1) times ``grad_output``.

    ``grad`` is the operator's second output. When only this module ever held it (the
    functions below drop it, see :func:`_disown_gradient`) and the graph is freed after
    this backward (no ``retain_graph``), nothing reads it again: it is scaled in place, or
    handed on as it is when ``grad_output`` is 1 (``loss.backward()``). Backward then costs
    at most one pass over the gradient and no allocation of N x C values (torch's compiled
    backward reuses saved tensors the same way). Otherwise (the operator called directly,
    a retained graph, or torch tracing the backward: torch.compile, opcheck, make_fx) a new
    tensor is returned.
    """
    traced = _traced(grad_output)
    reusable = (getattr(ctx, "gradient_disowned", False)
                and not torch._C._autograd._get_current_graph_task_keep_graph())
    if traced or not reusable:
        return grad * grad_output
    if grad_output.numel() == 1 and grad_output.item() == 1:
        return grad
    return grad.mul_(grad_output)


def _anchors(*tensors):
    """For each tensor that requires grad, a tensor of no elements on its autograd graph
    that does not keep its memory (``as_strided`` saves the geometry only): what
    :func:`_once` hangs its guard on. Weak references to the tensors themselves were dead
    whenever a tensor was a temporary (``x @ W``, an autocast copy, a reshaped weight),
    and a JVP by double backward then raised. About 5 us per tensor."""
    # Under torch.jit.trace the clones would be recorded, under names the trace's check
    # run does not reproduce ("Graphs differed across invocations"): weak references then.
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return []
    return [t.as_strided((0,), (1,)).clone() for t in tensors
            if t is not None and t.requires_grad]


def _disown_gradient(loss, anchors=()):
    """Mark the gradient output of the operator that made ``loss`` as never seen by the
    caller, and give its backward the ``anchors`` of the tensors it differentiates.

    The functions call the operators and drop that output, so :func:`_scaled` may reuse
    its memory. (``loss.grad_fn`` is the autograd context of the operator's backward.)
    Not under ``torch.autograd.graph.saved_tensors_hooks``: the pack hook has seen the
    saved gradient and may keep it (a debugging hook, an offload that packs by reference),
    and would see it scaled.
    """
    if not torch.compiler.is_compiling() and loss.grad_fn is not None:
        top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        hooked = top_hooks is None or top_hooks(False) is not None  # (unknown: as hooked)
        try:
            loss.grad_fn.gradient_disowned = not hooked
            if anchors:
                loss.grad_fn.sources = list(anchors)
        except AttributeError:  # a tensor subclass's node (AliasBackward0...): not reused
            pass


def _versions(tensors):
    """What :func:`_check_versions` compares: each tensor (weakly: not kept alive) and its
    version counter; for a view, its base, whose counter it shares (a weak reference to
    the view itself, ``target.view(-1)`` or ``weight[:]``, died after the forward, and an
    in-place change of the base then went unnoticed, where torch raises).

    Inference tensors have no version counter: torch's own losses refuse to save them,
    and so does this, with torch's message (which names the fix). Under
    ``torch.autograd.graph.allow_mutation_on_saved_tensors()`` torch clones a saved tensor
    before it is modified, so its backward raises nothing: nothing is compared then (the
    saved gradient is the original operands' anyway)."""
    tensors = [t for t in tensors if isinstance(t, Tensor)]
    if any(t.is_inference() for t in tensors):
        raise RuntimeError(
            "Inference tensors cannot be saved for backward. Please do not use Tensors created "
            "in inference mode in computation tracked by autograd. To work around this, you "
            "can make a clone to get a normal tensor and use it in autograd, or use "
            "`torch.no_grad()` instead of `torch.inference_mode()`.")
    if _mutation_allowed():
        return []
    roots = [t if t._base is None else t._base for t in tensors]
    return [(weakref.ref(t), t._version) for t in roots]


def _mutation_allowed():
    """Whether ``torch.autograd.graph.allow_mutation_on_saved_tensors()`` is active."""
    return getattr(torch.autograd.graph, "_allow_mutation_on_saved_tensors_enabled", False)


def _kept(target):
    """The target, as the backward reads it (its ignored positions): a copy where torch
    keeps the original of a saved tensor modified in place (:func:`_mutation_allowed`),
    else the tensor itself (a change of it raises in :func:`_check_versions` first)."""
    return target.clone() if _mutation_allowed() else target


def _check_versions(versions):
    """Raise torch's error if a tensor was modified in place since the forward pass.

    The gradient was computed in the forward pass, so it is the right one for the loss
    returned; but torch's own functions save these tensors and raise, and that error is
    how an ``optimizer.step()`` or an in-place edit before ``backward()`` is caught."""
    for ref, version in versions:
        t = ref()
        if t is not None and t._version != version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: {tuple(t.shape)} tensor is at version {t._version}; "
                f"expected version {version} (as torch's own loss checks)")


def _target_entries(shape, target, axis):
    """A bool tensor of ``shape``, True at each position's target class along ``axis``
    (nowhere for an ignored position); a broadcast compare, which inductor fuses."""
    classes = torch.arange(shape[axis]).view((-1,) + (1,) * (len(shape) - axis - 1))
    return classes == target.to(torch.int64).unsqueeze(axis if target.dim() else 0)


def _register_autograd(op, per_element, watched, ignore_arg=None, sparse=False):
    """Backward of ``op``: the forward's gradient (saved) scaled by ``grad_output``.

    With reduction='none', ``grad_output`` has the loss's shape: the input's (``per_element``,
    binary cross-entropy) or the input's without the class axis 1 (unbatched input has no
    batch axis and a 0-d loss). ``watched``: the positions of the arguments that torch's
    own function saves, whose in-place modification before backward raises there.
    ``ignore_arg``: the position of ``ignore_index`` (class-index targets, argument 1).
    ``sparse``: torch's backward writes the targets' entries only (nll_loss), so the
    others stay 0 for an infinite or NaN ``grad_output``, where the saved zeros times it
    were NaN.
    """

    def setup_context(ctx, inputs, output):
        input = inputs[0]
        _, grad = output
        ctx.mark_non_differentiable(grad)
        # Weakly: a strong reference would keep the logits alive until backward.
        ctx.input_ref = weakref.ref(input)
        # The gradient output gets no gradient: without this, autograd would allocate
        # an N x C tensor of zeros for it at every backward.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad)
        ctx.n_inputs = len(inputs)
        ctx.has_grad = grad.numel() == input.numel()
        ctx.input_dtype = input.dtype  # the saved gradient is float32 for half inputs
        ctx.class_axis = 1 if not per_element and input.dim() > 1 else None
        ctx.versions = _versions([inputs[i] for i in watched])
        target = inputs[1]
        ctx.ignore = ((_kept(target), inputs[ignore_arg]) if ignore_arg is not None
                      and not target.is_floating_point() else None)

    def backward(ctx, grad_output, _):
        (grad,) = ctx.saved_tensors
        nones = (None,) * (ctx.n_inputs - 1)
        if grad_output is None:
            return (None,) + nones
        if not ctx.has_grad:
            raise RuntimeError(f"{op._qualname} was called with with_grad=False: no gradient")
        _check_versions(ctx.versions)
        if ctx.ignore is not None:
            grad_output = _skip_ignored(grad_output, *ctx.ignore)
        if ctx.class_axis is not None and grad_output.dim():
            grad_output = grad_output.unsqueeze(ctx.class_axis)
        targets = None
        if sparse and grad.numel() and not _finite_scalar(grad_output) and (
                _opaque(grad_output) or not bool(torch.isfinite(grad_output).all())):
            # traced or batched, the value cannot be read: always the select (which
            # inductor fuses with the scaling; aot_eager and the like pay its passes)
            targets = _target_entries(grad.shape, ctx.ignore[0], ctx.class_axis or 0)
        result = _scaled(ctx, grad, grad_output).to(ctx.input_dtype)
        if targets is not None:
            result = torch.where(targets, result, 0)
        if torch.is_grad_enabled():  # create_graph=True: make a second backward fail loudly
            (result,) = _once([result], getattr(ctx, "sources", None) or [ctx.input_ref])
        return (result,) + nones

    op.register_autograd(backward, setup_context=setup_context)


# ----------------------------------------------------------------- custom operators
@torch.library.custom_op("cecore::cross_entropy", mutates_args=(), device_types="cpu")
def _cross_entropy_op(input: Tensor, target: Tensor, weight: Optional[Tensor],
                      ignore_index: int, reduction: str, label_smoothing: float,
                      with_grad: bool, backend: str,
                      n_threads: Optional[int]) -> tuple[Tensor, Tensor]:
    """``(loss, grad)`` of :func:`cecore.cross_entropy`, grad for grad_output=1 (empty without with_grad)."""
    x, grad = _logits(input, with_grad)
    try:
        loss = _fused(_F.cross_entropy, grad, x, _numpy(target), _numpy(weight), ignore_index,
                      reduction, label_smoothing, backend=backend,
                      n_threads=_threads(n_threads, x.size))
    except (ValueError, TypeError, IndexError) as error:
        _raise_torch_error(error, TF.cross_entropy, input.detach(), target, weight,
                           ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    return _outputs(loss, grad, input, target, weight)


@_cross_entropy_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, with_grad, backend,
      n_threads):
    return _fake_outputs(input, target, V.loss_shape(input.shape) if reduction == "none" else (),
                         with_grad, weight)


@torch.library.custom_op("cecore::nll_loss", mutates_args=(), device_types="cpu")
def _nll_loss_op(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                 reduction: str, with_grad: bool, backend: str,
                 n_threads: Optional[int]) -> tuple[Tensor, Tensor]:
    """``(loss, grad)`` of :func:`cecore.nll_loss`; grad for grad_output=1, empty without with_grad."""
    x, grad = _logits(input, with_grad)
    try:
        loss = _fused(_F.nll_loss, grad, x, _numpy(target), _numpy(weight), ignore_index,
                      reduction, backend=backend, n_threads=_threads(n_threads, x.size))
    except (ValueError, TypeError, IndexError) as error:
        _raise_torch_error(error, TF.nll_loss, input.detach(), target, weight,
                           ignore_index=ignore_index, reduction=reduction)
    return _outputs(loss, grad, input, target)


@_nll_loss_op.register_fake
def _(input, target, weight, ignore_index, reduction, with_grad, backend, n_threads):
    return _fake_outputs(input, target, V.loss_shape(input.shape) if reduction == "none" else (),
                         with_grad)


@torch.library.custom_op("cecore::binary_cross_entropy_with_logits", mutates_args=(),
                         device_types="cpu")
def _bce_op(input: Tensor, target: Tensor, weight: Optional[Tensor],
            pos_weight: Optional[Tensor], reduction: str, with_grad: bool, backend: str,
            n_threads: Optional[int]) -> tuple[Tensor, Tensor]:
    """``(loss, grad)`` of :func:`cecore.binary_cross_entropy_with_logits` (grad for grad_output=1)."""
    x, grad = _logits(input, with_grad)
    try:
        loss = _fused(_F.binary_cross_entropy_with_logits, grad, x, _numpy(target),
                      _numpy(weight), reduction, _numpy(pos_weight), backend=backend,
                      n_threads=_threads(n_threads, x.size))
    except (ValueError, TypeError, IndexError) as error:
        _raise_torch_error(error, TF.binary_cross_entropy_with_logits, input.detach(), target,
                           weight, reduction=reduction, pos_weight=pos_weight)
    return _outputs(loss, grad, input, target)


@_bce_op.register_fake
def _(input, target, weight, pos_weight, reduction, with_grad, backend, n_threads):
    return _fake_outputs(input, target, input.shape if reduction == "none" else (), with_grad)


# watched: what torch's functions save (cross_entropy's backward needs no logits)
_register_autograd(_cross_entropy_op, per_element=False, watched=(1, 2), ignore_arg=3)
_register_autograd(_nll_loss_op, per_element=False, watched=(0, 1, 2), ignore_arg=3,
                   sparse=True)
_register_autograd(_bce_op, per_element=True, watched=(0, 1, 2, 3))


# Linear cross-entropy: the loss of input @ linear_weight.T + linear_bias, a chunk of
# rows at a time (only a chunk's logits exist at once, see linear._chunk_rows). With 'mean'/'sum' the forward pass computes the three gradients for
# grad_output = 1 and backward scales them. With 'none' that is impossible: the weight's
# gradient sums the rows, each with its own grad_output, so backward runs the chunked
# pass again with the real grad_output (a second operator), from the saved inputs.
@torch.library.custom_op("cecore::linear_cross_entropy", mutates_args=(), device_types="cpu")
def _linear_ce_op(input: Tensor, linear_weight: Tensor, target: Tensor,
                  linear_bias: Optional[Tensor], weight: Optional[Tensor], ignore_index: int,
                  reduction: str, label_smoothing: float, grad_mask: int,
                  chunk_size: Optional[int], backend: str,
                  n_threads: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grad_input, grad_linear_weight, grad_linear_bias)`` of :func:`cecore.linear_cross_entropy`.

    Gradients for grad_output = 1 of the operands that ``grad_mask`` names (see
    :func:`_grad_mask`); the others are empty (the bias's also without ``linear_bias``).
    """
    x = _numpy(input)
    try:
        result = _L.linear_cross_entropy(
            x, _numpy(linear_weight), _numpy(target), linear_bias=_numpy(linear_bias),
            weight=_numpy(weight), reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing, return_grad=grad_mask != 0,
            needs_grad=_grad_flags(grad_mask), chunk_size=chunk_size, backend=backend,
            n_threads=_threads(n_threads, _n_logits(x, linear_weight)))
    except (ValueError, TypeError, IndexError) as error:
        _raise_torch_error(error, TF.linear_cross_entropy, input.detach(),
                           linear_weight.detach(), target,
                           linear_bias=None if linear_bias is None else linear_bias.detach(),
                           weight=weight, reduction=reduction,
                           # torch's default (None) where cecore put its -100 in: given
                           # -100, torch blames ignore_index for other errors
                           ignore_index=None if ignore_index == -100 else ignore_index,
                           label_smoothing=label_smoothing)
    loss, grads = result if grad_mask else (result, (None, None, None))
    # float32 gradients for half operands, rounded by backward after scaling (see _outputs)
    return (torch.from_numpy(np.asarray(loss)).to(input.dtype),
            *(_tensor(g, _grad_dtype(input)) for g in grads))


def _grad_mask(*operands):
    """Bit k set: the k-th of (input, linear_weight, linear_bias) needs its gradient.

    Forward computes only those (a frozen unembedding skips the N x V x D product of its
    own gradient); under jit tracing, where requires_grad is not final, all three.
    """
    if torch.jit.is_tracing():
        return 7
    if not torch.is_grad_enabled():
        return 0
    return _grad_mask_of(*(t is not None and t.requires_grad for t in operands))


def _grad_mask_of(*flags):
    """The bit mask of :func:`_grad_mask` from its flags."""
    return sum(1 << k for k, flag in enumerate(flags) if flag)


def _grad_flags(grad_mask):
    """The (input, linear_weight, linear_bias) flags of a bit mask."""
    return tuple(bool(grad_mask >> k & 1) for k in range(3))


def _n_logits(x, linear_weight):
    """N x V, the logits of a linear loss: the work that sets its default threads."""
    return int(np.prod(x.shape[:-1])) * linear_weight.shape[0]


def _tensor(array, dtype):
    """A tensor of ``array`` (its memory, no copy, when the dtype matches); empty for None."""
    return torch.empty(0, dtype=dtype) if array is None else torch.from_numpy(array).to(dtype)


@_linear_ce_op.register_fake
def _(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
      label_smoothing, grad_mask, chunk_size, backend, n_threads):
    loss = input.new_empty(input.shape[:-1] if reduction == "none" else ())
    return (loss, *_fake_linear_grads(input, linear_weight, linear_bias, grad_mask,
                                      _grad_dtype(input)))


def _fake_linear_grads(input, linear_weight, linear_bias, grad_mask, dtype):
    need_x, need_w, need_b = _grad_flags(grad_mask)
    return (input.new_empty(input.shape if need_x else (0,), dtype=dtype),
            input.new_empty(linear_weight.shape if need_w else (0,), dtype=dtype),
            input.new_empty(linear_weight.shape[:1] if need_b and linear_bias is not None
                            else (0,), dtype=dtype))


@torch.library.custom_op("cecore::linear_cross_entropy_backward", mutates_args=(),
                         device_types="cpu")
def _linear_ce_backward_op(grad_output: Tensor, input: Tensor, linear_weight: Tensor,
                           target: Tensor, linear_bias: Optional[Tensor],
                           weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
                           chunk_size: Optional[int], backend: str,
                           n_threads: Optional[int],
                           grad_mask: int) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients that ``grad_mask`` names of the unreduced (reduction='none') linear
    cross-entropy (the others empty)."""
    x = _numpy(input)
    _, grads = _L.linear_cross_entropy(
        x, _numpy(linear_weight), _numpy(target), linear_bias=_numpy(linear_bias),
        weight=_numpy(weight), reduction="none", ignore_index=ignore_index,
        label_smoothing=label_smoothing, return_grad=True, grad_output=_numpy(grad_output),
        needs_grad=_grad_flags(grad_mask), chunk_size=chunk_size, backend=backend,
        n_threads=_threads(n_threads, _n_logits(x, linear_weight)))
    return tuple(_tensor(g, input.dtype) for g in grads)


@_linear_ce_backward_op.register_fake
def _(grad_output, input, linear_weight, target, linear_bias, weight, ignore_index,
      label_smoothing, chunk_size, backend, n_threads, grad_mask):
    return _fake_linear_grads(input, linear_weight, linear_bias, grad_mask, input.dtype)


def _linear_setup_context(ctx, inputs, output):
    (input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
     label_smoothing, grad_mask, chunk_size, backend, n_threads) = inputs
    grads = output[1:]
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)  # no zeros for the gradient outputs' gradients
    ctx.recompute = reduction == "none"
    ctx.grad_mask = grad_mask
    ctx.input_dtype = input.dtype  # the saved gradients are float32 for half operands
    ctx.source_refs = [weakref.ref(t) for t in (input, linear_weight, linear_bias)
                       if t is not None]
    # Ignored positions get a zero input gradient whatever grad_output holds (as torch).
    ctx.ignore = (_kept(target), ignore_index)
    if ctx.recompute:  # every input is saved for the second pass (torch checks them)
        watched = (input, linear_weight, target, linear_bias, weight)
    else:  # what torch's F.linear + cross_entropy save: never the bias, the input only
        # for the weight's gradient, the weight only for the input's
        watched = [target, weight] + [a for a, b in ((input, linear_weight),
                                                     (linear_weight, input)) if b.requires_grad]
    ctx.versions = _versions(watched)
    if ctx.recompute:
        ctx.save_for_backward(input, linear_weight, target, linear_bias, weight)
        ctx.options = (ignore_index, label_smoothing, chunk_size, backend, n_threads)
    else:
        ctx.save_for_backward(*grads)


def _linear_backward(ctx, grad_output, *_):
    nones = (None,) * 8  # target, weight and the non-tensor arguments
    if grad_output is None:
        return (None,) * 4 + nones
    _check_versions(ctx.versions)
    if ctx.recompute:
        if torch.is_grad_enabled() and grad_output.requires_grad:
            # The gradients come from an operator with no autograd of its own: their
            # derivative with respect to grad_output (the double-backward trick for JVPs)
            # would be silently 0.
            raise RuntimeError("cecore.torch.linear_cross_entropy(reduction='none') cannot "
                               "differentiate its gradient with respect to grad_output "
                               "(a Jacobian-vector product); use reduction='sum' or torch's "
                               "function")
        needs = ctx.needs_input_grad
        with torch.no_grad():  # the backward operator has no autograd of its own
            grads = _linear_ce_backward_op(grad_output, *ctx.saved_tensors, *ctx.options,
                                           _grad_mask_of(needs[0], needs[1], needs[3]))
    else:
        computed = _grad_flags(ctx.grad_mask)
        for name, need, have in zip(("input", "linear_weight", "linear_bias"),
                                    ctx.needs_input_grad[:2] + ctx.needs_input_grad[3:4],
                                    computed):
            if need and not have:
                raise RuntimeError(f"cecore::linear_cross_entropy was called with "
                                   f"grad_mask={ctx.grad_mask}, without the gradient of {name}")
        grads = [_scaled(ctx, g, grad_output).to(ctx.input_dtype) for g in ctx.saved_tensors]
        if not _finite_scalar(grad_output):
            # A non-finite grad_output times the saved zeros of ignored rows made them NaN.
            # The weight's and bias's gradients are sums over rows, not separable, but
            # with every row ignored torch's are sums of zero rows: 0 whatever grad_output
            # holds.
            ignored = _ignored(*ctx.ignore)
            if _opaque(grad_output):  # no branch on the data: selects (fused by inductor)
                none_scored = ignored.all()
                grads = [torch.where(none_scored, 0, g) for g in grads]
            elif bool(ignored.all()):
                grads = [torch.zeros_like(g) for g in grads]
            if computed[0]:
                grads[0] = torch.where(ignored.unsqueeze(-1), 0, grads[0])
    if torch.is_grad_enabled():  # create_graph=True: make a second backward fail loudly
        grads = _once(grads, getattr(ctx, "sources", None) or ctx.source_refs)
    grad_input, grad_linear_weight, grad_linear_bias = grads
    needs = ctx.needs_input_grad
    return (grad_input if needs[0] else None, grad_linear_weight if needs[1] else None, None,
            grad_linear_bias if needs[3] else None) + nones


_linear_ce_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# ------------------------------------------------------------------------ functions
def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100,
                  reduce=None, reduction="mean", label_smoothing=0.0, *, backend="auto",
                  n_threads=None):
    """``torch.nn.functional.cross_entropy`` computed by cecore (CPU, autograd-aware).

    Arguments and result as torch's (see :func:`cecore.cross_entropy` for the semantics):
    logits of shape (C,), (N, C) or (N, C, d1, ..., dK); class-index targets (any integer
    dtype) or class probabilities of the input's shape. ``backend`` and ``n_threads``
    choose cecore's kernels (by default cecore's threads, at most
    ``torch.get_num_threads()``). Other devices, dtypes and layouts go to torch's function
    with a :class:`CecoreFallbackWarning` (see the module docstring), as do calls under
    ``torch.func`` transforms. Differentiable once (a second derivative raises).

    Returns
    -------
    loss : Tensor
        Shape () for 'mean'/'sum', the target's (class-index) shape for 'none'.
    """
    reduction = _reduction(_legacy_reduction(size_average, reduce, reduction))
    if not _all_tensors(input, target, weight) or _integer_class_weight(weight, target):
        return TF.cross_entropy(input, target, weight, ignore_index=ignore_index,
                                reduction=reduction, label_smoothing=label_smoothing)
    reason = _fallback_reason((input,), (target, weight))
    if reason is not None:
        _warn_fallback("cross_entropy", reason)
        return TF.cross_entropy(input, target, weight, ignore_index=ignore_index,
                                reduction=reduction, label_smoothing=label_smoothing)
    input, target, weight = _autocast(input, target, weight)
    ignore_index, label_smoothing, n_threads = _scalars(
        lambda: TF.cross_entropy(input.detach(), target, weight, ignore_index=ignore_index,
                                 reduction=reduction, label_smoothing=label_smoothing),
        ignore_index, label_smoothing, n_threads, backend)
    loss, _ = _cross_entropy_op(input, target, weight, ignore_index, reduction,
                                label_smoothing, _with_grad(input), backend, n_threads)
    _disown_gradient(loss, _anchors(input))
    return loss


def nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
             reduction="mean", *, backend="auto", n_threads=None):
    """``torch.nn.functional.nll_loss`` computed by cecore (CPU, autograd-aware).

    Log-probabilities of shape (C,), (N, C) or (N, C, d1, ..., dK) and class-index
    targets; otherwise as :func:`cross_entropy` (fallback, errors, differentiable once).
    """
    reduction = _reduction(_legacy_reduction(size_average, reduce, reduction))
    if not _all_tensors(input, target, weight) or _integer_class_weight(weight, target):
        return TF.nll_loss(input, target, weight, ignore_index=ignore_index, reduction=reduction)
    reason = _fallback_reason((input,), (target, weight))
    if reason is not None:
        _warn_fallback("nll_loss", reason)
        return TF.nll_loss(input, target, weight, ignore_index=ignore_index, reduction=reduction)
    input, weight = _autocast(input, weight)
    ignore_index, _, n_threads = _scalars(
        lambda: TF.nll_loss(input.detach(), target, weight, ignore_index=ignore_index,
                            reduction=reduction), ignore_index, n_threads=n_threads,
        backend=backend)
    loss, _ = _nll_loss_op(input, target, weight, ignore_index, reduction,
                           _with_grad(input), backend, n_threads)
    _disown_gradient(loss, _anchors(input))
    return loss


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None,
                                     reduce=None, reduction="mean", pos_weight=None, *,
                                     backend="auto", n_threads=None):
    """``torch.nn.functional.binary_cross_entropy_with_logits`` computed by cecore (CPU).

    ``weight`` and ``pos_weight`` broadcast against the input; a target, weight or
    pos_weight that requires grad goes to torch's function. Otherwise as
    :func:`cross_entropy` (fallback, errors, differentiable once).
    """
    reduction = _reduction(_legacy_reduction(size_average, reduce, reduction))
    if not _all_tensors(input, target, weight, pos_weight):
        return TF.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction,
                                                   pos_weight=pos_weight)
    reason = _fallback_reason((input,), (target, weight, pos_weight))
    if reason is not None:
        _warn_fallback("binary_cross_entropy_with_logits", reason)
        return TF.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction,
                                                   pos_weight=pos_weight)
    input, target, weight, pos_weight = _autocast(input, target, weight, pos_weight)
    _, _, n_threads = _scalars(None, n_threads=n_threads, backend=backend)
    loss, _ = _bce_op(input, target, weight, pos_weight, reduction, _with_grad(input),
                      backend, n_threads)
    _disown_gradient(loss, _anchors(input))
    return loss


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=None, label_smoothing=0.0, options=None,
                         chunk_size=None, backend="auto", n_threads=None):
    """``torch.nn.functional.linear_cross_entropy`` computed by cecore (CPU, autograd-aware).

    The cross-entropy of ``input @ linear_weight.T + linear_bias`` against class-index
    ``target`` without the N x V logits (see :func:`cecore.linear_cross_entropy`): input
    of shape (D,) or (N, D), ``linear_weight`` (V, D), ``linear_bias`` (V,), all three
    differentiable. ``options`` configures torch's own chunked implementation and is used
    only when the call falls back to torch; cecore chunks the rows by its own rule or
    ``chunk_size``. Probability targets, a K-dimensional ``linear_weight``
    (``out_features``), and the cases listed for :func:`cross_entropy` go to torch's
    function with a :class:`CecoreFallbackWarning`. With reduction='none' backward
    recomputes the chunked pass with the real ``grad_output`` (the forward pass computes
    the loss only). Differentiable once.
    """
    reduction = _reduction(reduction)

    def with_torch():
        return TF.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
            options=options)

    if (not _all_tensors(input, linear_weight, target, linear_bias, weight)
            or input.dim() not in (1, 2) or linear_weight.dim() < 2
            or _integer_class_weight(weight, target)):
        return with_torch()  # arguments torch rejects: its error
    if linear_weight.dim() > 2:
        reason = "a K-dimensional linear_weight (out_features)"
    elif target.is_floating_point():
        reason = "class-probability targets (cecore's linear loss takes class indices)"
    else:
        reason = _fallback_reason((input, linear_weight, linear_bias), (target, weight))
    if reason is not None:
        _warn_fallback("linear_cross_entropy", reason)
        return with_torch()
    if not torch.is_autocast_enabled("cpu") and len(
            {t.dtype for t in (input, linear_weight, linear_bias) if t is not None}) > 1:
        # torch's products refuse mixed dtypes outside autocast; half operands computed in
        # float32 beside a float32 one went through, and every gradient came back in the
        # input's dtype (a float32 weight's gradient rounded to bfloat16)
        return with_torch()
    input, linear_weight, linear_bias, weight = _autocast(input, linear_weight, linear_bias,
                                                          weight)
    grad_mask = 0 if reduction == "none" else _grad_mask(input, linear_weight, linear_bias)
    ignore_index, label_smoothing, n_threads = _scalars(
        with_torch, -100 if ignore_index is None else ignore_index, label_smoothing, n_threads,
        backend)
    # before the schema reads True as 1
    chunk_size = V.check_int(chunk_size, "chunk_size", 1, allow_none=True)
    chunk_size = None if chunk_size is None else min(chunk_size, 2**31 - 1)  # (int64 schema)
    loss, *_ = _linear_ce_op(input, linear_weight, target, linear_bias, weight, ignore_index,
                             reduction, label_smoothing, grad_mask, chunk_size, backend,
                             n_threads)
    _disown_gradient(loss, _anchors(input, linear_weight, linear_bias))
    return loss


# -------------------------------------------------------------------------- modules
# torch.fx.symbolic_trace records calls of these functions, the modules' below included,
# as calls of cecore's: its proxies are not tensors, and the functions handed them to
# torch's, which put torch's loss in the graph without a warning.
for _name in ("cross_entropy", "nll_loss", "binary_cross_entropy_with_logits",
              "linear_cross_entropy"):
    torch.fx.wrap(_name)
del _name


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by :func:`cross_entropy`.

    The same constructor (``weight`` is a buffer, so ``.to()`` and ``state_dict`` work as
    in torch), plus keyword-only ``backend`` and ``n_threads``.
    """

    def __init__(self, *args, backend="auto", n_threads=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend
        self.n_threads = n_threads

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             backend=self.backend, n_threads=self.n_threads)


class NLLLoss(torch.nn.NLLLoss):
    """``torch.nn.NLLLoss`` computed by :func:`nll_loss`; plus ``backend`` and ``n_threads``."""

    def __init__(self, *args, backend="auto", n_threads=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend
        self.n_threads = n_threads

    def forward(self, input, target):
        return nll_loss(input, target, self.weight, ignore_index=self.ignore_index,
                        reduction=self.reduction, backend=self.backend, n_threads=self.n_threads)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss`` computed by :func:`binary_cross_entropy_with_logits`.

    Plus keyword-only ``backend`` and ``n_threads``.
    """

    def __init__(self, *args, backend="auto", n_threads=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend
        self.n_threads = n_threads

    def forward(self, input, target):
        return binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight,
            backend=self.backend, n_threads=self.n_threads)


class LinearCrossEntropyLoss(torch.nn.LinearCrossEntropyLoss):
    """``torch.nn.LinearCrossEntropyLoss`` computed by :func:`linear_cross_entropy`.

    The same constructor (the module owns ``self.linear``), plus keyword-only
    ``chunk_size``, ``backend`` and ``n_threads``.
    """

    def __init__(self, *args, chunk_size=None, backend="auto", n_threads=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.chunk_size = chunk_size
        self.backend = backend
        self.n_threads = n_threads

    def forward(self, input, target):
        # As torch's module: the Linear's (V * prod(out_features), D) weight viewed as
        # (V, *out_features, D).
        linear = self.linear
        linear_weight = linear.weight.reshape(
            (self.num_classes, *self.out_features, linear.in_features))
        linear_bias = (None if linear.bias is None
                       else linear.bias.reshape((self.num_classes, *self.out_features)))
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, options=self.options,
            chunk_size=self.chunk_size, backend=self.backend, n_threads=self.n_threads)
