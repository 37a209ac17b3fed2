"""Per-token log-probabilities of an LM head, chunked over tokens AND vocabulary, manual backward.

For ``z = (hidden @ weight.T + bias) * logit_scale / temperature`` (``[N, V]``, never materialised)::

    log_probs_i = z_{i, y_i} - logsumexp_j z_ij          # fp32 [N]; 0 where y_i == ignore_index

This is what TRL 1.16's ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` computes for
``final_logit_softcapping=None`` (TRL's fused LM head for GRPO/DPO-style per-token log-probs); same
math, but the logits tiles are fp32 (TRL keeps them in the compute dtype) and the row math is the
cross-entropy kernels of ``cross_entropy.py``.

Tiling. Tokens go in chunks of ``token_chunk_size`` rows (default 2048), the vocabulary in chunks of
``vocab_chunk_size`` columns (default 8192): one tile is ``[2048, 8192]`` fp32 = 64 MB whatever V is
(a whole ``[2048, 152k]`` fp32 row block would be 1.2 GB), and still a GEMM big enough for cuBLAS
to run at full speed.

Forward, per tile: ``tile = h_c @ W_v.T (+ b_v)`` in fp32 (cuBLAS), then the CE forward kernel folds
the tile into a running per-token ``lse`` (``logaddexp`` across vocabulary chunks) and picks up the
label's logit from whichever chunk holds it. Saved: ``lse`` (fp32 ``[N]``) and the inputs.

Backward, with ``g_i`` = grad of ``log_probs_i``: the tile is recomputed, and the CE backward kernel
writes ``dtile = g_i * (onehot - softmax(z_i)) * logit_scale / temperature`` (0 on ignored rows) in
the compute dtype; then ``dh_c += dtile @ W_v`` (fp32 accumulator per token chunk),
``dW_v += dtile.T @ h_c`` and ``db_v += sum_rows(dtile)`` (fp32 accumulators), each only when needed.
"""
from __future__ import annotations

import torch

from ._common import check_same_device, check_tensor, empty, use_triton
from .cross_entropy import ce_backward_rows, ce_forward_rows, check_labels
from .fused_linear_cross_entropy import addmm_fp32, compute_dtype_for, mm_fp32

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
    def forward(ctx, hidden, weight, bias, labels, z_scale, ignore_index, token_chunk, vocab_chunk):
        n_rows = hidden.shape[0]
        vocab = weight.shape[0]
        device = hidden.device
        dtype = compute_dtype_for(hidden, weight)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = bias.float() if bias is not None else None

        lse = empty((n_rows,), dtype=torch.float32, device=device)
        target = empty((n_rows,), dtype=torch.float32, device=device)
        neg_log_probs = empty((n_rows,), dtype=torch.float32, device=device)
        buf = empty((min(token_chunk, n_rows) * min(vocab_chunk, vocab),), dtype=torch.float32, device=device)
        for t0, t1, vocab_chunks in _tiles(n_rows, vocab, token_chunk, vocab_chunk):
            for v0, v1 in vocab_chunks:
                tile = _logits_tile(buf, h[t0:t1], w, b, v0, v1)
                ce_forward_rows(
                    tile, labels[t0:t1], lse[t0:t1], neg_log_probs[t0:t1], target[t0:t1],
                    ignore_index=ignore_index, vocab_start=v0, z_scale=z_scale, first=v0 == 0, last=v1 == vocab,
                )
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.z_scale, ctx.ignore_index = z_scale, ignore_index
        ctx.token_chunk, ctx.vocab_chunk = token_chunk, vocab_chunk
        return neg_log_probs.neg_()  # the kernel writes the loss lse - z_y; 0 stays 0 on ignored rows

    @staticmethod
    def backward(ctx, grad_log_probs):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n_rows, hidden_size = hidden.shape
        vocab, device = weight.shape[0], hidden.device
        dtype = compute_dtype_for(hidden, weight)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = bias.float() if bias is not None else None
        g = grad_log_probs.float()
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
                # d log_probs / dz = onehot - softmax = -(softmax - onehot): grad_scale = -1
                ce_backward_rows(
                    tile, dtile, labels[t0:t1], lse[t0:t1], g[t0:t1],
                    ignore_index=ctx.ignore_index, grad_scale=-1.0, vocab_start=v0, z_scale=ctx.z_scale,
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
            None, None, None, None, None,
        )


def _linear_log_probs_torch(hidden, weight, bias, labels, z_scale, ignore_index, token_chunk):
    # Plain autograd, one token chunk at a time and checkpointed, so [N, V] is never kept.
    def chunk(h_c, w, b, y_c):
        z = h_c.float() @ w.float().t()
        if b is not None:
            z = z + b.float()
        z = z * z_scale
        valid = y_c != ignore_index
        target = z.gather(1, torch.where(valid, y_c, 0).long().unsqueeze(1)).squeeze(1)
        return torch.where(valid, target - torch.logsumexp(z, dim=-1), 0.0)

    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    out = []
    for t0 in range(0, max(hidden.shape[0], 1), token_chunk):  # N = 0: one empty chunk keeps the graph
        args = (hidden[t0:t0 + token_chunk], weight, bias, labels[t0:t0 + token_chunk])
        out.append(torch.utils.checkpoint.checkpoint(chunk, *args, use_reentrant=False) if track else chunk(*args))
    return torch.cat(out)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    *,
    token_chunk_size: int = TOKEN_CHUNK_SIZE,
    vocab_chunk_size: int = VOCAB_CHUNK_SIZE,
) -> torch.Tensor:
    """Log-probability of each label under ``softmax(z)``, ``z = (hidden @ weight.T + bias) * logit_scale
    / temperature``, without materialising ``z`` (see the module docstring for the tiling).

    Drop-in for TRL's ``ChunkedLogProbFunction.apply(hidden, weight, bias, labels, temperature,
    chunk_size, None, logit_scale)[0]`` (no logit soft-capping, no entropy/extra outputs), plus
    ``ignore_index`` handling.

    Args:
        hidden: ``[N, H]`` fp32/fp16/bf16.
        weight: ``[V, H]`` fp32/fp16/bf16 (frozen or trainable).
        labels: ``[N]`` int64/int32 in ``[0, V)`` or ``ignore_index`` (else ValueError, host check).
        bias: optional ``[V]`` fp32/fp16/bf16, added before the scaling (as TRL does).
        temperature: > 0; the logits are divided by it.
        logit_scale: the logits are multiplied by it (Cohere/Granite-style heads; 1.0 otherwise).
        ignore_index: label value whose output is 0 with zero gradient.
        token_chunk_size, vocab_chunk_size: tile shape (defaults 2048 x 8192).

    Returns:
        fp32 ``[N]`` log-probabilities (<= 0), 0 at ignored labels.

    Forward: ``lp_i = z_{i,y_i} - lse_i`` with ``lse_i`` accumulated over vocabulary chunks (saved).
    Backward (``g`` = grad of the output): ``dz = g * (onehot(y) - softmax(z))`` (0 on ignored rows),
    ``dhidden = s * dz @ W``, ``dweight = s * dz.T @ hidden``, ``dbias = s * sum_rows(dz)`` with
    ``s = logit_scale / temperature``; tiles are recomputed from ``lse``, GEMMs accumulate in fp32.
    """
    check_tensor("hidden", hidden, ndim=2)
    check_tensor("weight", weight, ndim=2)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
    check_same_device(hidden=hidden, weight=weight, bias=bias,
                      labels=labels if isinstance(labels, torch.Tensor) else None)
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    if weight.shape[1] != hidden_size:
        raise ValueError(
            f"weight must be [V, H] with H = hidden's last dim {hidden_size}; got weight shape {tuple(weight.shape)}"
        )
    if vocab == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if bias is not None and bias.shape[0] != vocab:
        raise ValueError(f"bias must have V = {vocab} elements (weight's rows); got shape {tuple(bias.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise ValueError(f"logit_scale must be a number, got {logit_scale!r}")
    token_chunk = _positive_int("token_chunk_size", token_chunk_size)
    vocab_chunk = _positive_int("vocab_chunk_size", vocab_chunk_size)
    check_labels(labels, n_rows, vocab, ignore_index, rows_name="hidden")
    z_scale = float(logit_scale) / float(temperature)

    if not use_triton(hidden):
        return _linear_log_probs_torch(hidden, weight, bias, labels, z_scale, ignore_index, token_chunk)
    return _LinearLogProbsFunction.apply(
        hidden, weight, bias, labels.contiguous(), z_scale, ignore_index, token_chunk, vocab_chunk
    )
