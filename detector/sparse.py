"""Sparse inference of decoupled networks: run only the open filters on the non-zero inputs.

Implements the acceleration of METHOD.md section 4. A :class:`~detector.gates.GatedConv`
decides its gates from its input before the convolution runs, so inside
:func:`sparse_execution` each gated layer computes

- only its open output channels: rows ``open`` of the conv weight and of the BN statistics;
- only from input channels that are not identically zero (filters closed by the previous gate):
  columns ``active`` of the weight and channels ``active`` of the input;

runs ``F.conv2d`` + ``F.batch_norm`` (eval statistics, sliced) on that sub-problem and scatters
the result into a zero tensor of full channel count. Logits and computation path equal those of
the masked dense network up to float rounding (different summation order in the smaller conv).

Batches: the sliced problem is the *union* over the batch of open filters and of non-zero input
channels; the result is then multiplied by each input's own gates, so every input sees exactly
its own path. Slicing has costs of its own (index computations, weight and activation copies,
the scatter), so each layer call first estimates the sliced time relative to the dense conv
(:func:`_relative_cost`, constants measured on x86 CPUs, see ``benchmarks/speed.py``) and runs
the masked dense conv when the estimate exceeds ``dense_above`` (default :data:`DENSE_ABOVE`).

Work accounting: at batch 1 a sliced layer does exactly the multiply-accumulates counted by
:attr:`detector.paths.LayerPath.executed_macs` (minus the control module, which runs in every
mode); a layer that falls back to dense does all of them, and at batch B the union can exceed
each input's own path. :class:`SparseStats`, yielded by :func:`sparse_execution`, reports what
actually ran; ``executed_macs`` of the path stays the per-input ideal.

Path recording (:func:`detector.recording.recording`, :func:`detector.paths.compute_path`) works
unchanged. ``GateRecord.pooled`` (spatial mean of the normalised output *before* masking, which
needs closed filters too) is computed exactly without running them: the conv is linear, so
``mean_ij conv(x) = W . m`` with ``m[c, u, v]`` the mean of input channel c over the positions
kernel tap (u, v) visits; that costs one (B, C_in k k) x (C_in k k, C_out) product, i.e.
1/(H' W') of the dense conv, and is done only while recording.

Only eval mode is supported (training-mode BN needs batch statistics of every filter): a layer in
training mode raises ValueError. Grouped convs, non-zero padding modes and BN without running
statistics fall back to the masked dense computation. Nothing is cached: BN statistics are
sliced on every call, so weights may change between calls.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from detector.conv_executor import conv_executor
from detector.gates import GatedConv, conv_geometry, conv_output_size

if TYPE_CHECKING:
    from collections.abc import Iterator

CHANNEL_BLOCK = 16
"""Channel block of oneDNN's batched convs on x86 CPUs with AVX-512 (8 with AVX2 only)."""

DENSE_ABOVE = 0.9
"""Run a layer call as masked dense conv unless slicing is estimated to take less than this
share of the dense conv's time (see :func:`_relative_cost`)."""
WEIGHT_COPY_MACS = 20.0
"""Time of gathering one weight element, in multiply-accumulates (measured on x86 CPUs)."""
SLICE_OVERHEAD_MACS = 2e6
"""Time of the extra tensor ops of one sliced layer call (~50 us), in multiply-accumulates."""
ACTIVATION_PASS_MACS = 20.0
"""Time of one element of an extra pass over batched activations, in multiply-accumulates."""


@dataclass
class SparseStats:
    """Work of the gated convs in all forward passes run inside one :func:`sparse_execution`.

    dense_macs: multiply-accumulates the dense convs would have done, summed over batch items.
    executed_macs: multiply-accumulates of the convs as run (sliced union or dense fallback),
        summed over batch items; excludes the control modules and the exact ``pooled``
        computation done while recording.
    sliced_calls / dense_calls: gated-layer calls run sliced / as masked dense conv.
    """

    dense_macs: int = 0
    executed_macs: int = 0
    sliced_calls: int = 0
    dense_calls: int = 0

    @property
    def executed_fraction(self) -> float:
        """executed / dense multiply-accumulates of the gated convs, in [0, 1]."""
        return self.executed_macs / self.dense_macs if self.dense_macs else 1.0

    def add(self, other: SparseStats) -> None:
        """Add the counts of ``other`` (another block's work) to these."""
        self.dense_macs += other.dense_macs
        self.executed_macs += other.executed_macs
        self.sliced_calls += other.sliced_calls
        self.dense_calls += other.dense_calls


@contextmanager
def sparse_execution(dense_above: float = DENSE_ABOVE) -> Iterator[SparseStats]:
    """Run every GatedConv inside the block sparsely (this thread/task only); yields the stats.

    ``dense_above`` >= 0: a layer call runs sliced when its estimated time is below this share of
    the dense conv's, else as masked dense conv (0 = never slice, ``math.inf`` = always).
    Models must be in eval mode.

    Example::

        with torch.no_grad(), sparse_execution():
            path = compute_path(model, x)   # same logits and path as without the block
    """
    if not dense_above >= 0.0:
        raise ValueError(f"dense_above must be >= 0, got {dense_above}")
    stats = SparseStats()
    executor = functools.partial(_sparse_conv_bn, stats=stats, dense_above=dense_above)
    with conv_executor(executor):
        yield stats


def sparse_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (B, K) of ``model`` (eval mode) on x: (B, C, H, W) in [0, 1], computed sparsely."""
    with sparse_execution():
        return model(x)


def _sparse_conv_bn(layer: GatedConv, x: torch.Tensor, z: torch.Tensor, need_pooled: bool, *,
                    stats: SparseStats, dense_above: float) -> tuple[torch.Tensor,
                                                                     torch.Tensor | None]:
    """The :class:`~detector.conv_executor.ConvExecutor` of sparse mode (see module docstring)."""
    conv, bn = layer.conv, layer.bn
    if layer.training or bn.training:
        raise ValueError(f"sparse execution needs eval mode, but layer {layer.name!r} is in "
                         "training mode; call model.eval() first")
    B, (c_out, c_in) = x.shape[0], conv.weight.shape[:2]
    conv_hw = conv_output_size(conv, x.shape[2], x.shape[3])
    pixels = B * conv_hw[0] * conv_hw[1]
    # the pooled means of every filter have no shortcut through a pool between conv and BN
    if not _sliceable(conv, bn) or (need_pooled and layer.pool is not None):
        return _dense_result(stats, layer, x, z, need_pooled, pixels)
    if dense_above * conv.weight.numel() * pixels < SLICE_OVERHEAD_MACS:  # too small to pay
        return _dense_result(stats, layer, x, z, need_pooled, pixels)
    out_idx = torch.nonzero(z[0] if B == 1 else z.amax(dim=0)).view(-1)  # (n_out,) open
    n_out = len(out_idx)
    # decide on the outputs alone first: finding the zero inputs costs a pass over x
    if _relative_cost(c_in, n_out, conv, pixels, B) > dense_above:
        return _dense_result(stats, layer, x, z, need_pooled, pixels)
    in_idx = _nonzero_channels(x)  # (n_in,)
    n_in = len(in_idx)
    if _relative_cost(n_in, n_out, conv, pixels, B) > dense_above:
        return _dense_result(stats, layer, x, z, need_pooled, pixels)

    all_out, all_in = n_out == c_out, n_in == c_in
    xs = x if all_in else x.index_select(1, in_idx)  # (B, n_in, H, W)
    if n_out == 0:
        out_hw = _pooled_size(layer, conv_hw, x)
        out = x.new_zeros(B, c_out, *out_hw)
    else:
        # rows first: gathering whole filters reads only n_out / C_out of the weight
        w_sub = conv.weight if all_out else conv.weight.index_select(0, out_idx)
        if not all_in:
            w_sub = w_sub.index_select(1, in_idx)  # (n_out, n_in, kh, kw)
        b_sub = _rows(conv.bias, out_idx, all_out)
        if n_in == 0:  # every input is zero: the conv gives its bias (or 0) everywhere
            y = x.new_zeros(B, n_out, *conv_hw)
            if b_sub is not None:
                y = y + b_sub[:, None, None]
        else:
            y = F.conv2d(xs, w_sub, b_sub, conv.stride, conv.padding, conv.dilation)
        if layer.pool is not None:
            y = layer.pool(y)  # per channel, so it commutes with the slicing
        y = _batch_norm(bn, y, out_idx, all_out)  # (B, n_out, H', W')
        if B > 1:  # the union of the batch's open filters ran: mask each input's own
            y = y * z.index_select(1, out_idx)[:, :, None, None]
        out = y if all_out else x.new_zeros(B, c_out, *y.shape[2:]).index_copy_(1, out_idx, y)
    stats.sliced_calls += 1
    stats.dense_macs += conv.weight.numel() * pixels
    stats.executed_macs += conv.kernel_size[0] * conv.kernel_size[1] * n_in * n_out * pixels
    pooled = _pooled(conv, bn, xs, in_idx, all_in, conv_hw) if need_pooled else None
    return out, pooled


def _pooled_size(layer: GatedConv, conv_hw: tuple[int, int], x: torch.Tensor) -> tuple[int, int]:
    """Spatial size of the layer's output for a conv output of size ``conv_hw``."""
    if layer.pool is None:
        return conv_hw
    h, w = layer.pool(x.new_zeros(1, 1, *conv_hw)).shape[2:]
    return h, w


def _normalized(layer: GatedConv, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode bn(pool(conv(x))) of every filter, without the modules' Python overhead."""
    conv, bn = layer.conv, layer.bn
    if not _sliceable(conv, bn):
        return layer.normalized(x)
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
    if layer.pool is not None:
        y = layer.pool(y)
    return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                        bn.eps)


def _nonzero_channels(x: torch.Tensor) -> torch.Tensor:
    """Indices of the channels of x: (B, C, H, W) that are not zero for every input."""
    if x.shape[0] == 1:
        return torch.nonzero(x[0].abs().amax(dim=(1, 2))).view(-1)
    # two read-only reductions beat abs(), which writes a copy of a large batch
    dims = (0, 2, 3)
    return torch.nonzero((x.amax(dim=dims) != 0) | (x.amin(dim=dims) != 0)).view(-1)


def _dense_result(stats: SparseStats, layer: GatedConv, x: torch.Tensor, z: torch.Tensor,
                  need_pooled: bool, pixels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked output and pooled means of the layer run densely; ``pixels``: conv output
    positions of the whole batch."""
    y = _normalized(layer, x)  # (B, C_out, H', W')
    macs = layer.conv.weight.numel() * pixels
    stats.dense_calls += 1
    stats.dense_macs += macs
    stats.executed_macs += macs
    return y * z[:, :, None, None], (y.mean(dim=(2, 3)) if need_pooled else None)


def _relative_cost(n_in: int, n_out: int, conv: nn.Conv2d, pixels: int, batch: int) -> float:
    """Estimated time of the sliced conv over that of the dense one (1 = equal), >= 0.

    ``pixels``: output positions of the whole batch. Terms, in multiply-accumulates (MACs):

    - the sliced conv's own MACs. At batch 1 PyTorch runs convs as im2col + GEMM, whose time
      follows the MACs; batched convs go through oneDNN, which processes channels in blocks of
      :data:`CHANNEL_BLOCK`, so there partial blocks count as full ones;
    - copying the weight rows and columns used (:data:`WEIGHT_COPY_MACS` per element; dominates
      for wide layers on small maps);
    - the extra tensor ops of a sliced call (:data:`SLICE_OVERHEAD_MACS`; dominates for small
      layers at batch 1);
    - for batches, the extra passes over activations (finding zero inputs, gathering them,
      masking and scattering outputs: ~3 (C_in + C_out) elements per output position at
      :data:`ACTIVATION_PASS_MACS` each, since batched activations leave the cache).
    """
    c_out, c_in, kh, kw = conv.weight.shape
    copied = n_out * kh * kw * (c_in + n_in)
    if batch > 1:
        n_in, n_out, c_in, c_out = (-(-n // CHANNEL_BLOCK) * CHANNEL_BLOCK if n > CHANNEL_BLOCK
                                    else n for n in (n_in, n_out, c_in, c_out))
    sliced = n_in * n_out * kh * kw * pixels + WEIGHT_COPY_MACS * copied + SLICE_OVERHEAD_MACS
    if batch > 1:
        sliced += ACTIVATION_PASS_MACS * 3 * (c_in + c_out) * pixels
    return sliced / (c_in * c_out * kh * kw * pixels)


def _sliceable(conv: nn.Conv2d, bn: nn.Module) -> bool:
    return (conv.groups == 1 and conv.padding_mode == "zeros"
            and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
            and bn.running_var is not None)


def _rows(t: torch.Tensor | None, idx: torch.Tensor, everything: bool) -> torch.Tensor | None:
    if t is None or everything:
        return t
    return t.index_select(0, idx)


def _batch_norm(bn: nn.BatchNorm2d, y: torch.Tensor, idx: torch.Tensor,
                everything: bool) -> torch.Tensor:
    """Eval-mode BN of y: (B, n, ...) whose channels are ``idx`` of the BN's channels."""
    mean, var = _rows(bn.running_mean, idx, everything), _rows(bn.running_var, idx, everything)
    weight, bias = _rows(bn.weight, idx, everything), _rows(bn.bias, idx, everything)
    return F.batch_norm(y, mean, var, weight, bias, False, 0.0, bn.eps)


def _tap_means(conv: nn.Conv2d, x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """m: (B, C, kh, kw), m[b, c, u, v] = mean over output positions of the input pixel that
    kernel tap (u, v) reads (0 in the padding); x: (B, C, H, W).

    Computed as ``R x S^T / (H' W')`` with R: (kh, H) marking the input rows tap u reads
    (row h = i s + u d - p for an output row i), and S: (kw, W) likewise for columns.
    """
    k, s, p, d = conv_geometry(conv)
    sel: list[torch.Tensor] = []
    for i, n in enumerate(x.shape[2:]):
        if i == 1 and (k[1], s[1], p[1], d[1], n, out_hw[1]) == (k[0], s[0], p[0], d[0],
                                                                    x.shape[2], out_hw[0]):
            sel.append(sel[0])  # square case: the same matrix
        elif s[i] == 1 and d[i] == 1:  # a band: tap u reads rows u - p .. u - p + H' - 1
            sel.append(x.new_ones(k[i], n).triu_(-p[i]).tril_(out_hw[i] - 1 - p[i]))
        else:
            rows, taps = torch.arange(n, device=x.device), torch.arange(k[i], device=x.device)
            t = rows[None, :] - (taps * d[i] - p[i])[:, None]  # (k, n): h - (u d - p)
            sel.append(((t >= 0) & (t < s[i] * out_hw[i]) & (t % s[i] == 0)).to(x.dtype))
    return sel[0] @ x @ sel[1].T / (out_hw[0] * out_hw[1])


def _pooled(conv: nn.Conv2d, bn: nn.BatchNorm2d, xs: torch.Tensor, in_idx: torch.Tensor,
            all_in: bool, out_hw: tuple[int, int]) -> torch.Tensor:
    """(B, C_out) spatial mean of bn(conv(x)) for all filters, without running the conv.

    xs: (B, n_in, H, W) the non-zero input channels ``in_idx`` of x (all of x if ``all_in``).
    """
    if in_idx.numel() == 0:
        mean = xs.new_zeros(xs.shape[0], conv.out_channels)
    else:
        weight = conv.weight if all_in else conv.weight.index_select(1, in_idx)
        taps = _tap_means(conv, xs, out_hw).flatten(1)  # (B, n_in kh kw)
        mean = taps @ weight.flatten(1).T  # (B, C_out)
    if conv.bias is not None:
        mean = mean + conv.bias
    return F.batch_norm(mean, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                        bn.eps)
