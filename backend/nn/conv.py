"""torch.nn.Conv2d and torch.nn.ConvTranspose2d, with torch's parameter names.

On CPU a convolution always runs on the host (backend/nn/host.py `conv2d_host`: im2col in
cache-sized bands + oneDNN's sgemm), Tensors included: MindSpore 2.10's CPU `conv2d` runs at
about 0.6 GFLOP/s here (oneDNN picks a reference NCHW path) against ~200 for the host kernel.
Measured (3x3, 384 -> 384 channels, 64x64, batch 2; quiet machine):

    ops.unfold + ops.matmul      61 GFLOP/s
    ops.unfold + ops.bmm        104 GFLOP/s
    pad + 9 shifted matmuls      41 GFLOP/s
    numpy im2col + oneDNN sgemm 205 GFLOP/s

On GPU and Ascend the native `ops.conv2d` is used.
"""
from __future__ import annotations

from mindspore import Tensor, nn, ops

from backend.device import on_cpu
from backend.nn.core import host_param, host_weight, is_host, zeros_parameter
from backend.nn.host import conv2d_host, host_matmul


def conv2d(x, weight, bias=None, stride: int = 1, padding: int = 0):
    """x (B, C, H, W), weight (O, C, kh, kw), bias (O,) -> (B, O, H', W'), arrays or Tensors."""
    if is_host(x):
        return conv2d_host(x, host_weight(weight), None if bias is None else host_param(bias), stride, padding)
    if on_cpu():  # a Tensor on CPU: its asnumpy() and Tensor.from_numpy share the memory
        out = conv2d_host(host_param(x), host_param(weight), None if bias is None else host_param(bias),
                          stride, padding)
        out = Tensor.from_numpy(out)
        return out if x.dtype == out.dtype else out.astype(x.dtype)
    y = ops.conv2d(x, weight, None, stride=stride, pad_mode="pad", padding=padding)
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y


class Conv2d(nn.Cell):
    """torch.nn.Conv2d (groups=1, dilation=1, zero padding): weight (out, in, kh, kw), bias (out,)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.weight = zeros_parameter((out_channels, in_channels, kernel_size, kernel_size))
        self.bias = zeros_parameter((out_channels,)) if bias else None

    def construct(self, x):
        return conv2d(x, self.weight, self.bias, self.stride, self.padding)


class ConvTranspose2d(nn.Cell):
    """torch.nn.ConvTranspose2d with kernel_size == stride (no padding): weight (in, out, k, k),
    bias (out,). Each input pixel writes its own k x k output patch, so it is one product
    (O*k*k, C) @ (C, H*W) per sample, whose patches are then interleaved into (O, kH, kW)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        if stride != kernel_size:
            raise ValueError(f"ConvTranspose2d: only stride == kernel_size is implemented; got kernel_size "
                             f"{kernel_size}, stride {stride}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.weight = zeros_parameter((in_channels, out_channels, kernel_size, kernel_size))
        self.bias = zeros_parameter((out_channels,))

    def construct(self, x):
        b, c, h, w = x.shape
        o, k = self.out_channels, self.kernel_size
        if is_host(x):
            weight = host_weight(self.weight).reshape(c, o * k * k).T  # (O*k*k, C), rows ordered (o, p, q)
            y = host_matmul(weight, x.reshape(b, c, h * w))  # (B, O*k*k, H*W)
        else:
            y = ops.matmul(self.weight.reshape(c, o * k * k).T, x.reshape(b, c, h * w))
        y = y.reshape(b, o, k, k, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(b, o, k * h, k * w)
        if is_host(y):
            y += host_param(self.bias)[None, :, None, None]
            return y
        return y + self.bias.reshape(1, -1, 1, 1)
