"""Sequential's inference plans (under no_grad()): after the first call on an input shape and
dtype, a model's parts that fastconv knows (Conv2d [-> ReLU] [-> MaxPool2d], Linear [-> ReLU],
ReLU, Flatten) run as prepared kernel calls.  The oracle is the layers run one by one in
training mode (each layer's forward, which tests/test_nn.py and tests/test_properties.py check
against finite differences and the naive reference): bit for bit, on every call, whatever
changes between calls (parameters in place or replaced, layer settings, the thread count,
the input's shape or layout) and without touching the input.
"""
import copy
import pickle
import threading

import numpy as np
import pytest

import fastconv as fc
import fastconv.nn as nn


def lenet(dtype, seed=0):
    kw = dict(dtype=dtype, rng=seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2, **kw), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, **kw), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 32, **kw), nn.ReLU(), nn.Linear(32, 10, **kw))


def one_by_one(model, x):
    """The layers' own forwards in training mode, one at a time (nested Sequentials by
    their children)."""
    for m in model:
        x = one_by_one(m, x) if type(m) is nn.Sequential else m.forward(x)
    return x


def planned(model, x, calls=3):
    """model(x) under no_grad() ``calls`` times (the first makes the plan); every result."""
    with nn.no_grad():
        return [model(x) for _ in range(calls)]


def count_parts(monkeypatch):
    """A list that grows by one for each part of a model run the usual way."""
    seen = []
    part = nn.Sequential._part

    def spy(self, *a):
        seen.append(1)
        return part(self, *a)

    monkeypatch.setattr(nn.Sequential, "_part", spy)
    return seen


def check(model, x, calls=3):
    x0 = x.copy()
    expected = one_by_one(model, x)
    for y in planned(model, x, calls):
        np.testing.assert_array_equal(y, expected)
        np.testing.assert_array_equal(np.signbit(y), np.signbit(expected))
        assert y.dtype == expected.dtype and y.shape == expected.shape
    np.testing.assert_array_equal(x, x0)          # the input is never modified
    return expected


class Alternate(nn.Module):
    """A user module whose output shape changes from call to call (keeps every other
    image of the batch on odd calls)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        object.__setattr__(self, "calls", self.calls + 1)
        return x[::2] if self.calls % 2 else x


MODELS = {
    "lenet": (lenet, (1, 1, 28, 28)),
    "lenet_batch3": (lenet, (3, 1, 28, 28)),
    "conv_alone": (lambda dt: nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, dtype=dt, rng=1)),
                   (2, 3, 9, 10)),
    "conv_relu_no_pool_bias_false": (
        lambda dt: nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, bias=False, dtype=dt, rng=2),
                                 nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3, bias=False,
                                                                    dtype=dt, rng=3)),
        (2, 3, 9, 9)),
    "relu_first_flatten_relu": (   # ReLUs on the caller's array (or a view of it)
        lambda dt: nn.Sequential(nn.ReLU(), nn.Flatten(), nn.ReLU(), nn.Linear(48, 4, dtype=dt,
                                                                             rng=4)),
        (2, 3, 4, 4)),
    "flatten_relu": (lambda dt: nn.Sequential(nn.Flatten(), nn.ReLU()), (2, 3, 4, 4)),
    "avgpool_relu_dropout_nested": (
        lambda dt: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, dtype=dt, rng=5), nn.AvgPool2d(2),
                                 nn.ReLU(), nn.Dropout(0.5, rng=6).eval(),
                                 nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 6, dtype=dt,
                                                                       rng=7), nn.ReLU()),
                                 nn.Linear(6, 2, dtype=dt, rng=8)),
        (3, 2, 8, 8)),
    "linear_3d_input": (lambda dt: nn.Sequential(nn.Linear(5, 7, dtype=dt, rng=9), nn.ReLU(),
                                                 nn.Linear(7, 3, dtype=dt, rng=10)),
                        (2, 4, 5)),
    "empty_batch": (lenet, (0, 1, 28, 28)),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(MODELS))
def test_plans_give_the_layers_numbers(name, dtype, threads, restore_threads):
    """Planned calls (and the call that makes the plan) bit for bit the layers one by one,
    with NaN, -0 and negative values, and the input untouched."""
    fc.set_num_threads(threads)
    make, shape = MODELS[name]
    model = make(dtype)
    x = np.random.default_rng(1).uniform(-1, 1, shape).astype(dtype)
    if x.size:
        x.flat[3] = np.nan
        x.flat[5:9] = -0.0
    check(model, x)


def test_planned_calls_run_no_part_the_usual_way(monkeypatch):
    """A LeNet-style model's every part is a prepared step: after the first call none runs
    through Sequential's usual path (so the tests above test the steps)."""
    model = lenet(np.float32)
    x = np.random.default_rng(2).standard_normal((1, 1, 28, 28)).astype(np.float32)
    seen = count_parts(monkeypatch)
    planned(model, x, calls=1)
    assert len(seen) == 5      # conv+relu+pool twice, flatten, linear+relu, linear
    seen.clear()
    planned(model, x, calls=2)
    assert seen == []


@pytest.mark.parametrize("direct", ["always", "never"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_steps_call_the_kernels_themselves(dtype, direct, monkeypatch):
    """Planned Conv2d and Linear parts are _kernels.ConvStep / LinearStep (the kernel called
    on the arrays' pointers), by the direct kernels or the own GEMM as the conv2d plan chose,
    bit for bit the layers one by one, batch 1 and 3, 1 and 2 threads."""
    from fastconv import _kernels, functional as F
    if _kernels.gemm_level() == "blas" or (direct == "always" and not _kernels.direct_ok()):
        pytest.skip("no own GEMM / direct kernels on this CPU")
    monkeypatch.setattr(F, "_DIRECT", direct)
    old = fc.get_num_threads()
    try:
        for threads in (1, 2):
            fc.set_num_threads(threads)
            for n in (1, 3):
                # 32 channels: whole blocks of the direct kernels at every level (AVX-512
                # float32: 2 vectors of 16; 16 channels ran the GEMM there, "always" or not)
                model = nn.Sequential(
                    nn.Conv2d(2, 32, 5, padding=2, dtype=dtype, rng=1), nn.ReLU(),
                    nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1, dtype=dtype, rng=2),
                    nn.Flatten(), nn.Linear(32 * 6 * 6, 7, dtype=dtype, rng=3), nn.ReLU())
                x = np.random.default_rng(n).uniform(-1, 1, (n, 2, 12, 12)).astype(dtype)
                check(model, x)
                steps = next(iter(model._plans.values()))
                kinds = [type(s).__name__ for s in steps]
                assert kinds[:2] == ["ConvStep", "ConvStep"] and kinds[3] == "LinearStep"
                assert all(s.direct == (direct == "always") for s in steps[:2])
    finally:
        fc.set_num_threads(old)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plans_follow_the_parameters(dtype):
    """Parameters changed in place, replaced by new arrays (also non-contiguous ones), or a
    bias removed: the next planned call uses them; a replacement of another dtype raises the
    layer's TypeError, as without plans."""
    model = lenet(dtype)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 1, 28, 28)).astype(dtype)
    check(model, x)
    model[0].weight.data *= 2                                         # in place
    model[7].bias.data += 1
    check(model, x)
    model[3].weight.data = rng.standard_normal(model[3].weight.shape).astype(dtype)
    model[9].weight.data = np.asfortranarray(rng.standard_normal((10, 32)).astype(dtype))
    model[7].weight.data = rng.standard_normal((32, 16 * 7 * 7 * 2)).astype(dtype)[:, ::2]
    check(model, x)
    model[3].bias = None
    model[9].bias = None
    check(model, x)
    other = np.float64 if dtype == np.float32 else np.float32
    model[3].weight.data = model[3].weight.data.astype(other)
    with pytest.raises(TypeError, match="dtype"):
        planned(model, x, calls=1)


def test_plans_follow_the_layers_settings_and_the_model(restore_threads, monkeypatch):
    """A layer's settings changed, a module appended, the thread count or the input's shape,
    dtype or layout changed (Fortran order, strided, read-only): each call as the layers
    one by one."""
    model = lenet(np.float32)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    check(model, x)
    model[3].padding, model[3].dilation = 2, 2      # the same output shape, other numbers
    check(model, x)
    model.append(nn.ReLU())
    check(model, x)
    for threads in (1, 2, 1):
        fc.set_num_threads(threads)
        check(model, x)
    import fastconv.functional as F
    rows = planned(model, x[:1])[-1]
    monkeypatch.setattr(F, "_LINEAR_OWN_ROWS", 1)     # Linear by the GEMM from 1 row on
    gemm = check(model, x[:1])
    assert not np.array_equal(rows, gemm)             # (other sums: the plan followed)
    ro = x.copy()
    ro.flags.writeable = False
    for xx in (x[:1], x, np.asfortranarray(x), x[:, :, ::-1], ro):
        check(model, xx)
    with pytest.raises(TypeError, match="dtype"):
        planned(model, x.astype(np.float64))


def test_a_part_whose_input_shape_changes_runs_the_usual_way():
    """After a user module whose output shape varies, the planned steps see an input other
    than the plan's and run their part the usual way: every call right."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, rng=1), nn.ReLU(), Alternate(),
                          nn.Conv2d(4, 4, 3, rng=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.ReLU(), nn.Linear(64, 5, rng=3), nn.ReLU())
    x = np.random.default_rng(5).standard_normal((4, 2, 10, 10)).astype(np.float32)
    for _ in range(5):
        with nn.no_grad():
            y = model(x)
        h = model[1].forward(model[0].forward(x))      # (no module made: no new plans)
        h = h[::2] if model[2].calls % 2 else h
        for m in list(model)[3:]:
            h = m.forward(h)
        np.testing.assert_array_equal(y, h)
    assert len(model._plans) == 1


def test_copies_and_pickles_make_their_own_plans():
    """A deep copy or a pickle of a planned model runs its own parameters (plans are not
    copied: they refer to the original's layers)."""
    model = lenet(np.float32)
    x = np.random.default_rng(6).standard_normal((1, 1, 28, 28)).astype(np.float32)
    y0 = planned(model, x)[-1]
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert "_plans" not in clone.__dict__
        clone[0].weight.data *= -1
        y1 = planned(clone, x)[-1]
        np.testing.assert_array_equal(y1, one_by_one(clone, x))
        assert not np.array_equal(y1, y0)
        np.testing.assert_array_equal(planned(model, x)[-1], y0)


def test_training_after_plans_and_backward_after_no_grad():
    """Plans do not change training: a training forward drops them, backward after a
    no_grad() forward still raises (the layers keep nothing), and gradients are the layers'
    one by one."""
    model = lenet(np.float64)
    x = np.random.default_rng(7).standard_normal((2, 1, 28, 28))
    planned(model, x)
    with pytest.raises(RuntimeError, match="no_grad"):
        model.backward(np.ones((2, 10)))
    y = model(x)
    assert "_plans" not in model.__dict__
    g = np.random.default_rng(8).standard_normal(y.shape)
    model.zero_grad()
    gx = model.backward(g)
    grads = [p.grad.copy() for p in model.parameters()]
    planned(model, x)
    with pytest.raises(RuntimeError, match="no_grad"):
        model.backward(g)
    model.zero_grad()
    mods = list(model)
    h = one_by_one(model, x)
    gh = g
    for m in reversed(mods):
        gh = m.backward(gh)
    np.testing.assert_array_equal(h, y)
    np.testing.assert_array_equal(gh, gx)
    for a, b in zip(grads, [p.grad for p in model.parameters()]):
        np.testing.assert_array_equal(a, b)


def test_python_threads_share_a_planned_model(restore_threads):
    """Two Python threads running one planned model on different inputs at once (each with
    its own workspaces) get their own answers."""
    fc.set_num_threads(2)
    model = lenet(np.float32)
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal((1, 1, 28, 28)).astype(np.float32) for _ in range(2)]
    expected = [one_by_one(model, x) for x in xs]
    bad = []

    def work(i):
        for _ in range(60):
            with nn.no_grad():
                if not np.array_equal(model(xs[i]), expected[i]):
                    bad.append(i)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert bad == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sequential_fuses_linear_relu_with_the_same_numbers(dtype):
    """Sequential runs Linear -> ReLU as one kernel call in training too: outputs and
    gradients bit for bit the layers one by one, with NaN and -0."""
    rng = np.random.default_rng(10)
    for bias in (True, False):
        lin, relu, lin2 = (nn.Linear(9, 6, bias=bias, dtype=dtype, rng=1), nn.ReLU(),
                           nn.Linear(6, 3, dtype=dtype, rng=2))
        model = nn.Sequential(lin, relu, lin2)
        x = rng.uniform(-1, 1, (5, 9)).astype(dtype)
        x[1, 2] = np.nan
        lin.weight.data[0] = 0.0
        lin.weight.data[1] = -0.0
        expected = lin2.forward(relu.forward(lin.forward(x)))
        g = rng.uniform(-1, 1, expected.shape).astype(dtype)
        model.zero_grad()
        gx1 = lin.backward(relu.backward(lin2.backward(g)))
        grads1 = [p.grad.copy() for p in model.parameters()]
        model.zero_grad()
        y = model(x)
        np.testing.assert_array_equal(y, expected)
        h = model[1]._y
        np.testing.assert_array_equal(np.signbit(h), np.signbit(relu.forward(lin.forward(x))))
        assert np.isnan(h).any() and (h == 0).any()
        np.testing.assert_array_equal(model.backward(g), gx1)
        for a, b in zip(grads1, [p.grad for p in model.parameters()]):
            np.testing.assert_array_equal(a, b)


def test_pool_wake_wakes_sleeping_workers(restore_threads):
    """pool_wake: sleeping workers wake (and spin through an open burst); nothing to do
    when none sleeps."""
    import time
    k = fc._kernels
    fc.set_num_threads(2)
    x = np.ones((1, 8, 40, 40), np.float32)
    w = np.ones((32, 8, 3, 3), np.float32)
    k.set_pool_burst_spin(60_000_000_000)
    try:
        ref = fc.conv2d(x, w, padding=1)             # a worker exists (earlier tests may
        t0 = time.monotonic()                        # have made more)
        while k.pool_sleeping() < 1 and time.monotonic() - t0 < 10:
            time.sleep(0.002)
        time.sleep(0.05)                             # (all of them asleep)
        assert k.pool_sleeping() >= 1
        assert not k.pool_wake(1)                    # one thread: nothing to wake
        k.pool_burst(1)
        assert k.pool_wake(2)
        time.sleep(0.1)
        assert k.pool_sleeping() == 0
        assert not k.pool_wake(2)
        np.testing.assert_array_equal(fc.conv2d(x, w, padding=1), ref)
    finally:
        k.pool_burst(-k.pool_burst(0))
        k.set_pool_burst_spin(1_000_000)


class Recorder(nn.Module):
    """A user module that records things about its input in its forward."""

    def forward(self, x):
        self.last_shape = x.shape
        self.last = x
        self.calls = getattr(self, "calls", 0) + 1
        return x


def test_plans_keep_up_with_what_users_do_to_layers(monkeypatch):
    """A forward set on a layer instance runs (planned or not); a max-pool's list settings
    changed in place are seen (such parts are not planned); a user module that records
    things in its forward does not make the plans anew on every call; a fused Linear under
    no_grad() keeps nothing for backward."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, rng=2), nn.ReLU(),
                          nn.MaxPool2d([2, 2]), nn.Flatten())
    check(model, x)
    model[2].kernel_size[:] = [4, 4]                  # in place: no attribute set
    assert check(model, x).shape == (2, 4 * 2 * 2)
    lin = nn.Linear(4 * 8 * 8, 5, rng=1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, rng=2), nn.ReLU(), nn.Flatten(), lin,
                          nn.ReLU())
    check(model, x)
    lin.forward = lambda z: np.full((z.shape[0], 5), -1, np.float32)
    for y in planned(model, x):
        np.testing.assert_array_equal(y, np.zeros((2, 5), np.float32))
    model[0].forward = lambda z: np.ones((z.shape[0], 4, 8, 8), np.float32)
    for y in planned(model, x):
        np.testing.assert_array_equal(y, np.zeros((2, 5), np.float32))
    lin.__dict__.pop("forward")
    for y in planned(model, x):
        np.testing.assert_array_equal(y, np.maximum(lin.forward(np.ones((2, 256),
                                                                       np.float32)), 0))
    # a recording module: planned calls run only its own part the usual way
    rec = Recorder()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, rng=3), nn.ReLU(), rec, nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 6, rng=4), nn.ReLU(), nn.Linear(6, 2, rng=5))
    expected = check(model, x)
    seen = count_parts(monkeypatch)
    for y in planned(model, x, calls=4):
        np.testing.assert_array_equal(y, expected)
    assert len(seen) == 4 and rec.last_shape == (2, 4, 8, 8)
    # the fused Linear -> ReLU under no_grad() keeps no input: backward raises
    with nn.no_grad():
        model(x)
    assert model[4].__dict__.get("_x") is None
    with pytest.raises(RuntimeError, match="no_grad"):
        model[4].backward(np.ones((2, 6), np.float32))


WINO_PARTS = {   # (layers after the convolution, the step expected for it)
    "5x5_relu_pool": (5, lambda: [nn.ReLU(), nn.MaxPool2d(2)], "WinoStep"),
    "5x5_pool": (5, lambda: [nn.MaxPool2d(2)], "WinoStep"),
    "5x5_relu": (5, lambda: [nn.ReLU()], "WinoStep"),
    "5x5_alone": (5, lambda: [], "WinoStep"),
    "3x3_relu": (3, lambda: [nn.ReLU()], "WinoStep"),
    "3x3_alone": (3, lambda: [], "WinoStep"),
    "3x3_relu_pool": (3, lambda: [nn.ReLU(), nn.MaxPool2d(2)], "function"),  # (pool after)
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(WINO_PARTS))
def test_winograd_steps(name, dtype, threads, restore_threads):
    """Convolutions that conv2d runs by Winograd are planned as _kernels.WinoStep (the kernel
    on the arrays' pointers; 5x5: ReLU and pool in its output transform, 3x3: ReLU after):
    bit for bit the layers one by one at batch 1, 3 and 6 (past the transform cache's 4), on
    1 and 2 threads, with an image holding inf and NaN (convolved directly), after the
    weights change in place or are replaced (a kept transform is not reused; by a read-only
    Fortran-order array too), on read-only, reversed and Fortran-order inputs."""
    from fastconv import _kernels, functional as F
    if _kernels.gemm_level() == "blas":
        pytest.skip("WinoStep runs with the own GEMM")
    fc.set_num_threads(threads)
    k, after, kind = WINO_PARTS[name]
    cin, cout = (16, 32) if k == 5 else (16, 16)
    rng = np.random.default_rng(k)
    for n in (1, 3, 6):
        model = nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, dtype=dtype, rng=n),
                              *after(), nn.Flatten())
        x = rng.uniform(-1, 1, (n, cin, 10, 9)).astype(dtype)
        geo = F._conv_setup("t", x, model[0].weight.data, 1, k // 2, 1, 1)
        assert F._use_winograd(geo, model[0].weight.data, n=n)
        if n > 1:
            x[1, 3, 4, 5], x[1, 0, 0, 0] = np.inf, np.nan
        check(model, x, calls=4)                  # (the cache keeps the transform from call 2)
        steps = next(iter(model._plans.values()))
        assert type(steps[0]).__name__ == kind
        model[0].weight.data[1, 2] *= -2                      # in place
        check(model, x, calls=2)
        model[0].weight.data = rng.standard_normal(model[0].weight.shape).astype(dtype)
        check(model, x, calls=2)
        model[0].weight.data = np.asfortranarray(model[0].weight.data)    # (the usual way)
        model[0].weight.data.flags.writeable = False
        ro = x.copy()
        ro.flags.writeable = False
        for xx in (ro, x[:, :, ::-1], np.asfortranarray(x)):
            check(model, xx, calls=2)
