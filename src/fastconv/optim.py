"""Optimizers over NumPy parameters with PyTorch's update rules (``torch.optim``).

A parameter is any object with a ``.data`` attribute holding a floating ndarray and a ``.grad``
attribute holding an array of the same shape, or ``None`` (such a parameter is skipped by
:meth:`Optimizer.step`, as in PyTorch).  ``step()`` updates ``.data`` **in place**, so every
layer holding the same array sees the new values, and never writes to ``.grad``.  Arithmetic is
done in the parameter's dtype: float32 parameters and their optimizer state stay float32.

:class:`SGD` and :class:`Adam` follow PyTorch's single-tensor (``foreach=False``) algorithms
operation for operation, so that in float64 they agree with ``torch.optim`` to rounding.
Parameter groups, ``zero_grad``, ``state_dict`` and ``load_state_dict`` follow
:class:`torch.optim.Optimizer`; the state dict uses PyTorch's key names.
"""
from collections.abc import Mapping

import numpy as np

from . import _kernels
from .functional import _FLOATS, _blocks_team

__all__ = ["Optimizer", "SGD", "Adam"]


def _sub_scaled(d, g, a):
    """d -= g * a (g * a rounded to d's dtype first, as numpy's multiply then subtract) in
    one pass without a temporary when both are C-contiguous arrays of one float dtype that
    do not overlap: a float64 LeNet-style training step at batch 1 spent 1.9 ms of its 4.9
    in page faults on a fresh 3.2 MB temporary and the fc1 gradient that followed it."""
    if (type(d) is np.ndarray and type(g) is np.ndarray and d.dtype == g.dtype
            and d.dtype in _FLOATS and d.shape == g.shape and d.flags.c_contiguous
            and g.flags.c_contiguous and d.flags.writeable and d.size
            and not np.may_share_memory(d, g)):
        _kernels.sub_scaled(d.reshape(-1), g.reshape(-1), a, _blocks_team(d.size))
        return
    t = np.empty_like(d)
    np.multiply(g, a, out=t)
    d -= t


def _as_float(value, name, where):
    """A hyperparameter as a Python float (weak in NumPy's promotion, so a float32 parameter
    is updated in float32 arithmetic)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: {name} must be a real number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: {name} must be a real number, got {value!r} "
                        f"({type(value).__name__})") from None


def _nonnegative(group, name, where):
    v = _as_float(group[name], name, where)
    if not v >= 0.0:  # also rejects NaN
        raise ValueError(f"{where}: {name} must be >= 0, got {group[name]!r}")
    group[name] = v


class _ParamState(Mapping):
    """``optimizer.state[param]`` -> that parameter's state dict (keyed by identity, since
    parameter objects need not be hashable)."""

    def __init__(self, opt):
        self._opt = opt

    def __getitem__(self, param):
        key = id(param)
        if self._opt._params.get(key) is not param:
            raise KeyError("not a parameter of this optimizer")
        return self._opt._state.setdefault(key, {})

    def __contains__(self, param):
        return bool(self._opt._state.get(id(param))) and \
            self._opt._params.get(id(param)) is param

    def __iter__(self):
        return (self._opt._params[k] for k, st in list(self._opt._state.items()) if st)

    def __len__(self):
        return sum(1 for st in self._opt._state.values() if st)

    def __repr__(self):
        return f"<optimizer state of {len(self)} parameters>"


class Optimizer:
    """Base class of the optimizers, as :class:`torch.optim.Optimizer`.

    Holds the parameter groups and the per-parameter state, and implements ``zero_grad``,
    ``state_dict`` and ``load_state_dict``.  A subclass defines ``_check_group(group, where)``
    (validate and normalise one group's options, raising ``ValueError``) and
    ``_update(group, items)`` (apply one step to the ``(data, grad, state)`` triples of a
    group's parameters that have a gradient).

    Parameters
    ----------
    params : iterable of parameters, or iterable of dicts
        Objects with ``.data`` (floating ndarray) and ``.grad`` (ndarray of the same shape, or
        None); or parameter groups ``{'params': [...], 'lr': ..., ...}`` whose options override
        ``defaults`` for their parameters.
    defaults : dict
        Default value of every option.

    Attributes
    ----------
    param_groups : list of dict
        One dict per group with every option and ``'params'``, the list of parameter objects.
        Options may be changed between steps (a learning-rate schedule sets ``group['lr']``).
    state : mapping
        ``state[param]`` is the state dict of ``param`` (e.g. ``'momentum_buffer'``).
    defaults : dict

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> from fastconv.optim import Optimizer
    >>> class SignDescent(Optimizer):
    ...     def __init__(self, params, lr=0.1):
    ...         super().__init__(params, dict(lr=lr))
    ...     def _check_group(self, group, where):
    ...         group["lr"] = float(group["lr"])
    ...     def _update(self, group, items):
    ...         for data, grad, state in items:
    ...             data -= group["lr"] * np.sign(grad)
    >>> w = SimpleNamespace(data=np.array([1.0, -1.0]), grad=np.array([3.0, -0.5]))
    >>> SignDescent([w]).step()
    >>> w.data
    array([ 0.9, -0.9])
    """

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self.param_groups = []
        self._params = {}    # id(param) -> param, for every parameter of every group
        self._state = {}     # id(param) -> state dict
        name = type(self).__name__
        if isinstance(params, (dict, np.ndarray, str)) or hasattr(params, "data") or \
                not hasattr(params, "__iter__"):
            raise TypeError(f"{name}: params must be an iterable of parameters or of "
                            f"param-group dicts, got {type(params).__name__}")
        groups = list(params)
        if not groups:
            raise ValueError(f"{name}: optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    # ---------------------------------------------------------------------------- groups

    def add_param_group(self, param_group):
        """Add a parameter group, with its own options (missing ones from ``defaults``).

        Parameters
        ----------
        param_group : dict
            ``{'params': iterable of parameters, option: value, ...}``; the dict is copied.

        Raises
        ------
        ValueError
            If an option is invalid or a parameter is already in the optimizer.
        TypeError
            If a parameter has no floating ndarray ``.data``.
        """
        name = type(self).__name__
        where = f"{name} (param group {len(self.param_groups)})"
        if not isinstance(param_group, dict):
            raise TypeError(f"{where}: a param group must be a dict, got "
                            f"{type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError(f"{where}: a param group needs a 'params' entry")
        params = param_group["params"]
        if hasattr(params, "data") and not isinstance(params, (list, tuple)):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError(f"{where}: 'params' must be an ordered collection (a list), "
                            "not a set, so that the order is reproducible")
        params = list(params)
        seen = set()
        for i, p in enumerate(params):
            data = getattr(p, "data", None)
            if not isinstance(data, np.ndarray):
                raise TypeError(f"{where}: parameter {i} ({type(p).__name__}) must have a "
                                f".data ndarray, got {type(data).__name__}")
            if data.dtype.kind != "f":
                raise TypeError(f"{where}: parameter {i} has .data of dtype {data.dtype}; "
                                "only floating parameters can be optimized")
            if id(p) in self._params or id(p) in seen:
                raise ValueError(f"{where}: parameter {i} appears more than once in the "
                                 "optimizer's parameter groups")
            seen.add(id(p))
        group = dict(param_group)
        group["params"] = params
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._check_group(group, where)
        self.param_groups.append(group)
        for p in params:
            self._params[id(p)] = p

    def _check_group(self, group, where):
        """Validate and normalise the options of ``group`` in place (subclasses)."""

    @property
    def state(self):
        return _ParamState(self)

    # ---------------------------------------------------------------------------- steps

    def zero_grad(self, set_to_none=True):
        """Reset the gradients of all parameters, as ``torch.optim.Optimizer.zero_grad``.

        Parameters
        ----------
        set_to_none : bool
            True (the default): set every ``.grad`` to None.  False: fill every existing
            ``.grad`` array with zeros in place (a ``.grad`` that is None stays None).
        """
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                else:
                    g = p.grad
                    if g is None:
                        continue
                    if isinstance(g, np.ndarray) and g.flags.writeable:
                        g.fill(0)
                    else:
                        p.grad = np.zeros_like(p.data)

    def _gather(self, gi, group):
        """The (data, grad, state) triples of the group's parameters that have a gradient,
        all checked before anything is modified."""
        items = []
        states = self._state
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            d = p.data
            if not isinstance(d, np.ndarray) or d.dtype.kind != "f":
                raise TypeError(f"{type(self).__name__}.step: parameter {i} of param group "
                                f"{gi} has .data of type {type(d).__name__}, not a floating "
                                "ndarray")
            if not d.flags.writeable:
                raise ValueError(f"{type(self).__name__}.step: parameter {i} of param group "
                                 f"{gi} has a read-only .data array")
            if type(g) is not np.ndarray or g.dtype != d.dtype:
                g = np.asarray(g, dtype=d.dtype)
            if g.shape != d.shape:
                raise ValueError(f"{type(self).__name__}.step: parameter {i} of param group "
                                 f"{gi} has .data of shape {d.shape} but .grad of shape "
                                 f"{g.shape}")
            st = states.get(id(p))
            if st is None:
                st = states[id(p)] = {}
            items.append((d, g, st))
        return items

    def step(self, closure=None):
        """Update every parameter that has a gradient, in place.

        Parameters
        ----------
        closure : callable, optional
            Called first (it typically recomputes the loss and the gradients); its result is
            returned.

        Returns
        -------
        loss : object or None
            What ``closure`` returned, or None.

        Raises
        ------
        ValueError
            If a parameter's ``.grad`` shape differs from its ``.data`` shape (nothing is
            updated then).
        """
        loss = closure() if closure is not None else None
        work = [(group, self._gather(gi, group)) for gi, group in enumerate(self.param_groups)]
        for group, items in work:
            if items:
                self._update(group, items)
        return loss

    def _update(self, group, items):
        raise NotImplementedError

    # ---------------------------------------------------------------------------- state

    def state_dict(self):
        """The optimizer's state and options, as ``torch.optim.Optimizer.state_dict``.

        Returns
        -------
        dict
            ``{'state': {index: {key: array or step}}, 'param_groups': [{option: value, ...,
            'params': [index, ...]}]}`` where parameters are numbered 0, 1, ... through the
            groups in order and ``'state'`` holds only parameters that have state.  Arrays are
            copies: later steps do not change a saved state dict.
        """
        state, groups, index = {}, [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(index, index + len(group["params"])))
            groups.append(packed)
            for p in group["params"]:
                st = self._state.get(id(p))
                if st:
                    state[index] = {k: (v.copy() if isinstance(v, np.ndarray) else v)
                                    for k, v in st.items()}
                index += 1
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore what :meth:`state_dict` saved (arrays are copied, in each parameter's dtype).

        The saved groups are matched to the current ones in order; their options replace the
        current options.

        Parameters
        ----------
        state_dict : dict
            As returned by :meth:`state_dict` (of this optimizer class).

        Raises
        ------
        ValueError
            If the number of groups, the size of a group or the shape of a state array does
            not match, or an option is invalid.  Nothing is changed then.
        """
        name = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or \
                "param_groups" not in state_dict:
            raise ValueError(f"{name}: expected a dict with 'state' and 'param_groups'")
        saved_groups = list(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}: loaded state dict has {len(saved_groups)} parameter "
                             f"groups but the optimizer has {len(self.param_groups)}")
        id_map = {}
        new_groups = []
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            saved_params = list(saved["params"])
            if len(saved_params) != len(group["params"]):
                raise ValueError(f"{name}: loaded param group {gi} has {len(saved_params)} "
                                 f"parameters but the optimizer's has {len(group['params'])}")
            for idx, p in zip(saved_params, group["params"]):
                id_map[idx] = p
            new = {k: v for k, v in saved.items() if k != "params"}
            new["params"] = group["params"]
            for key, value in self.defaults.items():
                new.setdefault(key, value)
            self._check_group(new, f"{name} (param group {gi})")
            new_groups.append(new)
        new_state = {}
        for idx, saved_st in state_dict["state"].items():
            if idx not in id_map:
                raise ValueError(f"{name}: state for parameter {idx!r}, which is in no "
                                 "loaded param group")
            p = id_map[idx]
            d = p.data
            st = {}
            for key, value in saved_st.items():
                if key == "step":
                    s = float(value)
                    st[key] = int(s) if s.is_integer() else s
                elif value is None:
                    st[key] = None
                else:
                    arr = np.array(value, dtype=d.dtype)
                    if arr.shape != d.shape:
                        raise ValueError(f"{name}: state {key!r} of parameter {idx!r} has "
                                         f"shape {arr.shape} but the parameter has shape "
                                         f"{d.shape}")
                    st[key] = arr
            new_state[id(p)] = st
        self.param_groups[:] = new_groups
        self._state = new_state

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(group):
                if key != "params":
                    lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)


def _effective_grad(d, g, weight_decay, maximize):
    """PyTorch's ``grad = -grad if maximize; grad = grad + weight_decay * param``.

    Returns ``(grad, owned)``; ``owned`` tells whether it is a fresh array the caller may
    overwrite (the parameter's ``.grad`` itself is never written)."""
    if weight_decay != 0:
        t = np.empty_like(d)
        np.multiply(d, weight_decay, out=t)
        if maximize:
            np.subtract(t, g, out=t)
        else:
            np.add(g, t, out=t)
        return t, True
    if maximize:
        return np.negative(g, out=np.empty_like(d)), True
    return g, False


class SGD(Optimizer):
    r"""Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    For each parameter ``p`` with gradient ``g`` (``-g`` when ``maximize``)::

        g = g + weight_decay * p                        # if weight_decay != 0
        b = g  (first step);  b = momentum * b + (1 - dampening) * g  (later)
        g = g + momentum * b  if nesterov  else  b     # if momentum != 0
        p = p - lr * g

    The momentum buffer ``b`` is state ``'momentum_buffer'`` (absent when momentum is 0).

    Parameters
    ----------
    params : iterable of parameters, or iterable of dicts
        See :class:`Optimizer`.
    lr : float
        Learning rate, >= 0 (PyTorch's default 1e-3).
    momentum : float
        >= 0.
    dampening : float
        Dampening of the momentum (not applied on the first step).
    weight_decay : float
        L2 penalty added to the gradient, >= 0.
    nesterov : bool
        Nesterov momentum; needs momentum > 0 and dampening == 0.
    maximize : bool
        Ascend instead of descend (keyword-only, as PyTorch).

    Raises
    ------
    ValueError
        If an option is out of range or ``params`` is empty.

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> from fastconv.optim import SGD
    >>> w = SimpleNamespace(data=np.array([1.0, -2.0]), grad=None)
    >>> opt = SGD([w], lr=0.125, momentum=0.5)
    >>> for _ in range(2):
    ...     w.grad = 2 * w.data          # gradient of sum(w ** 2)
    ...     opt.step()
    >>> w.data
    array([ 0.4375, -0.875 ])
    >>> opt.state[w]["momentum_buffer"]
    array([ 2.5, -5. ])
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        self._check_group(dict(defaults), "SGD")
        super().__init__(params, defaults)

    def _check_group(self, group, where):
        for key in ("lr", "momentum", "weight_decay"):
            _nonnegative(group, key, where)
        group["dampening"] = _as_float(group["dampening"], "dampening", where)
        group["nesterov"] = bool(group["nesterov"])
        group["maximize"] = bool(group["maximize"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{where}: nesterov=True requires momentum > 0 and "
                             f"dampening == 0, got momentum={group['momentum']}, "
                             f"dampening={group['dampening']}")

    def _update(self, group, items):
        lr = float(group["lr"])
        momentum = float(group["momentum"])
        dampening = float(group["dampening"])
        weight_decay = float(group["weight_decay"])
        nesterov, maximize = group["nesterov"], group["maximize"]
        for d, g, st in items:
            g, owned = _effective_grad(d, g, weight_decay, maximize)
            if momentum != 0:
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = np.array(g, copy=True)
                else:
                    buf *= momentum
                    if dampening == 0:
                        buf += g
                    else:
                        t = np.empty_like(d)
                        np.multiply(g, 1 - dampening, out=t)
                        buf += t
                if nesterov:
                    t = np.empty_like(d)
                    np.multiply(buf, momentum, out=t)
                    if owned:
                        g += t
                    else:
                        np.add(g, t, out=t)
                        g, owned = t, True
                else:
                    g, owned = buf, False
            if owned:
                g *= lr
                d -= g
            else:
                _sub_scaled(d, g, lr)


class Adam(Optimizer):
    r"""Adam, with the AMSGrad variant, as ``torch.optim.Adam``.

    For each parameter ``p`` with gradient ``g`` (``-g`` when ``maximize``), at step
    ``t = 1, 2, ...``::

        g = g + weight_decay * p                        # if weight_decay != 0 (L2, not AdamW)
        m = m + (1 - beta1) * (g - m)                   # exp_avg (torch.lerp)
        v = beta2 * v + (1 - beta2) * g * g             # exp_avg_sq
        vmax = max(vmax, v)                             # max_exp_avg_sq, if amsgrad
        denom = sqrt(vmax if amsgrad else v) / sqrt(1 - beta2 ** t) + eps
        p = p - lr / (1 - beta1 ** t) * m / denom

    State: ``'step'`` (int), ``'exp_avg'``, ``'exp_avg_sq'`` and, with amsgrad,
    ``'max_exp_avg_sq'``, created at a parameter's first step.

    Parameters
    ----------
    params : iterable of parameters, or iterable of dicts
        See :class:`Optimizer`.
    lr : float
        Learning rate, >= 0.
    betas : (float, float)
        Decay rates of the first and second moments, each in [0, 1).
    eps : float
        Added to the denominator, >= 0.
    weight_decay : float
        L2 penalty added to the gradient, >= 0.
    amsgrad : bool
        Use the maximum of the second moments so far.
    maximize : bool
        Ascend instead of descend (keyword-only, as PyTorch).

    Raises
    ------
    ValueError
        If an option is out of range or ``params`` is empty.

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> from fastconv.optim import Adam
    >>> w = SimpleNamespace(data=np.array([1.0, -2.0], np.float32), grad=None)
    >>> opt = Adam([w], lr=0.5)
    >>> w.grad = np.array([4.0, -0.25], np.float32)
    >>> opt.step()                       # the first step moves each entry by about lr
    >>> w.data.round(4)
    array([ 0.5, -1.5], dtype=float32)
    >>> opt.state[w]["step"]
    1
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, maximize=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize)
        self._check_group(dict(defaults), "Adam")
        super().__init__(params, defaults)

    def _check_group(self, group, where):
        for key in ("lr", "eps", "weight_decay"):
            _nonnegative(group, key, where)
        betas = group["betas"]
        try:
            betas = tuple(betas)
        except TypeError:
            betas = None
        if betas is None or len(betas) != 2:
            raise ValueError(f"{where}: betas must be a pair of floats, got {group['betas']!r}")
        betas = tuple(_as_float(b, f"betas[{i}]", where) for i, b in enumerate(betas))
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{where}: betas[{i}] must be in [0, 1), got {b!r}")
        group["betas"] = betas
        group["amsgrad"] = bool(group["amsgrad"])
        group["maximize"] = bool(group["maximize"])

    def _update(self, group, items):
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        eps = float(group["eps"])
        weight_decay = float(group["weight_decay"])
        amsgrad, maximize = group["amsgrad"], group["maximize"]
        w1 = 1 - beta1
        for d, g, st in items:
            if "exp_avg" not in st:
                st["step"] = 0
                st["exp_avg"] = np.zeros_like(d)
                st["exp_avg_sq"] = np.zeros_like(d)
            if amsgrad and st.get("max_exp_avg_sq") is None:
                st["max_exp_avg_sq"] = np.zeros_like(d)
            step = st["step"] = st["step"] + 1
            g, owned = _effective_grad(d, g, weight_decay, maximize)
            m, v = st["exp_avg"], st["exp_avg_sq"]
            t = np.empty_like(d)
            # m.lerp_(g, 1 - beta1), with torch.lerp's two formulas
            np.subtract(g, m, out=t)
            if abs(w1) < 0.5:
                t *= w1
                m += t
            else:
                t *= 1 - w1
                np.subtract(g, t, out=m)
            # v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            v *= beta2
            np.multiply(g, 1 - beta2, out=t)
            t *= g
            v += t
            bias_correction1 = 1 - beta1 ** step
            bias_correction2 = 1 - beta2 ** step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2 ** 0.5
            if amsgrad:
                vmax = st["max_exp_avg_sq"]
                np.maximum(vmax, v, out=vmax)
                np.sqrt(vmax, out=t)
            else:
                np.sqrt(v, out=t)
            t /= bias_correction2_sqrt
            t += eps
            # p.addcdiv_(m, denom, value=-step_size)
            u = g if owned else np.empty_like(d)
            np.multiply(m, -step_size, out=u)
            u /= t
            d += u
