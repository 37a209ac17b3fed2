"""Attention's q/k/v projections, each a frozen (NF4 or 16/32-bit) linear layer plus LoRA, as one
autograd Function.

For each projection ``p`` in (q, k, v), with ``W_p [out_p, in]``, ``A_p [r_p, in]``, ``B_p [out_p, r_p]``::

    p = x @ W_p.T (+ bias_p) + s_p * (x @ A_p.T) @ B_p.T

Backward, with ``dp`` the gradient of output ``p``; all three input gradients are summed into ONE
``dx`` buffer in place (``addmm_``), never materialised separately::

    dx   = sum_p  dp @ W_p  +  s_p * (dp @ B_p) @ A_p
    dA_p = s_p * (dp @ B_p).T @ x
    dB_p = s_p * dp.T @ (x @ A_p.T)
    dbias_p = dp.sum(0)                # only for a bias that requires grad (Qwen2's is frozen)

What is kept between forward and backward: ``x`` (one tensor for all three projections) and the
small ``x @ A_p.T`` ([T, r_p]). With LoRA dropout each projection draws its own mask ``M_p`` (peft
gives each projection its own ``nn.Dropout``) and ``x`` becomes ``M_p * x`` in its LoRA terms, the mask
regenerated from a seed by ``lora_dropout.py`` (see ``lora_projection.py``); nothing more is kept. Each NF4
weight is dequantized into the shared workspace buffer (``lora_projection.py``) right before its matmul,
in the forward and again in the backward; no dequantized weight outlives its matmul. q, k and v come
back as separate contiguous tensors (RoPE rotates them in place). A projection may have no active
adapter (``A = B = None``), e.g. peft's default Llama targets are only q and v. Dtype rules as in
``lora_projection.py``.

Design note: a single concatenated ``[out_q + out_k + out_v, in]`` matmul would return q/k/v as
views of one tensor, which the in-place RoPE after it cannot take (or would need a copy); three
cuBLAS calls on the same ``x`` do the same FLOPs and write q, k, v where they are returned.
"""
from __future__ import annotations

import torch

from . import lora_projection as proj
from ._common import check_tensor

_N = 7  # Function arguments per projection: weight, bias, A, B, scaling, compute_dtype, dropout


class _LoraQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, *flat):
        projections = [flat[i:i + _N] for i in range(0, 3 * _N, _N)]  # q, k, v
        masks = proj.draw_masks(x2.device, projections)  # each projection its own dropout seed, as in peft
        outputs, saved = [], [x2]
        for p, mask in zip(projections, masks):
            y, xa = proj.project_forward(x2, *p[:6], mask)
            outputs.append(y)
            saved += [p[2], p[3], xa]  # A, B, x @ A.T
        ctx.save_for_backward(*saved)
        ctx.weights = [p[0] for p in projections]  # frozen weights: references only
        ctx.scalings = [p[4] for p in projections]
        ctx.compute_dtypes = [p[5] for p in projections]
        ctx.bias_dtypes = [None if p[1] is None else p[1].dtype for p in projections]
        ctx.masks = masks
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        x2, *saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_dx = need[0]
        dx, result = None, [None] * (3 * _N)
        with proj.autocast_off(x2.device.type):
            for i, dy in enumerate(grads):
                A, B, xa = saved[3 * i: 3 * i + 3]
                base = 1 + _N * i  # index in needs_input_grad of this projection's weight
                dx, dA, dB = proj.project_backward(dy, x2, ctx.weights[i], A, B, ctx.scalings[i], xa,
                                                   ctx.compute_dtypes[i], need_dx=need_dx, need_dA=need[base + 2],
                                                   need_dB=need[base + 3], dx=dx, mask=ctx.masks[i])
                result[_N * i + 1: _N * i + 4] = [
                    proj.bias_grad(dy, ctx.bias_dtypes[i]) if need[base + 1] else None, dA, dB,
                ]
        return (dx, *result)


def lora_qkv(x: torch.Tensor, q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v projections with LoRA in one autograd node: one saved ``x``, one summed ``dx``.

    Args:
        x: ``[..., in]`` fp32/fp16/bf16 hidden states (the base matmuls run in this dtype).
        q, k, v: each a ``(weight, bias, A, B, scaling[, compute_dtype[, dropout]])`` tuple, as the
            arguments of ``lora_linear`` (e.g. ``fastft.quant.fused_linear_args(module)``): ``weight`` an
            ``NF4Weight`` ``(out_p, in)`` or a frozen ``[out_p, in]`` tensor; ``bias`` ``[out_p]`` or
            None; ``A`` ``[r_p, in]`` and ``B`` ``[out_p, r_p]`` or both None; ``scaling`` a number;
            ``dropout`` the LoRA dropout probability ``p_p`` (each projection draws its own mask ``M_p``).

    Returns:
        ``(q, k, v)``, each ``[..., out_p]`` contiguous, in ``x.dtype`` (autocast: see ``lora_projection.py``):
        ``p = x @ W_p.T + bias_p + s_p * ((M_p * x) @ A_p.T) @ B_p.T`` (``M_p = 1`` without dropout).

    Backward: ``dx = sum_p dp @ W_p + s_p * M_p * ((dp @ B_p) @ A_p)`` accumulated in place into one buffer;
    ``dA_p = s_p * (dp @ B_p).T @ (M_p * x)``; ``dB_p = s_p * dp.T @ ((M_p * x) @ A_p.T)``;
    ``dbias_p = dp.sum(0)``.
    """
    check_tensor("x", x, min_ndim=1)
    params = [
        proj.check_projection(name, x.shape[-1], p, x.device) for name, p in (("q", q), ("k", k), ("v", v))
    ]
    x, params, out_dtypes = proj.prepare_projections(x, params)
    lead_shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    with proj.autocast_off(x.device.type):
        outputs = _LoraQKVFunction.apply(x2, *params[0], *params[1], *params[2])
    return tuple(y.reshape(*lead_shape, y.shape[-1]).to(dt) for y, dt in zip(outputs, out_dtypes))
