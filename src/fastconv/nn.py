"""Layers over the functional API: modules that drop into plain NumPy code.

A module is called on an array (``y = layer(x)``), caches what its backward needs, and
``grad_x = layer.backward(grad_y)`` returns the gradient with respect to its input while
*accumulating* the gradients of its parameters into ``param.grad`` (as PyTorch's autograd does;
clear them with ``zero_grad()`` or the optimizer's).  Parameter names, layouts and default
initialisation follow PyTorch, so ``state_dict()`` keys (``'0.weight'``, ``'3.bias'``) and arrays
move between the two libraries unchanged.
"""
import functools
import itertools
import math
import threading
from collections import OrderedDict

import numpy as np

from . import _kernels
from . import functional as F

__all__ = [
    "Parameter", "Module", "Sequential", "Conv2d", "ConvTranspose2d", "MaxPool2d", "AvgPool2d",
    "Upsample", "Linear", "ReLU", "Flatten", "Dropout", "CrossEntropyLoss", "manual_seed",
    "no_grad", "is_grad_enabled",
]

_grad_mode = threading.local()


def is_grad_enabled():
    """False inside :class:`no_grad` (in this Python thread), else True."""
    return getattr(_grad_mode, "enabled", True)


class no_grad:
    """Context manager (or decorator) for inference, as ``torch.no_grad``: modules called
    inside it keep nothing for ``backward`` (which then raises), so a forward pass holds no
    activations, and ``Sequential`` runs Conv2d -> ReLU -> MaxPool2d as one kernel call that
    never stores the convolution's output.  The numbers are the same.  Per Python thread.

    Examples
    --------
    >>> import numpy as np, fastconv.nn as nn
    >>> layer = nn.Linear(4, 2, rng=0)
    >>> with nn.no_grad():
    ...     y = layer(np.ones((3, 4), np.float32))
    >>> y.shape, nn.is_grad_enabled()
    ((3, 2), True)
    """

    def __enter__(self):
        self._prev = is_grad_enabled()
        _grad_mode.enabled = False
        return self

    def __exit__(self, *exc):
        _grad_mode.enabled = self._prev
        return False

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with no_grad():
                return fn(*args, **kwargs)
        return wrapper

_default_rng = np.random.default_rng()


def manual_seed(seed):
    """Seed the generator that layers use for initialisation and dropout when given no ``rng``.

    Examples
    --------
    >>> import fastconv.nn as nn
    >>> nn.manual_seed(0); a = nn.Linear(2, 2).weight.data
    >>> nn.manual_seed(0); b = nn.Linear(2, 2).weight.data
    >>> bool((a == b).all())
    True
    """
    global _default_rng
    _default_rng = np.random.default_rng(seed)


def _rng(rng):
    if rng is None:
        return _default_rng
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _float_dtype(dtype, who):
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{who}: dtype must be float32 or float64, got {dt}")
    return dt


def _positive_int(value, name, who):
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{who}: {name} must be an int, got {value!r}")
    if int(value) < 1:
        raise ValueError(f"{who}: {name} must be >= 1, got {value}")
    return int(value)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class Parameter:
    """A trainable array: ``data`` (updated in place by optimizers) and its ``grad``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv.nn import Parameter
    >>> p = Parameter(np.zeros(3, np.float32))
    >>> p.shape, p.grad is None
    ((3,), True)
    """

    __slots__ = ("data", "grad")

    def __init__(self, data):
        self.data = np.ascontiguousarray(data)
        self.grad = None

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    def accumulate(self, g, *, fresh=False):
        """Add ``g`` to ``grad`` (creating it on first use).

        ``fresh=True``: ``g`` is a new array that nothing else refers to (a kernel's output,
        as the layers pass): on first use it becomes ``grad`` itself instead of a copy (a
        float64 LeNet-style training step at batch 1 spent 2.3 of its 5.2 ms copying fresh
        gradients and in the allocator's page faults and unmaps that the copies caused).
        """
        if self.grad is None:
            if (fresh and type(g) is np.ndarray and g.dtype == self.data.dtype
                    and g.shape == self.data.shape):
                self.grad = g
            else:
                self.grad = np.array(g, dtype=self.data.dtype, copy=True)
        else:
            self.grad += g

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


class Module:
    """Base class: ``__call__`` runs ``forward``; ``backward`` returns the input gradient.

    Sub-modules and parameters assigned as attributes are registered in assignment order,
    which fixes the names of ``named_parameters()`` and ``state_dict()``.

    Examples
    --------
    >>> import numpy as np, fastconv.nn as nn
    >>> class Scale(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.s = nn.Parameter(np.ones(1))
    ...     def forward(self, x):
    ...         self._x = x
    ...         return x * self.s.data
    ...     def backward(self, g):
    ...         self.s.accumulate(np.sum(g * self._x, keepdims=True).reshape(1))
    ...         return g * self.s.data
    >>> m = Scale(); y = m(np.arange(3.)); m.backward(np.ones(3))
    array([1., 1., 1.])
    >>> m.s.grad
    array([3.])
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if name in self._cache_attrs:       # what forward keeps: never a parameter or module
            object.__setattr__(self, name, value)
            return
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                                 "before assigning attributes")
        dropped = (self._parameters.pop(name, None) is not None
                   or self._modules.pop(name, None) is not None)
        if dropped or isinstance(value, (Parameter, Module)) or name in _PLAN_SETTINGS:
            # Sequential's inference plans are made again (what a user module records in its
            # forward leaves them alone)
            global _EPOCH
            _EPOCH = next(_EPOCHS)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    # ---- running
    # what forward keeps for backward: dropped under no_grad(); plain attributes (assigned
    # without the parameter / module registration)
    _cache_attrs = ()

    def __call__(self, x):
        # the call is a burst of kernel calls: the thread pool's idle workers keep spinning
        # between its layers instead of sleeping (waking one cost ~20 us per layer, more than
        # a small layer's work), and sleep once the outermost call returns
        _kernels.pool_burst(1)
        try:
            y = self.forward(x)
        finally:
            _kernels.pool_burst(-1)
        if self._cache_attrs and not is_grad_enabled():
            for a in self._cache_attrs:
                object.__setattr__(self, a, None)
        return y

    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def backward(self, grad_out):
        raise NotImplementedError(f"{type(self).__name__} does not define backward()")

    def _cached(self, attr):
        value = self.__dict__.get(attr)
        if value is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward(): "
                               "run the module on an input first (outside no_grad())")
        return value

    # ---- parameters
    def named_parameters(self, prefix=""):
        """Yield ``(name, Parameter)`` pairs, PyTorch's dotted names."""
        for name, p in self._parameters.items():
            yield prefix + name, p
        for mname, m in self._modules.items():
            yield from m.named_parameters(prefix + mname + ".")

    def parameters(self):
        """List of all parameters (this module's, then its sub-modules', in order)."""
        return [p for _, p in self.named_parameters()]

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(prefix + ("." if prefix else "") + name)

    def children(self):
        return list(self._modules.values())

    def zero_grad(self, set_to_none=True):
        """Clear parameter gradients (to None, as PyTorch 2, or to zeros)."""
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad.fill(0)

    def train(self, mode=True):
        """Set training mode (affects Dropout) here and in every sub-module; returns self."""
        for _, m in self.named_modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        """Evaluation mode: ``train(False)``."""
        return self.train(False)

    def to(self, dtype):
        """Convert every parameter to ``dtype`` (float32 or float64) in place; returns self."""
        dt = _float_dtype(dtype, f"{type(self).__name__}.to")
        for p in self.parameters():
            p.data = np.ascontiguousarray(p.data, dtype=dt)
            p.grad = None if p.grad is None else p.grad.astype(dt)
        return self

    def float(self):
        return self.to(np.float32)

    def double(self):
        return self.to(np.float64)

    # ---- state
    def state_dict(self):
        """``OrderedDict`` of name -> copy of each parameter array (PyTorch's keys)."""
        return OrderedDict((name, p.data.copy()) for name, p in self.named_parameters())

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays into the parameters (cast to their dtype).

        Values may be NumPy arrays or anything ``np.asarray`` takes, including PyTorch tensors
        (detached and moved to the CPU first).  With ``strict``, missing or unexpected keys are a
        ``KeyError``; a shape mismatch is always a ``ValueError``.
        """
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state_dict]
        unexpected = [k for k in state_dict if k not in params]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys "
                           f"{unexpected}")
        arrays = {}
        for name, p in params.items():
            if name not in state_dict:
                continue
            value = state_dict[name]
            if hasattr(value, "detach"):
                value = value.detach().cpu().numpy()
            value = np.asarray(value)
            if value.shape != p.data.shape:
                raise ValueError(f"load_state_dict: {name} has shape {value.shape}, the model "
                                 f"expects {p.data.shape}")
            try:
                arrays[name] = value.astype(p.data.dtype)
            except (TypeError, ValueError) as e:
                raise ValueError(f"load_state_dict: {name} (dtype {value.dtype}) cannot be "
                                 f"converted to {p.data.dtype}: {e}") from None
        for name, value in arrays.items():       # all checked and converted: now copy
            np.copyto(params[name].data, value)
        return self

    def save(self, path):
        """Save the parameters to an ``.npz`` file (keys as ``state_dict()``)."""
        with open(path, "wb") as f:        # exactly this path (np.savez would add .npz)
            np.savez(f, **self.state_dict())

    def load(self, path, strict=True):
        """Load parameters saved by :meth:`save`; returns self."""
        with np.load(path) as f:
            return self.load_state_dict({k: f[k] for k in f.files}, strict=strict)

    # ---- printing
    def extra_repr(self):
        return ""

    def __repr__(self):
        if not self._modules:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("]
        for name, m in self._modules.items():
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return "\n".join(lines) + "\n)"


class Sequential(Module):
    """Modules applied in order; sub-modules are named ``'0'``, ``'1'``, ... as PyTorch.

    Examples
    --------
    >>> import numpy as np, fastconv.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 3, rng=0), nn.ReLU(), nn.Linear(3, 2, rng=1))
    >>> list(model.state_dict())
    ['0.weight', '0.bias', '2.weight', '2.bias']
    >>> model(np.ones((5, 4), np.float32)).shape
    (5, 2)
    """

    _cache_attrs = ("_pooled",)

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            items = modules[0].items()
        else:
            items = ((str(i), m) for i, m in enumerate(modules))
        for name, m in items:
            if not isinstance(m, Module):
                raise TypeError(f"Sequential: item {name} is a {type(m).__name__}, not a Module")
            setattr(self, name, m)

    def append(self, module):
        if not isinstance(module, Module):
            raise TypeError(f"Sequential.append: expected a Module, got {type(module).__name__}")
        setattr(self, str(len(self._modules)), module)
        return self

    def __getitem__(self, i):
        mods = list(self._modules.values())
        if isinstance(i, slice):   # keeps the original names, as PyTorch
            return Sequential(OrderedDict(list(self._modules.items())[i]))
        return mods[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        grad = is_grad_enabled()
        if grad:
            self.__dict__.pop("_plans", None)   # (a plan's run would leave these caches)
        elif type(x) is np.ndarray and x.dtype in F._FLOATS:
            knobs = F._knobs()
            key = (x.shape, x.dtype, _EPOCH, knobs, _kernels.gemm_level())
            plans = self.__dict__.get("_plans")
            if plans is None:
                plans = {}
                object.__setattr__(self, "_plans", plans)
            steps = plans.get(key)
            if steps is None:
                if len(plans) >= 8:
                    plans.clear()
                steps = []
                x = self._run(x, False, steps)
                plans[key] = steps              # (complete: other threads may use it now)
                return x
            if knobs[0] > 1:
                # the pool's workers wake while the first step's Python runs, not in its
                # kernel call (batch-1 LeNet-style model on 2 threads: -6 us)
                _kernels.pool_wake(knobs[0])
            for step in steps:
                x = step(x)
            return x
        return self._run(x, grad)

    def _run(self, x, grad, steps=None):
        """The modules in order, Conv2d [-> ReLU] [-> MaxPool2d] in one kernel call; under
        no_grad() with ``steps`` (a list), also the inference plan of this input: one step per
        part (see _plan_step), appended as each part runs."""
        mods = list(self._modules.values())
        self._pooled = {}
        i = 0
        while i < len(mods):
            x0, j = x, i
            x, i, relu, pool = self._part(mods, i, x, grad)
            if steps is not None:
                steps.append(_plan_step(self, mods, j, i, relu, pool, x0, x, steps))
        return x

    def _part(self, mods, i, x, grad):
        """Run the part of the model that begins at mods[i]: (its output, the index after it,
        relu, pool), relu / pool what a Conv2d part fused, else None."""
        m = mods[i]
        own = "forward" not in m.__dict__      # (a forward set on the instance runs as given)
        if type(m) is Conv2d and own and i + 1 < len(mods):
            relu = type(mods[i + 1]) is ReLU
            j = i + 2 if relu else i + 1
            pool = (_tiling_pool(mods[j]) if j < len(mods) and type(mods[j]) is MaxPool2d
                    else None)
            if pool is not None:
                # Conv2d [-> ReLU] -> MaxPool2d in one kernel call: each block of the
                # convolution's output is pooled while it is in cache; under no_grad() that
                # output is never stored.  The ReLU and the max-pool keep for their backward
                # what they would have kept, as if they had run.
                y, x = m._forward(x, relu=relu, pool=pool, keep=grad)
                mods[j]._x = y                  # None under no_grad()
                if relu:
                    mods[i + 1]._y = y
                    if grad:
                        self._pooled[j] = x     # for ReLU's backward on the pooled values
                return x, j + 1, relu, pool
            if relu:
                # Conv2d -> ReLU in one kernel call: the ReLU is applied to each block of the
                # convolution's output while it is in cache, and no second array is made; the
                # ReLU layer keeps that output for its backward, as if it had run
                x = m._forward(x, relu=True)
                mods[i + 1]._y = x if grad else None
                return x, i + 2, True, None
        if type(m) is Linear and own and i + 1 < len(mods) and type(mods[i + 1]) is ReLU:
            # Linear -> ReLU in one kernel call (as Conv2d -> ReLU)
            x = m._forward(x, relu=True)
            mods[i + 1]._y = x if grad else None
            return x, i + 2, True, None
        x = m(x)
        if grad and i > 0 and type(m) is MaxPool2d and type(mods[i - 1]) is ReLU:
            self._pooled[i] = x     # for ReLU's backward on the pooled values
        return x, i + 1, None, None

    def __getstate__(self):     # (copies and pickles make their own plans)
        state = self.__dict__.copy()
        state.pop("_plans", None)
        return state

    def backward(self, grad_out, *, need_input_grad=True):
        """Backward through every module in reverse order.

        With ``need_input_grad=False`` (a trainer that has no use for the gradient of the
        model's input) the first module is asked not to compute it, when it supports that;
        None is then returned.
        """
        mods = list(self._modules.values())
        pooled = self.__dict__.get("_pooled") or {}
        i = len(mods) - 1
        while i >= 0:
            m = mods[i]
            if i == 0 and not need_input_grad and getattr(m, "_skips_input_grad", False):
                return m.backward(grad_out, need_input_grad=False)
            if i in pooled and np.shape(grad_out) == pooled[i].shape:
                # ReLU -> MaxPool2d: the max-pool's gradient lands only on its windows' maxima,
                # which are its outputs, so ReLU's mask (zero where the value <= 0) is applied
                # to grad_out on the pooled values first, a quarter of the pass (2x2) and the
                # same numbers; ReLU's own backward is then skipped.  (A grad_out of another
                # shape goes the unfused way, to the max-pool's own error.)
                grad_out = m.backward(_relu_grad(pooled[i], grad_out))
                i -= 2
                continue
            grad_out = m.backward(grad_out)
            i -= 1
        return grad_out

    _skips_input_grad = True


def _tiling_pool(mp):
    """(kH, kW) when the MaxPool2d's windows tile its input (stride = kernel, no padding or
    dilation, floor mode): the pooling that Conv2d's kernel call can fuse; else None (then
    also for arguments the max-pool itself would reject)."""
    try:
        k = F._pair(mp.kernel_size, "kernel_size", "MaxPool2d", 1)
        s = k if mp.stride is None else F._pair(mp.stride, "stride", "MaxPool2d", 1)
        p = F._pair(mp.padding, "padding", "MaxPool2d", 0)
        d = F._pair(mp.dilation, "dilation", "MaxPool2d", 1)
    except (TypeError, ValueError):
        return None
    if s != k or p != (0, 0) or d != (1, 1) or mp.ceil_mode:
        return None
    return k


# Sequential's inference plans (no_grad()): per input shape and dtype, one step per part of
# the model; a step of a part that fastconv knows calls its kernel with the checks and choices
# made when the plan was (LeNet-style model at batch 1, float32, each call after one of ONNX
# Runtime's, us, 1 / 2 threads: 341 / 282 -> 287 / 214, ONNX Runtime 261 / 222; 2026-12-04,
# Xeon).  Plans hold no arrays:
# each step reads its parameters' arrays when it runs and, when they or its input are not what
# the plan was made for, runs its part the usual way.  Any module attribute set (a layer's
# settings, parameters or sub-modules) makes every plan anew (_EPOCH); so does a change of
# the functional API's settings (F._knobs) or GEMM level, which are in the plan's key.  Other
# attributes, which no planned part reads, do not (a user module may record things in its
# forward).  Parts whose settings are mutable (a list) and modules with their own forward set
# on the instance are not planned.
_EPOCHS = itertools.count(1)
_EPOCH = 0
_PLAN_SETTINGS = frozenset((
    "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
    "ceil_mode", "in_features", "out_features", "start_dim", "end_dim", "bias", "weight",
    "training", "forward"))


def _plan_step(seq, mods, i, j, relu, pool, x, y, steps):
    """The step for mods[i:j] (relu, pool: what Sequential._part fused), made after the part
    ran on x giving y: a function of the part's input."""
    def slow(z):
        return seq._part(mods, i, z, False)[0]

    m = mods[i]
    fresh = bool(steps) and getattr(steps[-1], "fresh", False)  # x is the plan's own array
    step = slow
    if (type(x) is not np.ndarray or type(y) is not np.ndarray or x.dtype != y.dtype
            or any("forward" in p.__dict__ for p in mods[i:j])
            or (pool is not None and any(type(getattr(mods[j - 1], a)) is list
                                         for a in ("kernel_size", "stride", "padding",
                                                   "dilation")))):
        return step
    if type(m) is Conv2d:
        step = _conv_step(m, relu, pool, x, slow)
    elif type(m) is Linear:
        step = _linear_step(m, relu, x, slow)
    elif type(m) is ReLU and fresh and x.dtype in F._FLOATS and x.flags.c_contiguous:
        step = _relu_step(x, slow)
    elif type(m) is Flatten:
        step = _flatten_step(x, y, slow)
        step.fresh = fresh
    return step


def _conv_step(m, relu, pool, x, slow):
    w, b = m.weight.data, None if m.bias is None else m.bias.data
    kw = m._kw()
    keep = pool is None
    key = F._plan_key(x, w, b, kw["stride"], kw["padding"], kw["dilation"], kw["groups"], None,
                      pool, keep)
    plan = F._PLANS.get(key) if key is not None else None
    if plan is None or plan.dt != x.dtype or x.size == 0 or plan.N == 0:
        return slow
    if type(plan) is F._WinoPlan:
        return _wino_step(m, relu, plan, x, w, b, slow)
    # (the kernel on the arrays' pointers, nothing between the checks and it: see ConvStep)
    return _kernels.ConvStep(m, slow, plan, x.shape, w.shape, None if b is None else b.shape,
                             bool(relu), F._scratch, np.empty, np.ndarray)


def _wino_step(m, relu, plan, x, w, b, slow):
    """_kernels.WinoStep for a conv2d plan by Winograd (F._WinoPlan), else slow."""
    if _kernels.gemm_level() == "blas" or w.dtype != plan.dt or (b is not None
                                                                 and b.dtype != plan.dt):
        return slow
    dt, N, L, OH, OW, g, r = plan.dt, plan.N, plan.L, plan.OH, plan.OW, plan.g, w.shape[2]

    def weights(wc):
        return F._wino_weights(wc, g, dt, "conv2d", 0 < N <= F._WINO_CACHE_MAX_N)

    return _kernels.WinoStep(m, slow, dt, x.shape, w.shape, None if b is None else b.shape, g,
                             plan.pT, plan.pL, OH, OW, bool(relu), plan.pool is not None,
                             plan.team, F._blocks_team(N * L * OH * OW),
                             F._wino_cols(r, w.shape[1], L // g, OH, OW, dt, plan.pool is None),
                             F._scratch, weights, F._wino_kept, np.empty, np.ndarray)


def _linear_step(m, relu, x, slow):
    w, b = m.weight.data, None if m.bias is None else m.bias.data
    dt, I, O = w.dtype, m.in_features, m.out_features
    if (x.dtype != dt or x.ndim < 1 or x.shape[-1] != I or I == 0 or w.shape != (O, I)
            or _kernels.gemm_level() == "blas"):
        return slow
    team, path = F._linear_plan(math.prod(x.shape[:-1]), I, O)
    return _kernels.LinearStep(m, slow, dt, x.shape, w.shape, None if b is None else b.shape,
                               x.shape[:-1] + (O,), bool(relu), team, path, np.empty,
                               np.ndarray)


def _relu_step(x, slow):
    shape, dt, team = x.shape, x.dtype, F._blocks_team(x.size)

    def step(z):    # in place: z is the previous step's new array
        if type(z) is not np.ndarray or z.shape != shape or z.dtype != dt:
            return slow(z)
        _kernels.relu_inplace(z.reshape(-1), team)
        return z

    step.fresh = True
    return step


def _flatten_step(x, y, slow):
    shape, oshape = x.shape, y.shape

    def step(z):
        if type(z) is not np.ndarray or z.shape != shape:
            return slow(z)
        return z.reshape(oshape)

    return step


def _check_channels(who, x, expected, what="channels"):
    x = np.asarray(x) if not isinstance(x, np.ndarray) else x
    if x.ndim != 4:
        raise ValueError(f"{who}: expected a 4-D input (N, C, H, W), got shape {x.shape}")
    if x.shape[1] != expected:
        raise ValueError(f"{who}: expected input with {expected} {what}, got shape {x.shape}")
    return x


def _check_dtype(who, x, dtype):
    if x.dtype.kind == "f" and x.dtype != dtype:
        raise TypeError(f"{who}: input dtype {x.dtype} differs from the parameters' {dtype}; "
                        "convert one of them (e.g. model.to(np.float64))")


class _ConvNd(Module):
    _cache_attrs = ("_x",)

    def _init_params(self, wshape, fan_in, bias, dtype, rng):
        bound = 1.0 / math.sqrt(fan_in)   # kaiming_uniform_(a=sqrt(5)) as in PyTorch
        self.weight = Parameter(rng.uniform(-bound, bound, wshape).astype(dtype))
        self.bias = Parameter(rng.uniform(-bound, bound, wshape[0] if not self._transposed
                                          else self.out_channels).astype(dtype)) \
            if bias else None

    def _common(self, in_channels, out_channels, kernel_size, groups, dtype):
        who = type(self).__name__
        self.in_channels = _positive_int(in_channels, "in_channels", who)
        self.out_channels = _positive_int(out_channels, "out_channels", who)
        self.groups = _positive_int(groups, "groups", who)
        self.kernel_size = F._pair(kernel_size, "kernel_size", who, 1)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"{who}: in_channels={in_channels} and out_channels={out_channels} "
                             f"must be divisible by groups={groups}")
        return _float_dtype(dtype, who)

    _skips_input_grad = True

    def forward(self, x):
        return self._forward(x)

    def _forward(self, x, relu=False, pool=None, keep=True):
        name = type(self).__name__
        x = _check_channels(f"{name}({self.in_channels}, {self.out_channels})", x,
                            self.in_channels)
        _check_dtype(name, x, self.weight.dtype)
        self._x = x if is_grad_enabled() else None
        b = None if self.bias is None else self.bias.data
        if relu or pool is not None:
            # Conv2d only (Sequential): max(conv, 0) and / or a tiling max-pool fused into
            # the kernel call (see F._conv2d)
            kw = self._kw()
            return F._conv2d(x, self.weight.data, b, kw["stride"], kw["padding"],
                             kw["dilation"], kw["groups"], None, relu, pool, keep)
        return self._forward_fn(x, self.weight.data, b, **self._kw())

    def backward(self, grad_out, *, need_input_grad=True):
        x = self._cached("_x")
        gx, gw, gb = self._backward_fn(grad_out, x, self.weight.data, **self._kw(),
                                       output_mask=(bool(need_input_grad), True,
                                                    self.bias is not None))
        self.weight.accumulate(gw, fresh=True)
        if self.bias is not None:
            self.bias.accumulate(gb, fresh=True)
        return gx

    def extra_repr(self):
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, " \
            f"stride={_pair(self.stride)}"
        if self.padding not in (0, (0, 0)):
            s += f", padding={self.padding if isinstance(self.padding, str) else _pair(self.padding)}"
        if getattr(self, "output_padding", 0) not in (0, (0, 0)):
            s += f", output_padding={_pair(self.output_padding)}"
        if self.dilation not in (1, (1, 1)):
            s += f", dilation={_pair(self.dilation)}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class Conv2d(_ConvNd):
    """2-D convolution layer, as ``torch.nn.Conv2d`` (see :func:`fastconv.conv2d`).

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, dilation : int or (int, int)
    padding : int, (int, int), 'valid' or 'same'
    groups : int
    bias : bool
    dtype : float32 or float64
    rng : numpy.random.Generator or int, optional
        Source of the initial weights (Kaiming-uniform with a=sqrt(5), bias uniform in
        +-1/sqrt(fan_in), as PyTorch); the generator of :func:`manual_seed` by default.

    Attributes
    ----------
    weight : Parameter of shape (out_channels, in_channels / groups, kH, kW)
    bias : Parameter of shape (out_channels,) or None

    Examples
    --------
    >>> import numpy as np, fastconv.nn as nn
    >>> conv = nn.Conv2d(3, 8, 3, padding=1, rng=0)
    >>> y = conv(np.zeros((2, 3, 5, 5), np.float32)); y.shape
    (2, 8, 5, 5)
    >>> conv.backward(np.ones_like(y)).shape, conv.weight.grad.shape
    ((2, 3, 5, 5), (8, 3, 3, 3))
    """

    _transposed = False
    _forward_fn = staticmethod(F.conv2d)
    _backward_fn = staticmethod(F.conv2d_backward)

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, dtype=np.float32, rng=None):
        super().__init__()
        dt = self._common(in_channels, out_channels, kernel_size, groups, dtype)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        kH, kW = self.kernel_size
        cin_g = self.in_channels // self.groups
        _check_conv_args("Conv2d", (self.out_channels, cin_g, kH, kW), stride, padding,
                         dilation, self.groups)
        self._init_params((self.out_channels, cin_g, kH, kW), cin_g * kH * kW, bias, dt,
                          _rng(rng))
        self._x = None

    def _kw(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)



class ConvTranspose2d(_ConvNd):
    """2-D transposed convolution layer, as ``torch.nn.ConvTranspose2d``.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, padding, output_padding, dilation : int or (int, int)
    groups : int
    bias : bool
    dtype : float32 or float64
    rng : numpy.random.Generator or int, optional

    Attributes
    ----------
    weight : Parameter of shape (in_channels, out_channels / groups, kH, kW)
    bias : Parameter of shape (out_channels,) or None

    Examples
    --------
    >>> import numpy as np, fastconv.nn as nn
    >>> up = nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1, rng=0)
    >>> up(np.zeros((1, 4, 8, 8), np.float32)).shape
    (1, 2, 16, 16)
    """

    _transposed = True
    _forward_fn = staticmethod(F.conv_transpose2d)
    _backward_fn = staticmethod(F.conv_transpose2d_backward)

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 output_padding=0, groups=1, bias=True, dilation=1, dtype=np.float32, rng=None):
        super().__init__()
        dt = self._common(in_channels, out_channels, kernel_size, groups, dtype)
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        self.dilation = dilation
        kH, kW = self.kernel_size
        cout_g = self.out_channels // self.groups
        _check_conv_args("ConvTranspose2d", (self.in_channels, cout_g, kH, kW), stride,
                         padding, dilation, self.groups, True, output_padding)
        # PyTorch's fan_in for a transposed weight (in, out/groups, kH, kW) is out/groups*kH*kW
        self._init_params((self.in_channels, cout_g, kH, kW), cout_g * kH * kW, bias, dt,
                          _rng(rng))
        self._x = None

    def _kw(self):
        return dict(stride=self.stride, padding=self.padding,
                    output_padding=self.output_padding, groups=self.groups,
                    dilation=self.dilation)



class _Shape:
    """Stand-in for an array when only ``shape``/``ndim`` are needed (argument checks)."""

    def __init__(self, shape):
        self.shape, self.ndim = tuple(shape), len(shape)


def _check_conv_args(who, wshape, stride, padding, dilation, groups, transposed=False,
                     output_padding=0):
    """Validate a layer's stride/padding/dilation/output_padding at construction, on the
    smallest input they accept, so that a bad argument fails here and not at the first call."""
    d = F._pair(dilation, "dilation", who, 1)
    p = (0, 0) if isinstance(padding, str) else F._pair(padding, "padding", who, 0)
    size = tuple(d[i] * (wshape[2 + i] - 1) + 1 + 2 * p[i] for i in range(2))
    cin = wshape[0] if transposed else wshape[1] * groups
    F._conv_setup(who, _Shape((1, cin) + size), _Shape(wshape), stride, padding, dilation,
                  groups, transposed, output_padding)


class MaxPool2d(Module):
    """Max pooling layer, as ``torch.nn.MaxPool2d`` (see :func:`fastconv.max_pool2d`).

    Examples
    --------
    >>> import numpy as np, fastconv.nn as nn
    >>> nn.MaxPool2d(2)(np.arange(16.).reshape(1, 1, 4, 4))[0, 0]
    array([[ 5.,  7.],
           [13., 15.]])
    """

    _cache_attrs = ("_x",)

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.ceil_mode = dilation, ceil_mode
        self._x = None

    def _kw(self):
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                    dilation=self.dilation, ceil_mode=self.ceil_mode)

    def forward(self, x):
        self._x = x
        return F.max_pool2d(x, **self._kw())

    def backward(self, grad_out):
        return F.max_pool2d_backward(grad_out, self._cached("_x"), **self._kw())

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride or self.kernel_size}, " \
               f"padding={self.padding}, dilation={self.dilation}, ceil_mode={self.ceil_mode}"


class AvgPool2d(Module):
    """Average pooling layer, as ``torch.nn.AvgPool2d`` (see :func:`fastconv.avg_pool2d`).

    Examples
    --------
    >>> import numpy as np, fastconv.nn as nn
    >>> nn.AvgPool2d(2)(np.arange(16.).reshape(1, 1, 4, 4))[0, 0]
    array([[ 2.5,  4.5],
           [10.5, 12.5]])
    """

    _cache_attrs = ("_x",)

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad
        self.divisor_override = divisor_override
        self._x = None

    def _kw(self):
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                    ceil_mode=self.ceil_mode, count_include_pad=self.count_include_pad,
                    divisor_override=self.divisor_override)

    def forward(self, x):
        self._x = x
        return F.avg_pool2d(x, **self._kw())

    def backward(self, grad_out):
        return F.avg_pool2d_backward(grad_out, self._cached("_x"), **self._kw())

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride or self.kernel_size}, " \
               f"padding={self.padding}"


class Upsample(Module):
    """Nearest upsampling by integer factors, as ``torch.nn.Upsample(mode='nearest')``.

    Examples
    --------
    >>> import numpy as np, fastconv.nn as nn
    >>> nn.Upsample(scale_factor=2)(np.ones((1, 1, 2, 3))).shape
    (1, 1, 4, 6)
    """

    _cache_attrs = ("_ran",)

    def __init__(self, scale_factor, mode="nearest"):
        super().__init__()
        if mode != "nearest":
            raise ValueError(f"Upsample: only mode='nearest' is supported, got {mode!r}")
        F._scale(scale_factor, "Upsample")
        self.scale_factor, self.mode = scale_factor, mode
        self._ran = False

    def forward(self, x):
        self._ran = True
        return F.upsample_nearest2d(x, self.scale_factor)

    def backward(self, grad_out):
        if not self._ran:
            self._cached("_never")
        return F.upsample_nearest2d_backward(grad_out, self.scale_factor)

    def extra_repr(self):
        return f"scale_factor={self.scale_factor}, mode={self.mode!r}"


class Linear(Module):
    """Fully connected layer ``y = x @ weight.T + bias``, as ``torch.nn.Linear``.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
    dtype : float32 or float64
    rng : numpy.random.Generator or int, optional

    Attributes
    ----------
    weight : Parameter of shape (out_features, in_features)
    bias : Parameter of shape (out_features,) or None

    Examples
    --------
    >>> import numpy as np, fastconv.nn as nn
    >>> fc1 = nn.Linear(4, 2, rng=0)
    >>> fc1(np.ones((3, 4), np.float32)).shape
    (3, 2)
    """

    _cache_attrs = ("_x",)

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32, rng=None):
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features", "Linear")
        self.out_features = _positive_int(out_features, "out_features", "Linear")
        dt = _float_dtype(dtype, "Linear")
        g = _rng(rng)
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight = Parameter(g.uniform(-bound, bound, (self.out_features,
                                                          self.in_features)).astype(dt))
        self.bias = Parameter(g.uniform(-bound, bound, self.out_features).astype(dt)) \
            if bias else None
        self._x = None

    def forward(self, x):
        return self._forward(x)

    def _forward(self, x, relu=False):
        x = np.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"Linear({self.in_features}, {self.out_features}): expected input "
                             f"with {self.in_features} features in the last dimension, got "
                             f"shape {x.shape}")
        if x.dtype.kind not in "fiub":
            raise TypeError(f"Linear: input must be a real array, got dtype {x.dtype}")
        _check_dtype("Linear", x, self.weight.dtype)
        x = x.astype(self.weight.dtype, copy=False)
        self._x = x if is_grad_enabled() else None
        y = F._linear(x.reshape(-1, self.in_features), self.weight.data,
                      None if self.bias is None else self.bias.data, relu)
        return y.reshape(x.shape[:-1] + (self.out_features,))

    _skips_input_grad = True

    def backward(self, grad_out, *, need_input_grad=True):
        x = self._cached("_x")
        g = np.asarray(grad_out, dtype=self.weight.dtype)
        if g.shape != x.shape[:-1] + (self.out_features,):
            raise ValueError(f"Linear.backward: grad_out must have shape "
                             f"{x.shape[:-1] + (self.out_features,)}, got {g.shape}")
        g2, x2 = g.reshape(-1, self.out_features), x.reshape(-1, self.in_features)
        gx, gw = F._linear_backward(g2, x2, self.weight.data, True, need_input_grad)
        self.weight.accumulate(gw, fresh=True)
        if self.bias is not None:
            self.bias.accumulate(g2.sum(axis=0), fresh=True)
        return gx.reshape(x.shape) if need_input_grad else None

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


class ReLU(Module):
    """``max(x, 0)`` elementwise (NaN propagates), as ``torch.nn.ReLU``.

    Examples
    --------
    >>> import numpy as np, fastconv.nn as nn
    >>> r = nn.ReLU(); r(np.array([-1., 2.])), r.backward(np.array([5., 5.]))
    (array([0., 2.]), array([0., 5.]))
    """

    _cache_attrs = ("_y",)

    def __init__(self):
        super().__init__()
        self._y = None

    def forward(self, x):
        x = np.asarray(x)
        if x.dtype in (np.float32, np.float64) and x.size >= 4096:
            # one pass (np.maximum: 14 us on 25088 float32 values, this 5 us; below ~4096
            # values the call's set-up costs more than numpy's whole loop)
            y = np.empty(x.shape, x.dtype)
            F._kernels.relu_forward(np.ascontiguousarray(x).reshape(-1), y.reshape(-1),
                                    F._blocks_team(x.size))
        else:
            y = np.maximum(x, 0, dtype=x.dtype if x.dtype.kind == "f" else None)
        self._y = y
        return y

    def backward(self, grad_out):
        return _relu_grad(self._cached("_y"), grad_out)


def _relu_grad(y, grad_out):
    """ReLU's backward given its output y: grad_out where y > 0 (or NaN), else 0."""
    g = np.asarray(grad_out)
    if (g.shape == y.shape and g.dtype == y.dtype and g.dtype in (np.float32, np.float64)
            and g.size > 0):
        # one pass, no temporaries (a vectorised select in the kernels)
        out = np.empty(y.shape, y.dtype)
        F._kernels.relu_backward(np.ascontiguousarray(y).reshape(-1),
                                 np.ascontiguousarray(g).reshape(-1), out.reshape(-1),
                                 F._blocks_team(y.size))
        return out
    return np.where(y <= 0, g.dtype.type(0), g)   # as threshold_backward: NaN passes


class Flatten(Module):
    """Flatten dimensions ``start_dim..end_dim`` (default: all but the batch), as PyTorch.

    Examples
    --------
    >>> import numpy as np, fastconv.nn as nn
    >>> nn.Flatten()(np.zeros((2, 3, 4, 5))).shape
    (2, 60)
    """

    _cache_attrs = ("_shape",)

    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim
        self._shape = None

    def forward(self, x):
        x = np.asarray(x)
        nd = max(x.ndim, 1)
        s, e = self.start_dim, self.end_dim
        if not (-nd <= s < nd and -nd <= e < nd):
            raise ValueError(f"Flatten(start_dim={s}, end_dim={e}): dimension out of range "
                             f"for an input of shape {x.shape}")
        s, e = s % nd, e % nd
        if s > e:
            raise ValueError(f"Flatten: start_dim={self.start_dim} comes after "
                             f"end_dim={self.end_dim} for an input of shape {x.shape}")
        self._shape = x.shape
        if x.ndim == 0:
            return x.reshape(1)
        new = x.shape[:s] + (math.prod(x.shape[s:e + 1]),) + x.shape[e + 1:]
        return x.reshape(new)

    def backward(self, grad_out):
        return np.asarray(grad_out).reshape(self._cached("_shape"))


class Dropout(Module):
    """Zero each element with probability ``p`` in training, scaling the rest by 1/(1-p).

    Identity in evaluation mode, as ``torch.nn.Dropout``.

    Examples
    --------
    >>> import numpy as np, fastconv.nn as nn
    >>> d = nn.Dropout(0.5, rng=0).eval()
    >>> d(np.ones(3))
    array([1., 1., 1.])
    """

    _cache_attrs = ("_mask",)

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = float(p)
        self._rng = _rng(rng) if rng is not None else None
        self._mask = None

    def forward(self, x):
        x = np.asarray(x)
        if not self.training or self.p == 0.0:
            self._mask = 1.0
            return x
        rng = self._rng if self._rng is not None else _default_rng
        keep = rng.random(x.shape) >= self.p
        scale = 0.0 if self.p == 1.0 else 1.0 / (1.0 - self.p)
        dt = x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)
        self._mask = keep.astype(dt) * dt.type(scale)
        return x * self._mask

    def backward(self, grad_out):
        return grad_out * self._cached("_mask")

    def extra_repr(self):
        return f"p={self.p}"


class CrossEntropyLoss:
    """Cross-entropy from logits, as ``torch.nn.CrossEntropyLoss``.

    ``loss = loss_fn(logits, target)``, then ``grad_logits = loss_fn.backward()``.

    Parameters
    ----------
    weight : ndarray of shape (C,), optional
    reduction : {'mean', 'sum', 'none'}
    label_smoothing : float
    ignore_index : int

    Examples
    --------
    >>> import numpy as np, fastconv.nn as nn
    >>> loss_fn = nn.CrossEntropyLoss()
    >>> float(loss_fn(np.zeros((2, 4)), np.array([1, 3]))) == float(np.log(4))
    True
    >>> loss_fn.backward()
    array([[ 0.125, -0.375,  0.125,  0.125],
           [ 0.125,  0.125,  0.125, -0.375]])
    """

    def __init__(self, weight=None, reduction="mean", label_smoothing=0.0, ignore_index=-100):
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"CrossEntropyLoss: reduction must be 'mean', 'sum' or 'none', "
                             f"got {reduction!r}")
        self.weight = None if weight is None else np.asarray(weight)
        self.reduction, self.label_smoothing = reduction, label_smoothing
        self.ignore_index = ignore_index
        self._saved = None

    def _kw(self):
        return dict(weight=self.weight, reduction=self.reduction,
                    label_smoothing=self.label_smoothing, ignore_index=self.ignore_index)

    def __call__(self, logits, target):
        loss = F.cross_entropy(logits, target, **self._kw())
        self._saved = (logits, target)
        return loss

    forward = __call__

    def backward(self, grad_output=None):
        if self._saved is None:
            raise RuntimeError("CrossEntropyLoss.backward() called before computing a loss")
        logits, target = self._saved
        return F.cross_entropy_backward(logits, target, grad_output=grad_output, **self._kw())

    def __repr__(self):
        return f"CrossEntropyLoss(reduction={self.reduction!r})"
