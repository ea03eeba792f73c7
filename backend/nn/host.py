"""Host kernels for the CPU path (backend/nn/entry.py explains the two paths): matrix products
through oneDNN's sgemm split over the cores, convolutions built on them, whole samples per core.

Nothing in this module calls MindSpore ops, so its worker threads never run MindSpore work (two
threads doing that deadlock).
"""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import mindspore as ms
from mindspore._c_expression.np_dtypes import bfloat16 as _bfloat16

# numpy's view of a bfloat16 Parameter (asnumpy() returns this dtype, registered by MindSpore);
# x.astype(BFLOAT16) rounds float32 to nearest even at ~1 ns per element.
BFLOAT16 = np.dtype(_bfloat16)


# Host matrix products. Why: numpy's bundled OpenBLAS runs its AVX2 kernels here (the
# environment pins OPENBLAS_CORETYPE=Haswell) while this CPU has AVX-512; oneDNN, which
# MindSpore bundles (lib/libdnnl.so.3), picks its kernels at run time. Measured here: oneDNN's
# sgemm did 2.3x the work per CPU second of numpy's matmul on a 768x6912 @ 6912x1024 product,
# and the UNet's 3x3 convolutions built on it used 0.35-0.95x the CPU time of torch's own
# convolutions. MindSpore's oneDNN is built without threads of its own, so products are split
# over the cores with Python threads (ctypes releases the GIL during the call). Without the
# library, numpy's matmul is used.
#
# bfloat16 products. When a weight is stored in bfloat16 (a model loaded with dtype bfloat16), its
# products go through oneDNN's dnnl_gemm_bf16bf16f32: both operands in bfloat16 (the activation is
# rounded once, to nearest even), accumulation and output in float32, so everything between products
# (norms, softmax, residual sums) stays float32. Measured here, one thread, 640x3456 @ 3456x4096 (a
# 3x3 conv 384 -> 640 at 64x64): 432 GFLOP/s against 228 for the sgemm (this CPU has AVX512_BF16; the
# library picks its kernels at run time).

_MIN_SPLIT_FLOPS = 2e6  # smaller products run on the calling thread: a handoff costs ~50 us
MIN_PARALLEL_ELEMENTS = 65536  # likewise for element-wise work

# Set on a thread while it runs one share of _HostGemm.parallel: everything it calls then runs on
# that thread (products unsplit, nested parallel() calls in a loop). This makes parallel()
# re-entrant, and lets a model hand each core a whole sample once (see split_batch) instead of
# splitting every layer.
_local = threading.local()


def in_parallel_share() -> bool:
    """True on a thread that is running one share of a parallel() call."""
    return getattr(_local, "serial", False)


class _HostGemm:
    """dnnl_sgemm calls and other GIL-free work spread over the CPU cores."""

    def __init__(self):
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        self.threads = max(1, len(cores))
        self.pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None
        self.sgemm = self.gemm_bf16 = None
        try:
            lib = ctypes.CDLL(os.path.join(os.path.dirname(ms.__file__), "lib", "libdnnl.so.3"))
            sgemm, gemm_bf16 = lib.dnnl_sgemm, lib.dnnl_gemm_bf16bf16f32
        except (OSError, AttributeError):
            return
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        for function in (sgemm, gemm_bf16):  # the same row-major signature; A and B differ in type
            function.argtypes = [ctypes.c_char, ctypes.c_char, i64, i64, i64, ctypes.c_float, ptr, i64, ptr, i64,
                                 ctypes.c_float, ptr, i64]
            function.restype = ctypes.c_int
        self.sgemm = sgemm
        # oneDNN's bf16 gemm is unimplemented or emulated without native instructions: bfloat16
        # weights are then converted to float32 for the sgemm (host_matmul)
        self.gemm_bf16 = gemm_bf16 if cpu_bf16_flags() else None

    def run(self, tasks: list, flops: float, split: bool = True) -> None:
        """Each task is (function, argument tuple) of one dnnl_sgemm or dnnl_gemm_bf16bf16f32 call."""
        if (not split or self.pool is None or flops < _MIN_SPLIT_FLOPS or len(tasks) == 1
                or in_parallel_share()):
            self._run_all(tasks)
            return
        shares = [tasks[i::self.threads] for i in range(self.threads)]
        futures = [self.pool.submit(self._run_all, share) for share in shares[1:] if share]
        self._run_all(shares[0])
        for future in futures:
            future.result()

    def _run_all(self, tasks) -> None:
        for function, args in tasks:
            status = function(*args)
            if status != 0:
                raise RuntimeError(f"{function.__name__} failed with status {status}")

    def parallel(self, count: int, fn) -> None:
        """fn(i) for i in range(count), in round-robin shares over the cores. Each share runs with
        in_parallel_share() set, so whatever fn calls (host_matmul, parallel) stays on its thread;
        called from inside a share, parallel() is a plain loop."""
        if self.pool is None or count == 1 or in_parallel_share():
            for i in range(count):
                fn(i)
            return

        def share(start):
            _local.serial = True
            try:
                for i in range(start, count, self.threads):
                    fn(i)
            finally:
                _local.serial = False

        futures = [self.pool.submit(share, start) for start in range(1, min(count, self.threads))]
        error = None
        try:
            share(0)
        except BaseException as raised:  # e.g. a Stop (backend/interrupt.py): let the others end first
            error = raised
        for future in futures:
            try:
                future.result()
            except BaseException as raised:
                error = error or raised
        if error is not None:
            raise error


_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bfloat16 products


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bfloat16 product instructions (AVX512_BF16, AMX) as /proc/cpuinfo names them."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [flag for flag in _CPU_BF16_FLAGS if flag in flags]
    except OSError:
        pass
    return []


_host_gemm: _HostGemm | None = None  # created on first use: the library handle and thread pool


def host_gemm() -> _HostGemm:
    global _host_gemm
    if _host_gemm is None:
        _host_gemm = _HostGemm()
    return _host_gemm


def split_batch(batch: int, forward):
    """Whole samples per core: forward(start, stop) computes samples start:stop and returns an
    array (or a tuple of arrays) with them along axis 0; the contiguous ranges, one per core, run
    in parallel (each range entirely on one thread) and are concatenated. Returns None when
    there is nothing to gain (one core, fewer samples than cores, or already inside a share):
    the caller then runs forward(0, batch) with per-layer splitting.

    Why: splitting every layer's products over the cores means a few hundred hand-offs to the
    worker thread per UNet step; on a busy machine each one waits for a time slice (measured in
    docs/PERFORMANCE.md). Whole samples per core make it one hand-off per call, with the same
    per-sample products (conv2d_host and the attention already run one product per sample).
    """
    gemm = host_gemm()
    if gemm.pool is None or batch < gemm.threads or in_parallel_share():
        return None
    edges = np.linspace(0, batch, gemm.threads + 1).astype(int).tolist()
    ranges = [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    results = [None] * len(ranges)

    def one(i: int) -> None:
        results[i] = forward(*ranges[i])

    gemm.parallel(len(ranges), one)
    if isinstance(results[0], tuple):
        return tuple(np.concatenate(parts, axis=0) for parts in zip(*results))
    return np.concatenate(results, axis=0)


def _gemm_layout(x: np.ndarray):
    """(transpose flag, leading dimension) describing a 2-D view to a row-major gemm, or None if
    the view is neither row- nor column-contiguous."""
    rows, cols = x.shape
    s0, s1 = x.strides
    size = x.itemsize
    if (cols == 1 or s1 == size) and (rows == 1 or (s0 % size == 0 and s0 >= size * cols)):
        return b"N", (s0 // size if rows > 1 else cols)
    if (rows == 1 or s0 == size) and (cols == 1 or (s1 % size == 0 and s1 >= size * rows)):
        return b"T", (s1 // size if cols > 1 else rows)
    return None


def host_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None,
                split: bool = True) -> np.ndarray:
    """np.matmul for float32 (..., M, K) @ (..., K, N) with broadcast leading dimensions; the
    result is float32. If either operand is bfloat16 (a weight stored so), the product runs in
    bfloat16 with float32 accumulation (the other operand is rounded to bfloat16 first).

    Transposed views (x.T, x.transpose(0, 2, 1)) are passed to sgemm as such, without copies.
    `out` receives the result if given: an array with contiguous rows, or a transposed view of one
    (then its transpose b.T @ a.T is written, the same sgemm call). split=False keeps the work on the
    calling thread (for use inside _HostGemm.parallel).
    """
    gemm = host_gemm()
    operand = BFLOAT16 if BFLOAT16 in (a.dtype, b.dtype) and gemm.gemm_bf16 is not None else np.dtype(np.float32)
    a = a if a.dtype == operand else a.astype(operand)
    b = b if b.dtype == operand else b.astype(operand)
    if gemm.sgemm is None:
        return np.matmul(a, b, out=out)
    function = gemm.gemm_bf16 if operand == BFLOAT16 else gemm.sgemm
    size = operand.itemsize
    m, k = a.shape[-2:]
    n = b.shape[-1]
    if b.shape[-2] != k:
        raise ValueError(f"matmul shapes {a.shape} and {b.shape} do not fit")
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if out is None:
        out = np.empty(batch + (m, n), np.float32)
    if m == 0 or n == 0:
        return out
    if k == 0:
        out[...] = 0
        return out
    a_all = np.broadcast_to(a, batch + (m, k))
    b_all = np.broadcast_to(b, batch + (k, n))
    keep = []  # contiguous copies made for odd views must outlive the calls
    products = []  # (ta, tb, m, n, pa, lda, pb, ldb, pc, ldc): one row-major sgemm each
    for index in np.ndindex(*batch):
        a2, b2, c2 = a_all[index], b_all[index], out[index]
        layouts = []
        for x in (a2, b2):
            layout = _gemm_layout(x)
            if layout is None:
                x = np.ascontiguousarray(x)
                keep.append(x)
                layout = (b"N", x.shape[1])
            layouts.append((x, layout))
        c_layout = _gemm_layout(c2)
        if c_layout is None:
            raise ValueError("host_matmul: `out` must have contiguous rows or columns")
        (a2, (ta, lda)), (b2, (tb, ldb)) = layouts
        if c_layout[0] == b"N":
            products.append((ta, tb, m, n, a2.ctypes.data, lda, b2.ctypes.data, ldb, c2.ctypes.data, c_layout[1]))
        else:  # `out` is a column-major view: write its transpose, out.T = b.T @ a.T (one operand type)
            flip = {b"N": b"T", b"T": b"N"}
            products.append((flip[tb], flip[ta], n, m, b2.ctypes.data, ldb, a2.ctypes.data, lda, c2.ctypes.data,
                             c_layout[1]))

    # Split one product into column (or row) blocks when there are fewer products than cores.
    if not split or len(products) >= gemm.threads or in_parallel_share():
        parts = 1
    else:
        parts = -(-gemm.threads // len(products))
    tasks = []
    for ta, tb, m, n, pa, lda, pb, ldb, pc, ldc in products:
        if parts > 1 and n >= m:
            edges = np.linspace(0, n, parts + 1).astype(int).tolist()
            for n0, n1 in zip(edges[:-1], edges[1:]):
                if n1 > n0:
                    offset_b = size * n0 if tb == b"N" else size * n0 * ldb
                    tasks.append((function, (ta, tb, m, n1 - n0, k, 1.0, pa, lda, pb + offset_b, ldb, 0.0,
                                             pc + 4 * n0, ldc)))
        elif parts > 1:
            edges = np.linspace(0, m, parts + 1).astype(int).tolist()
            for m0, m1 in zip(edges[:-1], edges[1:]):
                if m1 > m0:
                    offset_a = size * m0 * lda if ta == b"N" else size * m0
                    tasks.append((function, (ta, tb, m1 - m0, n, k, 1.0, pa + offset_a, lda, pb, ldb, 0.0,
                                             pc + 4 * m0 * ldc, ldc)))
        else:
            tasks.append((function, (ta, tb, m, n, k, 1.0, pa, lda, pb, ldb, 0.0, pc, ldc)))
    gemm.run(tasks, 2.0 * m * n * k * len(products), split)
    del keep
    return out


# A convolution's im2col columns are built and multiplied in bands of output rows of about this
# size: a band stays in the CPU cache between its copy and its product, and the buffer stays
# small whatever the resolution (a whole 96x96 sample's columns are 127-255 MB in the UNet, 2.7 GB
# for a 768x768 MoVQ layer). Measured here (3x3, 384 -> 384, 96x96, batch 2): whole-sample columns
# 220 ms, 16 MB bands 115 ms, outputs bit-identical (the bands split the product's N dimension only).
COLUMNS_BAND_BYTES = 16 * 2**20


def conv2d_host(x: np.ndarray, weight: np.ndarray, bias, stride: int, padding: int) -> np.ndarray:
    """torch conv2d (groups 1) on host arrays (B, C, H, W), weight (O, C, kh, kw), bias (O,) or None.

    im2col through a strided view, then `weight (O, C*kh*kw) @ cols (C*kh*kw, rows*W')` per band of
    output rows, which lands directly in NCHW order. With at least as many samples as cores, each
    core does whole samples (copies, products, bias); otherwise the bands of a sample are spread
    over the cores. A stride-1 convolution with few output channels sums its taps on the output
    side instead (`_conv2d_few_outputs`).

    A bfloat16 weight makes the columns bfloat16 (the input rounded once, as each band's rows are
    padded) and the products bfloat16 with float32 accumulation; the output and the bias add are
    float32."""
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    pointwise = kh == 1 and kw == 1 and stride == 1 and padding == 0
    if stride == 1 and not pointwise and kh * kw * o <= c:
        # few products per input element: bfloat16 would save less than rounding the input costs
        return _conv2d_few_outputs(x, weight.astype(np.float32, copy=False), bias, padding)
    operand = weight.dtype if weight.dtype == BFLOAT16 and host_gemm().gemm_bf16 is not None else np.dtype(np.float32)
    out_h = (h + 2 * padding - kh) // stride + 1
    out_w = (w + 2 * padding - kw) // stride + 1
    weight = weight.reshape(o, -1)
    k = weight.shape[1]
    y = np.empty((b, o, out_h * out_w), np.float32)
    rows = out_h if pointwise else max(1, min(out_h, COLUMNS_BAND_BYTES // (operand.itemsize * k * out_w)))
    bands = [(r, min(out_h, r + rows)) for r in range(0, out_h, rows)]

    def band(i: int, r0: int, r1: int, split: bool = False) -> None:
        if pointwise:
            cols = x[i].reshape(c, h * w)
        else:
            # The input rows this band reads, zero-padded (and rounded to bfloat16) into a small
            # buffer that stays in the cache, then (C*kh*kw, rows*W') columns from it: the one copy.
            top, bottom = r0 * stride - padding, (r1 - 1) * stride - padding + kh
            rows_in = np.zeros((c, bottom - top, w + 2 * padding), operand)
            first, last = max(top, 0), min(bottom, h)
            rows_in[:, first - top:last - top, padding:padding + w] = x[i, :, first:last]
            view = np.lib.stride_tricks.sliding_window_view(rows_in, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
            cols = view.transpose(0, 3, 4, 1, 2).reshape(k, (r1 - r0) * out_w)
        out = y[i][:, r0 * out_w:r1 * out_w]
        host_matmul(weight, cols, out=out, split=split)
        if bias is not None:
            out += bias[:, None]

    gemm = host_gemm()
    if b >= gemm.threads:
        def one_sample(i: int) -> None:
            for r0, r1 in bands:
                band(i, r0, r1)

        gemm.parallel(b, one_sample)
    elif len(bands) == 1:
        for i in range(b):
            band(i, 0, out_h, split=True)
    else:
        items = [(i, r0, r1) for i in range(b) for r0, r1 in bands]
        gemm.parallel(len(items), lambda j: band(*items[j]))
    return y.reshape(b, o, out_h, out_w)


# Output positions per band of `_conv2d_few_outputs`; measured best of 2k/8k/32k/all at 512x512.
FEW_OUTPUTS_BAND_COLUMNS = 8192


def _conv2d_few_outputs(x: np.ndarray, weight: np.ndarray, bias, padding: int) -> np.ndarray:
    """Stride-1 convolution with kh*kw*O <= C (a conv_out: 128 -> 3 channels in the MoVQ, 384 -> 8
    in the UNet): one product `(kh*kw*O, C) @ padded input` for all taps, then kh*kw shifted adds
    of (O, band) slices: the taps' partial outputs are no more rows than the input, where im2col
    would copy kh*kw times the input. Measured on one core: 128 -> 3 at 512x512 84 ms against
    113 ms for the im2col bands, 384 -> 8 at 64x64 1.4 ms against 4.4 ms. With more outputs the
    weight permutation and the (kh*kw*O, band) partial sums cost more than they save.

    Layout: the input is zero-padded into (C, H+2p+1, W+2p) and each channel flattened; in that
    flat layout the input pixel under tap (dy, dx) of output pixel (i, j) sits at the fixed offset
    dy*(W+2p) + dx from position i*(W+2p) + j (the extra row absorbs the last taps' overrun). Each
    output row is computed W+2p wide and its last kw-1 columns dropped.
    """
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    out_h, out_w = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    row = w + 2 * padding
    padded = np.zeros((b, c, h + 2 * padding + 1, row), np.float32)
    padded[:, :, padding:padding + h, padding:padding + w] = x
    flat = padded.reshape(b, c, -1)
    offsets = [dy * row + dx for dy in range(kh) for dx in range(kw)]
    taps = len(offsets)
    w_taps = np.ascontiguousarray(weight.transpose(2, 3, 0, 1).reshape(taps * o, c))
    rows_per_band = max(1, min(out_h, FEW_OUTPUTS_BAND_COLUMNS // row))
    y = np.empty((b, o, out_h, out_w), np.float32)
    items = [(i, r0) for i in range(b) for r0 in range(0, out_h, rows_per_band)]

    def one_band(index: int) -> None:
        i, r0 = items[index]
        r = min(rows_per_band, out_h - r0)
        n, base = r * row, r0 * row
        z = host_matmul(w_taps, flat[i, :, base:base + n + offsets[-1]]).reshape(taps, o, -1)
        band = z[0, :, :n].copy()
        for tap in range(1, taps):
            band += z[tap, :, offsets[tap]:offsets[tap] + n]
        band = band.reshape(o, r, row)[:, :, :out_w]
        if bias is None:
            y[i, :, r0:r0 + r] = band
        else:
            np.add(band, bias.reshape(o, 1, 1), out=y[i, :, r0:r0 + r])

    host_gemm().parallel(len(items), one_band)
    return y
