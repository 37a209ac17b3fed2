"""Attention's q/k/v projections, each a frozen NF4 linear layer plus LoRA, as one autograd Function with ONE
matmul for the three frozen weights (16/32-bit weights: three ``lora_linear`` calls).

With ``N = out_q + out_k + out_v``, ``W = [W_q; W_k; W_v]`` (``[N, in]``), ``b = [b_q; b_k; b_v]`` (zeros
for a projection without bias) and, over the projections ``p`` with an adapter and no dropout,
``A = [A_p; ...]`` (``[R, in]``, ``R = sum r_p``)::

    Y    = x @ W.T + b                     # [T, N]: one GEMM over one dequantized [q|k|v] workspace
    XA   = x @ A.T                         # [T, R]: one GEMM for those adapters; XA_p its column block
    Y_p += s_p * XA_p @ B_p.T              # each projection's column block of Y, in place
    q, k, v = Y_q, Y_k, copy of Y_v        # column views of Y (split outside the Function); v copied out

Backward, ``dY = [dq | dk | dv]`` ([T, N], what autograd assembles for the split), ``dY_p`` its blocks::

    G_p  = s_p * dY_p @ B_p                # [T, r_p];  G = [G_p; ...] over the stacked adapters: [T, R]
    dx   = dY @ W + G @ A                  # one GEMM over the workspace, one addmm_ for every LoRA term
    dA   = G.T @ x                         # [R, in], one GEMM; dA_p its row block
    dB_p = s_p * dY_p.T @ XA_p
    dbias_p = dY_p.sum(0)                  # only for a bias that requires grad (Qwen2's is frozen)

So ``dx`` is written by one matmul and updated once, not read and rewritten per projection; the price is
the ``[T, N]`` copy in which autograd gathers ``dq``, ``dk``, ``dv`` for the split.

The workspace is the shared dequantization buffer of ``lora_projection.py`` seen as ``[N, in]``: each NF4
weight is dequantized into its row block right before the matmul, in the forward and again in the backward;
no dequantized weight outlives its matmul. The buffer is sized by its largest use (for Llama-type 4-bit models
the MLP's ``[intermediate, hidden]``, larger than ``[N, hidden]``).

Kept between forward and backward: ``x`` (one tensor for all three projections) and the small
``XA_p`` ([T, r_p]). A projection may have no active adapter (``A = B = None``), e.g. peft's default Llama
targets are only q and v; ranks and scalings may differ per projection (peft's ``rank_pattern`` /
``alpha_pattern``). With LoRA dropout each projection draws its own mask ``M_p`` (peft gives each its own
``nn.Dropout``; drawn in q, k, v order), and ``x`` becomes ``M_p * x`` in its LoRA terms: that projection's
``XA_p``, ``dA_p`` and ``M_p * (G_p @ A_p)`` come from the kernels of ``lora_dropout.py``, which regenerate the
mask from a seed; nothing more is kept.

Dtype rules as in ``lora_projection.py``. The one GEMM needs three NF4 weights (16/32-bit weights would have
to be copied into a workspace that a model without 4-bit weights never needs), one compute dtype for q, k and
v and one adapter dtype: :func:`lora_qkv` runs the other cases as three ``lora_linear`` calls.
"""
from __future__ import annotations

import torch

from . import lora_projection as proj
from ._common import check_tensor, composite_op, disabled_kernels, disabled_scope
from .lora_dropout import dropout_lora_a, dropout_lora_grad_a, dropout_lora_grad_x_
from .lora_linear import lora_linear
from .nf4 import NF4Weight, dequantize_nf4

_N = 7  # Function arguments per projection: weight, bias, A, B, scaling, compute_dtype, dropout


def _blocks(sizes) -> list[slice]:
    """Consecutive slices of the given sizes."""
    out, start = [], 0
    for size in sizes:
        out.append(slice(start, start + size))
        start += size
    return out


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _dense_qkv(weights: list[NF4Weight], dtype: torch.dtype) -> torch.Tensor:
    """``[W_q; W_k; W_v]`` dequantized to ``dtype``, in the shared dequantization workspace."""
    n_out = sum(w.shape[0] for w in weights)
    W = proj.dequant_workspace((n_out, weights[0].shape[1]), dtype, weights[0].device)
    for w, rows in zip(weights, _blocks(w.shape[0] for w in weights)):
        dequantize_nf4(w, out=W[rows])
    return W


class _LoraQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, *flat):
        projections = [flat[i:i + _N] for i in range(0, 3 * _N, _N)]  # q, k, v
        weights, biases, As, Bs, scalings = ([p[j] for p in projections] for j in range(5))
        masks = proj.draw_masks(x2.device, projections, "lora_qkv")  # each projection its own seed, as in peft
        dtype, cd = x2.dtype, projections[0][5]
        cols = _blocks(w.shape[0] for w in weights)
        W = _dense_qkv(weights, cd)
        xc = x2 if cd == dtype else x2.to(cd)
        if any(b is not None for b in biases):  # one addmm: the biases side by side (zeros where none)
            b = torch.cat([torch.zeros(w.shape[0], dtype=cd, device=x2.device) if b is None else b.to(cd)
                           for w, b in zip(weights, biases)])
            y = torch.addmm(b, xc, W.t())
        else:
            y = torch.mm(xc, W.t())
        del W
        if cd != dtype:
            y = y.to(dtype)  # bitsandbytes casts the base result back to the input dtype

        adapters = [i for i in range(3) if As[i] is not None]
        stacked = [i for i in adapters if masks[i] is None]
        xas = [None] * 3
        if stacked:
            ad = As[stacked[0]].dtype
            xa = torch.mm(x2 if ad == dtype else x2.to(ad), _stack([As[i] for i in stacked]).t())
            for i, part in zip(stacked, xa.split([As[i].shape[0] for i in stacked], dim=1)):
                xas[i] = part
        for i in adapters:
            if masks[i] is not None:
                xas[i] = dropout_lora_a(x2, As[i], masks[i])  # (M_p * x) @ A_p.T, the mask drawn in the kernel
            if As[i].dtype == cd == dtype:
                y[:, cols[i]].addmm_(xas[i], Bs[i].t(), alpha=scalings[i])  # LoRA accumulated into its block
            else:  # peft: LoRA computed in the adapter's dtype, cast to the result dtype, added
                y[:, cols[i]].add_(torch.mm(xas[i], Bs[i].t()).mul_(scalings[i]).to(dtype))

        ctx.save_for_backward(x2, *As, *Bs, *xas)
        ctx.weights, ctx.scalings, ctx.compute_dtype, ctx.masks = weights, scalings, cd, masks  # seeds, references
        ctx.bias_dtypes = [None if b is None else b.dtype for b in biases]
        ctx.disabled = disabled_kernels()  # the backward runs the engines the forward ran
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, *saved = ctx.saved_tensors
        As, Bs, xas = saved[0:3], saved[3:6], saved[6:9]
        need = ctx.needs_input_grad
        masks, scalings, dtype = ctx.masks, ctx.scalings, dy.dtype
        cols = _blocks(w.shape[0] for w in ctx.weights)
        adapters = [i for i in range(3) if As[i] is not None]
        stacked = [i for i in adapters if masks[i] is None]
        grads = [None] * (3 * _N)
        with proj.autocast_off(dy.device.type), disabled_scope(ctx.disabled):
            G = [None] * 3  # s_p * dY_p @ B_p, in the adapter's dtype
            if adapters:
                ad = As[adapters[0]].dtype
                g = dy if ad == dtype else dy.to(ad)
                for i in adapters:
                    base = _N * i + 1  # index in needs_input_grad of this projection's weight
                    if need[base + 3]:
                        grads[base + 2] = torch.mm(g[:, cols[i]].t(), xas[i]).mul_(scalings[i])  # dB_p
                    G[i] = torch.mm(g[:, cols[i]], Bs[i]).mul_(scalings[i])
                    if masks[i] is not None and need[base + 2]:
                        grads[base + 1] = dropout_lora_grad_a(G[i], x2, masks[i], 1.0)  # dA_p
            if stacked:
                G_st = torch.cat([G[i] for i in stacked], dim=1) if len(stacked) > 1 else G[stacked[0]]
                A_st = _stack([As[i] for i in stacked])
                if any(need[_N * i + 3] for i in stacked):
                    dA = torch.mm(G_st.t(), x2 if ad == dtype else x2.to(ad))
                    for i, part in zip(stacked, dA.split([As[i].shape[0] for i in stacked])):
                        grads[_N * i + 2] = part if need[_N * i + 3] else None
            dx = None
            if need[0]:
                cd = ctx.compute_dtype
                W = _dense_qkv(ctx.weights, cd)
                dx = torch.mm(dy, W) if cd == dtype else torch.mm(dy.to(cd), W).to(dtype)
                del W
                if stacked:  # every LoRA term without dropout in one update of dx
                    if ad == dtype:
                        dx.addmm_(G_st, A_st)
                    else:
                        dx.add_(torch.mm(G_st, A_st).to(dtype))
                for i in adapters:
                    if masks[i] is not None:
                        dropout_lora_grad_x_(dx, G[i], As[i], masks[i], 1.0)
            for i in range(3):
                if need[_N * i + 2]:
                    grads[_N * i + 1] = proj.bias_grad(dy[:, cols[i]], ctx.bias_dtypes[i])
        return (dx, *grads)


def lora_qkv(x: torch.Tensor, q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v projections with LoRA in one autograd node: one base matmul, one saved ``x``, one ``dx``.

    Args:
        x: ``[..., in]`` fp32/fp16/bf16 hidden states.
        q, k, v: each a ``(weight, bias, A, B, scaling[, compute_dtype[, dropout]])`` tuple, as the
            arguments of ``lora_linear`` (e.g. ``fastft.quant.fused_linear_args(module)``): ``weight`` an
            ``NF4Weight`` ``(out_p, in)`` or a frozen ``[out_p, in]`` tensor; ``bias`` ``[out_p]`` or
            None; ``A`` ``[r_p, in]`` and ``B`` ``[out_p, r_p]`` or both None; ``scaling`` a number;
            ``dropout`` the LoRA dropout probability ``p_p`` (each projection draws its own mask ``M_p``).

    Returns:
        ``(q, k, v)``, each ``[..., out_p]`` in ``x.dtype`` (autocast: see ``lora_projection.py``): q and k
        column views of one ``[..., out_q + out_k + out_v]`` tensor (last dim contiguous), v a contiguous
        copy of its columns (a view kept by attention would keep the whole tensor alive), with
        ``p = x @ W_p.T + bias_p + s_p * ((M_p * x) @ A_p.T) @ B_p.T`` (``M_p = 1`` without dropout).

    Backward: ``dx = [dq|dk|dv] @ [W_q; W_k; W_v] + sum_p s_p * M_p * ((dp @ B_p) @ A_p)`` (one matmul over the
    workspace, the LoRA terms without dropout in one more); ``dA_p = s_p * (dp @ B_p).T @ (M_p * x)``;
    ``dB_p = s_p * dp.T @ ((M_p * x) @ A_p.T)``; ``dbias_p = dp.sum(0)``.
    """
    check_tensor("x", x, min_ndim=1)
    checked = [proj.check_projection(name, x.shape[-1], p, x.device) for name, p in (("q", q), ("k", k), ("v", v))]
    x_in, params, out_dtypes = proj.prepare_projections(x, checked)
    adapter_dtypes = {p[2].dtype for p in params if p[2] is not None}
    all_nf4 = all(isinstance(p[0], NF4Weight) for p in params)
    if not all_nf4 or len({p[5] for p in params}) > 1 or len(adapter_dtypes) > 1:
        # the one [q|k|v] matmul needs three NF4 weights, one compute dtype and one adapter dtype
        with composite_op(x, "lora_qkv"):
            return tuple(lora_linear(x, *p) for p in checked)
    lead_shape = x_in.shape[:-1]
    x2 = x_in.reshape(-1, x_in.shape[-1])
    with proj.autocast_off(x_in.device.type), composite_op(x, "lora_qkv"):
        y = _LoraQKVFunction.apply(x2, *params[0], *params[1], *params[2])
    q, k, v = y.reshape(*lead_shape, y.shape[-1]).split([p[0].shape[0] for p in params], dim=-1)
    # v gets its own storage: attention keeps v for its backward (a KV cache keeps it too), and a view would
    # keep all of [T, N] alive with it; q and k are read by RoPE (or q/k norms) into new tensors
    return q.to(out_dtypes[0]), k.to(out_dtypes[1]), v.to(out_dtypes[2]).contiguous()
