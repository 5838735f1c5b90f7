"""The benchmark cases: shapes, data, work counts, and fastconv's runners.

A case is one operation at one size; each runs in two modes, ``fwd`` (the forward alone) and
``fwdbwd`` (the forward, then the gradients of every input: for a convolution grad_x,
grad_weight and grad_bias).  A *runner* is a function of no arguments that does one
iteration and returns its outputs as a tuple, in the same order for every library
(``(y,)`` forward; ``(y, grad_x, grad_w, grad_b)`` for a convolution's fwdbwd; ``(y,
grad_x)`` for pooling and upsampling; ``(loss, grad_logits)`` for cross-entropy; ``(logits,)``
or ``(loss,)`` for the model), so the suite can check that every library computed the same
thing.
"""
from dataclasses import dataclass, field

import numpy as np

MODES = ("fwd", "fwdbwd")


class Unsupported(Exception):
    """A library cannot run this case/mode/dtype; the message says why."""


@dataclass(frozen=True)
class Case:
    name: str
    kind: str           # conv, convT, maxpool, avgpool, upsample, xent, model
    p: dict = field(default_factory=dict)
    desc: str = ""


CASES = [
    Case("conv.lenet", "conv", dict(N=64, C=1, L=32, H=28, W=28, k=5, s=1, pad=2, g=1),
         "LeNet conv1: 1->32, 5x5 p2, 28x28, batch 64"),
    Case("conv.cifar", "conv", dict(N=32, C=64, L=64, H=32, W=32, k=3, s=1, pad=1, g=1),
         "CIFAR 3x3: 64->64, p1, 32x32, batch 32"),
    Case("conv.resnet", "conv", dict(N=8, C=128, L=128, H=28, W=28, k=3, s=1, pad=1, g=1),
         "ResNet 3x3: 128->128, p1, 28x28, batch 8"),
    Case("conv.strided", "conv", dict(N=8, C=64, L=128, H=56, W=56, k=3, s=2, pad=1, g=1),
         "strided 3x3 s2 p1: 64->128, 56x56 -> 28x28, batch 8"),
    Case("conv.pointwise", "conv", dict(N=8, C=256, L=256, H=14, W=14, k=1, s=1, pad=0, g=1),
         "pointwise 1x1: 256->256, 14x14, batch 8"),
    Case("conv.depthwise", "conv", dict(N=32, C=64, L=64, H=32, W=32, k=3, s=1, pad=1, g=64),
         "depthwise 3x3: 64 ch, groups=64, p1, 32x32, batch 32"),
    Case("conv.depthwise_s2", "conv", dict(N=32, C=64, L=64, H=32, W=32, k=3, s=2, pad=1,
                                           g=64),
         "depthwise 3x3 s2 (MobileNet's downsampling): 64 ch, p1, 32x32 -> 16x16, batch 32"),
    Case("conv.depthwise5", "conv", dict(N=32, C=64, L=64, H=32, W=32, k=5, s=1, pad=2, g=64),
         "depthwise 5x5 (EfficientNet-style): 64 ch, groups=64, p2, 32x32, batch 32"),
    Case("conv.batch1", "conv", dict(N=1, C=64, L=64, H=32, W=32, k=3, s=1, pad=1, g=1),
         "latency 3x3: 64->64, p1, 32x32, batch 1"),
    Case("convT.4x4s2", "convT", dict(N=16, C=64, L=32, H=16, W=16, k=4, s=2, pad=1, op=0, g=1),
         "transposed 4x4 s2 p1: 64->32, 16x16 -> 32x32, batch 16"),
    Case("maxpool.2x2", "maxpool", dict(N=16, C=64, H=56, W=56, k=2, s=2, pad=0),
         "max-pool 2x2 s2: 64 ch, 56x56, batch 16"),
    Case("maxpool.3x3s2p1", "maxpool", dict(N=16, C=64, H=56, W=56, k=3, s=2, pad=1),
         "max-pool 3x3 s2 p1: 64 ch, 56x56, batch 16"),
    Case("avgpool.2x2", "avgpool", dict(N=16, C=64, H=56, W=56, k=2, s=2, pad=0),
         "avg-pool 2x2 s2: 64 ch, 56x56, batch 16"),
    Case("upsample.x2", "upsample", dict(N=16, C=64, H=28, W=28, scale=2),
         "nearest upsample x2: 64 ch, 28x28 -> 56x56, batch 16"),
    Case("xent.1024x1000", "xent", dict(N=1024, K=1000),
         "cross-entropy from logits: 1024 x 1000 classes, mean"),
    Case("model.lenet", "model", dict(N=64, H=28, W=28),
         "LeNet-style model: conv5x5(1->32)-relu-pool-conv5x5(32->64)-relu-pool-fc(3136->128)-"
         "relu-fc(128->10), batch 64, 28x28; fwdbwd = one training step (loss, backward, SGD)"),
    Case("model.lenet.b1", "model", dict(N=1, H=28, W=28),
         "the LeNet-style model at batch 1: serving latency, every layer's Python included"),
]

BY_NAME = {c.name: c for c in CASES}


def select(patterns):
    """Cases whose name contains any of the comma-separated substrings (all when empty)."""
    pats = [p.strip().lower() for p in (patterns or "").split(",") if p.strip()]
    if not pats:
        return list(CASES)
    return [c for c in CASES if any(p in c.name.lower() for p in pats)]


# --------------------------------------------------------------------------------------------
# output sizes, work
# --------------------------------------------------------------------------------------------

def _conv_out(H, k, s, pad):
    return (H + 2 * pad - k) // s + 1


def _convT_out(H, k, s, pad, op):
    return (H - 1) * s - 2 * pad + k + op


def out_shape(case):
    p = case.p
    if case.kind == "conv":
        return (p["N"], p["L"], _conv_out(p["H"], p["k"], p["s"], p["pad"]),
                _conv_out(p["W"], p["k"], p["s"], p["pad"]))
    if case.kind == "convT":
        return (p["N"], p["L"], _convT_out(p["H"], p["k"], p["s"], p["pad"], p["op"]),
                _convT_out(p["W"], p["k"], p["s"], p["pad"], p["op"]))
    if case.kind in ("maxpool", "avgpool"):
        return (p["N"], p["C"], _conv_out(p["H"], p["k"], p["s"], p["pad"]),
                _conv_out(p["W"], p["k"], p["s"], p["pad"]))
    if case.kind == "upsample":
        return (p["N"], p["C"], p["H"] * p["scale"], p["W"] * p["scale"])
    if case.kind == "xent":
        return ()
    if case.kind == "model":
        return (p["N"], 10)
    raise ValueError(case.kind)


def _lenet_shapes(p):
    """(conv layers as (Cin, Cout, k, OH, OW), linear layers as (in, out)) of the model."""
    H, W = p["H"], p["W"]
    convs = [(1, 32, 5, H, W), (32, 64, 5, H // 2, W // 2)]
    fcs = [(64 * (H // 4) * (W // 4), 128), (128, 10)]
    return convs, fcs


def flops(case, mode):
    """Multiply-adds x 2 of the forward (x 3 for forward+backward); None for the memory-bound
    operations.  Convolution: 2*N*L*OH*OW*(C/g)*kH*kW; transposed: 2*N*C*H*W*(L/g)*kH*kW."""
    p = case.p
    if case.kind == "conv":
        N, L, OH, OW = out_shape(case)
        f = 2 * N * L * OH * OW * (p["C"] // p["g"]) * p["k"] ** 2
    elif case.kind == "convT":
        f = 2 * p["N"] * p["C"] * p["H"] * p["W"] * (p["L"] // p["g"]) * p["k"] ** 2
    elif case.kind == "model":
        convs, fcs = _lenet_shapes(p)
        f = sum(2 * p["N"] * co * oh * ow * ci * k * k for ci, co, k, oh, ow in convs)
        f += sum(2 * p["N"] * i * o for i, o in fcs)
    else:
        return None
    return f * (3 if mode == "fwdbwd" else 1)


def nbytes(case, mode, itemsize):
    """Nominal memory traffic of the memory-bound operations (each array read or written
    once): forward x + y; fwdbwd adds grad_y, x (again) and grad_x.  None for the others."""
    p = case.p
    if case.kind in ("maxpool", "avgpool", "upsample"):
        nx = p["N"] * p["C"] * p["H"] * p["W"]
        ny = int(np.prod(out_shape(case)))
    elif case.kind == "xent":
        nx, ny = p["N"] * p["K"], 0
    else:
        return None
    n = nx + ny if mode == "fwd" else 3 * nx + 2 * ny
    return n * itemsize


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

def lenet_fastconv(dtype, seed):
    import fastconv.nn as nn

    rng = np.random.default_rng(seed)
    kw = dict(dtype=dtype, rng=rng)
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2, **kw), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2, **kw), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128, **kw), nn.ReLU(), nn.Linear(128, 10, **kw))


def make_data(case, dtype, seed=0):
    """The inputs of one case, shared by every library (NumPy arrays)."""
    rng = np.random.default_rng(seed)
    p = case.p
    dt = np.dtype(dtype)

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(dt)

    d = {}
    if case.kind in ("conv", "convT"):
        C, L, k, g = p["C"], p["L"], p["k"], p["g"]
        d["x"] = normal(p["N"], C, p["H"], p["W"])
        if case.kind == "conv":
            d["w"] = normal(L, C // g, k, k, scale=(C // g * k * k) ** -0.5)
        else:
            d["w"] = normal(C, L // g, k, k, scale=(L // g * k * k) ** -0.5)
        d["b"] = normal(L, scale=0.1)
        d["gy"] = normal(*out_shape(case))
    elif case.kind in ("maxpool", "avgpool", "upsample"):
        d["x"] = normal(p["N"], p["C"], p["H"], p["W"])
        d["gy"] = normal(*out_shape(case))
    elif case.kind == "xent":
        d["x"] = normal(p["N"], p["K"], scale=3.0)
        d["target"] = rng.integers(0, p["K"], p["N"]).astype(np.int64)
    elif case.kind == "model":
        d["x"] = normal(p["N"], 1, p["H"], p["W"])
        d["target"] = rng.integers(0, 10, p["N"]).astype(np.int64)
        d["state"] = lenet_fastconv(dt, seed + 1).state_dict()
    else:
        raise ValueError(case.kind)
    return d


# --------------------------------------------------------------------------------------------
# fastconv
# --------------------------------------------------------------------------------------------

MODEL_LR = 1e-3


class fresh_caches:
    """Context manager: fastconv's cached im2col workspaces and Winograd weight transforms (if
    this version keeps any) start empty inside the block, so a memory measurement counts what
    a call keeps instead of finding it already allocated by an earlier call; the old caches
    are put back after."""

    _NAMES = ("_workspaces", "_wino_cache")

    def __enter__(self):
        import threading

        from fastconv import functional

        self._old = {}
        for name in self._NAMES:
            old = getattr(functional, name, None)
            if isinstance(old, threading.local):
                self._old[name] = old
                setattr(functional, name, threading.local())
        return self

    def __exit__(self, *exc):
        from fastconv import functional

        for name, old in self._old.items():
            setattr(functional, name, old)
        return False


def build_fastconv(case, mode, d, threads):
    """fastconv's runner (``threads`` is set globally by the caller)."""
    import fastconv as fc

    p = case.p
    x = d["x"]
    if case.kind == "conv":
        w, b, gy = d["w"], d["b"], d["gy"]
        kw = dict(stride=p["s"], padding=p["pad"], groups=p["g"])
        if mode == "fwd":
            return lambda: (fc.conv2d(x, w, b, **kw),)

        def run():
            y = fc.conv2d(x, w, b, **kw)
            return (y,) + tuple(fc.conv2d_backward(gy, x, w, **kw))
        return run
    if case.kind == "convT":
        w, b, gy = d["w"], d["b"], d["gy"]
        kw = dict(stride=p["s"], padding=p["pad"], output_padding=p["op"], groups=p["g"])
        if mode == "fwd":
            return lambda: (fc.conv_transpose2d(x, w, b, **kw),)

        def run():
            y = fc.conv_transpose2d(x, w, b, **kw)
            return (y,) + tuple(fc.conv_transpose2d_backward(gy, x, w, **kw))
        return run
    if case.kind in ("maxpool", "avgpool"):
        f, fb = ((fc.max_pool2d, fc.max_pool2d_backward) if case.kind == "maxpool"
                 else (fc.avg_pool2d, fc.avg_pool2d_backward))
        gy, k, kw = d["gy"], p["k"], dict(stride=p["s"], padding=p["pad"])
        if mode == "fwd":
            return lambda: (f(x, k, **kw),)
        return lambda: (f(x, k, **kw), fb(gy, x, k, **kw))
    if case.kind == "upsample":
        gy, s = d["gy"], p["scale"]
        if mode == "fwd":
            return lambda: (fc.upsample_nearest2d(x, s),)
        return lambda: (fc.upsample_nearest2d(x, s), fc.upsample_nearest2d_backward(gy, s))
    if case.kind == "xent":
        t = d["target"]
        if mode == "fwd":
            return lambda: (fc.cross_entropy(x, t),)
        return lambda: (fc.cross_entropy(x, t), fc.cross_entropy_backward(x, t))
    if case.kind == "model":
        import fastconv.nn as nn
        from fastconv import optim

        model = lenet_fastconv(x.dtype, 0)
        model.load_state_dict(d["state"])
        if mode == "fwd":
            def run():
                with nn.no_grad():          # inference, as PyTorch's under torch.no_grad()
                    return (model(x),)
            return run
        loss_fn = nn.CrossEntropyLoss()
        opt = optim.SGD(model.parameters(), lr=MODEL_LR)
        t = d["target"]

        def step():
            opt.zero_grad()
            loss = loss_fn(model(x), t)
            model.backward(loss_fn.backward())
            opt.step()
            return (loss,)
        return step
    raise ValueError(case.kind)
