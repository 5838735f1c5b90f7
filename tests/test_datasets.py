"""fastconv.datasets.load_digits: the shipped UCI digits and their fixed split."""
import doctest
import hashlib
import io
from importlib.resources import files

import numpy as np
import pytest

import fastconv.datasets
from fastconv.datasets import load_digits

# Printed by src/fastconv/datasets/make_digits.py when digits.npz was made.
IMAGES_SUM = 561718
LABELS_SUM = 8070
TEST_INDEX_SUM = 322462
IMAGES_SHA256 = "8f26b2bd9d135c256808f68f14fdabddde6d9c7f869ae419704b051f0f14b3b3"
LABELS_SHA256 = "8ba4f891220f5e4c9c819638d1602d74b83618f167043c6da52a2a247841ddf0"
TEST_INDEX_SHA256 = "8777340c2acecbbb2a6d70cdaf6945ca88761190ef5c0b98d7a46e67e6bef5cf"
CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
TEST_CLASS_COUNTS = [36, 37, 35, 37, 36, 36, 36, 36, 35, 36]
SIZES = {"train": 1437, "test": 360, "all": 1797}


def _sha256(arr, dtype):
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=dtype).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def npz():
    data = (files("fastconv.datasets") / "digits.npz").read_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# --- the file itself -------------------------------------------------------

def test_file_contents_and_checksums(npz):
    assert set(npz) == {"images", "labels", "test_index", "classes"}
    images, labels, test_index = npz["images"], npz["labels"], npz["test_index"]
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8)
    assert labels.dtype == np.uint8 and labels.shape == (1797,)
    assert test_index.dtype == np.uint16 and test_index.shape == (360,)
    assert npz["classes"].tolist() == list(range(10))
    assert int(images.sum(dtype=np.int64)) == IMAGES_SUM
    assert int(labels.sum(dtype=np.int64)) == LABELS_SUM
    assert int(test_index.sum(dtype=np.int64)) == TEST_INDEX_SUM
    assert _sha256(images, "u1") == IMAGES_SHA256
    assert _sha256(labels, "u1") == LABELS_SHA256
    assert _sha256(test_index, "<u2") == TEST_INDEX_SHA256


def test_file_is_small():
    assert (files("fastconv.datasets") / "digits.npz").read_bytes().__len__() < 100_000


# --- load_digits -----------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "test", "all"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("normalize", [True, False])
def test_shapes_dtypes_ranges(split, dtype, normalize):
    X, y = load_digits(split, dtype=dtype, normalize=normalize)
    n = SIZES[split]
    assert X.shape == (n, 1, 8, 8) and X.dtype == dtype
    assert y.shape == (n,) and y.dtype == np.int64
    for a in (X, y):
        assert a.flags.c_contiguous and a.flags.writeable and a.flags.owndata
    assert y.min() == 0 and y.max() == 9
    top = 1.0 if normalize else 16.0
    assert X.min() == 0.0 and X.max() == top
    # the values are exactly k/16 (or k) for integers k in 0..16
    k = X * 16 if normalize else X
    assert np.array_equal(k, np.round(k))
    assert set(np.unique(k).tolist()) <= set(range(17))


def test_defaults_are_train_float32_normalized():
    X, y = load_digits()
    X2, y2 = load_digits("train", np.float32, True)
    assert X.dtype == np.float32 and X.shape[0] == 1437
    assert np.array_equal(X, X2) and np.array_equal(y, y2)


def test_dtype_spellings_accepted():
    for dt in ("float32", "f4", np.dtype(np.float32)):
        assert load_digits("test", dtype=dt)[0].dtype == np.float32
    for dt in ("float64", float, np.dtype("f8")):
        assert load_digits("test", dtype=dt)[0].dtype == np.float64


def test_normalize_is_raw_over_16():
    X_raw, y_raw = load_digits("all", np.float64, normalize=False)
    X, y = load_digits("all", np.float64, normalize=True)
    assert np.array_equal(X, X_raw / 16)
    assert np.array_equal(y, y_raw)
    X32, _ = load_digits("all", np.float32)
    assert np.array_equal(X32.astype(np.float64), X)  # k/16 is exact in float32


def test_all_matches_file(npz):
    X, y = load_digits("all", np.float64, normalize=False)
    assert np.array_equal(X[:, 0], npz["images"])
    assert np.array_equal(y, npz["labels"])
    assert int(X.sum()) == IMAGES_SUM and int(y.sum()) == LABELS_SUM


def test_split_disjoint_covering_and_ordered(npz):
    X_all, y_all = load_digits("all", np.float64, normalize=False)
    test_index = npz["test_index"].astype(np.intp)
    train_index = np.setdiff1d(np.arange(1797), test_index)
    assert len(np.intersect1d(train_index, test_index)) == 0
    assert len(train_index) + len(test_index) == 1797
    assert np.array_equal(np.sort(np.concatenate([train_index, test_index])), np.arange(1797))
    assert np.all(np.diff(test_index) > 0)
    X_tr, y_tr = load_digits("train", np.float64, normalize=False)
    X_te, y_te = load_digits("test", np.float64, normalize=False)
    assert np.array_equal(X_tr, X_all[train_index]) and np.array_equal(y_tr, y_all[train_index])
    assert np.array_equal(X_te, X_all[test_index]) and np.array_equal(y_te, y_all[test_index])


def test_split_is_stratified():
    _, y_all = load_digits("all")
    _, y_tr = load_digits("train")
    _, y_te = load_digits("test")
    assert np.bincount(y_all, minlength=10).tolist() == CLASS_COUNTS
    test_counts = np.bincount(y_te, minlength=10)
    assert test_counts.tolist() == TEST_CLASS_COUNTS
    assert np.all(test_counts > 0)
    assert np.array_equal(np.bincount(y_tr, minlength=10) + test_counts, CLASS_COUNTS)
    # every class within one image of its exact 20 % share
    assert np.all(np.abs(test_counts - np.array(CLASS_COUNTS) * 360 / 1797) < 1)


def test_deterministic_and_fresh_arrays():
    X1, y1 = load_digits("test")
    X2, y2 = load_digits("test")
    assert np.array_equal(X1, X2) and np.array_equal(y1, y2)
    assert not np.shares_memory(X1, X2) and not np.shares_memory(y1, y2)
    X1[...] = -1
    y1[...] = -1
    X3, y3 = load_digits("test")
    assert np.array_equal(X3, X2) and np.array_equal(y3, y2)
    # 'all' must not hand out the cached arrays either
    Xa, ya = load_digits("all", np.float64, normalize=False)
    Xa[...] = 99
    ya[...] = 99
    Xb, yb = load_digits("all", np.float64, normalize=False)
    assert int(Xb.sum()) == IMAGES_SUM and int(yb.sum()) == LABELS_SUM


@pytest.mark.parametrize("split", ["Train", "validation", "", None, 0, ("train",)])
def test_bad_split(split):
    with pytest.raises(ValueError, match="'train', 'test', 'all'"):
        load_digits(split)


@pytest.mark.parametrize("dtype", [np.float16, np.int64, np.uint8, "complex128",
                                   "not-a-dtype", None, object, np.longdouble,
                                   ">f4" if np.little_endian else "<f4"])
def test_bad_dtype(dtype):
    if np.dtype(np.longdouble) == np.dtype(np.float64) and dtype is np.longdouble:
        pytest.skip("longdouble is float64 on this platform")
    with pytest.raises(TypeError, match="float32 or numpy.float64"):
        load_digits("test", dtype=dtype)


def test_docstring_example():
    result = doctest.testmod(fastconv.datasets, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
