"""Trainer, checkpoints, the digits training run and the command line."""
import numpy as np
import pytest

from fastconv import nn, optim
from fastconv.__main__ import main
from fastconv.datasets import load_digits
from fastconv.models import small_cnn
from fastconv.train import Trainer, TrainingDiverged


def _digits():
    Xtr, ytr = load_digits("train")
    Xte, yte = load_digits("test")
    m, s = Xtr.mean(), Xtr.std()
    return (Xtr - m) / s, ytr, (Xte - m) / s, yte


def _trainer(opt="adam", seed=0, lr=3e-3):
    model = small_cnn(rng=seed)
    o = optim.Adam(model.parameters(), lr=lr) if opt == "adam" else \
        optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return Trainer(model, nn.CrossEntropyLoss(), o, verbose=False)


def test_digits_training_reaches_fixed_accuracy():
    Xtr, ytr, Xte, yte = _digits()
    tr = _trainer()
    hist = tr.fit(Xtr, ytr, epochs=6, batch_size=32, validation_data=(Xte, yte), seed=0)
    assert len(hist["loss"]) == 6 and len(hist["val_accuracy"]) == 6
    assert hist["loss"][-1] < hist["loss"][0] / 3
    assert tr.evaluate(Xte, yte)["accuracy"] >= 0.95
    assert tr.epoch == 6


def test_training_is_deterministic():
    Xtr, ytr, _, _ = _digits()
    a, b = _trainer(seed=3), _trainer(seed=3)
    ha = a.fit(Xtr[:300], ytr[:300], epochs=2, batch_size=50, seed=7)
    hb = b.fit(Xtr[:300], ytr[:300], epochs=2, batch_size=50, seed=7)
    assert ha == hb
    for (k, va), (_, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        np.testing.assert_array_equal(va, vb, err_msg=k)


def test_predict_and_predict_proba():
    Xtr, ytr, Xte, yte = _digits()
    tr = _trainer()
    tr.fit(Xtr, ytr, epochs=2, batch_size=64, seed=0)
    proba = tr.predict_proba(Xte, batch_size=100)
    assert proba.shape == (len(Xte), 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    pred = tr.predict(Xte, batch_size=7)
    np.testing.assert_array_equal(pred, proba.argmax(axis=1))
    assert np.mean(pred == yte) == pytest.approx(tr.evaluate(Xte, yte)["accuracy"])
    assert tr.model.training  # evaluation does not leave the model in eval mode


def test_validation_split_holds_out_the_last_samples():
    Xtr, ytr, _, _ = _digits()
    tr = _trainer()
    hist = tr.fit(Xtr[:200], ytr[:200], epochs=1, batch_size=50, validation_split=0.25,
                  seed=0)
    ev = Trainer(tr.model, nn.CrossEntropyLoss(), tr.optimizer).evaluate(Xtr[150:200],
                                                                         ytr[150:200])
    assert hist["val_accuracy"][0] == pytest.approx(ev["accuracy"])
    assert hist["val_loss"][0] == pytest.approx(ev["loss"])


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_checkpoint_resume_equals_uninterrupted_run(tmp_path, opt):
    Xtr, ytr, _, _ = _digits()
    X, y = Xtr[:256], ytr[:256]
    straight = _trainer(opt, lr=1e-2 if opt == "sgd" else 3e-3)
    for e in range(4):
        straight.fit(X, y, epochs=1, batch_size=32, seed=e)
    first = _trainer(opt, lr=1e-2 if opt == "sgd" else 3e-3)
    for e in range(2):
        first.fit(X, y, epochs=1, batch_size=32, seed=e, checkpoint=tmp_path / "ck.npz")
    resumed = _trainer(opt, seed=99, lr=0.5)   # other weights and lr: all must be restored
    resumed.load_checkpoint(tmp_path / "ck.npz")
    assert resumed.epoch == 2 and resumed.history["loss"] == first.history["loss"]
    for e in range(2, 4):
        resumed.fit(X, y, epochs=1, batch_size=32, seed=e)
    assert resumed.history["loss"] == straight.history["loss"]
    for (k, va), (_, vb) in zip(straight.model.state_dict().items(),
                                resumed.model.state_dict().items()):
        np.testing.assert_array_equal(va, vb, err_msg=k)


def test_checkpoint_of_another_optimizer_is_refused(tmp_path):
    Xtr, ytr, _, _ = _digits()
    a = _trainer("adam")
    a.fit(Xtr[:64], ytr[:64], epochs=1, batch_size=32, seed=0)
    a.save_checkpoint(tmp_path / "a.npz")
    with pytest.raises(ValueError, match="Adam"):
        _trainer("sgd").load_checkpoint(tmp_path / "a.npz")


def test_nan_loss_stops_training_with_a_clear_error():
    Xtr, ytr, _, _ = _digits()
    X = Xtr[:64].copy()
    X[5, 0, 3, 3] = np.nan
    with pytest.raises(TrainingDiverged, match="loss became nan"):
        _trainer().fit(X, ytr[:64], epochs=1, batch_size=64, seed=0)
    with pytest.raises(FloatingPointError):
        _trainer("sgd", lr=1e6).fit(Xtr[:256], ytr[:256], epochs=5, batch_size=16, seed=0)


def test_fit_rejects_bad_arguments():
    tr = _trainer()
    X = np.zeros((10, 1, 8, 8), np.float32)
    with pytest.raises(ValueError, match="y must be labels"):
        tr.fit(X, np.zeros(9, int))
    with pytest.raises(TypeError, match="integer class labels"):
        tr.fit(X, np.zeros(10))
    with pytest.raises(ValueError, match="batch_size"):
        tr.fit(X, np.zeros(10, int), batch_size=0)
    with pytest.raises(ValueError, match="validation_split"):
        tr.fit(X, np.zeros(10, int), validation_split=1.5)


def test_progress_bar_shows_loss_accuracy_and_speed(capsys):
    pytest.importorskip("tqdm")
    Xtr, ytr, _, _ = _digits()
    tr = _trainer()
    tr.verbose = True
    tr.fit(Xtr[:64], ytr[:64], epochs=1, batch_size=32, seed=0)
    err = capsys.readouterr().err
    assert "epoch 1" in err and "loss=" in err and "acc=" in err and "img_s=" in err


# ---- command line

def test_cli_train_save_and_predict(tmp_path, capsys):
    model = tmp_path / "model.npz"
    assert main(["train", "--epochs", "3", "--quiet", "--save", str(model)]) == 0
    out = capsys.readouterr().out
    acc = float(out.strip().splitlines()[-1].split(":")[1])
    assert out.strip().splitlines()[-1].startswith("test accuracy: ")
    assert acc > 0.9
    X, y = load_digits("test", normalize=False)
    data = tmp_path / "digits.npz"
    np.savez(data, X=X[:, 0].astype(np.uint8), y=y)   # N x H x W raw pixels
    assert main(["predict", "--model", str(model), "--data", str(data),
                 "--output", str(tmp_path / "pred.txt")]) == 0
    pred = np.loadtxt(tmp_path / "pred.txt", dtype=int)
    assert pred.shape == y.shape and np.mean(pred == y) == pytest.approx(acc, abs=1e-3)


def test_cli_train_on_user_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 2, 6, 6)).astype(np.float32)
    y = (X[:, 0].mean(axis=(1, 2)) > 0).astype(np.int64)
    X[y == 1, 0] += 1.0
    data = tmp_path / "mine.npz"
    np.savez(data, X=X, y=y)
    assert main(["train", "--data", str(data), "--epochs", "5", "--quiet", "--optimizer",
                 "sgd", "--lr", "0.05"]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_cli_plot_without_or_with_matplotlib(tmp_path, capsys):
    png = tmp_path / "curves.png"
    assert main(["train", "--epochs", "1", "--quiet", "--plot", str(png)]) == 0
    captured = capsys.readouterr()
    try:
        import matplotlib  # noqa: F401
        assert png.exists() and png.stat().st_size > 0
    except ImportError:
        assert "matplotlib is not installed" in captured.err


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--epochs", "0"])
    with pytest.raises(SystemExit, match="cannot read"):
        main(["train", "--data", str(tmp_path / "missing.npz")])
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=np.zeros((4, 8)), y=np.zeros(4, int))
    with pytest.raises(SystemExit, match="N x H x W"):
        main(["train", "--data", str(bad)])
    with pytest.raises(SystemExit, match="not saved by"):
        main(["predict", "--model", str(bad), "--data", str(bad)])


def test_cli_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "OpenMP" in out and "BLAS" in out and "CPU" in out
