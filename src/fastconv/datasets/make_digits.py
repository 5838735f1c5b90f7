"""Regenerate ``digits.npz`` from scikit-learn's bundled copy of the UCI digits.

This script is *not* imported by fastconv and scikit-learn is *not* a
dependency of fastconv; it documents how the committed ``digits.npz`` was made.
Run it in any environment that has scikit-learn and NumPy installed::

    python -m venv /tmp/skl && /tmp/skl/bin/pip install scikit-learn
    /tmp/skl/bin/python src/fastconv/datasets/make_digits.py

The output holds four arrays:

``images``      uint8 (1797, 8, 8), values 0..16
``labels``      uint8 (1797,), values 0..9
``test_index``  uint16 (360,), sorted row indices of the fixed test split
``classes``     uint8 (10,), the class values 0..9

The test split is 20 % of the data, stratified by class: each class
contributes its share of the 360 test rows (largest-remainder rounding, ties
broken towards the smaller class value), drawn without replacement with
``numpy.random.default_rng(0)``, one class after another in increasing order.
The split is stored in the file, so it never changes with NumPy versions;
re-running this script with another NumPy could in principle draw a different
split, which the checksums in ``tests/test_datasets.py`` would catch.
"""
import argparse
import hashlib
import os

import numpy as np

N_TEST = 360
SEED = 0


def stratified_test_index(labels, n_test, seed):
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n_test / counts.sum()
    take = np.floor(quota).astype(np.int64)
    # largest remainder; stable sort on -remainder keeps the smaller class first on ties
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: n_test - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    picked = []
    for c, k in zip(classes, take):
        members = np.flatnonzero(labels == c)
        picked.append(rng.choice(members, size=int(k), replace=False))
    test_index = np.sort(np.concatenate(picked))
    assert test_index.size == n_test and np.unique(test_index).size == n_test
    return test_index


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-o", "--output",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz"),
        help="where to write the .npz (default: next to this script)",
    )
    args = parser.parse_args()

    import sklearn
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw_images = np.asarray(bunch.images)
    raw_labels = np.asarray(bunch.target)
    assert raw_images.shape == (1797, 8, 8) and raw_labels.shape == (1797,)
    # the source values are small integers: the uint8 cast must be exact
    assert np.array_equal(raw_images, np.round(raw_images))
    assert raw_images.min() == 0 and raw_images.max() == 16
    assert set(np.unique(raw_labels)) == set(range(10))
    images = raw_images.astype(np.uint8)
    labels = raw_labels.astype(np.uint8)

    test_index = stratified_test_index(labels, N_TEST, SEED).astype(np.uint16)
    classes = np.arange(10, dtype=np.uint8)

    np.savez_compressed(
        args.output, images=images, labels=labels, test_index=test_index, classes=classes
    )

    print(f"scikit-learn {sklearn.__version__}, numpy {np.__version__}")
    print(f"wrote {args.output} ({os.path.getsize(args.output)} bytes)")
    print("images.sum() =", int(images.sum(dtype=np.int64)))
    print("labels.sum() =", int(labels.sum(dtype=np.int64)))
    print("test_index.sum() =", int(test_index.sum(dtype=np.int64)))
    for name, arr in [("images", images), ("labels", labels), ("test_index", test_index)]:
        print(f"sha256({name}.tobytes()) =", hashlib.sha256(arr.tobytes()).hexdigest())
    print("test counts per class =", np.bincount(labels[test_index], minlength=10).tolist())
    print("all counts per class  =", np.bincount(labels, minlength=10).tolist())


if __name__ == "__main__":
    main()
