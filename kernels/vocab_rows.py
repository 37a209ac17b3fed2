"""Online softmax over vocabulary rows: the one kernel pair behind ``cross_entropy``, the lm-head loss
(``fused_linear_cross_entropy``) and ``linear_log_probs``, their launchers, the label check, and the row math of
the PyTorch engines. Each use is a few flags (after flash-attention's ``ops/triton/cross_entropy.py``).

A row holds the logits ``x`` of one token (fp32/fp16/bf16, columns contiguous), possibly only a vocabulary chunk
``[vocab_start, vocab_start + n_cols)`` of them, and its label ``y``. The kernels work on ``z = x * z_scale``
(temperature / logit scale; 1 for cross-entropy), in fp32 whatever the logits' dtype; with a soft-cap ``c``
(Gemma 2's ``final_logit_softcapping``) on ``z = c * tanh(x * x_scale / c) * z_scale`` (``x_scale``: a logit scale
applied before the cap, ``z_scale`` after it: TRL's order), whose derivative ``dz/dx = x_scale * z_scale *
(1 - tanh^2)`` the backward applies per column (``_logits``; tanh from ``_common.tanh_and_slope``). A -inf logit is
then capped to ``-c * z_scale``, as transformers' soft-capping does.

Forward (``_fwd_kernel``, one program per row): ONE pass over the row, ``BLOCK_V`` columns at a time (the row
never has to fit one block: V is 128k-152k for Llama-3/Qwen2), every statistic relative to the running max ``m``
so nothing overflows::

    m   = max_j z_j                 s  = sum_j e_j,   e_j = exp(z_j - m)
    t   = z_y                       xs = sum_j e_j (z_j - m)     (HAS_ENTROPY)
    mb  = max_{j < y} z_j (HAS_TOP1)  sq = sum_j e_j**2          (HAS_LOG_SUM_SQ)
    zs  = sum_j z_j     (HAS_MEAN)

When the max moves from ``m`` to ``m'`` the sums are rescaled by ``r = exp(m - m')``: ``s *= r``,
``sq *= r**2`` and ``xs = (xs + (m - m') s) r`` (each ``z_j - m`` becomes ``z_j - m'``). A vocabulary split into
chunks is folded chunk by chunk (``FIRST`` / ``LAST``): in between, the statistics live in the "running" buffers.
The last chunk writes::

    lse = m + log s
    out = t - lse  (the log-prob)   or, NLL, lse - t (cross-entropy's loss)
    entropy = log s - xs / s,   log_sum_sq_probs = log sq - 2 log s,   mean_logits = zs / V,
    is_top1 = (t >= m) & (t > mb)   (y is the FIRST index of the max)

(``xs`` is kept relative to the max: ``entropy = lse - sum_j e_j z_j / s`` would cancel two numbers of the logits'
size ~10 to get an entropy that may be ~1e-2.) ``SAVE_EXP`` (``linear_log_probs``' frozen head) also writes the
chunk's ``e_j = exp(z_j - m)`` against its final max (0 at the label), ``exp(m_before - m)`` and, last, ``1 / s``;
with a soft-cap ``e_j`` times the cap's slope ``1 - tanh_j^2``, and the label's slope (in the label's chunk).

Backward (``_bwd_kernel``, one program per (row, ``BLOCK_V`` columns): a block needs only the row's saved ``lse``
and entropy, so it is one embarrassingly parallel pass). With ``p = exp(z - lse)``, ``g`` the gradient of the
log-prob (``-grad`` of a loss, NLL) and ``gH`` that of the entropy::

    dz = g * (onehot(y) - p) - gH * p * (log p + entropy)      # d entropy / dz_j = -p_j (log p_j + H)
    dx = dz * z_scale     (soft-cap: dz * dz/dx)               # in DLOGITS' dtype; DLOGITS may alias LOGITS

Ignored rows (``y == ignore_index``) read no logit (prompt tokens are often most of a batch): every output is 0
(False), the gradient 0. -inf logits (a masked vocabulary) have ``p = 0`` and ``p log p = 0``. A row with NO finite
logit is read as ``p = 0`` everywhere: lse -inf, log-prob -inf (loss +inf), entropy 0, log_sum_sq_probs -inf,
is_top1 False, mean_logits -inf (its definition), and a zero gradient, in both engines.
"""
from __future__ import annotations

from math import inf

import torch
import triton
import triton.language as tl

from ._common import check_tensor, device_assert, on_gpu, tanh_and_slope

_LABEL_DTYPES = (torch.int64, torch.int32)
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
"""The per-row outputs (TRL's names), in the order the PyTorch row math returns them."""

# Columns per loop step of the forward and per program of the backward. 4096 fp32 values over 8 warps is 16 per
# thread: enough bytes in flight to saturate HBM, few enough registers to keep occupancy (the same order as
# flash-attention's and Liger's CE kernels).
_BLOCK_V = 4096
_NUM_WARPS = 8
# Rows of the running statistics that only some outputs need (tl.constexpr: kernels read only constexpr globals).
_X_SUM_EXP, _SQ_SUM_EXP, _Z_SUM, _MAX_BEFORE = (tl.constexpr(i) for i in range(4))
RUNNING_ROWS = 7
"""Rows of the buffer ``running_views`` splits: max, sum, label logit, and the four above."""


@triton.jit
def _logits(x, z_scale, cap_in, cap_out, SOFTCAP: tl.constexpr):
    """``(z, slope)`` of fp32 raw logits ``x``: ``(x * z_scale, 1)``, or with SOFTCAP ``tanh(x * cap_in) * cap_out``
    (``cap_in = x_scale / c``, ``cap_out = c * z_scale``) and the cap's slope ``1 - tanh^2``: ``dz/dx`` is
    ``slope * z_scale``, with ``z_scale = x_scale * z_scale`` passed under SOFTCAP."""
    if SOFTCAP:
        t, slope = tanh_and_slope(x * cap_in)
        return t * cap_out, slope
    else:
        return x * z_scale, 1.0


@triton.jit
def _fwd_kernel(
    LOGITS, LABELS,  # [rows, n_cols] logits; [rows] labels
    OUT, LSE, ENTROPY, LOG_SUM_SQ, MEAN_LOGITS, IS_TOP1,  # [rows] outputs, written by the LAST chunk
    RUN_MAX, RUN_SUM, RUN_TARGET, RUN_STATS,  # fp32 statistics between chunks: [rows] each, RUN_STATS [4, stride]
    EXP, RESCALE, INV_SUM,  # SAVE_EXP: [rows, n_cols] exp(z - m) (0 at the label), [rows] exp(m_old - m), 1 / s
    LABEL_SLOPE,  # SAVE_EXP with SOFTCAP: [rows] the cap's slope at the label, written by the label's chunk
    stride_logits_row, stride_stats, stride_exp_row,  # columns are contiguous
    n_cols, vocab_start, vocab,  # this call sees vocabulary entries [vocab_start, vocab_start + n_cols) of V
    z_scale, cap_in, cap_out, ignore_index,  # SOFTCAP: z_scale = dz/dx without the slope (see _logits)
    FIRST: tl.constexpr,  # first vocabulary chunk: start from empty statistics instead of reading the running ones
    LAST: tl.constexpr,  # last vocabulary chunk: write the outputs instead of the running statistics
    NLL: tl.constexpr,  # OUT = lse - z_y (cross-entropy's loss, +inf on a row with no finite logit), not z_y - lse
    HAS_ENTROPY: tl.constexpr, HAS_LOG_SUM_SQ: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_TOP1: tl.constexpr,
    SAVE_EXP: tl.constexpr,  # write what the host needs to sum p_j W_j (the frozen-head log-prob gradient)
    SOFTCAP: tl.constexpr,  # z = tanh(x * cap_in) * cap_out instead of x * z_scale
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 for [N, 152k] logits
    label = tl.load(LABELS + row).to(tl.int64)
    exp_ptr = EXP + row * stride_exp_row
    if label != ignore_index:
        row_ptr = LOGITS + row * stride_logits_row
        local = label - vocab_start  # the label's column in this chunk; may lie outside it
        in_chunk = (local >= 0) & (local < n_cols)
        # The label's logit: one scalar load, with exactly the arithmetic of the loop below (is_top1 compares it).
        target, target_slope = _logits(tl.load(row_ptr + local, mask=in_chunk, other=0.0).to(tl.float32), z_scale,
                                       cap_in, cap_out, SOFTCAP)
        m = tl.full([], float("-inf"), tl.float32)  # empty statistics: the state before the first chunk
        s = tl.zeros([], tl.float32)
        xs = tl.zeros([], tl.float32)
        sq = tl.zeros([], tl.float32)
        zs = tl.zeros([], tl.float32)
        max_before = tl.full([], float("-inf"), tl.float32)
        if not FIRST:
            m = tl.load(RUN_MAX + row)
            s = tl.load(RUN_SUM + row)
            target = tl.where(in_chunk, target, tl.load(RUN_TARGET + row))
            if HAS_ENTROPY:
                xs = tl.load(RUN_STATS + _X_SUM_EXP * stride_stats + row)
            if HAS_LOG_SUM_SQ:
                sq = tl.load(RUN_STATS + _SQ_SUM_EXP * stride_stats + row)
            if HAS_MEAN:
                zs = tl.load(RUN_STATS + _Z_SUM * stride_stats + row)
            if HAS_TOP1:
                max_before = tl.load(RUN_STATS + _MAX_BEFORE * stride_stats + row)
        m_start = m

        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            z, _ = _logits(tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32), z_scale, cap_in, cap_out,
                           SOFTCAP)
            if HAS_MEAN:
                zs += tl.sum(z, axis=0)  # masked lanes were loaded as 0
            z = tl.where(mask, z, float("-inf"))
            if HAS_TOP1:
                # the largest logit strictly before the label: a tie there means argmax is not the label
                max_before = tl.maximum(max_before, tl.max(tl.where(cols < local, z, float("-inf")), axis=0))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # While every logit so far is -inf (a masked prefix), exponentiate against 0, not m_new: the sums
            # stay 0 instead of exp(-inf - -inf) = NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            rescale = tl.exp(m - m_safe)  # 0 while m = -inf (before the first finite logit)
            d = tl.where(mask, z - m_safe, 0.0)  # logits relative to the new max; 0, not -inf - m, when masked
            e = tl.where(mask, tl.exp(d), 0.0)
            if HAS_ENTROPY:
                # every earlier (z_j - m) becomes (z_j - m_new); before the first finite logit s = 0 and m = -inf
                shift = tl.where(s > 0.0, m - m_new, 0.0) * s
                # a -inf logit has e = 0 and d = -inf: its term is 0 (p log p -> 0), not 0 * -inf = NaN
                xs = (xs + shift) * rescale + tl.sum(tl.where(e > 0.0, e * d, 0.0), axis=0)
            if HAS_LOG_SUM_SQ:
                sq = sq * rescale * rescale + tl.sum(e * e, axis=0)
            s = s * rescale + tl.sum(e, axis=0)
            m = m_new

        if SAVE_EXP:
            # exp(z_j - m) against this chunk's final max (the online loop's e used moving maxima), the label's
            # column 0: the host adds EXP @ W_v to its running sum of e_j W_j after scaling that by RESCALE.
            # May overwrite the logits (fp32): each column is read before it is written, by this program only.
            m_final = tl.where(m == float("-inf"), 0.0, m)
            tl.store(RESCALE + row, tl.exp(m_start - m_final))  # 0 while m_start = -inf (the first chunk)
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < n_cols
                z, slope = _logits(tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32), z_scale, cap_in,
                                   cap_out, SOFTCAP)
                # a -inf logit gives 0; with a soft-cap d z_j / d x_j differs per column: its slope joins the weight
                e = tl.where(mask & (cols != local), tl.exp(z - m_final) * slope, 0.0)
                tl.store(exp_ptr + cols, e.to(EXP.dtype.element_ty), mask=mask)
            if SOFTCAP:
                if in_chunk:
                    tl.store(LABEL_SLOPE + row, target_slope)
            if LAST:
                tl.store(INV_SUM + row, tl.where(m == float("-inf"), 0.0, 1.0 / s))

        if LAST:
            log_s = tl.log(s)
            lse = m + log_s  # -inf when the row has no finite logit (m = -inf, s = 0)
            dead = m == float("-inf")  # no finite logit: p = 0 everywhere (the formulas below would give NaN)
            tl.store(LSE + row, lse)
            if NLL:
                tl.store(OUT + row, tl.where(dead, float("inf"), lse - target))
            else:
                tl.store(OUT + row, tl.where(dead, float("-inf"), target - lse))
            if HAS_ENTROPY:
                tl.store(ENTROPY + row, tl.where(dead, 0.0, log_s - xs / s))
            if HAS_LOG_SUM_SQ:
                tl.store(LOG_SUM_SQ + row, tl.where(dead, float("-inf"), tl.log(sq) - 2.0 * log_s))
            if HAS_MEAN:
                tl.store(MEAN_LOGITS + row, zs / vocab)
            if HAS_TOP1:
                tl.store(IS_TOP1 + row, (target >= m) & (target > max_before))
        else:
            tl.store(RUN_MAX + row, m)
            tl.store(RUN_SUM + row, s)
            tl.store(RUN_TARGET + row, target)
            if HAS_ENTROPY:
                tl.store(RUN_STATS + _X_SUM_EXP * stride_stats + row, xs)
            if HAS_LOG_SUM_SQ:
                tl.store(RUN_STATS + _SQ_SUM_EXP * stride_stats + row, sq)
            if HAS_MEAN:
                tl.store(RUN_STATS + _Z_SUM * stride_stats + row, zs)
            if HAS_TOP1:
                tl.store(RUN_STATS + _MAX_BEFORE * stride_stats + row, max_before)
    else:
        # Ignored row: its logits are never read; every output is 0.
        if SAVE_EXP:  # zeros, not stale values, go into the host's GEMM and sums
            tl.store(RESCALE + row, 0.0)
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(exp_ptr + cols, tl.zeros([BLOCK_V], EXP.dtype.element_ty), mask=cols < n_cols)
            if LAST:
                tl.store(INV_SUM + row, 0.0)
        if LAST:
            tl.store(LSE + row, 0.0)
            tl.store(OUT + row, 0.0)
            if HAS_ENTROPY:
                tl.store(ENTROPY + row, 0.0)
            if HAS_LOG_SUM_SQ:
                tl.store(LOG_SUM_SQ + row, 0.0)
            if HAS_MEAN:
                tl.store(MEAN_LOGITS + row, 0.0)
            if HAS_TOP1:
                tl.store(IS_TOP1 + row, 0)


@triton.jit
def _bwd_kernel(
    LOGITS, DLOGITS, LABELS, LSE, ENTROPY, GRAD, GRAD_ENTROPY,  # DLOGITS may alias LOGITS; [rows] fp32
    stride_logits_row, stride_dlogits_row, stride_grad,  # stride_grad = 0: one GRAD for every row
    n_cols, vocab_start,
    z_scale, cap_in, cap_out, grad_scale, ignore_index,  # g = GRAD * grad_scale (negative for a loss: NLL)
    HAS_GRAD: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,  # which outputs received a gradient
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < n_cols
    label = tl.load(LABELS + row).to(tl.int64)
    lse = tl.load(LSE + row)
    valid = (label != ignore_index) & (lse != float("-inf"))  # a row with no finite logit gets a zero gradient

    # Ignored rows read nothing (an empty load mask) and write zeros.
    load_mask = cols < tl.where(valid, n_cols, 0)
    z, slope = _logits(tl.load(LOGITS + row * stride_logits_row + cols, mask=load_mask, other=0.0).to(tl.float32),
                       z_scale, cap_in, cap_out, SOFTCAP)
    log_p = z - lse
    p = tl.exp(log_p)
    dz = tl.zeros([BLOCK_V], tl.float32)
    if HAS_GRAD:
        # d log p_y / dz_j = [j == y] - p_j
        g = tl.load(GRAD + row * stride_grad) * grad_scale
        dz += g * (tl.where((cols + vocab_start) == label, 1.0, 0.0) - p)
    if HAS_ENTROPY_GRAD:
        # d entropy / dz_j = -p_j (log p_j + entropy)
        g_entropy = tl.load(GRAD_ENTROPY + row)
        # a -inf logit has p = 0 and log p = -inf: its gradient is 0, not 0 * -inf = NaN
        dz -= g_entropy * tl.where(p > 0.0, p * (log_p + tl.load(ENTROPY + row)), 0.0)
    dz = tl.where(valid, dz, 0.0)  # not dz * 0: a NaN/inf incoming gradient on an ignored row stays out
    if SOFTCAP:
        dz = dz * slope
    tl.store(DLOGITS + row * stride_dlogits_row + cols, (dz * z_scale).to(DLOGITS.dtype.element_ty), mask=mask)


def _block_v(n_cols: int) -> int:
    return max(16, min(_BLOCK_V, triton.next_power_of_2(n_cols)))


def _num_warps(block_v: int) -> int:
    return _NUM_WARPS if block_v >= 2048 else 4


def _scales(z_scale: float, x_scale: float, softcap: float | None) -> tuple:
    """The kernels' ``(z_scale, cap_in, cap_out)`` for ``z = cap(x * x_scale) * z_scale`` (see ``_logits``)."""
    if softcap is None:
        return float(x_scale) * float(z_scale), 1.0, 1.0
    return float(x_scale) * float(z_scale), float(x_scale) / float(softcap), float(softcap) * float(z_scale)


def transform_torch(x: torch.Tensor, *, z_scale: float = 1.0, x_scale: float = 1.0,
                    softcap: float | None = None) -> torch.Tensor:
    """The kernels' ``z`` by plain autograd, on fp32 ``x``: ``x * (x_scale * z_scale)``, or
    ``c * tanh(x * x_scale / c) * z_scale`` with a soft-cap ``c``."""
    if softcap is None:
        return x * (float(x_scale) * float(z_scale))
    return torch.tanh(x * (float(x_scale) / softcap)) * (float(softcap) * float(z_scale))


def running_views(running: torch.Tensor) -> tuple:
    """``(max, sum, label logit, the other statistics)`` of a ``[RUNNING_ROWS, rows]`` fp32 buffer (or of a column
    slice of one), as ``forward_rows`` takes them."""
    return running[0], running[1], running[2], running[3:]


def forward_rows(
    logits: torch.Tensor, labels: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *, ignore_index: int,
    nll: bool = False, z_scale: float = 1.0, vocab_start: int = 0, vocab: int | None = None,
    first: bool = True, last: bool = True, running: tuple | None = None, stats: tuple = (None,) * 4,
    saved_exp: tuple | None = None, softcap: float | None = None, x_scale: float = 1.0,
) -> None:
    """Launch the forward kernel on ``logits`` ``[rows, n_cols]`` (columns contiguous), vocabulary entries
    ``[vocab_start, vocab_start + n_cols)`` of ``vocab`` (default: ``n_cols``); see the module docstring.

    ``out`` and ``lse`` (fp32 ``[rows]``) get the log-prob (``nll``: the loss) and the lse when ``last``.
    ``stats``: ``(entropy, log_sum_sq_probs, mean_logits, is_top1)`` ``[rows]`` buffers (fp32; bool), None for
    each not wanted (its work is compiled out). ``running``: the ``(max, sum, label logit, others)`` buffers of
    ``running_views``, needed unless ``first`` and ``last``; max / sum / label logit may be any fp32 ``[rows]``
    buffers, e.g. ``lse`` and ``out`` themselves (both are read before they are written). ``saved_exp``:
    ``(exp [rows, n_cols], rescale [rows], inv_sum [rows])`` for SAVE_EXP, plus ``label_slope [rows]`` with a
    soft-cap. ``softcap``, ``x_scale``: ``z = c * tanh(x * x_scale / c) * z_scale`` (without a cap
    ``z = x * x_scale * z_scale``)."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    run_max, run_sum, run_target, run_stats = running if running is not None else (lse, lse, lse, None)
    if not (first and last) and (running is None or run_target is None
                                 or (run_stats is None and any(x is not None for x in stats))):
        raise ValueError("a vocabulary split into chunks needs running buffers (running=...) for the max, the sum, "
                         "the label's logit and, when any is requested, the other statistics")
    run_stats = run_stats if run_stats is not None else lse  # stand-ins are not touched by a single-chunk launch
    if saved_exp is not None and len(saved_exp) != (3 if softcap is None else 4):
        raise ValueError("saved_exp is (exp, rescale, inv_sum), plus label_slope with a soft-cap")
    exp, rescale, inv_sum, label_slope = (*saved_exp, lse)[:4] if saved_exp is not None else (lse, lse, lse, lse)
    entropy, log_sum_sq, mean_logits, is_top1 = stats
    block_v = _block_v(n_cols)
    _fwd_kernel[(n_rows,)](
        logits, labels,
        out, lse, *(x if x is not None else lse for x in stats),  # unrequested: a stand-in, its stores compiled out
        run_max, run_sum, run_target, run_stats,
        exp, rescale, inv_sum, label_slope,
        logits.stride(0), run_stats.stride(0) if run_stats.dim() == 2 else 0, exp.stride(0),
        n_cols, vocab_start, n_cols if vocab is None else vocab,
        *_scales(z_scale, x_scale, softcap), ignore_index,
        FIRST=first, LAST=last, NLL=nll,
        HAS_ENTROPY=entropy is not None, HAS_LOG_SUM_SQ=log_sum_sq is not None,
        HAS_MEAN=mean_logits is not None, HAS_TOP1=is_top1 is not None,
        SAVE_EXP=saved_exp is not None, SOFTCAP=softcap is not None, BLOCK_V=block_v, num_warps=_num_warps(block_v),
    )


def backward_rows(
    logits: torch.Tensor, dlogits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
    grad: torch.Tensor | None, *, ignore_index: int, nll: bool = False, grad_scale: float = 1.0,
    z_scale: float = 1.0, vocab_start: int = 0, entropy: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None, softcap: float | None = None, x_scale: float = 1.0,
) -> None:
    """Launch the backward kernel: ``dlogits = (g (onehot - p) - gH p (log p + H)) * dz/dx`` (``dz/dx = x_scale *
    z_scale``, times the cap's slope ``1 - tanh^2`` with a soft-cap; 0 on ignored rows
    and rows with no finite logit), ``g = grad * grad_scale`` the gradient of the log-probs (``nll``: ``grad`` is
    the loss's, ``g = -grad * grad_scale``), ``gH = grad_entropy`` with the forward's ``entropy``. ``grad`` is fp32,
    either 0-d (the same for every row) or ``[rows]`` (any stride), or None; ``grad_entropy`` contiguous fp32
    ``[rows]`` or None. ``dlogits`` may be ``logits`` itself."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block_v = _block_v(n_cols)
    _bwd_kernel[(n_rows, triton.cdiv(n_cols, block_v))](
        logits, dlogits, labels, lse,
        entropy if grad_entropy is not None else lse,
        grad if grad is not None else lse,
        grad_entropy if grad_entropy is not None else lse,
        logits.stride(0), dlogits.stride(0), grad.stride(0) if grad is not None and grad.dim() == 1 else 0,
        n_cols, vocab_start,
        *_scales(z_scale, x_scale, softcap), -float(grad_scale) if nll else float(grad_scale), ignore_index,
        HAS_GRAD=grad is not None, HAS_ENTROPY_GRAD=grad_entropy is not None, SOFTCAP=softcap is not None,
        BLOCK_V=block_v, num_warps=_num_warps(block_v),
    )


def check_labels(labels, n_rows: int, vocab: int, ignore_index: int, *, rows_name: str) -> torch.Tensor:
    """Validate ``labels`` ([n_rows] int64/int32, each in [0, vocab) or == ignore_index) and return the
    number of non-ignored labels as a 0-d int64 tensor on labels' device.

    Nothing is read back to the host on a GPU (no sync: the loss is queued right behind the forward). There an
    out-of-range label, which the kernels would read out of bounds, fails a device-side assert
    (``torch._assert_async``): the error surfaces at the next sync as "device-side assert triggered"; rerun
    on CPU (or with ``CUDA_LAUNCH_BLOCKING=1``) to see it at its source. On CPU (and on a GPU with a torch
    that lacks ``torch._assert_async``) the check is immediate: a ValueError naming the first bad label."""
    check_tensor("labels", labels, dtypes=_LABEL_DTYPES, ndim=1)
    if labels.shape[0] != n_rows:
        raise ValueError(f"labels has {labels.shape[0]} elements but {rows_name} has {n_rows} rows")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    assert_async = device_assert() if on_gpu(labels) else None
    if assert_async is not None:
        assert_async(~bad.any(), f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}")
    elif bad.any():
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; {int(bad.sum())} are not, "
            f"the first at index {first} is {int(labels[first])}"
        )
    return valid.sum()


def rows_torch(z: torch.Tensor, labels: torch.Tensor, ignore_index: int, outputs=frozenset({"log_probs"})) -> tuple:
    """The kernels' row math by plain autograd, on fp32 logits ``z`` ``[rows, V]`` (already scaled): the tuple of
    ``OUTPUTS`` (log_probs always; the others when named in ``outputs``, else None), with the kernels' conventions
    for ignored rows, -inf logits and rows with no finite logit. log_probs and entropy are differentiable."""
    valid = labels != ignore_index
    y = torch.where(valid, labels, 0).long()
    # Rows with no finite logit are zeroed (p = 0 everywhere, as the kernels): autograd through log_softmax of an
    # all -inf row is NaN even where the result is replaced afterwards (NaN * 0); zeroed, its gradient is 0.
    with torch.no_grad():
        dead = z.amax(dim=-1) == -inf
    log_p = torch.log_softmax(torch.where(dead.unsqueeze(-1), 0.0, z), dim=-1)
    log_probs = torch.where(valid, log_p.gather(1, y.unsqueeze(1)).squeeze(1), 0.0).masked_fill(valid & dead, -inf)
    entropy = log_sum_sq = mean_logits = is_top1 = None
    if "entropy" in outputs:
        p_log_p = log_p.exp() * torch.where(log_p > -inf, log_p, 0.0)  # 0 log 0 = 0 at -inf logits
        entropy = torch.where(valid & ~dead, -p_log_p.sum(-1), 0.0)
    with torch.no_grad():  # the statistics TRL marks non-differentiable
        if "log_sum_sq_probs" in outputs:
            log_sum_sq = torch.where(valid, torch.logsumexp(2 * log_p, dim=-1).masked_fill(dead, -inf), 0.0)
        if "mean_logits" in outputs:
            mean_logits = torch.where(valid, z.mean(-1), 0.0)
        if "is_top1" in outputs:
            is_top1 = (z.argmax(-1) == y) & valid & ~dead  # argmax: the first maximum
    return log_probs, entropy, log_sum_sq, mean_logits, is_top1
