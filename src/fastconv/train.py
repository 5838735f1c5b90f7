"""A small trainer for classifiers: mini-batches, cross-entropy, progress, checkpoints.

::

    trainer = Trainer(model, nn.CrossEntropyLoss(), optim.Adam(model.parameters(), lr=1e-3))
    history = trainer.fit(X, y, epochs=10, batch_size=64, validation_split=0.1, seed=0)
    print(trainer.evaluate(X_test, y_test))
"""
import json
import math
import sys
import time

import numpy as np

__all__ = ["Trainer", "TrainingDiverged"]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite: training stopped instead of producing garbage."""


def _check_xy(X, y, who):
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim < 2:
        raise ValueError(f"{who}: X must have a batch dimension, got shape {X.shape}")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"{who}: y must be labels of shape ({X.shape[0]},) to match X of shape "
                         f"{X.shape}, got shape {y.shape}")
    if y.dtype.kind not in "iu":
        raise TypeError(f"{who}: y must hold integer class labels, got dtype {y.dtype}")
    return X, y


def _batches(n, batch_size):
    return range(0, n, batch_size)


class Trainer:
    """Train a classifier (a :class:`fastconv.nn.Module` mapping inputs to logits).

    Parameters
    ----------
    model : fastconv.nn.Module
    loss_fn : fastconv.nn.CrossEntropyLoss
        Anything called as ``loss_fn(logits, y)`` returning a scalar, with ``backward()``
        returning the gradient of that scalar with respect to the logits.
    optimizer : fastconv.optim.Optimizer
        Over ``model.parameters()``.
    verbose : bool, optional
        Show a progress bar per epoch (loss, accuracy, images/s). By default only when
        standard error is a terminal.

    Attributes
    ----------
    history : dict of lists
        ``loss``, ``accuracy`` and, with validation data, ``val_loss`` and ``val_accuracy``,
        one entry per epoch trained (across calls to :meth:`fit`).
    epoch : int
        Epochs trained so far (restored by :meth:`load_checkpoint`).

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv import nn, optim
    >>> from fastconv.train import Trainer
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((64, 4)).astype(np.float32); y = (X[:, 0] > 0).astype(int)
    >>> model = nn.Sequential(nn.Linear(4, 2, rng=0))
    >>> trainer = Trainer(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.5),
    ...                   verbose=False)
    >>> history = trainer.fit(X, y, epochs=20, batch_size=16, seed=0)
    >>> trainer.evaluate(X, y)["accuracy"] > 0.9
    True
    """

    def __init__(self, model, loss_fn, optimizer, verbose=None):
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.verbose = verbose
        self.history = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
        self.epoch = 0

    def _progress(self, total, desc):
        verbose = self.verbose
        if verbose is None:
            verbose = sys.stderr.isatty()
        if not verbose:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            return None
        return tqdm(total=total, desc=desc, unit="img", leave=True, file=sys.stderr,
                    dynamic_ncols=True)

    def train_step(self, xb, yb):
        """One optimisation step on a batch; returns ``(loss, number correct)``."""
        self.model.train()
        logits = self.model(xb)
        loss = float(self.loss_fn(logits, yb))
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {loss} at epoch {self.epoch + 1}: training stopped. Lower the "
                "learning rate, check the inputs for NaN/inf, or normalise them.")
        self.optimizer.zero_grad()
        g = self.loss_fn.backward()
        if getattr(self.model, "_skips_input_grad", False):
            self.model.backward(g, need_input_grad=False)   # nobody needs d loss / d input
        else:
            self.model.backward(g)
        self.optimizer.step()
        return loss, int(np.sum(np.argmax(logits, axis=1) == yb))

    def fit(self, X, y, epochs=1, batch_size=32, validation_data=None, validation_split=0.0,
            shuffle=True, seed=None, checkpoint=None):
        """Train for ``epochs`` more epochs of mini-batch steps.

        Parameters
        ----------
        X : ndarray of shape (N, ...)
        y : ndarray of int of shape (N,)
        epochs, batch_size : int
        validation_data : (X_val, y_val), optional
            Evaluated after each epoch.
        validation_split : float in [0, 1)
            Without ``validation_data``, hold out this fraction of (X, y) (the last samples,
            before shuffling) for validation.
        shuffle : bool
            Shuffle the training samples every epoch.
        seed : int or numpy.random.Generator, optional
            For the shuffling.
        checkpoint : str or path, optional
            Save a checkpoint (:meth:`save_checkpoint`) there after every epoch.

        Returns
        -------
        dict of lists
            :attr:`history`.

        Raises
        ------
        TrainingDiverged
            When the loss becomes NaN or infinite.
        """
        X, y = _check_xy(X, y, "fit")
        for name, v in (("epochs", epochs), ("batch_size", batch_size)):
            if isinstance(v, bool) or not hasattr(v, "__index__") or int(v) < (name == "batch_size"):
                raise ValueError(f"fit: {name} must be a positive int, got {v!r}")
        if not 0.0 <= float(validation_split) < 1.0:
            raise ValueError(f"fit: validation_split must be in [0, 1), got {validation_split}")
        if validation_data is None and validation_split > 0:
            n_val = int(round(len(X) * validation_split))
            if n_val < 1 or n_val >= len(X):
                raise ValueError(f"fit: validation_split={validation_split} leaves no samples "
                                 f"for training or validation (N={len(X)})")
            validation_data = (X[-n_val:], y[-n_val:])
            X, y = X[:-n_val], y[:-n_val]
        if validation_data is not None:
            validation_data = _check_xy(*validation_data, "fit (validation_data)")
        if len(X) == 0:
            raise ValueError("fit: no training samples")
        rng = np.random.default_rng(seed)
        n = len(X)
        for _ in range(int(epochs)):
            order = rng.permutation(n) if shuffle else np.arange(n)
            bar = self._progress(n, f"epoch {self.epoch + 1}")
            total_loss, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
            try:
                for start in _batches(n, batch_size):
                    idx = order[start:start + batch_size]
                    loss, ok = self.train_step(X[idx], y[idx])
                    total_loss += loss * len(idx)
                    correct += ok
                    seen += len(idx)
                    if bar is not None:
                        rate = seen / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix(loss=f"{total_loss / seen:.4f}",
                                        acc=f"{correct / seen:.3f}", img_s=f"{rate:.0f}",
                                        refresh=False)
                        bar.update(len(idx))
            finally:
                if bar is not None:
                    bar.close()
            self.epoch += 1
            self.history["loss"].append(total_loss / n)
            self.history["accuracy"].append(correct / n)
            if validation_data is not None:
                v = self.evaluate(*validation_data, batch_size=max(256, batch_size))
                self.history["val_loss"].append(v["loss"])
                self.history["val_accuracy"].append(v["accuracy"])
            if checkpoint is not None:
                self.save_checkpoint(checkpoint)
        return self.history

    def _logits(self, X, batch_size):
        from .nn import no_grad

        self.model.eval()
        try:
            with no_grad():       # no activations kept: nothing calls backward on these
                outs = [self.model(X[i:i + batch_size]) for i in _batches(len(X), batch_size)]
        finally:
            self.model.train()
        if not outs:
            return np.zeros((0, 0))
        return np.concatenate(outs)

    def evaluate(self, X, y, batch_size=256):
        """Mean loss and accuracy on (X, y), in evaluation mode.

        Returns
        -------
        dict
            ``{'loss': float, 'accuracy': float}``
        """
        X, y = _check_xy(X, y, "evaluate")
        logits = self._logits(X, batch_size)
        loss = float(self.loss_fn(logits, y)) if len(X) else float("nan")
        acc = float(np.mean(np.argmax(logits, axis=1) == y)) if len(X) else float("nan")
        return {"loss": loss, "accuracy": acc}

    def predict_proba(self, X, batch_size=256):
        """Class probabilities (softmax of the logits), shape (N, classes)."""
        z = self._logits(np.asarray(X), batch_size).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z

    def predict(self, X, batch_size=256):
        """Predicted class labels, shape (N,)."""
        return np.argmax(self._logits(np.asarray(X), batch_size), axis=1)

    # ---- checkpoints
    def save_checkpoint(self, path):
        """Save weights, optimizer state, epoch count and history to one ``.npz`` file."""
        arrays = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        sd = self.optimizer.state_dict()
        scalars = {}
        for idx, st in sd["state"].items():
            for key, value in st.items():
                if isinstance(value, np.ndarray):
                    arrays[f"optim/{idx}/{key}"] = value
                else:
                    scalars[f"{idx}/{key}"] = value
        meta = {"epoch": self.epoch, "history": self.history,
                "param_groups": sd["param_groups"], "scalars": scalars,
                "optimizer": type(self.optimizer).__name__}
        arrays["meta"] = np.array(json.dumps(meta, default=_json_default))
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    def load_checkpoint(self, path):
        """Restore what :meth:`save_checkpoint` saved; training continues from there."""
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            model = {k[len("model/"):]: f[k] for k in f.files if k.startswith("model/")}
            state = {}
            for k in f.files:
                if k.startswith("optim/"):
                    _, idx, key = k.split("/", 2)
                    state.setdefault(int(idx), {})[key] = f[k]
        if meta.get("optimizer") != type(self.optimizer).__name__:
            raise ValueError(f"load_checkpoint: {path} holds {meta.get('optimizer')} state, "
                             f"the trainer uses {type(self.optimizer).__name__}")
        for key, value in meta["scalars"].items():
            idx, name = key.split("/", 1)
            state.setdefault(int(idx), {})[name] = value
        self.model.load_state_dict(model)
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.epoch = int(meta["epoch"])
        self.history = {k: list(v) for k, v in meta["history"].items()}
        return self


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"cannot save {type(o).__name__} in a checkpoint")
