"""Per-token log-probabilities (and softmax statistics) of an LM head, chunked over tokens AND vocabulary,
manual backward.

For ``z = (hidden @ weight.T + bias) * logit_scale / temperature`` (``[N, V]``, never materialised) and
``p = softmax(z)`` per row, with ``lse_i = logsumexp_j z_ij``::

    log_probs_i        = z_{i, y_i} - lse_i                    # fp32, always computed, differentiable
    entropy_i          = -sum_j p_ij log p_ij                  # fp32, optional, differentiable
    log_sum_sq_probs_i = log sum_j p_ij**2                     # fp32, optional, no gradient
    mean_logits_i      = (1 / V) sum_j z_ij                    # fp32, optional, no gradient
    is_top1_i          = y_i is the FIRST index of max_j z_ij  # bool, optional (ties -> earliest index)

each 0 (False) where ``y_i == ignore_index``. These are the five outputs of TRL 1.16's
``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` (its fused LM head for SFT/DPO/GRPO), with the same
definitions, dtypes and differentiability, for ``final_logit_softcapping=None``; here the logits tiles are
fp32 (TRL keeps them in the compute dtype) and ignored labels are handled.

Masked vocabularies: -inf logits (e.g. a -inf bias) have ``p = 0`` and ``p log p = 0``. A row with NO finite
logit is read as ``p = 0`` everywhere: log_probs -inf, entropy 0, log_sum_sq_probs -inf, is_top1 False,
mean_logits -inf (its definition), and a zero gradient, in both engines.

Tiling. Tokens go in chunks of ``token_chunk_size`` rows (default 2048), the vocabulary in chunks of
``vocab_chunk_size`` columns (default 8192): one tile is ``[2048, 8192]`` fp32 = 64 MB whatever V is
(a whole ``[2048, 152k]`` fp32 row block would be 1.2 GB), and still a GEMM big enough for cuBLAS
to run at full speed.

Forward, per tile: ``tile = h_c @ W_v.T (+ b_v)`` in fp32 (cuBLAS), then ``_fwd_kernel`` (one program
per token) folds the tile into the token's running statistics in ONE pass, BLOCK_V columns at a time,
all relative to the running max ``m`` so nothing overflows::

    m   = max_j z_j                 s  = sum_j e_j,   e_j = exp(z_j - m)
    t   = z_{y}                     xs = sum_j e_j (z_j - m)     (entropy)
    mb  = max_{j < y} z_j  (top-1)  sq = sum_j e_j**2            (log_sum_sq_probs)
    zs  = sum_j z_j  (mean)

When the max moves from ``m`` to ``m'`` the sums are rescaled by ``r = exp(m - m')``: ``s *= r``,
``sq *= r**2`` and ``xs = (xs + (m - m') s) r`` (each ``z_j - m`` becomes ``z_j - m'``). Between vocabulary
chunks the statistics live in a ``[7, N]`` fp32 scratch buffer; the last chunk writes the outputs::

    lse = m + log s,  log_probs = t - lse,  entropy = log s - xs / s,
    log_sum_sq_probs = log sq - 2 log s,  mean_logits = zs / V,  is_top1 = (t >= m) & (t > mb)

(``xs`` is kept relative to the max, not as TRL's ``sum e_j z_j``: ``entropy = lse - sum e_j z_j / s`` would
cancel two numbers of the logits' size ~10 to get an entropy that may be ~1e-2.) Saved for the backward:
``lse`` and ``entropy`` (fp32 ``[N]``) and the inputs.

Backward, with ``g_i`` = grad of ``log_probs_i`` and ``gH_i`` = grad of ``entropy_i`` (either may be absent):
the tile is recomputed, ``log p = z - lse``, and ``_bwd_kernel`` writes ::

    dz = g * (onehot(y) - p) - gH * p * (log p + entropy)        # d entropy / dz_j = -p_j (log p_j + H)
    dtile = dz * logit_scale / temperature                        # 0 on ignored rows

in the compute dtype; then ``dh_c += dtile @ W_v`` (fp32 accumulator per token chunk),
``dW_v += dtile.T @ h_c`` and ``db_v += sum_rows(dtile)`` (fp32 accumulators), each only when needed.

Frozen head (QLoRA: weight and bias need no gradient, hidden does). The gradient of the log-probs alone is ::

    dh_i = s * g_i * D_i,   D_i = (1 - p_iy) W_y - sum_{j != y} p_ij W_j,   s = logit_scale / temperature

so the forward saves ``D`` (``[N, H]``, hidden's dtype) and that backward is one in-place scaling: no
recomputed logits, no GEMM. While it has each tile, the forward's kernel writes ``e_j = exp(z_j - m)`` against
the chunk's final running max ``m`` (0 at the label and on ignored rows, compute dtype) and the factor
``exp(m_before - m)``; the host keeps ``A = sum_{j != y} e_j W_j`` in fp32 per token chunk,
``A <- A * exp(m_before - m) + e_tile @ W_v``, and after the last chunk ``D = -expm1(log p_y) W_y - A / s``.
Cost: one ``[C, V_c] x [V_c, H]`` GEMM per tile in the forward instead of two (recompute, ``dh``) in the
backward; memory: ``D`` lives from the forward to the backward, where it becomes ``dh`` (no other ``[N, H]``
tensor then), plus a compute-dtype tile and an fp32 ``[C, H]`` accumulator during the forward. Keeping the
label's term apart avoids cancellation: ``W_y - sum_j p_j W_j`` is tiny next to ``W_y`` when ``p_y ~ 1``.
When the entropy does receive a gradient (the forward cannot know), or the head is trainable, the backward
recomputes the tiles as above, exactly.
"""
from __future__ import annotations

from math import inf

import torch
import triton
import triton.language as tl

from ._common import empty, use_triton
from .cross_entropy import check_labels, without_dead_rows
from .fused_linear_cross_entropy import addmm_fp32, check_lm_head_args, compute_dtype_for, mm_fp32

TOKEN_CHUNK_SIZE = 2048
VOCAB_CHUNK_SIZE = 8192
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
"""TRL's output names, in the order of the tuple ``linear_log_probs`` returns when asked for more than
log-probs."""

# Columns per loop step (forward) and per program (backward): 4096 fp32 values over 8 warps is 16 per
# thread, enough bytes in flight to saturate HBM with few registers (as the cross-entropy kernels).
_BLOCK_V = 4096
_NUM_WARPS = 8
# Rows of the scratch buffer that carries the running statistics from one vocabulary chunk to the next.
# (tl.constexpr: Triton kernels may read only constexpr globals.)
_MAX, _SUM_EXP, _TARGET, _X_SUM_EXP, _SQ_SUM_EXP, _Z_SUM, _MAX_BEFORE = (tl.constexpr(i) for i in range(7))
_N_STATS = 7


@triton.jit
def _fwd_kernel(
    LOGITS, LABELS, STATE,  # [rows, n_cols] fp32 tile; [rows] labels; fp32 [7, stride_state] running stats
    LOG_PROBS, LSE, ENTROPY, LOG_SUM_SQ, MEAN_LOGITS, IS_TOP1,  # [rows] outputs, written by the LAST chunk
    EXP, RESCALE, INV_SUM,  # SAVE_EXP: [rows, n_cols] exp(z - m) (0 at the label), [rows] exp(m_old - m), 1 / s
    stride_logits_row, stride_state, stride_exp_row,  # columns are contiguous
    n_cols, vocab_start, vocab,  # this tile holds vocabulary entries [vocab_start, vocab_start + n_cols) of V
    z_scale, ignore_index,
    FIRST: tl.constexpr,  # first vocabulary chunk: start from empty statistics instead of reading STATE
    LAST: tl.constexpr,  # last vocabulary chunk: write the outputs instead of STATE
    HAS_ENTROPY: tl.constexpr, HAS_LOG_SUM_SQ: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_TOP1: tl.constexpr,
    SAVE_EXP: tl.constexpr,  # write what the host needs to sum p_j W_j (the frozen-head log-prob gradient)
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 for big tiles
    label = tl.load(LABELS + row).to(tl.int64)
    exp_ptr = EXP + row * stride_exp_row
    if label != ignore_index:
        row_ptr = LOGITS + row * stride_logits_row
        local = label - vocab_start  # the label's column in this tile; may lie outside it
        in_tile = (local >= 0) & (local < n_cols)
        # The label's logit: one scalar load, with exactly the arithmetic of the loop below (is_top1 compares it).
        target = tl.load(row_ptr + local, mask=in_tile, other=0.0).to(tl.float32) * z_scale
        m = tl.full([], float("-inf"), tl.float32)  # empty statistics: the state before the first chunk
        s = tl.zeros([], tl.float32)
        xs = tl.zeros([], tl.float32)
        sq = tl.zeros([], tl.float32)
        zs = tl.zeros([], tl.float32)
        max_before = tl.full([], float("-inf"), tl.float32)
        if not FIRST:
            m = tl.load(STATE + _MAX * stride_state + row)
            s = tl.load(STATE + _SUM_EXP * stride_state + row)
            target = tl.where(in_tile, target, tl.load(STATE + _TARGET * stride_state + row))
            if HAS_ENTROPY:
                xs = tl.load(STATE + _X_SUM_EXP * stride_state + row)
            if HAS_LOG_SUM_SQ:
                sq = tl.load(STATE + _SQ_SUM_EXP * stride_state + row)
            if HAS_MEAN:
                zs = tl.load(STATE + _Z_SUM * stride_state + row)
            if HAS_TOP1:
                max_before = tl.load(STATE + _MAX_BEFORE * stride_state + row)
        m_start = m

        # One pass, online: the row never has to fit one block (V is 128k-152k for Llama-3/Qwen2).
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) * z_scale
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
                z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) * z_scale
                e = tl.where(mask & (cols != local), tl.exp(z - m_final), 0.0)  # a -inf logit gives 0
                tl.store(exp_ptr + cols, e.to(EXP.dtype.element_ty), mask=mask)
            if LAST:
                tl.store(INV_SUM + row, tl.where(m == float("-inf"), 0.0, 1.0 / s))

        if LAST:
            log_s = tl.log(s)
            lse = m + log_s  # -inf when the row has no finite logit (m = -inf, s = 0)
            dead = m == float("-inf")  # no finite logit: p = 0 everywhere (the formulas below would give NaN)
            tl.store(LSE + row, lse)
            tl.store(LOG_PROBS + row, tl.where(dead, float("-inf"), target - lse))
            if HAS_ENTROPY:
                tl.store(ENTROPY + row, tl.where(dead, 0.0, log_s - xs / s))
            if HAS_LOG_SUM_SQ:
                tl.store(LOG_SUM_SQ + row, tl.where(dead, float("-inf"), tl.log(sq) - 2.0 * log_s))
            if HAS_MEAN:
                tl.store(MEAN_LOGITS + row, zs / vocab)
            if HAS_TOP1:
                tl.store(IS_TOP1 + row, (target >= m) & (target > max_before))
        else:
            tl.store(STATE + _MAX * stride_state + row, m)
            tl.store(STATE + _SUM_EXP * stride_state + row, s)
            tl.store(STATE + _TARGET * stride_state + row, target)
            if HAS_ENTROPY:
                tl.store(STATE + _X_SUM_EXP * stride_state + row, xs)
            if HAS_LOG_SUM_SQ:
                tl.store(STATE + _SQ_SUM_EXP * stride_state + row, sq)
            if HAS_MEAN:
                tl.store(STATE + _Z_SUM * stride_state + row, zs)
            if HAS_TOP1:
                tl.store(STATE + _MAX_BEFORE * stride_state + row, max_before)
    else:
        # Ignored row: its logits are never read (prompt tokens are often most of a batch); every output is 0.
        if SAVE_EXP:  # zeros, not stale values, go into the host's GEMM and sums
            tl.store(RESCALE + row, 0.0)
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(exp_ptr + cols, tl.zeros([BLOCK_V], EXP.dtype.element_ty), mask=cols < n_cols)
            if LAST:
                tl.store(INV_SUM + row, 0.0)
        if LAST:
            tl.store(LSE + row, 0.0)
            tl.store(LOG_PROBS + row, 0.0)
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
    LOGITS, DLOGITS, LABELS, LSE, ENTROPY, GRAD_LOG_PROBS, GRAD_ENTROPY,  # DLOGITS may alias LOGITS; [rows] fp32
    stride_logits_row, stride_dlogits_row,
    n_cols, vocab_start,
    z_scale, ignore_index,
    HAS_LOG_PROBS_GRAD: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,  # which outputs received a gradient
    BLOCK_V: tl.constexpr,
):
    # One program per (row, column block): the gradient of a block needs only the row's saved lse and
    # entropy, so the backward is a single embarrassingly parallel pass.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < n_cols
    label = tl.load(LABELS + row).to(tl.int64)
    lse = tl.load(LSE + row)
    valid = (label != ignore_index) & (lse != float("-inf"))  # a row with no finite logit gets a zero gradient

    # Ignored rows read nothing (an empty load mask) and write zeros.
    load_mask = cols < tl.where(valid, n_cols, 0)
    z = tl.load(LOGITS + row * stride_logits_row + cols, mask=load_mask, other=0.0).to(tl.float32) * z_scale
    log_p = z - lse
    p = tl.exp(log_p)
    dz = tl.zeros([BLOCK_V], tl.float32)
    if HAS_LOG_PROBS_GRAD:
        # d log p_y / dz_j = [j == y] - p_j
        g = tl.load(GRAD_LOG_PROBS + row)
        dz += g * (tl.where((cols + vocab_start) == label, 1.0, 0.0) - p)
    if HAS_ENTROPY_GRAD:
        # d entropy / dz_j = -p_j (log p_j + entropy)
        g_entropy = tl.load(GRAD_ENTROPY + row)
        # a -inf logit has p = 0 and log p = -inf: its gradient is 0, not 0 * -inf = NaN
        dz -= g_entropy * tl.where(p > 0.0, p * (log_p + tl.load(ENTROPY + row)), 0.0)
    dz = tl.where(valid, dz, 0.0)  # not dz * 0: a NaN/inf incoming gradient on an ignored row stays out
    tl.store(DLOGITS + row * stride_dlogits_row + cols, (dz * z_scale).to(DLOGITS.dtype.element_ty), mask=mask)


def _block_v(n_cols: int) -> int:
    return max(16, min(_BLOCK_V, triton.next_power_of_2(n_cols)))


def _num_warps(block_v: int) -> int:
    return _NUM_WARPS if block_v >= 2048 else 4


def _tiles(n_rows: int, vocab: int, token_chunk: int, vocab_chunk: int):
    for t0 in range(0, n_rows, token_chunk):
        t1 = min(t0 + token_chunk, n_rows)
        yield t0, t1, [(v0, min(v0 + vocab_chunk, vocab)) for v0 in range(0, vocab, vocab_chunk)]


def _logits_tile(buf, h_c, w, b, v0, v1):
    # contiguous [n, v1 - v0] view of the flat fp32 tile buffer
    tile = mm_fp32(h_c, w[v0:v1].t(), out=buf[: h_c.shape[0] * (v1 - v0)].view(h_c.shape[0], v1 - v0))
    if b is not None:
        tile.add_(b[v0:v1])
    return tile


class _LinearLogProbsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, z_scale, ignore_index, token_chunk, vocab_chunk, outputs):
        # entropy is often only logged: without this, autograd would hand the backward a zero gradient for it
        # (and for log-probs when only the entropy is used), and the backward would do that work for nothing.
        ctx.set_materialize_grads(False)
        n_rows = hidden.shape[0]
        vocab = weight.shape[0]
        device = hidden.device
        dtype = compute_dtype_for(hidden, weight)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = bias.float() if bias is not None else None

        def out(name, out_dtype=torch.float32):
            return empty((n_rows,), dtype=out_dtype, device=device) if name in outputs else None

        log_probs, lse = out("log_probs"), empty((n_rows,), dtype=torch.float32, device=device)
        entropy, log_sum_sq, mean_logits = out("entropy"), out("log_sum_sq_probs"), out("mean_logits")
        is_top1 = out("is_top1", torch.bool)
        flags = dict(HAS_ENTROPY=entropy is not None, HAS_LOG_SUM_SQ=log_sum_sq is not None,
                     HAS_MEAN=mean_logits is not None, HAS_TOP1=is_top1 is not None)
        # the statistics of the chunks seen so far; only needed when the vocabulary is split
        state = empty((_N_STATS, n_rows), dtype=torch.float32, device=device) if vocab > vocab_chunk else lse
        buf = empty((min(token_chunk, n_rows) * min(vocab_chunk, vocab),), dtype=torch.float32, device=device)
        # Frozen head (and bias), hidden needs a gradient: save the log-probs' gradient direction, no recompute.
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        direction = None
        if need_h and not need_w and not need_b:
            direction = empty(hidden.shape, dtype=hidden.dtype, device=device)
            # exp(z - m) for the tensor-core GEMM: in place of the fp32 logits, else a compute-dtype buffer
            exp_buf = buf if dtype == torch.float32 else empty(buf.shape, dtype=dtype, device=device)
            acc = torch.empty((min(token_chunk, n_rows), hidden.shape[1]), dtype=torch.float32, device=device)
            rescale = empty((min(token_chunk, n_rows),), dtype=torch.float32, device=device)
            inv_sum = empty((min(token_chunk, n_rows),), dtype=torch.float32, device=device)
        for t0, t1, vocab_chunks in _tiles(n_rows, vocab, token_chunk, vocab_chunk):
            # unrequested outputs get a harmless stand-in pointer (their stores are compiled out)
            rows = [x[t0:t1] if x is not None else lse[t0:t1]
                    for x in (log_probs, lse, entropy, log_sum_sq, mean_logits, is_top1)]
            state_rows = state[..., t0:t1]
            for v0, v1 in vocab_chunks:
                tile = _logits_tile(buf, h[t0:t1], w, b, v0, v1)
                exp_tile = exp_buf[: tile.numel()].view(tile.shape) if direction is not None else tile
                saved = (exp_tile, rescale, inv_sum) if direction is not None else (lse, lse, lse)
                block_v = _block_v(v1 - v0)
                _fwd_kernel[(t1 - t0,)](
                    tile, labels[t0:t1], state_rows,
                    *rows, *saved,
                    tile.stride(0), state.stride(0) if state.dim() == 2 else 0, exp_tile.stride(0),
                    v1 - v0, v0, vocab,
                    z_scale, ignore_index,
                    FIRST=v0 == 0, LAST=v1 == vocab, **flags, SAVE_EXP=direction is not None,
                    BLOCK_V=block_v, num_warps=_num_warps(block_v),
                )
                if direction is not None:  # acc = sum_{j != y} exp(z_j - m) W_j, m the running max
                    a = acc[: t1 - t0]
                    if v0 == 0:
                        mm_fp32(exp_tile, w[v0:v1], out=a)
                    else:
                        a.mul_(rescale[: t1 - t0, None])
                        addmm_fp32(a, exp_tile, w[v0:v1])
            if direction is not None:
                _store_direction(direction[t0:t1], acc[: t1 - t0], inv_sum[: t1 - t0], log_probs[t0:t1],
                                 lse[t0:t1], labels[t0:t1], w, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy, direction)
        ctx.z_scale, ctx.ignore_index = z_scale, ignore_index
        ctx.token_chunk, ctx.vocab_chunk = token_chunk, vocab_chunk
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq, mean_logits, is_top1) if x is not None))
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        hidden, weight, bias, labels, lse, entropy, direction = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if (grad_log_probs is None and grad_entropy is None) or not (need_h or need_w or need_b):
            return (None,) * 9
        if direction is not None and grad_entropy is None:
            # dhidden = s * g * direction, in place: the forward saved the direction for this one use (a second
            # backward of the graph fails autograd's version check of the saved tensor)
            valid = (labels != ctx.ignore_index) & (lse != float("-inf"))
            # not g * 0 on ignored rows: a NaN/inf incoming gradient there stays out
            g = torch.where(valid, grad_log_probs.float() * ctx.z_scale, 0.0)
            return (direction.mul_(g[:, None]),) + (None,) * 8
        n_rows, hidden_size = hidden.shape
        vocab, device = weight.shape[0], hidden.device
        dtype = compute_dtype_for(hidden, weight)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = bias.float() if bias is not None else None
        g_lp = grad_log_probs.float().contiguous() if grad_log_probs is not None else None
        g_ent = grad_entropy.float().contiguous() if grad_entropy is not None else None
        token_chunk, vocab_chunk = ctx.token_chunk, ctx.vocab_chunk

        buf = empty((min(token_chunk, n_rows) * min(vocab_chunk, vocab),), dtype=torch.float32, device=device)
        # fp32: the gradient overwrites the tile in place; bf16/fp16: a buffer for tensor-core GEMMs
        dbuf = buf if dtype == torch.float32 else empty(buf.shape, dtype=dtype, device=device)
        grad_h = empty((n_rows, hidden_size), dtype=hidden.dtype, device=device) if need_h else None
        grad_h_acc = (  # fp32 sum over the vocabulary chunks of one token chunk
            torch.empty((min(token_chunk, n_rows), hidden_size), dtype=torch.float32, device=device) if need_h else None
        )
        grad_w = torch.zeros((vocab, hidden_size), dtype=torch.float32, device=device) if need_w else None
        grad_b = torch.zeros((vocab,), dtype=torch.float32, device=device) if need_b else None
        for t0, t1, vocab_chunks in _tiles(n_rows, vocab, token_chunk, vocab_chunk):
            h_c = h[t0:t1]
            if need_h:
                acc = grad_h_acc[: t1 - t0].zero_()
            for v0, v1 in vocab_chunks:
                tile = _logits_tile(buf, h_c, w, b, v0, v1)
                dtile = dbuf[: tile.numel()].view(tile.shape)
                block_v = _block_v(v1 - v0)
                _bwd_kernel[(t1 - t0, triton.cdiv(v1 - v0, block_v))](
                    tile, dtile, labels[t0:t1], lse[t0:t1],
                    entropy[t0:t1] if g_ent is not None else lse[t0:t1],
                    g_lp[t0:t1] if g_lp is not None else lse[t0:t1],
                    g_ent[t0:t1] if g_ent is not None else lse[t0:t1],
                    tile.stride(0), dtile.stride(0),
                    v1 - v0, v0,
                    ctx.z_scale, ctx.ignore_index,
                    HAS_LOG_PROBS_GRAD=g_lp is not None, HAS_ENTROPY_GRAD=g_ent is not None,
                    BLOCK_V=block_v, num_warps=_num_warps(block_v),
                )
                if need_h:
                    addmm_fp32(acc, dtile, w[v0:v1])
                if need_w:
                    addmm_fp32(grad_w[v0:v1], dtile.t(), h_c)
                if need_b:
                    grad_b[v0:v1] += dtile.sum(dim=0, dtype=torch.float32)
            if need_h:
                grad_h[t0:t1] = acc
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None, None, None, None, None, None,
        )


def _store_direction(out, acc, inv_sum, log_probs, lse, labels, w, ignore_index):
    """``out = (1 - p_y) W_y - sum_{j != y} p_j W_j`` per row (0 on ignored rows and rows with no finite logit):
    the gradient of log p_y wrt hidden, up to the scale. ``acc`` holds ``sum_{j != y} e_j W_j`` with
    ``p_j = e_j * inv_sum``; ``1 - p_y = -expm1(log p_y)`` in fp32. Splitting off the label's own term keeps
    ``W_y - sum_j p_j W_j`` from cancelling when p_y is close to 1: each term carries only its own rounding."""
    valid = (labels != ignore_index) & (lse != float("-inf"))
    w_y = w[torch.where(valid, labels, 0)].float()
    d = acc.mul_(-inv_sum[:, None]).addcmul_(w_y, torch.expm1(log_probs).neg_()[:, None])
    out.copy_(d.masked_fill_(~valid[:, None], 0.0))


def _chunk_outputs_torch(h_c, w, b, y_c, dtype, z_scale, ignore_index, outputs):
    # As the Triton path: operands rounded to the compute dtype, fp32 logits and math. Autocast is off
    # in here, else it would run the matmul (and all that follows) in bf16.
    with torch.autocast(h_c.device.type, enabled=False):
        z = h_c.to(dtype).float() @ w.to(dtype).float().t()
        if b is not None:
            z = z + b.float()
        z = z * z_scale
        valid = y_c != ignore_index
        y = torch.where(valid, y_c, 0).long()
        z_live, dead = without_dead_rows(z)  # rows with no finite logit: p = 0 everywhere, as the kernels
        log_p = torch.log_softmax(z_live, dim=-1)
        log_probs = torch.where(valid, log_p.gather(1, y.unsqueeze(1)).squeeze(1), 0.0).masked_fill(valid & dead, -inf)
        if "entropy" in outputs:
            p_log_p = log_p.exp() * torch.where(log_p > -inf, log_p, 0.0)  # 0 log 0 = 0 at -inf logits
            entropy = torch.where(valid & ~dead, -p_log_p.sum(-1), 0.0)
        else:
            entropy = None
        with torch.no_grad():  # the statistics TRL marks non-differentiable
            log_sum_sq = (
                torch.where(valid, torch.logsumexp(2 * log_p, dim=-1).masked_fill(dead, -inf), 0.0)
                if "log_sum_sq_probs" in outputs else None
            )
            mean_logits = torch.where(valid, z.mean(-1), 0.0) if "mean_logits" in outputs else None
            # argmax: the first maximum
            is_top1 = (z.argmax(-1) == y) & valid & ~dead if "is_top1" in outputs else None
    return log_probs, entropy, log_sum_sq, mean_logits, is_top1


def _linear_log_probs_torch(hidden, weight, bias, labels, z_scale, ignore_index, token_chunk, outputs):
    # Plain autograd, one token chunk at a time and checkpointed, so [N, V] is never kept.
    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    dtype = compute_dtype_for(hidden, weight)
    chunks = []
    for t0 in range(0, max(hidden.shape[0], 1), token_chunk):  # N = 0: one empty chunk keeps the graph
        args = (hidden[t0:t0 + token_chunk], weight, bias, labels[t0:t0 + token_chunk], dtype, z_scale,
                ignore_index, outputs)
        chunks.append(
            torch.utils.checkpoint.checkpoint(_chunk_outputs_torch, *args, use_reentrant=False) if track
            else _chunk_outputs_torch(*args)
        )
    return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*chunks))


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_outputs(outputs) -> frozenset:
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list, set, frozenset)):
        raise TypeError(f"outputs must be a tuple of output names from {OUTPUTS}, got {outputs!r}")
    unknown = [name for name in outputs if name not in OUTPUTS]
    if unknown:
        raise ValueError(f"outputs has unknown names {unknown}; choose from {OUTPUTS}")
    return frozenset(outputs) | {"log_probs"}


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    *,
    outputs: tuple[str, ...] = ("log_probs",),
    token_chunk_size: int = TOKEN_CHUNK_SIZE,
    vocab_chunk_size: int = VOCAB_CHUNK_SIZE,
):
    """Log-probability of each label under ``softmax(z)``, ``z = (hidden @ weight.T + bias) * logit_scale
    / temperature``, and optionally the softmax statistics TRL logs, without materialising ``z`` (see the
    module docstring for the tiling and the one-pass statistics).

    Serves TRL 1.16's ``ChunkedLogProbFunction.apply(hidden, weight, bias, labels, temperature, chunk_size,
    None, logit_scale, outputs)`` (no logit soft-capping): asked for more than log-probs it returns the same
    5-tuple; plus ``ignore_index`` handling.

    Args:
        hidden: ``[N, H]`` fp32/fp16/bf16.
        weight: ``[V, H]`` fp32/fp16/bf16 (frozen or trainable).
        labels: ``[N]`` int64/int32 in ``[0, V)`` or ``ignore_index`` (else ValueError on CPU; on a GPU a
            device-side assert, no host sync: see ``cross_entropy.check_labels``).
        bias: optional ``[V]`` fp32/fp16/bf16, added before the scaling (as TRL does).
        temperature: > 0; the logits are divided by it.
        logit_scale: the logits are multiplied by it (Cohere/Granite-style heads; 1.0 otherwise).
        ignore_index: label value whose outputs are 0 (False) with zero gradient.
        outputs: any subset of ``OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits",
            "is_top1")`` (TRL's names; log-probs are always computed). Only the requested statistics cost work.
        token_chunk_size, vocab_chunk_size: tile shape (defaults 2048 x 8192).

    Returns:
        If ``outputs`` names nothing but ``"log_probs"`` (the default): fp32 ``[N]`` log-probabilities.
        Otherwise TRL's 5-tuple ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, ``None``
        for each name not requested: ``[N]`` tensors, fp32 except ``is_top1`` (bool), 0 / False at ignored
        labels. ``log_probs`` and ``entropy`` are differentiable, the other three are not.

    Forward: ``lp_i = z_{i,y_i} - lse_i``, ``H_i = -sum_j p_ij log p_ij``, ``log sum_j p_ij**2``, ``mean_j z_ij``,
    ``is_top1_i = [y_i == first argmax_j z_ij]``, all from one online pass over vocabulary chunks.
    Backward (``g``, ``gH`` = grads of log_probs and entropy): ``dz = g * (onehot(y) - p) - gH * p * (log p + H)``
    (0 on ignored rows), ``dhidden = s * dz @ W``, ``dweight = s * dz.T @ hidden``, ``dbias = s * sum_rows(dz)``
    with ``s = logit_scale / temperature``; tiles are recomputed from ``lse``, GEMMs accumulate in fp32. With a
    frozen head and no entropy gradient, ``dhidden = s * g * D`` from the direction ``D = (1 - p_y) W_y -
    sum_{j != y} p_j W_j`` saved by the forward (module docstring): no recompute.
    A row whose logits are all -inf gives log-prob -inf and a zero gradient (see the module docstring).
    """
    n_rows, _, vocab = check_lm_head_args(hidden, weight, labels, bias)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise ValueError(f"logit_scale must be a number, got {logit_scale!r}")
    requested = _check_outputs(outputs)
    token_chunk = _positive_int("token_chunk_size", token_chunk_size)
    vocab_chunk = _positive_int("vocab_chunk_size", vocab_chunk_size)
    check_labels(labels, n_rows, vocab, ignore_index, rows_name="hidden")
    z_scale = float(logit_scale) / float(temperature)

    if not use_triton(hidden):
        results = _linear_log_probs_torch(hidden, weight, bias, labels, z_scale, ignore_index, token_chunk, requested)
    else:
        results = _LinearLogProbsFunction.apply(
            hidden, weight, bias, labels.contiguous(), z_scale, ignore_index, token_chunk, vocab_chunk, requested
        )
    return results[0] if requested == {"log_probs"} else tuple(results)
