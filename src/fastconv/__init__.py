"""fastconv: fast CNN kernels for NumPy.

Convolution, transposed convolution, max/average pooling, nearest upsampling and
cross-entropy, forward and backward, float32 and float64, NCHW, with PyTorch's semantics.
"""
from ._threading import get_num_threads, set_num_threads
from .functional import (
    avg_pool2d,
    avg_pool2d_backward,
    conv2d,
    conv2d_backward,
    conv_transpose2d,
    conv_transpose2d_backward,
    cross_entropy,
    cross_entropy_backward,
    max_pool2d,
    max_pool2d_backward,
    upsample_nearest2d,
    upsample_nearest2d_backward,
)

__version__ = "0.1.0"

__all__ = [
    "conv2d", "conv2d_backward", "conv_transpose2d", "conv_transpose2d_backward",
    "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
    "upsample_nearest2d", "upsample_nearest2d_backward",
    "cross_entropy", "cross_entropy_backward",
    "set_num_threads", "get_num_threads",
]
