"""Command line: ``fastconv demo`` (until the trainer lands) and ``fastconv info``."""
import argparse
import sys
import time


def _demo(args):
    import numpy as np

    import fastconv as fc

    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
    w = (rng.standard_normal((16, 3, 3, 3)) * 0.1).astype(np.float32)
    b = np.zeros(16, np.float32)
    t0 = time.perf_counter()
    y = fc.conv2d(x, w, b, stride=2, padding=1)
    gx, gw, gb = fc.conv2d_backward(np.ones_like(y), x, w, stride=2, padding=1)
    p = fc.max_pool2d(y, 2)
    logits = p.reshape(len(x), -1)[:, :10]
    labels = rng.integers(0, 10, len(x))
    loss = fc.cross_entropy(logits, labels)
    dt = time.perf_counter() - t0
    print(f"fastconv {fc.__version__}: conv2d {x.shape} -> {y.shape}, grads {gx.shape} "
          f"{gw.shape} {gb.shape}, max_pool2d -> {p.shape}")
    print(f"cross-entropy on {logits.shape}: {float(loss):.4f}  ({dt * 1e3:.1f} ms, "
          f"{fc.get_num_threads()} threads)")
    return 0


def _info(args):
    import fastconv as fc
    from fastconv import _kernels

    print(f"fastconv {fc.__version__}")
    print(f"OpenMP: {'on' if _kernels.openmp_enabled() else 'off'}; threads: "
          f"{fc.get_num_threads()}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastconv", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run a forward/backward pass on random data")
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)
    i = sub.add_parser("info", help="show build configuration")
    i.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
