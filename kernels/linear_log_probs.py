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
definitions, dtypes and differentiability; here the logits tiles are fp32 (TRL keeps them in the compute dtype)
and ignored labels are handled. With a soft-cap ``c`` (Gemma 2's ``final_logit_softcapping``, TRL's order):
``z = c * tanh((hidden @ weight.T + bias) * logit_scale / c) / temperature``; every ``dz_j`` then carries the
cap's slope ``1 - tanh_j^2`` (``vocab_rows``), in the frozen-head direction below as well.

Masked vocabularies: -inf logits (e.g. a -inf bias) have ``p = 0`` and ``p log p = 0``. A row with NO finite
logit is read as ``p = 0`` everywhere: log_probs -inf, entropy 0, log_sum_sq_probs -inf, is_top1 False,
mean_logits -inf (its definition), and a zero gradient, in both engines.

Tiling. Tokens go in chunks of ``token_chunk_size`` rows (default 2048), the vocabulary in chunks of
``vocab_chunk_size`` columns (default 8192): one tile is ``[2048, 8192]`` fp32 = 64 MB whatever V is
(a whole ``[2048, 152k]`` fp32 row block would be 1.2 GB), and still a GEMM big enough for cuBLAS
to run at full speed.

Forward, per tile: ``tile = h_c @ W_v.T (+ b_v)`` in fp32 (cuBLAS), then the vocabulary-row forward kernel
(``vocab_rows``, one program per token) folds the tile into the token's running statistics in ONE pass, all
relative to the running max ``m`` (``s = sum_j exp(z_j - m)``, ``xs = sum_j exp(z_j - m) (z_j - m)``, ...; see
``vocab_rows`` for how they are rescaled when the max moves). Between vocabulary chunks they live in a
``[7, N]`` fp32 buffer; the last chunk writes::

    lse = m + log s,  log_probs = t - lse,  entropy = log s - xs / s,
    log_sum_sq_probs = log sq - 2 log s,  mean_logits = zs / V,  is_top1 = (t >= m) & (t > mb)

with ``t = z_y`` and ``mb = max_{j < y} z_j``. Saved for the backward: ``lse`` and ``entropy`` (fp32 ``[N]``)
and the inputs.

Backward, with ``g_i`` = grad of ``log_probs_i`` and ``gH_i`` = grad of ``entropy_i`` (either may be absent):
the tile is recomputed, ``log p = z - lse``, and the vocabulary-row backward kernel writes ::

    dz = g * (onehot(y) - p) - gH * p * (log p + entropy)        # d entropy / dz_j = -p_j (log p_j + H)
    dtile = dz * logit_scale / temperature                        # 0 on ignored rows

in the compute dtype; then ``dh_c += dtile @ W_v`` (fp32 accumulator per token chunk),
``dW_v += dtile.T @ h_c`` and ``db_v += sum_rows(dtile)`` (fp32 accumulators), each only when needed.

Frozen head (QLoRA: weight and bias need no gradient, hidden does). The gradient of the log-probs alone is ::

    dh_i = s * g_i * D_i,   D_i = (1 - p_iy) W_y - sum_{j != y} p_ij W_j,   s = logit_scale / temperature

so the forward saves ``D`` (``[N, H]``, hidden's dtype) and that backward is one in-place scaling: no
recomputed logits, no GEMM. While it has each tile, the forward's kernel writes ``e_j = exp(z_j - m)`` against
the chunk's final running max ``m`` (0 at the label and on ignored rows, compute dtype; times the cap's slope with a
soft-cap, and the label's term then too) and the factor ``exp(m_before - m)``; the host keeps
``A = sum_{j != y} e_j W_j`` in fp32 per token chunk, ``A <- A * exp(m_before - m) + e_tile @ W_v``, and after
the last chunk ``D = -expm1(log p_y) W_y - A / s``.
Cost: one ``[C, V_c] x [V_c, H]`` GEMM per tile in the forward instead of two (recompute, ``dh``) in the
backward; memory: ``D`` lives from the forward to the backward, where it becomes ``dh`` (no other ``[N, H]``
tensor then), plus a compute-dtype tile and an fp32 ``[C, H]`` accumulator during the forward. Keeping the
label's term apart avoids cancellation: ``W_y - sum_j p_j W_j`` is tiny next to ``W_y`` when ``p_y ~ 1``.
When the entropy does receive a gradient (the forward cannot know), or the head is trainable, the backward
recomputes the tiles as above, exactly.
"""
from __future__ import annotations

import torch

from ._common import empty, use_triton
from .cross_entropy import check_softcap
from .fused_linear_cross_entropy import (
    addmm_fp32,
    check_lm_head_args,
    compute_dtype_for,
    lm_head_rows_torch,
    mm_fp32,
)
from .vocab_rows import OUTPUTS, RUNNING_ROWS, backward_rows, check_labels, forward_rows, running_views

TOKEN_CHUNK_SIZE = 2048
VOCAB_CHUNK_SIZE = 8192


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
    def forward(ctx, hidden, weight, bias, labels, scales, ignore_index, token_chunk, vocab_chunk, outputs):
        # scales: z = cap(x * x_scale) * z_scale (vocab_rows.forward_rows); dz/dx = x_scale * z_scale (* slope)
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
        # the statistics of the chunks seen so far; only needed when the vocabulary is split
        state = empty((RUNNING_ROWS, n_rows), dtype=torch.float32, device=device) if vocab > vocab_chunk else None
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
            label_slope = (torch.ones((min(token_chunk, n_rows),), dtype=torch.float32, device=device)
                           if scales["softcap"] is not None else None)
        for t0, t1, vocab_chunks in _tiles(n_rows, vocab, token_chunk, vocab_chunk):
            stats = tuple(x[t0:t1] if x is not None else None for x in (entropy, log_sum_sq, mean_logits, is_top1))
            running = running_views(state[:, t0:t1]) if state is not None else None
            for v0, v1 in vocab_chunks:
                tile = _logits_tile(buf, h[t0:t1], w, b, v0, v1)
                exp_tile = exp_buf[: tile.numel()].view(tile.shape) if direction is not None else None
                forward_rows(tile, labels[t0:t1], log_probs[t0:t1], lse[t0:t1], ignore_index=ignore_index,
                             vocab_start=v0, vocab=vocab, first=v0 == 0, last=v1 == vocab,
                             running=running, stats=stats, **scales,
                             saved_exp=None if direction is None else (
                                 (exp_tile, rescale, inv_sum) if label_slope is None
                                 else (exp_tile, rescale, inv_sum, label_slope[: t1 - t0])))
                if direction is not None:  # acc = sum_{j != y} exp(z_j - m) W_j, m the running max
                    a = acc[: t1 - t0]
                    if v0 == 0:
                        mm_fp32(exp_tile, w[v0:v1], out=a)
                    else:
                        a.mul_(rescale[: t1 - t0, None])
                        addmm_fp32(a, exp_tile, w[v0:v1])
            if direction is not None:
                _store_direction(direction[t0:t1], acc[: t1 - t0], inv_sum[: t1 - t0], log_probs[t0:t1],
                                 lse[t0:t1], labels[t0:t1], w, ignore_index,
                                 None if label_slope is None else label_slope[: t1 - t0])
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy, direction)
        ctx.scales, ctx.ignore_index = scales, ignore_index
        ctx.compute_dtype = dtype  # the backward runs after autocast is left (AMP): recompute as the forward did
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
            g = torch.where(valid, grad_log_probs.float() * (ctx.scales["x_scale"] * ctx.scales["z_scale"]), 0.0)
            return (direction.mul_(g[:, None]),) + (None,) * 8
        n_rows, hidden_size = hidden.shape
        vocab, device = weight.shape[0], hidden.device
        dtype = ctx.compute_dtype
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
                backward_rows(tile, dtile, labels[t0:t1], lse[t0:t1], g_lp[t0:t1] if g_lp is not None else None,
                              ignore_index=ctx.ignore_index, **ctx.scales, vocab_start=v0,
                              entropy=entropy[t0:t1] if g_ent is not None else None,
                              grad_entropy=g_ent[t0:t1] if g_ent is not None else None)
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


def _store_direction(out, acc, inv_sum, log_probs, lse, labels, w, ignore_index, label_slope=None):
    """``out = (1 - p_y) W_y - sum_{j != y} p_j W_j`` per row (0 on ignored rows and rows with no finite logit):
    the gradient of log p_y wrt hidden, up to the scale. ``acc`` holds ``sum_{j != y} e_j W_j`` with
    ``p_j = e_j * inv_sum``; ``1 - p_y = -expm1(log p_y)`` in fp32. Splitting off the label's own term keeps
    ``W_y - sum_j p_j W_j`` from cancelling when p_y is close to 1: each term carries only its own rounding.
    With a soft-cap, ``acc``'s terms carry their slopes and the label's term is multiplied by ``label_slope``."""
    valid = (labels != ignore_index) & (lse != float("-inf"))
    w_y = w[torch.where(valid, labels, 0)].float()
    label_weight = torch.expm1(log_probs).neg_()
    if label_slope is not None:
        label_weight = label_weight * label_slope
    d = acc.mul_(-inv_sum[:, None]).addcmul_(w_y, label_weight[:, None])
    out.copy_(d.masked_fill_(~valid[:, None], 0.0))


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
    softcap: float | None = None,
    outputs: tuple[str, ...] = ("log_probs",),
    token_chunk_size: int = TOKEN_CHUNK_SIZE,
    vocab_chunk_size: int = VOCAB_CHUNK_SIZE,
):
    """Log-probability of each label under ``softmax(z)``, ``z = (hidden @ weight.T + bias) * logit_scale
    / temperature``, and optionally the softmax statistics TRL logs, without materialising ``z`` (see the
    module docstring for the tiling and the one-pass statistics).

    Serves TRL 1.16's ``ChunkedLogProbFunction.apply(hidden, weight, bias, labels, temperature, chunk_size,
    final_logit_softcapping, logit_scale, outputs)`` (``softcap=final_logit_softcapping``): asked for more than
    log-probs it returns the same 5-tuple; plus ``ignore_index`` handling.

    Args:
        hidden: ``[N, H]`` fp32/fp16/bf16.
        weight: ``[V, H]`` fp32/fp16/bf16 (frozen or trainable).
        labels: ``[N]`` int64/int32 in ``[0, V)`` or ``ignore_index`` (else ValueError on CPU; on a GPU a
            device-side assert, no host sync: see ``vocab_rows.check_labels``).
        bias: optional ``[V]`` fp32/fp16/bf16, added before the scaling (as TRL does).
        temperature: > 0; the logits are divided by it.
        logit_scale: the logits are multiplied by it (Cohere/Granite-style heads; 1.0 otherwise).
        ignore_index: label value whose outputs are 0 (False) with zero gradient.
        softcap: None, or ``c > 0``: ``z = c * tanh((hidden @ weight.T + bias) * logit_scale / c) / temperature``
            (TRL's order; Gemma 2's ``final_logit_softcapping``).
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
    softcap = check_softcap(softcap)
    if softcap is None:  # one factor, as the kernels always applied it
        scales = dict(z_scale=float(logit_scale) / float(temperature), x_scale=1.0, softcap=None)
    else:  # the logit scale before the cap, the temperature after it
        scales = dict(z_scale=1.0 / float(temperature), x_scale=float(logit_scale), softcap=softcap)

    if not use_triton(hidden, "linear_log_probs"):
        results = lm_head_rows_torch(hidden, weight, bias, labels, ignore_index=ignore_index,
                                     chunk_rows=token_chunk, outputs=requested, **scales)
    else:
        results = _LinearLogProbsFunction.apply(
            hidden, weight, bias, labels.contiguous(), scales, ignore_index, token_chunk, vocab_chunk, requested
        )
    return results[0] if requested == {"log_probs"} else tuple(results)
