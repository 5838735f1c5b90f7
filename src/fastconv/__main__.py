"""The ``fastconv`` command: ``train``, ``predict`` and ``info``."""
import argparse
import json
import sys
import time

import numpy as np

CONFIG_KEY = "__fastconv_config__"


def _load_data(path):
    """(X as float32 (N, C, H, W), y int64) from an .npz with arrays X and y."""
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SystemExit(f"fastconv: cannot read {path}: {e}")
    with f:
        if "X" not in f.files:
            raise SystemExit(f"fastconv: {path} must hold an array 'X' (images), found "
                             f"{f.files}")
        X = f["X"]
        y = f["y"] if "y" in f.files else None
    if X.ndim == 3:
        X = X[:, None]
    if X.ndim != 4:
        raise SystemExit(f"fastconv: X in {path} must be N x H x W or N x C x H x W, got shape "
                         f"{X.shape}")
    if X.dtype.kind not in "fiub":
        raise SystemExit(f"fastconv: X in {path} must be numeric, got dtype {X.dtype}")
    if y is not None:
        if y.shape != (X.shape[0],) or y.dtype.kind not in "iu":
            raise SystemExit(f"fastconv: y in {path} must be integer labels of shape "
                             f"({X.shape[0]},), got {y.dtype} {y.shape}")
        y = y.astype(np.int64)
    return X.astype(np.float32), y


def _split(X, y, seed, test_fraction=0.2):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    n_test = max(1, int(round(len(X) * test_fraction)))
    te, tr = order[:n_test], order[n_test:]
    return X[tr], y[tr], X[te], y[te]


def _train(args):
    from . import get_num_threads, nn, optim, set_num_threads
    from .datasets import load_digits
    from .models import small_cnn
    from .train import Trainer, TrainingDiverged

    if args.threads:
        set_num_threads(args.threads)
    t_start = time.perf_counter()
    if args.data:
        X, y = _load_data(args.data)
        if y is None:
            raise SystemExit(f"fastconv: {args.data} has no labels 'y' to train on")
        Xtr, ytr, Xte, yte = _split(X, y, args.seed)
        source = args.data
    else:
        # raw 0..16 pixel values: the saved mean/std then apply to raw images at predict time
        Xtr, ytr = load_digits("train", normalize=False)
        Xte, yte = load_digits("test", normalize=False)
        source = "bundled UCI digits"
    mean, std = float(Xtr.mean()), float(Xtr.std()) or 1.0
    Xtr, Xte = (Xtr - mean) / std, (Xte - mean) / std
    n_classes = int(max(ytr.max(), yte.max())) + 1
    C, H, W = Xtr.shape[1:]
    config = {"in_channels": int(C), "input_size": [int(H), int(W)], "num_classes": n_classes,
              "width": args.width, "mean": mean, "std": std}
    nn.manual_seed(args.seed)
    model = small_cnn(C, n_classes, (H, W), width=args.width)
    if args.optimizer == "adam":
        opt = optim.Adam(model.parameters(), lr=args.lr)
    else:
        opt = optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    verbose = False if args.quiet else None
    trainer = Trainer(model, nn.CrossEntropyLoss(), opt, verbose=verbose)
    print(f"fastconv: training a small CNN on {source}: {len(Xtr)} train / {len(Xte)} test "
          f"images of {C}x{H}x{W}, {n_classes} classes, {args.optimizer} lr={args.lr}, "
          f"{args.epochs} epochs, batch {args.batch_size}, {get_num_threads()} threads")
    try:
        for epoch in range(args.epochs):
            h = trainer.fit(Xtr, ytr, epochs=1, batch_size=args.batch_size,
                            validation_data=(Xte, yte), seed=args.seed + epoch)
            if not args.quiet and not sys.stderr.isatty():
                print(f"epoch {epoch + 1}/{args.epochs}: loss {h['loss'][-1]:.4f} "
                      f"accuracy {h['accuracy'][-1]:.4f} test loss {h['val_loss'][-1]:.4f} "
                      f"test accuracy {h['val_accuracy'][-1]:.4f}")
    except TrainingDiverged as e:
        raise SystemExit(f"fastconv: {e}")
    result = trainer.evaluate(Xte, yte)
    elapsed = time.perf_counter() - t_start
    if args.save:
        arrays = dict(model.state_dict())
        arrays[CONFIG_KEY] = np.array(json.dumps(config))
        with open(args.save, "wb") as f:
            np.savez(f, **arrays)
        print(f"saved the model to {args.save}")
    if args.plot:
        _plot(trainer.history, args.plot)
    print(f"time: {elapsed:.1f} s")
    print(f"test accuracy: {result['accuracy']:.3f}")
    return 0


def _plot(history, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastconv: matplotlib is not installed (pip install matplotlib); no plot written",
              file=sys.stderr)
        return
    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, history["loss"], label="train")
    b.plot(epochs, history["accuracy"], label="train")
    if history.get("val_loss"):
        a.plot(epochs, history["val_loss"], label="test")
        b.plot(epochs, history["val_accuracy"], label="test")
    a.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    b.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"saved the training curves to {path}")


def _predict(args):
    from .models import small_cnn
    from .train import Trainer

    try:
        f = np.load(args.model, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SystemExit(f"fastconv: cannot read the model {args.model}: {e}")
    with f:
        if CONFIG_KEY not in f.files:
            raise SystemExit(f"fastconv: {args.model} was not saved by 'fastconv train --save'")
        config = json.loads(str(f[CONFIG_KEY]))
        weights = {k: f[k] for k in f.files if k != CONFIG_KEY}
    model = small_cnn(config["in_channels"], config["num_classes"], config["input_size"],
                      width=config["width"], rng=0)
    model.load_state_dict(weights)
    X, y = _load_data(args.data)
    if X.shape[1:] != (config["in_channels"], *config["input_size"]):
        raise SystemExit(f"fastconv: the model expects images of shape "
                         f"{(config['in_channels'], *config['input_size'])}, {args.data} has "
                         f"{X.shape[1:]}")
    X = (X - config["mean"]) / config["std"]
    trainer = Trainer(model, None, None, verbose=False)
    proba = trainer.predict_proba(X)
    pred = proba.argmax(axis=1)
    if args.output:
        if args.output.endswith(".npz"):
            np.savez(args.output, predictions=pred, probabilities=proba)
        else:
            np.savetxt(args.output, pred, fmt="%d")
        print(f"saved {len(pred)} predictions to {args.output}")
    else:
        for p in pred:
            print(p)
    if y is not None:
        print(f"accuracy: {np.mean(pred == y):.3f}", file=sys.stderr)
    return 0


def _info(args):
    from . import show_config

    show_config()
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="fastconv", description="Fast CNN kernels for NumPy: train and run small CNNs.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a small CNN (default: on the bundled digits)")
    t.add_argument("--epochs", type=int, default=15)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--width", type=int, default=16, help="channels of the first conv")
    t.add_argument("--threads", type=int, default=0, help="kernel threads (default: all)")
    t.add_argument("--data", help=".npz with X (N x H x W or N x C x H x W) and y (labels)")
    t.add_argument("--save", metavar="PATH", help="save the trained model (.npz)")
    t.add_argument("--plot", metavar="PATH", help="save loss/accuracy curves (PNG)")
    t.add_argument("--quiet", action="store_true", default=None, help="no progress output")
    t.set_defaults(func=_train)
    p = sub.add_parser("predict", help="predict labels with a model saved by 'train --save'")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help=".npz with X (and optionally y)")
    p.add_argument("--output", help="write predictions to a .txt (one per line) or .npz")
    p.set_defaults(func=_predict)
    i = sub.add_parser("info", help="show the build configuration")
    i.set_defaults(func=_info)
    sub.add_parser("bench", help="benchmark against PyTorch / ONNX Runtime / NumPy "
                   "('fastconv bench --help' for options)", add_help=False)
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench.run import main as bench_main, quiet_blas_reexec

        if from_command_line:
            quiet_blas_reexec(argv[1:])
        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "width"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if getattr(args, "lr", 1.0) is not None and not getattr(args, "lr", 1.0) > 0:
        parser.error("--lr must be > 0")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
