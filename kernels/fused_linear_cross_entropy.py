"""Fused LM head + cross-entropy: ``cross_entropy(hidden @ weight.T, labels)`` without ever holding the
full ``[N, V]`` logits (for N = 16k tokens and Qwen2's V = 152k that would be 10 GB in fp32).

The tokens are processed in chunks of ``C`` rows. For each chunk (Liger-Kernel's approach)::

    z   = h_c @ W.T                        # [C, V] fp32 (cuBLAS, fp32 accumulation AND fp32 output)
    lse, loss_c = CE forward kernel (z)    # online log-sum-exp over the vocabulary (vocab_rows.py)
    dz  = CE backward kernel (z)           # softmax(z) - onehot, in the compute dtype (unscaled)
    dh_c  = dz @ W                         # [C, H]
    dW   += dz.T @ h_c                     # [V, H], fp32 accumulator, only if weight.requires_grad

so the gradients are already known when the forward returns; the autograd backward only multiplies
them by ``grad_output`` (a scalar for "mean"/"sum") and, for "mean", by ``1 / n_valid``. That factor is
not folded into ``dz``: in fp16, ``p / n`` (``p ~ 1/V``, thousands of tokens) flushes to zero before
GradScaler's scale, which arrives with ``grad_output``, can rescue it (5% off at 4096 tokens x 32k
vocab). Peak extra memory is one fp32 ``[C, V]`` chunk,
one compute-dtype ``[C, V]`` gradient chunk, ``dh`` ``[N, H]`` and, for a trainable head, an fp32
``[V, H]`` accumulator (fp32 so that summing over chunks does not round every partial sum to bf16).

``reduction="none"`` cannot be handled that way: ``dW = sum_i g_i dz_i.T h_i`` needs the per-row
``g_i`` before the chunk is reduced. There the forward computes only the loss and the per-row ``lse``
(fp32, ``[N]``), and the backward recomputes each chunk's logits and runs the same backward kernel
with ``g_i`` per row: one extra ``[C, H] x [H, V]`` GEMM per chunk instead of storing anything
``[N, V]``-sized.

Chunk size: as many rows as fit ``CHUNK_BYTES`` (256 MiB) of fp32 logits plus their compute-dtype
gradient, rounded down to a power of two, at most N: about 256 rows for Llama-3's 128k vocabulary in
bf16. A fixed budget, not Liger-Kernel's ``N / ceil(V / H)`` rows: that rule cuts 2048 tokens into 32
chunks of 64 rows, each re-reading the whole 1 GB head in a GEMM too thin to be fast, and lets the
chunk grow with N (3 GB at 128k tokens), which is exactly when memory is short.

``softcap=c`` (Gemma 2's ``final_logit_softcapping``): the loss of ``c * tanh(z / c)``, capped in fp32 inside the
row kernels (``vocab_rows``), whose backward multiplies ``dz`` by the cap's slope ``1 - tanh^2``; the GEMMs are
unchanged.

For ``mean``/``sum`` the backward scales the gradients saved by the forward in place (a graph's
backward runs once; a second one raises a RuntimeError).

The PyTorch engine (CPU without the Triton interpreter) is ``lm_head_rows_torch``: plain autograd of the same
math, chunked over tokens and checkpointed, with the kernels' numerics: operands in the compute dtype, fp32 logits,
also under autocast (which would otherwise run the matmul in bf16 and round the logits, as ``nn.Linear`` would).
It and the matmul helpers below (fp32 output from bf16/fp16 operands) are shared with ``linear_log_probs``.
"""
from __future__ import annotations

import torch

from ._common import autocast_dtype, check_same_device, check_tensor, empty, on_gpu, torch_at_least, use_triton
from .cross_entropy import (
    ce_backward_rows,
    ce_forward_rows,
    check_reduction,
    check_softcap,
    grad_scale_for,
    reduce_loss,
)
from .vocab_rows import check_labels, rows_torch, transform_torch

CHUNK_BYTES = 256 << 20  # fp32 logits + their gradient, per chunk


def _torch_has_fp32_output_gemm(version: str) -> bool:
    """``torch.mm(a, b, out_dtype=torch.float32)`` from bf16/fp16 operands on CUDA: cuBLAS accumulates in fp32
    and writes fp32, with no 16-bit rounding between. torch 2.8 and 2.9 have the overload but their CUDA check
    rejects the mixed dtypes; from 2.10 it runs."""
    return torch_at_least(version, 2, 10)


FP32_OUTPUT_GEMM = _torch_has_fp32_output_gemm(torch.__version__)


def mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` with fp32 ``out``; bf16/fp16 operands keep their tensor-core speed on a GPU."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if not on_gpu(a):
        return torch.mm(a.float(), b.float(), out=out)  # CPU: no fp32-output kernel for half operands
    if FP32_OUTPUT_GEMM:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return out.copy_(torch.mm(a, b))  # older torch: a 16-bit GEMM, rounded once, never an fp32 copy of b


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc``, without rounding ``a @ b`` to the operands' dtype (older torch
    on a GPU: the 16-bit product of this call is rounded once, the sum over calls stays fp32)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif not on_gpu(a):
        acc.addmm_(a.float(), b.float())
    elif FP32_OUTPUT_GEMM:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(torch.mm(a, b))


def compute_dtype_for(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: the autocast dtype under autocast (as ``nn.Linear`` would),
    otherwise the promotion of both (a bf16 hidden with an fp32 head computes in fp32)."""
    return autocast_dtype(hidden.device.type) or torch.promote_types(hidden.dtype, weight.dtype)


def check_lm_head_args(hidden, weight, labels, bias=None) -> tuple[int, int, int]:
    """Check hidden ``[N, H]``, weight ``[V, H]`` (and bias ``[V]``) of an LM-head op; returns (N, H, V)."""
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
    return n_rows, hidden_size, vocab


def _default_chunk_rows(n_rows: int, vocab: int, compute_itemsize: int) -> int:
    """Rows per chunk: the largest power of two whose logits (fp32) and gradient fit CHUNK_BYTES, at most N."""
    bytes_per_row = vocab * (4 + (0 if compute_itemsize == 4 else compute_itemsize))  # fp32: one shared buffer
    rows = max(1, CHUNK_BYTES // bytes_per_row)
    return max(1, min(n_rows, 1 << (rows.bit_length() - 1)))


class _FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, n_valid, chunk_rows, grad_hidden_needed,
                grad_weight_needed, softcap):
        n_rows, hidden_size = hidden.shape
        vocab = weight.shape[0]
        device = hidden.device
        dtype = compute_dtype_for(hidden, weight)
        h, w = hidden.to(dtype), weight.to(dtype)  # no copy in the usual case (both already `dtype`)

        lse = empty((n_rows,), dtype=torch.float32, device=device)
        loss_rows = empty((n_rows,), dtype=torch.float32, device=device)
        grads_now = reduction != "none" and (grad_hidden_needed or grad_weight_needed)
        logits_buf = empty((chunk_rows * vocab,), dtype=torch.float32, device=device)
        if grads_now:
            # fp32 inputs: the gradient overwrites the logits in place; else a compute-dtype buffer
            # so the two gradient GEMMs run on bf16/fp16 tensor cores.
            dlogits_buf = (
                logits_buf if dtype == torch.float32 else empty((chunk_rows * vocab,), dtype=dtype, device=device)
            )
            grad_h = empty((n_rows, hidden_size), dtype=dtype, device=device) if grad_hidden_needed else None
            grad_w = (
                torch.zeros((vocab, hidden_size), dtype=torch.float32, device=device) if grad_weight_needed else None
            )
            unit = torch.ones((), dtype=torch.float32, device=device)  # grad_output arrives in backward

        for start in range(0, n_rows, chunk_rows):
            end = min(start + chunk_rows, n_rows)
            h_c, y_c = h[start:end], labels[start:end]
            logits = mm_fp32(h_c, w.t(), out=logits_buf[: (end - start) * vocab].view(end - start, vocab))
            ce_forward_rows(logits, y_c, lse[start:end], loss_rows[start:end], ignore_index=ignore_index,
                            softcap=softcap)
            if grads_now:
                dlogits = dlogits_buf[: (end - start) * vocab].view(end - start, vocab)
                # unscaled (softmax - onehot): the 1/n of "mean" joins grad_output in the backward. Folded in
                # here, fp16 would flush p/n to zero (p ~ 1/V, n ~ 4k tokens) before GradScaler's scale arrives.
                ce_backward_rows(logits, dlogits, y_c, lse[start:end], unit, ignore_index=ignore_index, grad_scale=1.0,
                                 softcap=softcap)
                if grad_h is not None:
                    torch.mm(dlogits, w, out=grad_h[start:end])
                if grad_w is not None:
                    addmm_fp32(grad_w, dlogits.t(), h_c)

        ctx.reduction, ctx.ignore_index, ctx.chunk_rows, ctx.softcap = reduction, ignore_index, chunk_rows, softcap
        ctx.compute_dtype = dtype  # the backward runs after autocast is left (AMP): recompute as the forward did
        ctx.grad_scale = grad_scale_for(reduction, n_valid)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, labels, lse)
        elif grads_now:
            ctx.save_for_backward(
                grad_h.to(hidden.dtype) if grad_h is not None else None,
                grad_w.to(weight.dtype) if grad_w is not None else None,
            )
        return reduce_loss(loss_rows, reduction, n_valid)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction != "none":
            if getattr(ctx, "consumed", False):
                raise RuntimeError("fused_linear_cross_entropy's backward scales its saved gradients in place: it "
                                   "runs once per forward (backward with retain_graph=True twice is not supported)")
            ctx.consumed = True
            grad_h, grad_w = ctx.saved_tensors
            g = grad_output.float() * ctx.grad_scale
            return (
                grad_h.mul_(g) if grad_h is not None else None,  # no second [N, H] tensor
                grad_w.mul_(g) if grad_w is not None else None,
                None, None, None, None, None, None, None, None,
            )

        # "none": recompute each chunk's logits, then the same backward kernel with g per row.
        hidden, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        n_rows, hidden_size = hidden.shape
        vocab, device, chunk_rows = weight.shape[0], hidden.device, ctx.chunk_rows
        dtype = ctx.compute_dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        g = grad_output.float()
        logits_buf = empty((chunk_rows * vocab,), dtype=torch.float32, device=device)
        dlogits_buf = logits_buf if dtype == torch.float32 else empty((chunk_rows * vocab,), dtype=dtype, device=device)
        grad_h = empty((n_rows, hidden_size), dtype=dtype, device=device) if need_h else None
        grad_w = torch.zeros((vocab, hidden_size), dtype=torch.float32, device=device) if need_w else None
        for start in range(0, n_rows, chunk_rows):
            end = min(start + chunk_rows, n_rows)
            h_c, n = h[start:end], end - start
            logits = mm_fp32(h_c, w.t(), out=logits_buf[: n * vocab].view(n, vocab))
            dlogits = dlogits_buf[: n * vocab].view(n, vocab)
            ce_backward_rows(logits, dlogits, labels[start:end], lse[start:end], g[start:end],
                             ignore_index=ctx.ignore_index, softcap=ctx.softcap)
            if grad_h is not None:
                torch.mm(dlogits, w, out=grad_h[start:end])
            if grad_w is not None:
                addmm_fp32(grad_w, dlogits.t(), h_c)
        return (
            grad_h.to(ctx.hidden_dtype) if grad_h is not None else None,
            grad_w.to(ctx.weight_dtype) if grad_w is not None else None,
            None, None, None, None, None, None, None, None,
        )


def _lm_head_chunk_torch(h_c, weight, bias, y_c, dtype, scales, ignore_index, outputs):
    # As the kernels: operands rounded to the compute dtype, fp32 logits and math. Autocast is off in here, else
    # it would run the matmul (and all that follows) in bf16 and round the logits.
    with torch.autocast(h_c.device.type, enabled=False):
        z = h_c.to(dtype).float() @ weight.to(dtype).float().t()
        if bias is not None:
            z = z + bias.float()
        return rows_torch(transform_torch(z, **scales), y_c, ignore_index, outputs)


def lm_head_rows_torch(hidden, weight, bias, labels, *, z_scale: float, ignore_index: int, chunk_rows: int,
                       outputs=frozenset({"log_probs"}), softcap: float | None = None, x_scale: float = 1.0) -> tuple:
    """The PyTorch engine of the lm-head ops (this one and ``linear_log_probs``): ``vocab_rows.rows_torch`` of
    ``z = (hidden @ weight.T + bias) * z_scale`` (with a soft-cap ``c``: ``c * tanh(x * x_scale / c) * z_scale`` of
    those logits ``x``, see ``vocab_rows.transform_torch``) by plain autograd, ``chunk_rows`` tokens at a time and
    checkpointed, so that ``[N, V]`` logits are never kept. Numerics as the Triton engine's: the operands in
    ``compute_dtype_for(hidden, weight)`` (the autocast dtype under autocast), the logits and all that follows in
    fp32, under autocast too."""
    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    dtype = compute_dtype_for(hidden, weight)
    chunks = []
    for t0 in range(0, max(hidden.shape[0], 1), chunk_rows):  # N = 0: one empty chunk keeps the graph
        scales = dict(z_scale=z_scale, x_scale=x_scale, softcap=softcap)
        args = (hidden[t0:t0 + chunk_rows], weight, bias, labels[t0:t0 + chunk_rows], dtype, scales, ignore_index,
                outputs)
        chunks.append(
            torch.utils.checkpoint.checkpoint(_lm_head_chunk_torch, *args, use_reentrant=False) if track
            else _lm_head_chunk_torch(*args)
        )
    return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*chunks))


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    chunk_size: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, labels)`` computed chunk by chunk over the tokens, so the
    ``[N, V]`` logits never exist (see the module docstring for the memory layout).

    Args:
        hidden: ``[N, H]`` fp32/fp16/bf16 (the final hidden states, flattened over batch and time).
        weight: ``[V, H]`` fp32/fp16/bf16, the LM head (no bias). May be frozen: then no ``[V, H]``
            gradient work or memory is spent.
        labels: ``[N]`` int64/int32 in ``[0, V)`` or ``ignore_index``; out-of-range values raise
            ValueError on CPU, a device-side assert on a GPU (no host sync, see ``vocab_rows.check_labels``).
        ignore_index: label value that contributes 0 loss and 0 gradient.
        reduction: ``"mean"`` (over non-ignored labels; 0 if there are none), ``"sum"`` or ``"none"``.
        chunk_size: tokens per chunk; default: as many as fit ``CHUNK_BYTES`` (see the module docstring).
        softcap: None, or ``c > 0``: the loss of ``c * tanh(hidden @ weight.T / c)`` (Gemma 2's
            ``final_logit_softcapping``); ``dz`` is multiplied by ``1 - tanh^2`` before the gradient GEMMs.

    Returns:
        fp32 loss: scalar for mean/sum, ``[N]`` for none.

    The GEMMs run in ``promote(hidden.dtype, weight.dtype)`` (or the autocast dtype) with fp32
    accumulation; the logits are produced in fp32 and all softmax math is fp32.

    Forward: ``z = h @ W.T`` per chunk, ``loss_i = logsumexp(z_i) - z_{i, y_i}``, reduced. A row whose logits
    are all -inf has loss +inf and a zero gradient (see ``cross_entropy``).
    Backward: ``dz = (softmax(z) - onehot(y)) * g`` (0 on ignored rows, ``g`` = grad_output, divided
    by n_valid for mean), ``dhidden = dz @ W``, ``dweight = dz.T @ hidden``. For mean/sum the
    gradients are computed in the forward (with g = 1, n_valid not applied) and scaled by
    ``grad_output / n_valid`` (mean) or ``grad_output`` (sum) in the backward;
    for none the backward recomputes each chunk's logits from the saved per-row ``lse``.
    """
    check_reduction(reduction)
    softcap = check_softcap(softcap)
    n_rows, hidden_size, vocab = check_lm_head_args(hidden, weight, labels)
    n_valid = check_labels(labels, n_rows, vocab, ignore_index, rows_name="hidden")
    if chunk_size is None:
        chunk_rows = _default_chunk_rows(n_rows, vocab, compute_dtype_for(hidden, weight).itemsize)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    else:
        chunk_rows = min(chunk_size, max(n_rows, 1))

    if not use_triton(hidden, "fused_linear_cross_entropy"):
        log_probs = lm_head_rows_torch(hidden, weight, None, labels, z_scale=1.0, ignore_index=ignore_index,
                                       chunk_rows=max(chunk_rows, 1), softcap=softcap)[0]
        return reduce_loss(0.0 - log_probs, reduction, n_valid)  # 0 - x: +0, not -0, on ignored rows
    grad_enabled = torch.is_grad_enabled()
    return _FusedLinearCrossEntropyFunction.apply(
        hidden, weight, labels.contiguous(), ignore_index, reduction, n_valid, max(chunk_rows, 1),
        grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad, softcap,
    )
