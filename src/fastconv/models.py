"""Ready-made models."""
import numpy as np

from . import nn

__all__ = ["small_cnn"]


def small_cnn(in_channels=1, num_classes=10, input_size=(8, 8), width=16, dtype=np.float32,
              rng=None):
    """conv3x3 -> ReLU -> maxpool2 -> conv3x3 -> ReLU -> flatten -> linear.

    Parameters
    ----------
    in_channels, num_classes : int
    input_size : (int, int)
        Height and width of the images (at least 2x2).
    width : int
        Channels of the first convolution (the second has twice as many).
    dtype : float32 or float64
    rng : numpy.random.Generator or int, optional
        Initialisation; :func:`fastconv.nn.manual_seed`'s generator by default.

    Returns
    -------
    fastconv.nn.Sequential

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv.models import small_cnn
    >>> small_cnn(rng=0)(np.zeros((5, 1, 8, 8), np.float32)).shape
    (5, 10)
    """
    H, W = (int(v) for v in input_size)
    if H < 2 or W < 2:
        raise ValueError(f"small_cnn: input_size must be at least (2, 2), got {input_size}")
    g = rng if isinstance(rng, np.random.Generator) or rng is None else np.random.default_rng(rng)
    kw = dict(dtype=dtype, rng=g)
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, **kw),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, **kw),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * (H // 2) * (W // 2), num_classes, **kw),
    )
