"""Flash attention (FlashAttention-2 style) forward and backward in Triton.

Causal or not, grouped-query attention (GQA) without repeating K/V in memory, an optional sliding
window, optional soft-capping of the scores (Gemma 2), dense batches ``[B, H, T, D]`` (any strides, e.g. Hugging
Face's transposed views of ``[B, T, H, D]``) and variable-length packed sequences ``[total_tokens, H, D]`` +
``cu_seqlens``.

Math (one query head ``h`` reading kv head ``h // (Hq // Hkv)``; ``M`` is the mask below)::

    S   = scale * Q K^T  (masked entries -> -inf)        P = softmax_rows(S)        O = P V
    LSE = log(sum_j exp(S_ij))                            (fp32, the only other saved tensor)

    backward:  dV = P^T dO                 dP = dO V^T
               delta_i = sum_d dO_id O_id  (= sum_j P_ij dP_ij)
               dS = P * (dP - delta)       dQ = scale * dS K      dK = scale * dS^T Q
               for GQA, dK and dV of a kv head sum over the query heads of its group.

Soft-capping ``c`` (Gemma 2's ``attn_logit_softcapping``): ``S = c * tanh(scale * Q K^T / c)`` before the mask;
its derivative enters the backward as ``dS <- dS * (1 - tanh^2)`` (then ``dQ = scale * dS K``, ``dK = scale * dS^T Q``
as above). tanh and its slope come from ``_common.tanh_and_slope`` (a few ulp, no cancellation).

Mask, for query row ``i`` of ``T`` and key ``j`` of ``S`` (keys of one sequence only, in varlen):

* causal: bottom-right aligned like flash-attn: ``j <= i + S - T`` (the usual ``j <= i`` when
  ``T == S``; with ``T < S`` the queries are the last ``T`` positions, as in decoding with a cache).
  A query row that sees no key at all (causal with ``T > S``) gets output 0 and zero gradients,
  like flash-attn and PyTorch's SDPA.
* sliding window ``w``: ``(i + S - T) - j < w`` -- transformers' ``sliding_window_overlay``
  (``kv_idx > q_idx - sliding_window``), so a query sees itself and the ``w - 1`` keys before it.
  Without ``causal`` only this left bound applies (flash-attn's ``window_size=(w - 1, -1)``).

Kernels (why this split):

* ``_attn_fwd_kernel``: one program per (query block, query head, batch/sequence); online softmax
  over key blocks with exp2 and the scale folded in; writes O and LSE.
* ``_attn_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)``.
* ``_attn_bwd_dkdv_kernel``: one program per (key block, **kv** head, batch); it loops over the
  query heads of its GQA group and their query blocks, recomputing ``P`` from ``LSE``, so dK/dV are
  accumulated in registers with no atomics and no repeated K/V.
* ``_attn_bwd_dq_kernel``: one program per (query block, query head, batch); loops over key blocks.
  Recomputing ``Q K^T`` once more here (instead of FA2's atomic dq adds) keeps the backward
  deterministic and bf16-friendly.

Every kernel visits only key (or query) blocks that the mask can reach, and applies the score mask
only on the blocks that straddle the causal diagonal, the window edge or the sequence end. Causal
grids start their heaviest blocks first (``_program_tile``); tiles are chosen per GPU (``_TILES``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    check_same_device,
    check_tensor,
    compute_capability,
    device_assert,
    empty,
    on_gpu,
    tanh_and_slope,
    use_triton,
)
from ._common import mma_operand as _mma_operand

SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
# exp(x) = exp2(x * log2(e)): the kernels work in base 2, exp2 is the fast instruction on GPUs
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ---- Triton helpers -------------------------------------------------------------------------
@triton.jit
def _sequence_rows(CU_SEQLENS, batch, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(first row, query length, key length) of program ``batch``'s sequence. Dense: rows from 0 of the
    batch's own slice (``stride_*b`` moves between batches). Packed (VARLEN): the sequence's rows start at
    ``cu_seqlens[batch]`` (``stride_*b`` are 0), and its queries are its keys."""
    if VARLEN:
        seq_start = tl.load(CU_SEQLENS + batch).to(tl.int64)
        seqlen_q = (tl.load(CU_SEQLENS + batch + 1) - tl.load(CU_SEQLENS + batch)).to(tl.int32)
        seqlen_k = seqlen_q
    else:
        seq_start = batch * 0
    return seq_start, seqlen_q, seqlen_k


@triton.jit
def _tensor_base(X, batch, head, seq_start, stride_b, stride_h, stride_t):
    """Start of one (batch, head) slice of X (packed sequences: ``seq_start`` rows in), once per program."""
    return X + batch * stride_b + head * stride_h + seq_start * stride_t


@triton.jit
def _program_tile(n_blocks, n_heads, section, HEAVY_LAST: tl.constexpr):
    """(block, head, batch) of this program of a 1-D grid. GPUs start programs about in id order: (batch, head)
    pairs, head fastest, form sections of ``section`` pairs (sharing the L2 cache); in one the block varies slowest,
    heaviest first (the last if HEAVY_LAST), so every pair's longest program starts before any shorter one."""
    pid = tl.program_id(0)
    first = pid // (section * n_blocks) * section  # this section's first pair; the last section may be narrower
    width = tl.minimum(section, tl.num_programs(0) // n_blocks - first)
    rest = pid - first * n_blocks
    block = rest // width
    pair = first + rest - block * width
    if HEAVY_LAST:
        block = n_blocks - 1 - block
    return block, pair % n_heads, (pair // n_heads).to(tl.int64)


@triton.jit
def _query_block_prologue(
    Q, K, V, CU_SEQLENS, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, seqlen_q, seqlen_k, group_size, n_heads, section,
    BLOCK_M: tl.constexpr, VARLEN: tl.constexpr, HEAVY_LAST: tl.constexpr,
):
    """Shared start of the forward and dQ kernels: this program's first query row, head, batch, sequence rows
    and lengths, and base pointers of its Q slice and its kv head's K / V slices (GQA: read in place)."""
    block, head, batch = _program_tile(tl.cdiv(seqlen_q, BLOCK_M), n_heads, section, HEAVY_LAST)
    start_m = block * BLOCK_M
    seq_start, seqlen_q, seqlen_k = _sequence_rows(CU_SEQLENS, batch, seqlen_q, seqlen_k, VARLEN)
    q_base = _tensor_base(Q, batch, head, seq_start, stride_qb, stride_qh, stride_qt)
    k_base = _tensor_base(K, batch, head // group_size, seq_start, stride_kb, stride_kh, stride_kt)
    v_base = _tensor_base(V, batch, head // group_size, seq_start, stride_vb, stride_vh, stride_vt)
    return start_m, head, batch, seq_start, seqlen_q, seqlen_k, q_base, k_base, v_base


@triton.jit
def _score_mask(q_idx, k_idx, seqlen_k, causal_offset, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Which (query, key) pairs may attend; q_idx and k_idx broadcast against each other."""
    q_pos = q_idx + causal_offset  # a query's position on the key axis (bottom-right alignment)
    valid = k_idx < seqlen_k
    if CAUSAL:
        valid = valid & (k_idx <= q_pos)
    if HAS_WINDOW:
        valid = valid & (q_pos - k_idx < window)
    return valid


@triton.jit
def _scores(qk, qk_scale, softcap_in, SOFTCAP: tl.constexpr):
    """Scores in log2 units from the raw products ``qk = Q K^T``, and the soft-cap's slope ``1 - tanh^2`` (1.0
    without it). Without SOFTCAP ``qk_scale = scale * log2(e)``; with it ``qk_scale = c * log2(e)`` and
    ``softcap_in = scale / c``: ``c * tanh(scale * qk / c) * log2(e)``."""
    if SOFTCAP:
        t, slope = tanh_and_slope(qk * softcap_in)
        return t * qk_scale, slope
    else:
        return qk * qk_scale, 1.0


@triton.jit
def _key_range(start_m, seqlen_k, causal_offset, window,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key blocks the query rows [start_m, start_m + BLOCK_M) reach: [lo, hi). Inside it,
    [full_lo, full_hi) are blocks every row sees whole, so they need no score mask."""
    lo = start_m * 0
    hi = lo + seqlen_k
    full_lo = lo
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N  # a partial last block needs the key-bound mask
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + causal_offset)
        full_hi = tl.minimum(full_hi, (tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N) * BLOCK_N)
    if HAS_WINDOW:
        lo = (tl.maximum(start_m + causal_offset - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M + causal_offset - window, 0), BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_range(start_n, seqlen_q, causal_offset, window,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query blocks that reach the keys [start_n, start_n + BLOCK_N): [lo, hi); [full_lo, full_hi)
    see every key of the block (keys past the sequence end only feed rows of dK/dV that are
    never stored, so they need no mask here)."""
    lo = start_n * 0
    hi = lo + seqlen_q
    full_lo = lo
    full_hi = hi
    if CAUSAL:
        lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(hi, start_n + BLOCK_N - 1 + window - causal_offset)
        full_hi = (tl.maximum(start_n + window - causal_offset, 0) // BLOCK_M) * BLOCK_M
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


# ---- Forward --------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    k_ptrs, v_ptrs, stride_kt, stride_vt,
    offs_m, offs_n, d_mask, start, end,
    seqlen_k, causal_offset, window, qk_scale, softcap_in,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_ptrs + start_n * stride_kt, mask=(cols[None, :] < seqlen_k) & d_mask[:, None], other=0.0)
        # scores in log2 units: exp2(s * scale * log2e) == exp(s * scale)
        qk, _ = _scores(tl.dot(q, _mma_operand(k, INTERPRET), input_precision=DOT_PRECISION), qk_scale, softcap_in,
                        SOFTCAP)
        if MASKED:
            valid = _score_mask(offs_m[:, None], cols[None, :], seqlen_k, causal_offset, window, CAUSAL, HAS_WINDOW)
            qk = tl.where(valid, qk, float("-inf"))
        # online softmax: rescale what was accumulated under the old row maximum
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + start_n * stride_vt, mask=(cols[:, None] < seqlen_k) & d_mask[None, :], other=0.0)
        v = _mma_operand(v, INTERPRET)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window", "n_heads", "section"])
def _attn_fwd_kernel(
    Q, K, V, Out, LSE, CU_SEQLENS,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, group_size, qk_scale, softcap_in, window, n_heads, section,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, VARLEN: tl.constexpr, HEAVY_LAST: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    start_m, head, batch, seq_start, seqlen_q, seqlen_k, q_base, k_base, v_base = _query_block_prologue(
        Q, K, V, CU_SEQLENS, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt, seqlen_q, seqlen_k, group_size, n_heads, section, BLOCK_M, VARLEN, HEAVY_LAST)
    if start_m >= seqlen_q:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM  # head dims like 80/96 run in a power-of-two tile
    row_mask = offs_m < seqlen_q

    q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    k_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd  # K^T tile [BLOCK_D, BLOCK_N]
    v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    q = _mma_operand(tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0), INTERPRET)

    # m_i starts finite, not -inf: a row whose first blocks are all masked then keeps
    # alpha = exp2(0) = 1 and p = 0 instead of exp2(-inf + inf) = NaN
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    causal_offset = seqlen_k - seqlen_q
    lo, full_lo, full_hi, hi = _key_range(start_m, seqlen_k, causal_offset, window,
                                          BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    # masked blocks left of the window edge / unmasked middle / masked diagonal and sequence end
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n, d_mask,
                                    lo, full_lo, seqlen_k, causal_offset, window, qk_scale, softcap_in,
                                    BLOCK_N, True, CAUSAL, HAS_WINDOW, SOFTCAP, DOT_PRECISION, INTERPRET)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n, d_mask,
                                    full_lo, full_hi, seqlen_k, causal_offset, window, qk_scale, softcap_in,
                                    BLOCK_N, False, CAUSAL, HAS_WINDOW, SOFTCAP, DOT_PRECISION, INTERPRET)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n, d_mask,
                                    full_hi, hi, seqlen_k, causal_offset, window, qk_scale, softcap_in,
                                    BLOCK_N, True, CAUSAL, HAS_WINDOW, SOFTCAP, DOT_PRECISION, INTERPRET)

    # a row that saw no key (causal with T > S) gets O = 0 and LSE = +inf, so the backward's
    # recomputed P = exp(s - LSE) is exactly 0 there
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * LN2, float("inf"))

    o_ptrs = (_tensor_base(Out, batch, head, seq_start, stride_ob, stride_oh, stride_ot)
              + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    tl.store(_tensor_base(LSE, batch, head, seq_start, stride_lb, stride_lh, 1) + offs_m, lse, mask=row_mask)


# ---- Backward -------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DO, DELTA, CU_SEQLENS,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_lb, stride_lh,
    seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id (fp32), in LSE's layout."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    seq_start, seqlen_q, _ = _sequence_rows(CU_SEQLENS, batch, seqlen_q, seqlen_q, VARLEN)
    if start_m >= seqlen_q:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(_tensor_base(Out, batch, head, seq_start, stride_ob, stride_oh, stride_ot)
                + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(_tensor_base(DO, batch, head, seq_start, stride_dob, stride_doh, stride_dot)
                 + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(_tensor_base(DELTA, batch, head, seq_start, stride_lb, stride_lh, 1) + offs_m, delta,
             mask=offs_m < seqlen_q)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,
    qT_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_dot,
    offs_m, offs_n, d_mask, start, end,
    seqlen_q, seqlen_k, causal_offset, window, qk_scale, softcap_in,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    # Works on transposed tiles ([keys, queries]) so dK and dV come out of tl.dot directly.
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        row_mask = rows < seqlen_q
        qT = tl.load(qT_ptrs + start_m * stride_qt, mask=d_mask[:, None] & row_mask[None, :], other=0.0)
        qT = _mma_operand(qT, INTERPRET)
        # rows past the end load LSE = +inf, so their P is exactly 0
        lse = tl.load(lse_ptrs + start_m, mask=row_mask, other=float("inf")) * LOG2E
        qkT, slopeT = _scores(tl.dot(k, qT, input_precision=DOT_PRECISION), qk_scale, softcap_in, SOFTCAP)
        pT = tl.exp2(qkT - lse[None, :])
        if MASKED:
            valid = _score_mask(rows[None, :], offs_n[:, None], seqlen_k, causal_offset, window, CAUSAL, HAS_WINDOW)
            pT = tl.where(valid, pT, 0.0)
        do = tl.load(do_ptrs + start_m * stride_dot, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        do = _mma_operand(do, INTERPRET)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # dV += P^T dO
        delta = tl.load(delta_ptrs + start_m, mask=row_mask, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (dO V^T)^T
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * slopeT  # through c * tanh(s / c)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)  # dK += dS^T Q
    return dk, dv


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window", "n_heads", "section"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, group_size, sm_scale, qk_scale, softcap_in, window, n_heads, section,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, VARLEN: tl.constexpr, HEAVY_LAST: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    block, head_kv, batch = _program_tile(tl.cdiv(seqlen_k, BLOCK_N), n_heads, section, HEAVY_LAST)
    start_n = block * BLOCK_N
    seq_start, seqlen_q, seqlen_k = _sequence_rows(CU_SEQLENS, batch, seqlen_q, seqlen_k, VARLEN)
    if start_n >= seqlen_k:
        return

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    kv_mask = (offs_n[:, None] < seqlen_k) & d_mask[None, :]
    k = tl.load(_tensor_base(K, batch, head_kv, seq_start, stride_kb, stride_kh, stride_kt)
                + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(_tensor_base(V, batch, head_kv, seq_start, stride_vb, stride_vh, stride_vt)
                + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    k, v = _mma_operand(k, INTERPRET), _mma_operand(v, INTERPRET)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    causal_offset = seqlen_k - seqlen_q
    lo, full_lo, full_hi, hi = _query_range(start_n, seqlen_q, causal_offset, window,
                                            BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    # GQA: dK/dV of this kv head sum over its group's query heads, in registers (no atomics, no [B, Hq, S, D]
    # scratch). Scalar bases here; pointer tiles built in the loop (kept live across it, they spilled)
    head0 = head_kv * group_size
    q_base = _tensor_base(Q, batch, head0, seq_start, stride_qb, stride_qh, stride_qt)
    do_base = _tensor_base(DO, batch, head0, seq_start, stride_dob, stride_doh, stride_dot)
    row_base = batch * stride_lb + head0 * stride_lh + seq_start  # LSE and DELTA share one layout
    for g in range(0, group_size):
        q_g = q_base + g * stride_qh + offs_m[None, :] * stride_qt + offs_d[:, None] * stride_qd  # Q^T tile
        do_g = do_base + g * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod
        lse_g, delta_g = LSE + row_base + g * stride_lh + offs_m, DELTA + row_base + g * stride_lh + offs_m
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_g, do_g, lse_g, delta_g, stride_qt, stride_dot, offs_m, offs_n,
                                      d_mask, lo, full_lo, seqlen_q, seqlen_k, causal_offset, window, qk_scale,
                                      softcap_in, BLOCK_M, True, CAUSAL, HAS_WINDOW, SOFTCAP, DOT_PRECISION,
                                      INTERPRET)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_g, do_g, lse_g, delta_g, stride_qt, stride_dot, offs_m, offs_n,
                                      d_mask, full_lo, full_hi, seqlen_q, seqlen_k, causal_offset, window, qk_scale,
                                      softcap_in, BLOCK_M, False, CAUSAL, HAS_WINDOW, SOFTCAP, DOT_PRECISION,
                                      INTERPRET)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_g, do_g, lse_g, delta_g, stride_qt, stride_dot, offs_m, offs_n,
                                      d_mask, full_hi, hi, seqlen_q, seqlen_k, causal_offset, window, qk_scale,
                                      softcap_in, BLOCK_M, True, CAUSAL, HAS_WINDOW, SOFTCAP, DOT_PRECISION,
                                      INTERPRET)
    dk = dk * sm_scale

    tl.store(_tensor_base(DK, batch, head_kv, seq_start, stride_dkb, stride_dkh, stride_dkt)
             + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(_tensor_base(DV, batch, head_kv, seq_start, stride_dvb, stride_dvh, stride_dvt)
             + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta,
    kT_ptrs, vT_ptrs, stride_kt, stride_vt,
    offs_m, offs_n, d_mask, start, end,
    seqlen_k, causal_offset, window, qk_scale, softcap_in,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[None, :] < seqlen_k) & d_mask[:, None]
        kT = _mma_operand(tl.load(kT_ptrs + start_n * stride_kt, mask=kv_mask, other=0.0), INTERPRET)
        qk, slope = _scores(tl.dot(q, kT, input_precision=DOT_PRECISION), qk_scale, softcap_in, SOFTCAP)
        p = tl.exp2(qk - lse[:, None])
        if MASKED:
            valid = _score_mask(offs_m[:, None], cols[None, :], seqlen_k, causal_offset, window, CAUSAL, HAS_WINDOW)
            p = tl.where(valid, p, 0.0)
        vT = _mma_operand(tl.load(vT_ptrs + start_n * stride_vt, mask=kv_mask, other=0.0), INTERPRET)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * slope  # through c * tanh(s / c)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)  # dQ += dS K
    return dq


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window", "n_heads", "section"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, group_size, sm_scale, qk_scale, softcap_in, window, n_heads, section,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, VARLEN: tl.constexpr, HEAVY_LAST: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    start_m, head, batch, seq_start, seqlen_q, seqlen_k, q_base, k_base, v_base = _query_block_prologue(
        Q, K, V, CU_SEQLENS, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt, seqlen_q, seqlen_k, group_size, n_heads, section, BLOCK_M, VARLEN, HEAVY_LAST)
    if start_m >= seqlen_q:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_mask = offs_m < seqlen_q
    q_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    do = tl.load(_tensor_base(DO, batch, head, seq_start, stride_dob, stride_doh, stride_dot)
                 + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
    q, do = _mma_operand(q, INTERPRET), _mma_operand(do, INTERPRET)
    row_offs = batch * stride_lb + head * stride_lh + seq_start + offs_m  # LSE and DELTA share one layout
    lse = tl.load(LSE + row_offs, mask=row_mask, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + row_offs, mask=row_mask, other=0.0)
    kT_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
    vT_ptrs = v_base + offs_n[None, :] * stride_vt + offs_d[:, None] * stride_vd
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    causal_offset = seqlen_k - seqlen_q
    lo, full_lo, full_hi, hi = _key_range(start_m, seqlen_k, causal_offset, window,
                                          BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, offs_m, offs_n, d_mask,
                            lo, full_lo, seqlen_k, causal_offset, window, qk_scale, softcap_in,
                            BLOCK_N, True, CAUSAL, HAS_WINDOW, SOFTCAP, DOT_PRECISION, INTERPRET)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, offs_m, offs_n, d_mask,
                            full_lo, full_hi, seqlen_k, causal_offset, window, qk_scale, softcap_in,
                            BLOCK_N, False, CAUSAL, HAS_WINDOW, SOFTCAP, DOT_PRECISION, INTERPRET)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, offs_m, offs_n, d_mask,
                            full_hi, hi, seqlen_k, causal_offset, window, qk_scale, softcap_in,
                            BLOCK_N, True, CAUSAL, HAS_WINDOW, SOFTCAP, DOT_PRECISION, INTERPRET)
    dq = dq * sm_scale
    tl.store(_tensor_base(DQ, batch, head, seq_start, stride_dqb, stride_dqh, stride_dqt)
             + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=q_mask)


# ---- Launch code ----------------------------------------------------------------------------
# Tiles for 16-bit inputs: arch -> kernel -> padded head dim (<= 64, 128) -> (BLOCK_M, BLOCK_N, num_warps,
# num_stages), from compiling for each arch (bench/compile_check.py --verbose: ptxas registers and spills, PTX mma
# shapes; Triton 3.9; not timed). sm_80 (every arch but Hopper): forward 128x64; dK/dV 32 queries x 64 keys (64x64
# spilled); dQ 64x64 (128x64 spilled); at D=64 and in the D=128 forward they still spill a few dozen bytes. sm_90,
# all spill-free: dQ 128x64, 8 warps (m64n64 / m64n128 wgmma, was m64n32); dK/dV at D=128 16 queries x 128 keys
# (dK, dV accumulate in m64n128 wgmma, was m64n64; 64x64, 32x128 and 64x128 spilled).
# D=256 (Gemma), spill-free with and without soft-capping: sm_80 row within sm_86/89's 99 KiB: forward 64x32 (68 KiB;
# 64x64 and 128x32 need 104 KiB), dQ 32x32, 8 warps (68 KiB; 4 warps or 16x64 spilled), dK/dV 16x32, 8 warps (52 KiB;
# 32x32 sits at 255 registers and spilled 4-44 B with the window or the soft-cap in the merged build). sm_90: forward
# 128x32 (wgmma m64n256 for P V; 128 KiB), dQ 128x16 (m64n256 for dS K; 128x32 spilled with the soft-cap), dK/dV
# 16x32 (32x32 spilled with the soft-cap, every wider tile without).
_TILES = {
    80: {"fwd": {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)},
         "dkdv": {64: (32, 64, 4, 2), 128: (32, 64, 8, 2), 256: (16, 32, 8, 2)},
         "dq": {64: (64, 64, 4, 2), 128: (64, 64, 8, 2), 256: (32, 32, 8, 2)}},
    90: {"fwd": {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (128, 32, 8, 2)},
         "dkdv": {64: (32, 64, 4, 2), 128: (16, 128, 8, 3), 256: (16, 32, 8, 2)},
         "dq": {64: (128, 64, 8, 2), 128: (128, 64, 8, 2), 256: (128, 16, 8, 2)}},
}


def _tile_config(capability: int, head_dim: int, kernel: str, dtype: torch.dtype) -> dict:
    """Launch constants of ``kernel`` ("fwd", "dkdv", "dq") on compute ``capability`` (major * 10 + minor): only
    Hopper (90) has its own row; Blackwell (100+), not compile-checked, takes sm_80's. fp32 inputs (exact products
    on CUDA cores, a slow accuracy path): 32x32 tiles on every arch, 8 warps for dK/dV (4 spilled at D=64); at
    D=256 one stage (two need 100 KiB in the forward, over sm_86/89's 99 KiB)."""
    block_d = triton.next_power_of_2(head_dim)
    if dtype == torch.float32:
        num_warps = 8 if kernel == "dkdv" or block_d > 64 else 4
        return dict(BLOCK_D=block_d, BLOCK_M=32, BLOCK_N=32, num_warps=num_warps, num_stages=1 if block_d > 128 else 2)
    block_m, block_n, num_warps, num_stages = _TILES[90 if capability == 90 else 80][kernel][max(block_d, 64)]
    return dict(BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def _block_sizes(head_dim: int, kernel: str, dtype: torch.dtype, device: torch.device) -> dict:
    """No autotune (it fails in the interpreter): the table above on GPUs. The interpreter runs 64x32 tiles (bigger
    tiles, fewer costly Python loop steps; BLOCK_M != BLOCK_N so a mix-up of the two shows in tests)."""
    if INTERPRET:
        bm, bn = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}[kernel]
        return dict(BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1)
    return _tile_config(compute_capability(device), head_dim, kernel, dtype)


def _strides(x: torch.Tensor, varlen: bool):
    """(batch, head, token, dim) strides; a packed [total, H, D] tensor has no batch stride."""
    if varlen:
        return 0, x.stride(1), x.stride(0), x.stride(2)
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def _empty_in_layout_of(t: torch.Tensor) -> torch.Tensor:
    """`empty` with ``t``'s memory order: for q given as a transposed view of [B, T, H, D] the
    output and gradient come back in that layout, so callers' ``transpose().reshape()`` is free."""
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    buf = empty([t.shape[i] for i in order], dtype=t.dtype, device=t.device)
    inverse = [order.index(i) for i in range(t.dim())]
    return buf.permute(inverse)


class _Problem:
    """Geometry shared by the launches of one attention call."""

    def __init__(self, q, k, cu_seqlens, max_seqlen, causal, scale, window, softcap=None):
        self.varlen = cu_seqlens is not None
        if self.varlen:
            total, self.n_heads, self.head_dim = q.shape
            self.n_kv_heads = k.shape[1]
            self.batch = cu_seqlens.numel() - 1
            self.seqlen_q = self.seqlen_k = max_seqlen
            self.lse_shape = (self.n_heads, total)
            self.lse_strides = (0, total)
        else:
            self.batch, self.n_heads, self.seqlen_q, self.head_dim = q.shape
            self.n_kv_heads, self.seqlen_k = k.shape[1], k.shape[2]
            self.lse_shape = (self.batch, self.n_heads, self.seqlen_q)
            self.lse_strides = (self.n_heads * self.seqlen_q, self.seqlen_q)
        self.group_size = self.n_heads // self.n_kv_heads
        self.causal, self.scale = causal, scale
        self.window = window if window is not None else 0
        # the scores in log2 units are qk * qk_scale, or with a soft-cap tanh(qk * softcap_in) * qk_scale (_scores)
        if softcap is None:
            self.qk_scale, self.softcap_in = scale * math.log2(math.e), 0.0
        else:
            self.qk_scale, self.softcap_in = softcap * math.log2(math.e), scale / softcap
        self.cu_seqlens = cu_seqlens
        # fp32 inputs: exact fp32 products, not tf32 (fp32 is the accuracy path)
        self.consts = dict(CAUSAL=causal, HAS_WINDOW=window is not None, VARLEN=self.varlen,
                           SOFTCAP=softcap is not None,
                           DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRET=INTERPRET)
        self.element_size = q.element_size()

    def cu_seqlens_arg(self, q):
        """The CU_SEQLENS launch argument: dense launches never read it and get ``q``. (Not stored: the
        problem lives on the autograd context, where a tensor would outlive gradient checkpointing.)"""
        return self.cu_seqlens if self.varlen else q


def _tile_grid(p: _Problem, kernel: str, cfg: dict, device: torch.device):
    """1-D grid and ``_program_tile``'s section: as many (batch, head) pairs, whole GQA groups, as keep what all
    blocks of a pair read (K, V of its kv head; Q, dO of its group for dK/dV) in half the L2 (stand-ins: 50 MiB)."""
    if kernel == "dkdv":  # under causal the first key blocks see the most queries
        n_blocks, n_heads, group, heavy_last = triton.cdiv(p.seqlen_k, cfg["BLOCK_N"]), p.n_kv_heads, 1, False
        group_bytes = 2 * p.group_size * p.seqlen_q * p.head_dim * p.element_size
    else:  # forward, dQ: the last query blocks see the most keys
        n_blocks, n_heads, group, heavy_last = triton.cdiv(p.seqlen_q, cfg["BLOCK_M"]), p.n_heads, p.group_size, True
        group_bytes = 2 * p.seqlen_k * p.head_dim * p.element_size
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 50 * 2**20
    section = min(n_heads * p.batch, group * max(1, l2 // 2 // max(group_bytes, 1)))
    return (n_blocks * n_heads * p.batch,), section, heavy_last


def _flash_forward(q, k, v, p: _Problem):
    o = _empty_in_layout_of(q)
    lse = empty(p.lse_shape, dtype=torch.float32, device=q.device)
    cfg = _block_sizes(p.head_dim, "fwd", q.dtype, q.device)
    grid, section, heavy_last = _tile_grid(p, "fwd", cfg, q.device)
    if grid[0] > 0:
        _attn_fwd_kernel[grid](
            q, k, v, o, lse, p.cu_seqlens_arg(q),
            *_strides(q, p.varlen), *_strides(k, p.varlen), *_strides(v, p.varlen), *_strides(o, p.varlen),
            *p.lse_strides,
            p.seqlen_q, p.seqlen_k, p.group_size, p.qk_scale, p.softcap_in, p.window, p.n_heads, section,
            HEAD_DIM=p.head_dim, HEAVY_LAST=heavy_last, **cfg, **p.consts,
        )
    return o, lse


def _flash_backward(do, q, k, v, o, lse, p: _Problem):
    dq, dk, dv = _empty_in_layout_of(q), _empty_in_layout_of(k), _empty_in_layout_of(v)
    delta = empty(p.lse_shape, dtype=torch.float32, device=q.device)
    strides = dict(q=_strides(q, p.varlen), k=_strides(k, p.varlen), v=_strides(v, p.varlen), do=_strides(do, p.varlen))

    pre_block_m = 32 if INTERPRET else 64
    grid = (triton.cdiv(p.seqlen_q, pre_block_m), p.n_heads, p.batch)
    if min(grid) > 0:
        _attn_bwd_preprocess_kernel[grid](
            o, do, delta, p.cu_seqlens_arg(q), *_strides(o, p.varlen), *strides["do"], *p.lse_strides, p.seqlen_q,
            HEAD_DIM=p.head_dim, BLOCK_D=triton.next_power_of_2(p.head_dim), BLOCK_M=pre_block_m, VARLEN=p.varlen,
        )

    cfg = _block_sizes(p.head_dim, "dkdv", q.dtype, q.device)
    grid, section, heavy_last = _tile_grid(p, "dkdv", cfg, q.device)
    if grid[0] > 0:
        _attn_bwd_dkdv_kernel[grid](
            q, k, v, do, lse, delta, dk, dv, p.cu_seqlens_arg(q),
            *strides["q"], *strides["k"], *strides["v"], *strides["do"],
            *_strides(dk, p.varlen), *_strides(dv, p.varlen), *p.lse_strides,
            p.seqlen_q, p.seqlen_k, p.group_size, p.scale, p.qk_scale, p.softcap_in, p.window, p.n_kv_heads, section,
            HEAD_DIM=p.head_dim, HEAVY_LAST=heavy_last, **cfg, **p.consts,
        )

    cfg = _block_sizes(p.head_dim, "dq", q.dtype, q.device)
    grid, section, heavy_last = _tile_grid(p, "dq", cfg, q.device)
    if grid[0] > 0:
        _attn_bwd_dq_kernel[grid](
            q, k, v, do, lse, delta, dq, p.cu_seqlens_arg(q),
            *strides["q"], *strides["k"], *strides["v"], *strides["do"], *_strides(dq, p.varlen),
            *p.lse_strides,
            p.seqlen_q, p.seqlen_k, p.group_size, p.scale, p.qk_scale, p.softcap_in, p.window, p.n_heads, section,
            HEAD_DIM=p.head_dim, HEAVY_LAST=heavy_last, **cfg, **p.consts,
        )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: the forward saves only O and the fp32 LSE; the backward recomputes P."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale, sliding_window, softcap):
        problem = _Problem(q, k, cu_seqlens, max_seqlen, causal, scale, sliding_window, softcap)
        o, lse = _flash_forward(q, k, v, problem)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.problem = problem
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _flash_backward(do, q, k, v, o, lse, ctx.problem)
        return dq, dk, dv, None, None, None, None, None, None


# ---- PyTorch path (CPU without the interpreter) and argument checks -------------------------
def _allowed(seqlen_q, seqlen_k, causal, window, device):
    """Our mask convention as a boolean ``[T, S]`` tensor: True where query ``i`` may attend key ``j``."""
    i = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= i - j < window
    return allowed


def _attention_torch(q, k, v, causal, scale, window, softcap=None):
    """SDPA on [B, H, T, D] with our mask convention; plain autograd. With a soft-cap, the same math written out
    (SDPA has no soft-cap): fp32 scores and softmax, as the kernel."""
    seqlen_q, seqlen_k = q.shape[-2], k.shape[-2]
    if softcap is not None:
        group = q.shape[1] // k.shape[1]
        kf, vf = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
        scores = softcap * torch.tanh(q.float() @ kf.transpose(-1, -2) * (scale / softcap))
        scores = scores.masked_fill(~_allowed(seqlen_q, seqlen_k, causal, window, q.device), float("-inf"))
        # a row that sees no key gets 0 (as the kernel): softmax of all -inf would be NaN
        return (torch.softmax(scores, -1).nan_to_num(0.0) @ vf).to(q.dtype)
    mask, is_causal = None, False
    if causal and window is None and seqlen_q == seqlen_k:
        is_causal = True  # SDPA's is_causal is top-left aligned: equal to ours only when T == S
    elif causal or window is not None:
        mask = _allowed(seqlen_q, seqlen_k, causal, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _check_qkv(q, k, v, varlen: bool, causal, scale, sliding_window, softcap=None) -> None:
    layout = "[total_tokens, H, D]" if varlen else "[B, H, T, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.dim() != (3 if varlen else 4):
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    check_same_device(q=q, k=k, v=v)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')} but q has "
                            f"{str(q.dtype).replace('torch.', '')}; q, k and v must share one dtype")
    head_dim = q.shape[-1]
    for name, t in (("k", k), ("v", v)):
        if t.shape[-1] != head_dim:
            raise ValueError(f"{name} has head dim {t.shape[-1]} but q has {head_dim}; they must match")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} of q is not supported; supported head dims: "
                         f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}; they must match")
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    if n_kv_heads == 0 or n_heads % n_kv_heads != 0:
        raise ValueError(f"q has {n_heads} heads, not a multiple of the {n_kv_heads} heads of k and v "
                         f"(grouped-query attention needs Hq % Hkv == 0)")
    if varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k has {k.shape[0]} tokens but q has {q.shape[0]}; attention_varlen uses one "
                         f"cu_seqlens for q and k")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {q.shape[0]}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise TypeError(f"scale must be None or a finite float, got {scale!r}")
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")


def _check_cu_seqlens(cu_seqlens, max_seqlen, q, need_offsets: bool) -> list[int] | None:
    """Validate the packing once per cu_seqlens tensor (same version and q length: every layer shares it). On a
    GPU, unless the offsets are needed on the host (or torch lacks ``torch._assert_async``), a device-side assert
    (no sync, as ``check_labels``); else the offsets are read back (one sync), checked with a clear error and returned
    as a list."""
    check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1)
    check_same_device(q=q, cu_seqlens=cu_seqlens)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold n_seqs + 1 >= 2 offsets, got shape {tuple(cu_seqlens.shape)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise TypeError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
    key = (cu_seqlens._version, q.shape[0], max_seqlen)
    cached = getattr(cu_seqlens, "_fastft_attention_checked", None)
    if cached is not None and cached[0] == key and (cached[1] is not None or not need_offsets):
        return cached[1]
    assert_async = device_assert() if on_gpu(cu_seqlens) and not need_offsets else None
    if assert_async is not None:
        d, ends_ok = cu_seqlens.diff(), (cu_seqlens[0] == 0) & (cu_seqlens[-1] == q.shape[0])
        assert_async(ends_ok & (d.min() >= 0) & (d.max() <= max_seqlen), "cu_seqlens: not from 0 to q's "
                     "token count, decreasing, or a sequence over max_seqlen")
        cu_seqlens._fastft_attention_checked = (key, None)
        return None
    offsets, total = cu_seqlens.tolist(), q.shape[0]
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {offsets[0]}")
    if offsets[-1] != total:
        raise ValueError(f"cu_seqlens[-1] = {offsets[-1]} but q has {total} tokens; they must be equal")
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    if min(lengths) < 0:
        raise ValueError("cu_seqlens must be non-decreasing")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen = {max_seqlen} is smaller than the longest sequence in cu_seqlens "
                         f"({max(lengths)})")
    cu_seqlens._fastft_attention_checked = (key, offsets)
    return offsets


# ---- Public API -----------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              scale: float | None = None, sliding_window: int | None = None,
              softcap: float | None = None) -> torch.Tensor:
    """Flash attention on dense batches.

    Args:
        q: ``[B, Hq, T, D]``; k, v: ``[B, Hkv, S, D]`` with ``Hq % Hkv == 0`` (query head ``h``
            reads kv head ``h // (Hq // Hkv)``; K/V are never repeated). Any strides (e.g. the
            ``transpose(1, 2)`` views Hugging Face passes). fp16/bf16/fp32, one dtype for all three.
            Head dim D in 16, 32, 64, 80, 96, 128, 256.
        causal: query ``i`` sees keys ``j <= i + S - T`` (bottom-right aligned, as flash-attn);
            rows that see no key (``T > S``) return 0.
        scale: softmax scale, default ``1 / sqrt(D)``.
        sliding_window: None, or ``w``: query ``i`` also needs ``(i + S - T) - j < w``
            (transformers' convention: itself plus ``w - 1`` earlier keys).
        softcap: None, or ``c > 0``: the scores are ``c * tanh(scale * Q K^T / c)`` (Gemma 2's
            ``attn_logit_softcapping``), before the mask.

    Returns:
        ``[B, Hq, T, D]`` in q's dtype (and q's memory layout on the Triton path).

    Math: ``O = softmax(scale * Q K^T + mask) V``; backward: ``dV = P^T dO``, ``dP = dO V^T``,
    ``dS = P * (dP - rowsum(dO * O))``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``, with dK/dV
    summed over each kv head's query-head group. The forward keeps only O and the fp32
    log-sum-exp per row; the backward recomputes P block by block (see the module docstring). With a soft-cap,
    ``dS`` is multiplied by ``1 - tanh^2(scale * Q K^T / c)`` before dQ and dK.
    """
    _check_qkv(q, k, v, False, causal, scale, sliding_window, softcap)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    softcap = float(softcap) if softcap is not None else None
    if not use_triton(q, "attention"):
        return _attention_torch(q, k, v, causal, scale, sliding_window, softcap)
    return FlashAttentionFunction.apply(q, k, v, None, None, causal, scale, sliding_window, softcap)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     causal: bool = True, scale: float | None = None,
                     sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Flash attention on variable-length sequences packed without padding.

    Args:
        q: ``[total_tokens, Hq, D]``; k, v: ``[total_tokens, Hkv, D]`` (``Hq % Hkv == 0``, any strides).
        cu_seqlens: int32 ``[n_seqs + 1]``, on q's device: sequence ``s`` is tokens
            ``cu_seqlens[s]:cu_seqlens[s + 1]``; starts at 0, ends at ``total_tokens``, one
            tensor for q and k. No token attends across a sequence boundary.
        max_seqlen: an int >= the longest sequence (sizes the launch grid).
        causal, scale, sliding_window, softcap: as in :func:`attention`, positions counted from each
            sequence's start.

    Returns:
        ``[total_tokens, Hq, D]``. Math: :func:`attention` applied to each sequence.

    The first call with a given ``cu_seqlens`` tensor validates it (on a GPU without a host sync).
    """
    _check_qkv(q, k, v, True, causal, scale, sliding_window, softcap)
    offsets = _check_cu_seqlens(cu_seqlens, max_seqlen, q, need_offsets=not use_triton(q, "attention"))
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    softcap = float(softcap) if softcap is not None else None
    if not use_triton(q, "attention"):
        outs = [
            _attention_torch(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                             causal, scale, sliding_window, softcap)[0].transpose(0, 1)
            for a, b in zip(offsets[:-1], offsets[1:]) if b > a
        ]
        return torch.cat(outs) if outs else q.new_zeros(q.shape)
    return FlashAttentionFunction.apply(q, k, v, cu_seqlens, max_seqlen, causal, scale, sliding_window, softcap)
