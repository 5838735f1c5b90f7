"""fastconv.nn and fastconv.optim against torch.nn / torch.optim, in float64.

State dicts move both ways between the libraries (same keys, same layouts); forward outputs,
losses, input gradients and every parameter gradient agree to ~1e-10, and ten training steps
with SGD (momentum, weight decay) and Adam give the same per-step losses and final weights.
Skipped when torch is not installed.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn

import fastconv.nn as nn  # noqa: E402
from fastconv.optim import SGD, Adam  # noqa: E402

pytestmark = pytest.mark.torch

TOL = dict(rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------- models

def cnn_pair(seed=0):
    """The CNN of test_nn.py in both libraries (same indices), on (N, 1, 8, 8), 5 classes."""
    g = np.random.default_rng(seed)
    fc = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, dtype=np.float64, rng=g),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, dtype=np.float64, rng=g),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(24, 5, dtype=np.float64, rng=g),
    )
    th = tnn.Sequential(
        tnn.Conv2d(1, 4, 3, padding=1),
        tnn.ReLU(),
        tnn.MaxPool2d(2),
        tnn.Conv2d(4, 6, 3),
        tnn.ReLU(),
        tnn.Flatten(),
        tnn.Linear(24, 5),
    ).double()
    return fc, th, (1, 8, 8), 5


def gen_pair(seed=0):
    """A model with ConvTranspose2d (groups, output_padding), AvgPool2d, Upsample, a grouped
    dilated 'same' Conv2d and a max pool with padding, on (N, 2, 8, 8), 4 classes."""
    g = np.random.default_rng(seed)
    d = np.float64
    fc = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, dtype=d, rng=g),                   # 4x4x4
        nn.ReLU(),
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2,
                           dtype=d, rng=g),                                        # 6x8x8
        nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),             # 6x4x4
        nn.Upsample(scale_factor=2),                                               # 6x8x8
        nn.Conv2d(6, 6, 3, padding="same", dilation=2, groups=3, dtype=d, rng=g),  # 6x8x8
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),                                      # 6x4x4
        nn.Dropout(0.0),
        nn.Flatten(),
        nn.Linear(96, 4, dtype=d, rng=g),
    )
    th = tnn.Sequential(
        tnn.Conv2d(2, 4, 3, stride=2, padding=1),
        tnn.ReLU(),
        tnn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        tnn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        tnn.Upsample(scale_factor=2, mode="nearest"),
        tnn.Conv2d(6, 6, 3, padding="same", dilation=2, groups=3),
        tnn.ReLU(),
        tnn.MaxPool2d(3, stride=2, padding=1),
        tnn.Dropout(0.0),
        tnn.Flatten(),
        tnn.Linear(96, 4),
    ).double()
    return fc, th, (2, 8, 8), 4


PAIRS = {"cnn": cnn_pair, "gen": gen_pair}


def data(in_shape, n_classes, n=6, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n,) + in_shape), rng.integers(0, n_classes, n)


def to_torch(sd):
    return {k: torch.from_numpy(v) for k, v in sd.items()}


def to_numpy(sd):
    return {k: v.detach().numpy() for k, v in sd.items()}


def fc_run(model, x, t):
    """loss, logits, input gradient, {name: grad} of a fastconv model."""
    loss_fn = nn.CrossEntropyLoss()
    model.zero_grad()
    logits = model(x)
    loss = loss_fn(logits, t)
    gx = model.backward(loss_fn.backward())
    return float(loss), logits, gx, {n: p.grad for n, p in model.named_parameters()}


def th_run(model, x, t):
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    model.zero_grad()
    logits = model(xt)
    loss = tnn.CrossEntropyLoss()(logits, torch.from_numpy(t))
    loss.backward()
    return (loss.item(), logits.detach().numpy(), xt.grad.numpy(),
            {n: p.grad.numpy() for n, p in model.named_parameters()})


def assert_same_run(fc_out, th_out):
    (l1, y1, gx1, g1), (l2, y2, gx2, g2) = fc_out, th_out
    np.testing.assert_allclose(y1, y2, **TOL, err_msg="logits")
    np.testing.assert_allclose(l1, l2, **TOL, err_msg="loss")
    np.testing.assert_allclose(gx1, gx2, **TOL, err_msg="input gradient")
    assert list(g1) == list(g2)
    for k in g1:
        np.testing.assert_allclose(g1[k], g2[k], **TOL, err_msg=k)


# ------------------------------------------------------------------ state dict exchange

@pytest.mark.parametrize("which", list(PAIRS))
def test_state_dict_keys_match_torch(which):
    fc, th, _, _ = PAIRS[which]()
    sd_fc, sd_th = fc.state_dict(), th.state_dict()
    assert list(sd_fc) == list(sd_th)
    assert [v.shape for v in sd_fc.values()] == [tuple(v.shape) for v in sd_th.values()]
    assert [n for n, _ in fc.named_parameters()] == [n for n, _ in th.named_parameters()]


@pytest.mark.parametrize("which", list(PAIRS))
def test_fastconv_weights_into_torch(which):
    fc, th, in_shape, nc = PAIRS[which](seed=0)
    th.load_state_dict(to_torch(fc.state_dict()))
    x, t = data(in_shape, nc)
    assert_same_run(fc_run(fc, x, t), th_run(th, x, t))


@pytest.mark.parametrize("which", list(PAIRS))
def test_torch_weights_into_fastconv(which):
    torch.manual_seed(0)
    fc, th, in_shape, nc = PAIRS[which](seed=3)
    x, t = data(in_shape, nc, seed=2)
    expected = th_run(th, x, t)
    # as NumPy arrays
    fc.load_state_dict(to_numpy(th.state_dict()))
    assert_same_run(fc_run(fc, x, t), expected)
    # as torch tensors directly: the state dict, and the parameters themselves (grad enabled)
    fc2, _, _, _ = PAIRS[which](seed=4)
    fc2.load_state_dict(th.state_dict())
    assert_same_run(fc_run(fc2, x, t), expected)
    fc3, _, _, _ = PAIRS[which](seed=5)
    fc3.load_state_dict(dict(th.named_parameters()))
    assert_same_run(fc_run(fc3, x, t), expected)
    assert all(isinstance(p.data, np.ndarray) and p.dtype == np.float64
               for p in fc3.parameters())


def test_float32_torch_tensors_into_float32_model():
    fc = nn.Sequential(nn.Conv2d(1, 4, 3, rng=0), nn.ReLU(), nn.Flatten(),
                       nn.Linear(4 * 6 * 6, 3, rng=0))
    th = tnn.Sequential(tnn.Conv2d(1, 4, 3), tnn.ReLU(), tnn.Flatten(), tnn.Linear(144, 3))
    fc.load_state_dict(th.state_dict())
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    y = fc(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, th(torch.from_numpy(x)).detach().numpy(), rtol=1e-5,
                               atol=1e-5)


# ------------------------------------------------------------------ single layers

LAYERS = [
    ("conv", lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                               dtype=np.float64, rng=0),
     lambda: tnn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
     (2, 3, 9, 8)),
    ("conv-same-groups", lambda: nn.Conv2d(4, 6, 4, padding="same", groups=2, bias=False,
                                           dtype=np.float64, rng=0),
     lambda: tnn.Conv2d(4, 6, 4, padding="same", groups=2, bias=False), (2, 4, 7, 6)),
    ("convT", lambda: nn.ConvTranspose2d(4, 6, (3, 2), stride=(3, 2), padding=(1, 0),
                                         output_padding=(2, 1), groups=2, dilation=(1, 2),
                                         dtype=np.float64, rng=0),
     lambda: tnn.ConvTranspose2d(4, 6, (3, 2), stride=(3, 2), padding=(1, 0),
                                 output_padding=(2, 1), groups=2, dilation=(1, 2)),
     (2, 4, 4, 5)),
    ("maxpool", lambda: nn.MaxPool2d((3, 2), stride=(2, 1), padding=1, dilation=(1, 2),
                                     ceil_mode=True),
     lambda: tnn.MaxPool2d((3, 2), stride=(2, 1), padding=1, dilation=(1, 2), ceil_mode=True),
     (2, 3, 9, 8)),
    ("avgpool", lambda: nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True),
     lambda: tnn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True), (2, 3, 8, 9)),
    ("avgpool-divisor", lambda: nn.AvgPool2d(2, divisor_override=3),
     lambda: tnn.AvgPool2d(2, divisor_override=3), (1, 2, 6, 7)),
    ("upsample", lambda: nn.Upsample(scale_factor=(2, 3)),
     lambda: tnn.Upsample(scale_factor=(2, 3), mode="nearest"), (2, 3, 3, 4)),
    ("linear3d", lambda: nn.Linear(5, 3, dtype=np.float64, rng=0), lambda: tnn.Linear(5, 3),
     (2, 4, 5)),
    ("relu", nn.ReLU, tnn.ReLU, (2, 3, 4)),
    ("flatten", lambda: nn.Flatten(1, 2), lambda: tnn.Flatten(1, 2), (2, 3, 4, 5)),
    ("dropout-eval", lambda: nn.Dropout(0.5).eval(), lambda: tnn.Dropout(0.5).eval(),
     (3, 4)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
@pytest.mark.parametrize("name,make_fc,make_th,shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_matches_torch(name, make_fc, make_th, shape):
    fc, th = make_fc(), make_th().double()
    th.load_state_dict(to_torch(fc.state_dict()))
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    y_th = th(xt)
    y = fc(x)
    np.testing.assert_allclose(y, y_th.detach().numpy(), **TOL)
    r = rng.standard_normal(y.shape)
    y_th.backward(torch.from_numpy(r))
    np.testing.assert_allclose(fc.backward(r), xt.grad.numpy(), **TOL)
    for n, p in th.named_parameters():
        np.testing.assert_allclose(dict(fc.named_parameters())[n].grad, p.grad.numpy(),
                                   **TOL, err_msg=n)


def test_dropout_p1_and_train_mask_semantics_match_torch():
    x = np.random.default_rng(0).standard_normal((5, 7))
    np.testing.assert_array_equal(nn.Dropout(1.0, rng=0)(x),
                                  tnn.Dropout(1.0)(torch.from_numpy(x)).numpy())
    # train mode: kept values are scaled by 1/(1-p) in both (masks differ: different RNGs)
    y = nn.Dropout(0.3, rng=0)(x)
    yt = tnn.Dropout(0.3)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y[y != 0], x[y != 0] / 0.7, rtol=1e-15)
    np.testing.assert_allclose(yt[yt != 0], x[yt != 0] / 0.7, rtol=1e-15)


# ------------------------------------------------------------------ training parity

OPTIMS = {
    "sgd": (lambda ps: SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-4),
            lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-4,
                                       foreach=False)),
    "sgd-nesterov": (lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
                     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                                foreach=False)),
    "adam": (lambda ps: Adam(ps, lr=0.01),
             lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=False)),
    "adam-wd-amsgrad": (lambda ps: Adam(ps, lr=0.01, weight_decay=1e-4, amsgrad=True),
                        lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-4,
                                                    amsgrad=True, foreach=False)),
}


@pytest.mark.parametrize("opt_name", list(OPTIMS))
@pytest.mark.parametrize("which", list(PAIRS))
def test_training_matches_torch(which, opt_name):
    fc, th, in_shape, nc = PAIRS[which](seed=7)
    th.load_state_dict(to_torch(fc.state_dict()))
    make_fc_opt, make_th_opt = OPTIMS[opt_name]
    opt_fc, opt_th = make_fc_opt(fc.parameters()), make_th_opt(th.parameters())
    loss_fc, loss_th = nn.CrossEntropyLoss(), tnn.CrossEntropyLoss()
    rng = np.random.default_rng(11)
    losses_fc, losses_th = [], []
    for _ in range(10):
        x = rng.standard_normal((8,) + in_shape)
        t = rng.integers(0, nc, 8)

        opt_fc.zero_grad()
        loss = loss_fc(fc(x), t)
        fc.backward(loss_fc.backward())
        opt_fc.step()
        losses_fc.append(float(loss))

        opt_th.zero_grad()
        lt = loss_th(th(torch.from_numpy(x)), torch.from_numpy(t))
        lt.backward()
        opt_th.step()
        losses_th.append(lt.item())

    np.testing.assert_allclose(losses_fc, losses_th, rtol=1e-9, atol=0)
    assert losses_fc[-1] != losses_fc[0]
    sd_th = to_numpy(th.state_dict())
    for k, v in fc.state_dict().items():
        np.testing.assert_allclose(v, sd_th[k], rtol=1e-9, atol=1e-12, err_msg=k)
    # the optimizer states agree too
    st_fc, st_th = opt_fc.state_dict()["state"], opt_th.state_dict()["state"]
    assert sorted(st_fc) == sorted(st_th)
    for i in st_fc:
        for key, v in st_th[i].items():
            if isinstance(v, torch.Tensor) and v.ndim > 0:
                np.testing.assert_allclose(st_fc[i][key], v.numpy(), rtol=1e-8, atol=1e-12,
                                           err_msg=f"{i} {key}")
            elif key == "step":
                assert float(st_fc[i][key]) == float(v)


def test_saved_weights_load_into_torch(tmp_path):
    fc, th, in_shape, nc = cnn_pair(seed=9)
    fc.save(tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz") as f:
        th.load_state_dict({k: torch.from_numpy(f[k]) for k in f.files})
    x, t = data(in_shape, nc)
    assert_same_run(fc_run(fc, x, t), th_run(th, x, t))


@pytest.mark.parametrize("kw", [
    dict(),
    dict(reduction="sum", label_smoothing=0.1),
    dict(weight=[0.5, 1.0, 2.0, 1.5], ignore_index=2),
    dict(reduction="none", weight=[0.5, 1.0, 2.0, 1.5], label_smoothing=0.2),
], ids=lambda kw: ",".join(kw) or "default")
def test_cross_entropy_module_matches_torch(kw):
    rng = np.random.default_rng(0)
    logits, t = 3 * rng.standard_normal((7, 4)), rng.integers(0, 4, 7)
    tkw = dict(kw)
    if "weight" in kw:
        tkw["weight"] = torch.tensor(kw["weight"], dtype=torch.float64)
    lt = torch.from_numpy(logits.copy()).requires_grad_(True)
    out_t = tnn.CrossEntropyLoss(**tkw)(lt, torch.from_numpy(t))
    loss_fn = nn.CrossEntropyLoss(**kw)
    out = loss_fn(logits, t)
    np.testing.assert_allclose(out, out_t.detach().numpy(), **TOL)
    go = rng.standard_normal(7) if kw.get("reduction") == "none" else 1.7
    out_t.backward(torch.tensor(go, dtype=torch.float64))
    np.testing.assert_allclose(loss_fn.backward(go), lt.grad.numpy(), **TOL)
