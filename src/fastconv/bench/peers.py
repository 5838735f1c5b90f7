"""The baselines: PyTorch CPU, ONNX Runtime and plain NumPy.

Each ``build_*`` returns a runner for one case/mode/dtype (see :mod:`cases`) or raises
:class:`cases.Unsupported`.  Every import of an optional library happens inside these
functions, so a missing library only removes its column.
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .cases import MODEL_LR, Unsupported

PEERS = ("torch", "onnxruntime", "numpy")
SHORT = {"fastconv": "fc", "torch": "torch", "onnxruntime": "ort", "numpy": "numpy"}


def available(name):
    """None when ``name`` can be used, else why not (the import error)."""
    try:
        if name == "torch":
            import torch  # noqa: F401
        elif name == "onnxruntime":
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        elif name == "numpy":
            import numpy  # noqa: F401
        else:
            raise ValueError(name)
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install
        return f"{type(e).__name__}: {e}"
    return None


def to_numpy(outputs):
    """A runner's outputs as NumPy arrays (for the cross-check)."""
    res = []
    for o in outputs:
        if hasattr(o, "detach"):
            o = o.detach().numpy()
        res.append(np.asarray(o))
    return tuple(res)


# --------------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------------

def lenet_torch(dtype):
    import torch
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    ).to(torch.float32 if np.dtype(dtype) == np.float32 else torch.float64)


def build_torch(case, mode, d, threads):
    """torch.nn.functional / torch.nn on CPU tensors sharing the NumPy data; forward under
    ``torch.no_grad()``, forward+backward through autograd (``torch.autograd.grad``, so
    gradients are returned, not accumulated).  Threads: ``torch.set_num_threads`` (set by the
    caller)."""
    import torch
    import torch.nn.functional as F

    p = case.p
    fwd = mode == "fwd"

    def t(a, grad=False):
        return torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(grad and not fwd)

    x = t(d["x"], True)
    if case.kind in ("conv", "convT"):
        w, b, gy = t(d["w"], True), t(d["b"], True), t(d["gy"])
        if case.kind == "conv":
            def f():
                return F.conv2d(x, w, b, p["s"], p["pad"], 1, p["g"])
        else:
            def f():
                return F.conv_transpose2d(x, w, b, p["s"], p["pad"], p["op"], p["g"])
        inputs = (x, w, b)
    elif case.kind in ("maxpool", "avgpool"):
        gy = t(d["gy"])
        pool = F.max_pool2d if case.kind == "maxpool" else F.avg_pool2d

        def f():
            return pool(x, p["k"], p["s"], p["pad"])
        inputs = (x,)
    elif case.kind == "upsample":
        gy = t(d["gy"])

        def f():
            return F.interpolate(x, scale_factor=p["scale"], mode="nearest")
        inputs = (x,)
    elif case.kind == "xent":
        target, gy = t(d["target"]), None

        def f():
            return F.cross_entropy(x, target)
        inputs = (x,)
    elif case.kind == "model":
        model = lenet_torch(d["x"].dtype)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in d["state"].items()})
        x = t(d["x"])
        if fwd:
            def run():
                with torch.no_grad():
                    return (model(x),)
            return run
        target = t(d["target"])
        params = list(model.parameters())

        def step():
            for q in params:
                q.grad = None
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            with torch.no_grad():       # torch.optim.SGD's update for momentum 0, see README
                for q in params:
                    q.add_(q.grad, alpha=-MODEL_LR)
            return (loss.detach(),)
        return step
    else:
        raise ValueError(case.kind)

    if fwd:
        def run():
            with torch.no_grad():
                return (f(),)
        return run

    def run():
        y = f()
        return (y.detach(),) + tuple(torch.autograd.grad(y, inputs, gy))
    return run


# --------------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------------

def _session(nodes, inputs, outputs, inits, threads):
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "bench", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, producer_name="fastconv-benchmarks",
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8                      # opset 17's IR; any onnxruntime >= 1.12 reads it
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - NOT_IMPLEMENTED for a dtype, mostly
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Unsupported(f"onnxruntime: {msg[:200]}") from e


def build_onnxruntime(case, mode, d, threads):
    """A one-node ONNX model (opset 17; weights as initializers, as an exported model has
    them), forward only; one session per thread count (``intra_op_num_threads``)."""
    if mode != "fwd":
        raise Unsupported("onnxruntime: forward only (no training)")
    from onnx import TensorProto, helper, numpy_helper

    p = case.p
    x = np.ascontiguousarray(d["x"])
    et = TensorProto.FLOAT if x.dtype == np.float32 else TensorProto.DOUBLE
    X = helper.make_tensor_value_info("X", et, list(x.shape))
    Y = helper.make_tensor_value_info("Y", et, None)
    inits, feeds, inputs = [], {"X": x}, [X]

    def init(name, a):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
        return name

    if case.kind in ("conv", "convT"):
        op = "Conv" if case.kind == "conv" else "ConvTranspose"
        attrs = dict(kernel_shape=[p["k"]] * 2, strides=[p["s"]] * 2, pads=[p["pad"]] * 4,
                     group=p["g"])
        if case.kind == "convT":
            attrs["output_padding"] = [p["op"]] * 2
        nodes = [helper.make_node(op, ["X", init("W", d["w"]), init("B", d["b"])], ["Y"],
                                  **attrs)]
    elif case.kind in ("maxpool", "avgpool"):
        attrs = dict(kernel_shape=[p["k"]] * 2, strides=[p["s"]] * 2, pads=[p["pad"]] * 4)
        if case.kind == "avgpool":
            attrs["count_include_pad"] = 1              # PyTorch's default
        nodes = [helper.make_node("MaxPool" if case.kind == "maxpool" else "AveragePool",
                                  ["X"], ["Y"], **attrs)]
    elif case.kind == "upsample":
        s = float(p["scale"])
        nodes = [helper.make_node("Resize", ["X", "", init("scales", np.array([1, 1, s, s],
                                                                             np.float32))],
                                  ["Y"], mode="nearest", nearest_mode="floor",
                                  coordinate_transformation_mode="asymmetric")]
    elif case.kind == "xent":
        t = np.ascontiguousarray(d["target"])
        inputs.append(helper.make_tensor_value_info("T", TensorProto.INT64, list(t.shape)))
        feeds["T"] = t
        nodes = [helper.make_node("SoftmaxCrossEntropyLoss", ["X", "T"], ["Y"],
                                  reduction="mean")]
    elif case.kind == "model":
        s = d["state"]
        nodes = [
            helper.make_node("Conv", ["X", init("w0", s["0.weight"]), init("b0", s["0.bias"])],
                             ["c1"], kernel_shape=[5, 5], pads=[2, 2, 2, 2]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Conv", ["p1", init("w3", s["3.weight"]), init("b3", s["3.bias"])],
                             ["c2"], kernel_shape=[5, 5], pads=[2, 2, 2, 2]),
            helper.make_node("Relu", ["c2"], ["r2"]),
            helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Flatten", ["p2"], ["f"], axis=1),
            helper.make_node("Gemm", ["f", init("w7", s["7.weight"]), init("b7", s["7.bias"])],
                             ["g1"], transB=1),
            helper.make_node("Relu", ["g1"], ["r3"]),
            helper.make_node("Gemm", ["r3", init("w9", s["9.weight"]), init("b9", s["9.bias"])],
                             ["Y"], transB=1),
        ]
    else:
        raise ValueError(case.kind)
    sess = _session(nodes, inputs, [Y], inits, threads)
    run_ = sess.run
    return lambda: tuple(run_(None, feeds))


# --------------------------------------------------------------------------------------------
# plain NumPy
# --------------------------------------------------------------------------------------------

def np_conv2d(x, w, b, stride, pad, groups):
    """im2col (``sliding_window_view`` + one copy) and one GEMM per group (``matmul``)."""
    N, C, H, W = x.shape
    L, Cg, kh, kw = w.shape
    g = groups
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    OH, OW = win.shape[2:4]
    win = win.reshape(N, g, Cg, OH, OW, kh, kw)
    cols = win.transpose(1, 0, 3, 4, 2, 5, 6).reshape(g, N * OH * OW, Cg * kh * kw)
    wm = w.reshape(g, L // g, Cg * kh * kw).transpose(0, 2, 1)
    if g == 1:
        y = (cols[0] @ wm[0])[None]                         # (1, N*OH*OW, L): one GEMM
    else:
        y = np.matmul(cols, wm)                             # (g, N*OH*OW, L/g)
    y = y.reshape(g, N, OH, OW, L // g).transpose(1, 0, 4, 2, 3).reshape(N, L, OH, OW)
    if b is not None:
        y += b[None, :, None, None]
    return y


def np_conv_transpose2d(x, w, b, stride, pad, output_padding, groups):
    """GEMM (x^T times W) then col2im: kH*kW strided slice-adds into the padded output."""
    if groups != 1:
        raise Unsupported("numpy: grouped transposed convolution not implemented")
    N, C, H, W = x.shape
    _, L, kh, kw = w.shape
    s = stride
    cols = np.tensordot(x, w, axes=([1], [0]))            # (N, H, W, L, kh, kw)
    cols = cols.transpose(0, 3, 4, 5, 1, 2)                # (N, L, kh, kw, H, W), a view
    OH = (H - 1) * s - 2 * pad + kh + output_padding
    OW = (W - 1) * s - 2 * pad + kw + output_padding
    full = np.zeros((N, L, (H - 1) * s + kh + output_padding, (W - 1) * s + kw + output_padding),
                    x.dtype)
    for a in range(kh):
        for c in range(kw):
            full[:, :, a:a + (H - 1) * s + 1:s, c:c + (W - 1) * s + 1:s] += cols[:, :, a, c]
    y = np.ascontiguousarray(full[:, :, pad:pad + OH, pad:pad + OW])
    if b is not None:
        y += b[None, :, None, None]
    return y


def np_pool(x, k, stride, pad, kind):
    """``sliding_window_view`` then max / mean over the window (-inf / zero padding, so the
    average counts padding, as PyTorch's default)."""
    if pad:
        fill = -np.inf if kind == "max" else 0
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    win = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return win.max(axis=(4, 5)) if kind == "max" else win.mean(axis=(4, 5))


def np_cross_entropy(z, t):
    m = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
    return np.mean(lse - z[np.arange(len(t)), t])


def build_numpy(case, mode, d, threads):
    """Plain NumPy, forward only; BLAS threads via threadpoolctl (set by the caller)."""
    if mode != "fwd":
        raise Unsupported("numpy: forward only")
    p = case.p
    x = d["x"]
    if case.kind == "conv":
        w, b = d["w"], d["b"]
        return lambda: (np_conv2d(x, w, b, p["s"], p["pad"], p["g"]),)
    if case.kind == "convT":
        w, b = d["w"], d["b"]
        if p["g"] != 1:
            raise Unsupported("numpy: grouped transposed convolution not implemented")
        return lambda: (np_conv_transpose2d(x, w, b, p["s"], p["pad"], p["op"], p["g"]),)
    if case.kind in ("maxpool", "avgpool"):
        kind = case.kind[:3]
        return lambda: (np_pool(x, p["k"], p["s"], p["pad"], kind),)
    if case.kind == "upsample":
        s = p["scale"]
        return lambda: (x.repeat(s, axis=2).repeat(s, axis=3),)
    if case.kind == "xent":
        t = d["target"]
        return lambda: (np_cross_entropy(x, t),)
    raise Unsupported(f"numpy: no baseline for {case.kind}")


BUILDERS = {"torch": build_torch, "onnxruntime": build_onnxruntime, "numpy": build_numpy}
