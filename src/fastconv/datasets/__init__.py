"""Small datasets shipped with fastconv.

Only :func:`load_digits` for now: the UCI ML hand-written digits (1,797 grey
images of 8x8, ten classes), stored in ``digits.npz`` next to this file.
See ``README.md`` in this folder for the source and licence (CC BY 4.0).
"""
import io
from importlib.resources import files

import numpy as np

__all__ = ["load_digits"]

_SPLITS = ("train", "test", "all")
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_RAW = None


def _raw_digits():
    """The arrays of ``digits.npz``, read once and kept read-only."""
    global _RAW
    if _RAW is None:
        data = (files(__package__) / "digits.npz").read_bytes()
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            images = npz["images"]
            labels = npz["labels"]
            test_index = npz["test_index"].astype(np.intp)
        is_test = np.zeros(labels.shape[0], dtype=bool)
        is_test[test_index] = True
        raw = {
            "images": images,
            "labels": labels,
            "test": test_index,
            "train": np.flatnonzero(~is_test),
        }
        for arr in raw.values():
            arr.setflags(write=False)
        _RAW = raw
    return _RAW


def load_digits(split="train", dtype=np.float32, normalize=True):
    """Load the UCI hand-written digits as NCHW images and integer labels.

    1,797 grey 8x8 images of the digits 0 to 9 (E. Alpaydin and C. Kaynak,
    1998, as bundled by scikit-learn; licence CC BY 4.0), with a fixed,
    class-stratified train/test split of 1,437/360 images stored alongside
    the data, so it is the same on every machine and NumPy version.

    Parameters
    ----------
    split : {'train', 'test', 'all'}, default 'train'
        Which part to return: the 1,437 training images, the 360 test images
        (20 %, every class in proportion), or all 1,797 images. Rows keep
        the order of the original data set (shuffle them yourself).
    dtype : {numpy.float32, numpy.float64}, default numpy.float32
        Floating-point type of the images (anything ``numpy.dtype`` turns
        into one of these two, such as ``"float64"``).
    normalize : bool, default True
        If true, divide the pixel values by 16 so that they lie in
        ``[0, 1]``; otherwise return the raw intensities 0..16 as `dtype`.

    Returns
    -------
    X : numpy.ndarray of shape (N, 1, 8, 8) and dtype `dtype`
        The images, one channel each, C-contiguous.
    y : numpy.ndarray of shape (N,) and dtype int64
        The class labels, 0..9.

    Each call returns new, writable arrays: changing them does not affect
    later calls.

    Raises
    ------
    ValueError
        If `split` is not one of 'train', 'test', 'all'.
    TypeError
        If `dtype` is not float32 or float64.

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv.datasets import load_digits
    >>> X, y = load_digits()
    >>> X.shape, X.dtype, y.shape, y.dtype
    ((1437, 1, 8, 8), dtype('float32'), (1437,), dtype('int64'))
    >>> float(X.min()), float(X.max())
    (0.0, 1.0)
    >>> X_test, y_test = load_digits("test", dtype=np.float64, normalize=False)
    >>> X_test.shape, X_test.dtype, float(X_test.max())
    ((360, 1, 8, 8), dtype('float64'), 16.0)
    >>> np.bincount(y_test).tolist()
    [36, 37, 35, 37, 36, 36, 36, 36, 35, 36]
    """
    if not isinstance(split, str) or split not in _SPLITS:
        raise ValueError(
            f"split must be one of 'train', 'test', 'all'; got {split!r}"
        )
    if dtype is None:
        raise TypeError("dtype must be numpy.float32 or numpy.float64; got None")
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        dt = None
    if dt is None or dt not in _DTYPES:  # (np.dtype == None is float64 == ...)
        raise TypeError(f"dtype must be numpy.float32 or numpy.float64; got {dtype!r}")

    raw = _raw_digits()
    images, labels = raw["images"], raw["labels"]
    if split != "all":
        index = raw[split]
        images, labels = images[index], labels[index]
    n = labels.shape[0]
    X = images.reshape(n, 1, 8, 8).astype(dt, order="C")  # always a fresh copy
    if normalize:
        X /= dt.type(16)  # exact: 16 is a power of two
    y = labels.astype(np.int64)
    return X, y
