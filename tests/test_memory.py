"""Long runs leave resident memory flat (no leak in the kernels, their wrappers or the layers).

10,000 forward+backward+SGD steps of a small CNN (Conv2d/ReLU/MaxPool2d/Conv2d/ReLU/Flatten/
Linear + CrossEntropyLoss + optim.SGD), then 10,000 rounds of every functional entry point
(forward and backward, both dtypes, the parallel paths included), must not grow the process's
resident set size (VmRSS in /proc/self/status) between the end of a warm-up and the end of the
run by more than a small tolerance.  A leak of one small array per step (a missed memoryview
release, a cached workspace that keeps growing, a reference cycle per call) would be 10,000
arrays: tens of megabytes.

Slow (about a minute): skipped unless FASTCONV_SLOW=1 (or pytest's ``-m slow`` together with
that variable); Linux only.
"""
import gc
import os

import numpy as np
import pytest

import fastconv as fc
import fastconv.functional
from fastconv import nn, optim

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("FASTCONV_SLOW"),
                       reason="slow: set FASTCONV_SLOW=1 to run"),
    pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)"),
]

STEPS = 10_000
WARMUP = 1_000
TOLERANCE_MB = 4.0


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def _assert_flat(samples, what):
    """samples: [(step, rss)] from the end of the warm-up to the end of the run."""
    start, end = samples[0][1], samples[-1][1]
    peak = max(r for _, r in samples)
    trace = ", ".join(f"{s}: {r:.1f}" for s, r in samples[:: max(1, len(samples) // 10)])
    assert end - start <= TOLERANCE_MB, (
        f"{what}: resident memory grew by {end - start:.1f} MiB over {samples[-1][0] - samples[0][0]}"
        f" steps after warm-up (from {start:.1f} to {end:.1f} MiB, peak {peak:.1f}); "
        f"step: MiB = {trace}")


def _run(step, what):
    for i in range(WARMUP):
        step(i)
    gc.collect()
    samples = [(WARMUP, rss_mb())]
    for i in range(WARMUP, STEPS):
        step(i)
        if (i + 1) % 500 == 0:
            gc.collect()
            samples.append((i + 1, rss_mb()))
    _assert_flat(samples, what)


@pytest.mark.parametrize("dtype", [np.float32])
def test_training_steps_keep_memory_flat(dtype):
    rng = np.random.default_rng(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, rng=0, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1, rng=1, dtype=dtype),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10, rng=2, dtype=dtype),
    )
    loss_fn = nn.CrossEntropyLoss()
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # a few fixed batches, so that the data itself allocates nothing new per step
    xs = [rng.standard_normal((8, 1, 8, 8)).astype(dtype) for _ in range(4)]
    ys = [rng.integers(0, 10, 8) for _ in range(4)]
    losses = []

    def step(i):
        x, y = xs[i % 4], ys[i % 4]
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        model.backward(loss_fn.backward())
        opt.step()
        if i % 1000 == 0:
            losses.append(float(loss))

    _run(step, "training")
    assert np.isfinite(losses).all()


def test_functional_calls_keep_memory_flat(monkeypatch):
    """Every kernel entry point, forward and backward, float32 and float64, with the parallel
    code paths forced (tiny grain, 2 threads): the per-thread workspaces, partial buffers and
    BLAS thread switching must not accumulate anything."""
    monkeypatch.setattr(fastconv.functional, "_GRAIN", 1)
    old = fc.get_num_threads()
    fc.set_num_threads(2)
    rng = np.random.default_rng(1)
    data = {}
    for dt in (np.float32, np.float64):
        x = rng.standard_normal((3, 4, 7, 6)).astype(dt)
        data[dt] = dict(
            x=x, w=rng.standard_normal((6, 2, 3, 3)).astype(dt),
            wd=rng.standard_normal((8, 1, 3, 3)).astype(dt),
            wt=rng.standard_normal((4, 3, 2, 2)).astype(dt),
            b=rng.standard_normal(6).astype(dt),
            logits=rng.standard_normal((5, 7)).astype(dt), labels=rng.integers(0, 7, 5),
            probs=rng.dirichlet(np.ones(7), 5).astype(dt))

    def step(i):
        d = data[np.float32 if i % 2 else np.float64]
        x, w, wd, wt = d["x"], d["w"], d["wd"], d["wt"]
        y = fc.conv2d(x, w, d["b"], stride=2, padding=1, groups=2)
        fc.conv2d_backward(y, x, w, stride=2, padding=1, groups=2)
        yd = fc.conv2d(x, wd, padding=1, groups=4)                 # depthwise kernel
        fc.conv2d_backward(yd, x, wd, padding=1, groups=4)
        yt = fc.conv_transpose2d(x, wt, stride=2, output_padding=1, groups=2)
        fc.conv_transpose2d_backward(yt, x, wt, stride=2, output_padding=1, groups=2)
        p, _ = fc.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
        fc.max_pool2d_backward(p, x, 3, 2, 1, ceil_mode=True)
        a = fc.avg_pool2d(x, 2, 1, 1, count_include_pad=False)
        fc.avg_pool2d_backward(a, x, 2, 1, 1, count_include_pad=False)
        u = fc.upsample_nearest2d(x, 2)
        fc.upsample_nearest2d_backward(u, 2)
        fc.cross_entropy(d["logits"], d["labels"], label_smoothing=0.1)
        fc.cross_entropy_backward(d["logits"], d["labels"], label_smoothing=0.1)
        fc.cross_entropy_backward(d["logits"], d["probs"], reduction="none")
        # and the error paths: a rejected call must not leak either
        with pytest.raises(ValueError):
            fc.conv2d(x, w, groups=3)

    try:
        _run(step, "functional API")
    finally:
        fc.set_num_threads(old)
