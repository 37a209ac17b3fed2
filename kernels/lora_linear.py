"""Frozen (NF4 or 16/32-bit) linear layer plus a LoRA adapter, as one autograd Function.

    y = x @ W.T (+ bias) + s * (dropout(x) @ A.T) @ B.T

The forward and backward math, the dtype rules, LoRA dropout and the shared dequantization workspace are
those of one projection in ``lora_projection.py``; this file is the op around them: one saved ``x``, the small
``x @ A.T`` kept for ``dB``, the dropout seed on the autograd context, the weight by reference only.
"""
from __future__ import annotations

import torch

from . import lora_projection as proj
from ._common import check_tensor, composite_op, disabled_kernels, disabled_scope


class _LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, A, B, s, compute_dtype, dropout):
        (mask,) = proj.draw_masks(x2.device, [(weight, bias, A, B, s, compute_dtype, dropout)], "lora_linear")
        y, xa = proj.project_forward(x2, weight, bias, A, B, s, compute_dtype, mask)
        ctx.save_for_backward(x2, A, B, xa)
        ctx.weight, ctx.s, ctx.compute_dtype = weight, s, compute_dtype  # weight: a reference, never a dequantized copy
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mask = mask  # a seed, not a tensor
        ctx.disabled = disabled_kernels()  # the backward runs the engines the forward ran
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, A, B, xa = ctx.saved_tensors
        need_dx, _, need_dbias, need_dA, need_dB, _, _, _ = ctx.needs_input_grad
        with proj.autocast_off(dy.device.type), disabled_scope(ctx.disabled):
            dx, dA, dB = proj.project_backward(dy, x2, ctx.weight, A, B, ctx.s, xa, ctx.compute_dtype,
                                          need_dx=need_dx, need_dA=need_dA, need_dB=need_dB, mask=ctx.mask)
            dbias = proj.bias_grad(dy, ctx.bias_dtype) if need_dbias else None
        return dx, None, dbias, dA, dB, None, None, None


def lora_linear(x: torch.Tensor, weight, bias, A, B, scaling, compute_dtype=None, dropout: float = 0.0) -> torch.Tensor:
    """Frozen linear layer plus LoRA: ``y = x @ W.T (+ bias) + scaling * (dropout(x) @ A.T) @ B.T``.

    Args:
        x: ``[..., in]`` fp32/fp16/bf16.
        weight: frozen ``W``: an :class:`~fastft.kernels.nf4.NF4Weight` of shape ``(out, in)``
            (dequantized on the fly, never kept) or a ``[out, in]`` tensor not requiring grad.
        bias: ``[out]`` or None; gets a gradient when it requires grad.
        A: ``[r, in]`` LoRA down-projection, or None (with ``B``) for no active adapter (disabled
            or merged adapters): then the base layer alone, still on this path.
        B: ``[out, r]``, same dtype as ``A``. The LoRA branch runs in ``A.dtype``.
        scaling: ``alpha / r`` (or ``alpha / sqrt(r)``), a Python number.
        compute_dtype: dtype of the base matmul (bitsandbytes' compute dtype); None: ``x.dtype``.
        dropout: peft's ``lora_dropout`` probability ``p`` in [0, 1) when it applies (training), else 0: the
            LoRA branch sees ``dropout(x) = M * x`` (``M``: ``1 / (1 - p)`` kept, 0 dropped), drawn from a
            seed inside the kernels of ``lora_dropout.py``; no mask or dropped copy of ``x`` is kept.

    Returns:
        ``[..., out]`` in ``x.dtype`` (see the module doc for autocast).

    Backward: ``dx = dy @ W + s * M * ((dy @ B) @ A)``, ``dA = s * (dy @ B).T @ (M * x)``,
    ``dB = s * dy.T @ ((M * x) @ A.T)``, ``dbias = dy.sum(0)`` (``M = 1`` without dropout); W is
    re-dequantized, never saved.
    """
    check_tensor("x", x, min_ndim=1)
    params = proj.check_projection("lora_linear", x.shape[-1], (weight, bias, A, B, scaling, compute_dtype, dropout),
                               x.device)
    x, (params,), (out_dtype,) = proj.prepare_projections(x, [params])
    lead_shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    with proj.autocast_off(x.device.type), composite_op(x, "lora_linear"):
        y = _LoraLinearFunction.apply(x2, *params)
    return y.reshape(*lead_shape, y.shape[-1]).to(out_dtype)
