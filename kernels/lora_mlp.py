"""Llama's MLP, ``down(swiglu(gate(x), up(x)))``, with frozen (NF4 or 16/32-bit) weights and LoRA on
all three projections, as one autograd Function; and Phi-3's, whose gate and up are one fused projection.

Forward (each ``proj(z) = z @ W.T (+ bias) + s * (z @ A.T) @ B.T``, see ``lora_projection.py``)::

    g = gate(x)                 # [T, I]   kept
    u = up(x)                   # [T, I]   kept
    h = silu(g) * u             # [T, I]   fp32 math, rounded once; NOT kept (recomputed)
    y = down(h)                 # [T, H]

Backward (``dy`` [T, H]; ``sig = sigmoid(g)``)::

    dB_d   = s_d * dy.T @ (h @ A_d.T)           # h @ A_d.T ([T, r]) kept from the forward
    dh     = dy @ W_d + s_d * (dy @ B_d) @ A_d  # into a [T, I] buffer
    h, dg, du = silu(g) * u,                    # ONE elementwise pass reads dh, g, u and writes
                dh * u * sig * (1 + g * (1 - sig)),   # h over dh, dg over g, du over u
                dh * g * sig
    dA_d   = s_d * (dy @ B_d).T @ h
    dx     = dg @ W_g + s_g * (dg @ B_g) @ A_g + du @ W_u + s_u * (du @ B_u) @ A_u   # one buffer
    dA_p   = s_p * (dp @ B_p).T @ x,   dB_p = s_p * dp.T @ (x @ A_p.T)      for p in (gate, up)

Kept between forward and backward: ``x``, ``g``, ``u`` and the small LoRA products ``x @ A_g.T``,
``x @ A_u.T``, ``h @ A_d.T`` ([T, r] each). Every dequantized weight goes through the shared workspace
buffer of ``lora_projection.py`` right before its matmul; none is kept. The backward peaks at one extra
[T, I] buffer (dh, then h); ``dg``/``du`` reuse the storage of ``g``/``u``, so a graph's backward can run
only once (a second one raises a RuntimeError).

**Token chunks** (``chunk_tokens=C``, for long sequences): the ``[T, I]`` tensors are what grows with the
context (three of them: 86 KB per token for Llama-3-8B in bf16). With ``C < T`` the forward runs C tokens
at a time and keeps only ``x`` and the [T, r] LoRA products; the backward recomputes ``g`` and ``u`` chunk by
chunk (two more GEMMs per chunk: the price of the memory) and accumulates the LoRA weight gradients over
the chunks in fp32. The MLP then never holds more than three ``[C, I]`` tensors.

**LoRA dropout** (peft's ``lora_dropout``, while training): each projection draws its own mask (``M_g``,
``M_u`` over ``x``, ``M_d`` over ``h``, as peft's three ``nn.Dropout`` modules do) and its LoRA terms see
``M_p * z`` instead of ``z`` (``z`` = ``x`` or ``h``): ``xa``, ``dA`` and the LoRA term of ``dx`` / ``dh`` come
from the kernels of ``lora_dropout.py``, which regenerate the mask from a seed (see ``lora_projection.py``);
no mask is kept. A mask element belongs to a global row: in token chunks, rows ``c0 ..`` draw the part of
the mask that the whole sequence would, in the forward and in the backward's recompute of ``g``, ``u``.

**Fused gate/up** (:func:`lora_mlp_gate_up`, Phi-3's ``gate_up_proj``: one weight ``[W_g; W_u]`` of ``[2I, H]``
and one LoRA ``A`` ``[r, H]``, ``B`` ``[2I, r]`` on it, as peft puts it there)::

    gu = gate_up(x)             # [T, 2I]  kept; g = gu[:, :I], u = gu[:, I:] are its column halves
    h  = silu(g) * u            # as above, read from the halves in place
    ...                         # the SwiGLU pass writes [dg | du] over gu: dgu
    dx = dgu @ W_gu + s * (dgu @ B) @ A,   dA = s * (dgu @ B).T @ x,   dB = s * dgu.T @ (x @ A.T)

i.e. one projection's backward over ``[T, 2I]`` where Llama's has two over ``[T, I]``. The same memory is kept
(``gu`` is ``g`` and ``u`` side by side), one dropout mask over ``x`` (peft's one ``nn.Dropout``), token chunks alike.

The SwiGLU passes are the kernels of ``swiglu.py``; the PyTorch engine runs the same math in fp32.
Dtype rules as in ``lora_projection.py``.
"""
from __future__ import annotations

import torch

from . import lora_projection as proj
from ._common import check_tensor, empty
from .swiglu import swiglu_backward_into, swiglu_forward_into

_N = 7  # Function arguments per projection: weight, bias, A, B, scaling, compute_dtype, dropout


def _rows_from(masks, start: int) -> list:
    """The dropout masks (or None) of the projections seen from row ``start`` on: a chunk's part of each."""
    return [None if m is None else m.rows_from(start) for m in masks]


def _gate_and_up(outs):
    """``g`` and ``u`` from the input projections' outputs: ``[g, u]`` (gate and up), or the column halves of
    ``[g | u]`` (one fused gate_up projection; views with rows strided by 2I)."""
    return outs if len(outs) == 2 else outs[0].chunk(2, dim=1)


def _mlp_forward(x, ins, down, masks):
    """``(y, outs, smalls)`` of the MLP on the rows ``x``: ``outs`` the input projections' outputs (``[g, u]`` or
    ``[gu]``), ``smalls`` their ``x @ A.T`` and down's ``h @ A_d.T`` ([T, r] each, or None). ``ins``: ``(gate, up)``
    or ``(gate_up,)``; ``masks``: their dropout masks, then down's."""
    outs, smalls = [], []
    for p, mask in zip(ins, masks):
        out, xa = proj.project_forward(x, *p[:6], mask)
        outs.append(out)
        smalls.append(xa)
    g, u = _gate_and_up(outs)
    h = swiglu_forward_into(g, u, empty(g.shape, dtype=g.dtype, device=g.device))
    y, ha_d = proj.project_forward(h, *down[:6], masks[-1])
    return y, outs, smalls + [ha_d]


def _mlp_backward(dy, x, outs, smalls, projections, need, dx, masks):
    """Gradients of the rows ``x`` (``dy`` their output gradient; ``outs`` their input projections' outputs, which
    are overwritten by their gradients). ``smalls``: as :func:`_mlp_forward` returns them; ``projections``: the
    input projections then down, each ``(W, bias, A, B, s, compute_dtype)``; ``need``: Function's
    needs_input_grad (x, then _N per projection); ``masks``: the rows' dropout masks (or None).
    Writes ``dx`` (a buffer of the rows, or None) and returns the (dbias, dA, dB) of every projection, flat."""
    *ins, (W_d, b_d, A_d, B_d, s_d, cd_d) = projections
    d = 1 + _N * len(ins)  # index in needs_input_grad of down's weight
    g, u = _gate_and_up(outs)
    buf = empty(g.shape, dtype=g.dtype, device=g.device)
    dh, _, dB_d = proj.project_backward(dy, None, W_d, A_d, B_d, s_d, smalls[-1], cd_d, need_dx=True,
                                        need_dA=False, need_dB=need[d + 3], dx_out=buf, mask=masks[-1])
    swiglu_backward_into(dh, g, u, g, u, out=buf)  # buf: h; g, u (so outs): dg, du
    dA_d = None
    if A_d is not None and need[d + 2]:  # dA_d = s_d * (dy @ B_d).T @ (M_d * h), now that buf holds h
        _, dA_d, _ = proj.project_backward(dy, buf, W_d, A_d, B_d, s_d, smalls[-1], cd_d, need_dx=False,
                                           need_dA=True, need_dB=False, mask=masks[-1])
    grads = [None] * (3 * len(ins)) + [proj.bias_grad(dy, b_d.dtype) if need[d + 1] else None, dA_d, dB_d]
    del buf, dh
    for i, (dp, (W, b, A, B, s, cd), xa) in enumerate(zip(outs, ins, smalls)):
        base = 1 + _N * i
        into = dict(dx_out=dx) if i == 0 else dict(dx=dx)  # the first writes dx, the second (up) adds to it
        dx, dA, dB = proj.project_backward(dp, x, W, A, B, s, xa, cd, need_dx=need[0], need_dA=need[base + 2],
                                           need_dB=need[base + 3], mask=masks[i], **into)
        grads[3 * i: 3 * i + 3] = [proj.bias_grad(dp, b.dtype) if need[base + 1] else None, dA, dB]
    return dx, grads


class _LoraMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, chunk_tokens, *flat):
        projections = [flat[i:i + _N] for i in range(0, len(flat), _N)]  # (gate, up, down) or (gate_up, down)
        *ins, down = projections
        T = x2.shape[0]
        ctx.chunked = chunk_tokens is not None and chunk_tokens < T
        masks = proj.draw_masks(x2.device, projections)  # each projection its own dropout seed
        adapters = [t for p in projections for t in (p[2], p[3])]
        if not ctx.chunked:
            y, outs, smalls = _mlp_forward(x2, ins, down, masks)
            ctx.save_for_backward(x2, *outs, *smalls, *adapters)
        else:  # keep x and the [T, r] LoRA products; the input projections are recomputed in the backward
            y = empty((T, down[0].shape[0]), dtype=x2.dtype, device=x2.device)
            smalls = [None if p[2] is None else empty((T, p[2].shape[0]), dtype=p[2].dtype, device=x2.device)
                      for p in projections]
            for c0 in range(0, T, chunk_tokens):
                rows = slice(c0, min(c0 + chunk_tokens, T))
                y_c, _, smalls_c = _mlp_forward(x2[rows], ins, down, _rows_from(masks, c0))
                y[rows] = y_c
                for kept, part in zip(smalls, smalls_c):
                    if kept is not None:
                        kept[rows] = part
                del y_c, smalls_c
            ctx.save_for_backward(x2, *smalls, *adapters)
        ctx.n_projections = len(projections)
        ctx.chunk_tokens = chunk_tokens
        ctx.frozen = [(p[0], p[1], p[4], p[5]) for p in projections]  # weight (a reference), bias, s, dtype
        ctx.masks = masks  # seeds, not tensors
        return y

    @staticmethod
    def backward(ctx, dy):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("lora_mlp's backward overwrites its saved gate/up activations with their gradients: "
                               "it runs once per forward (backward with retain_graph=True twice is not supported)")
        ctx.consumed = True
        need = ctx.needs_input_grad[:1] + ctx.needs_input_grad[2:]  # x2, then _N per projection (no chunk_tokens)
        n = ctx.n_projections
        saved = list(ctx.saved_tensors)
        x2 = saved.pop(0)
        outs = None
        if not ctx.chunked:
            outs, saved = saved[:n - 1], saved[n - 1:]
        smalls, adapters = saved[:n], saved[n:]
        projections = [(W, b, adapters[2 * i], adapters[2 * i + 1], s, cd)
                       for i, (W, b, s, cd) in enumerate(ctx.frozen)]
        with proj.autocast_off(dy.device.type):
            if not ctx.chunked:
                dx, grads = _mlp_backward(dy, x2, outs, smalls, projections, need, None, ctx.masks)
            else:
                dx, grads = _chunked_backward(dy, x2, smalls, projections, need, ctx.chunk_tokens, ctx.masks)
        out = [None] * (n * _N)
        for i in range(n):
            out[_N * i + 1: _N * i + 4] = grads[3 * i: 3 * i + 3]
        return (dx, None, *out)


def _chunked_backward(dy, x2, smalls, projections, need, chunk_tokens, masks):
    """:func:`_mlp_backward` chunk by chunk, the input projections recomputed (with the forward's dropout masks);
    weight gradients summed in fp32."""
    T = x2.shape[0]
    dx = empty(x2.shape, dtype=x2.dtype, device=x2.device) if need[0] else None
    sums = [None] * (3 * len(projections))
    for c0 in range(0, T, chunk_tokens):
        rows = slice(c0, min(c0 + chunk_tokens, T))
        x_c, masks_c = x2[rows], _rows_from(masks, c0)
        outs_c = [proj.project_forward(x_c, *p, m)[0] for p, m in zip(projections[:-1], masks_c)]
        smalls_c = [None if t is None else t[rows] for t in smalls]
        _, grads = _mlp_backward(dy[rows], x_c, outs_c, smalls_c, projections, need,
                                 dx[rows] if dx is not None else None, masks_c)
        del outs_c
        for k, grad in enumerate(grads):
            if grad is not None:
                sums[k] = grad.float() if sums[k] is None else sums[k].add_(grad)
    dtypes = []
    for W, b, A, B, s, cd in projections:
        dtypes += [None if b is None else b.dtype, None if A is None else A.dtype, None if B is None else B.dtype]
    return dx, [None if total is None else total.to(dtype) for total, dtype in zip(sums, dtypes)]


def _check_chunk_tokens(chunk_tokens) -> None:
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")


def _check_down(x, intermediate, down):
    down = proj.check_projection("down", intermediate, down, x.device)
    if down[0].shape[0] != x.shape[-1]:
        raise ValueError(f"down weight has shape {tuple(down[0].shape)}; expected ({x.shape[-1]}, {intermediate})")
    return down


def _apply(x, ins, down, chunk_tokens):
    """The checked projections through :class:`_LoraMLPFunction`, dtype rules applied."""
    x, projections, out_dtypes = proj.prepare_projections(x, [*ins, down])
    lead_shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    with proj.autocast_off(x.device.type):
        y = _LoraMLPFunction.apply(x2, chunk_tokens, *(arg for p in projections for arg in p))
    return y.reshape(*lead_shape, y.shape[-1]).to(out_dtypes[-1])


def lora_mlp(x: torch.Tensor, gate, up, down, chunk_tokens: int | None = None) -> torch.Tensor:
    """Llama/Qwen2 MLP with LoRA: ``down(silu(gate(x)) * up(x))`` in one autograd node.

    Args:
        x: ``[..., H]`` fp32/fp16/bf16 hidden states (the base matmuls run in this dtype).
        gate, up: ``(weight, bias, A, B, scaling[, compute_dtype[, dropout]])`` tuples as the arguments
            of ``lora_linear`` (e.g. ``fastft.quant.fused_linear_args(module)``), weights
            ``(I, H)`` (NF4Weight or frozen tensor), A ``[r, H]``, B ``[I, r]`` (or both None).
        down: the same with weight ``(H, I)``, A ``[r, I]``, B ``[H, r]``. Each projection with
            ``dropout > 0`` draws its own mask (down's over ``h``; see the module doc).
        chunk_tokens: process at most this many tokens at a time (see the module doc: bounded
            ``[C, I]`` buffers, ``g``/``u`` recomputed in the backward); None: all at once.

    Returns:
        ``[..., H]`` in ``x.dtype`` (autocast: see ``lora_projection.py``; g, u, h stay in ``x.dtype``).

    Backward: see the module docstring. ``h = silu(g) * u`` is recomputed together with the SwiGLU
    gradients in one pass, ``g``/``u`` are overwritten by their gradients, each NF4 weight is
    re-dequantized into the shared buffer.
    """
    check_tensor("x", x, min_ndim=1)
    _check_chunk_tokens(chunk_tokens)
    gate = proj.check_projection("gate", x.shape[-1], gate, x.device)
    up = proj.check_projection("up", x.shape[-1], up, x.device)
    intermediate = gate[0].shape[0]
    if up[0].shape[0] != intermediate:
        raise ValueError(f"up weight has {up[0].shape[0]} output features but gate has {intermediate}")
    return _apply(x, (gate, up), _check_down(x, intermediate, down), chunk_tokens)


def lora_mlp_gate_up(x: torch.Tensor, gate_up, down, chunk_tokens: int | None = None) -> torch.Tensor:
    """Phi-3's MLP with LoRA, gate and up fused in one projection: ``[g | u] = gate_up(x)``,
    ``y = down(silu(g) * u)``, in one autograd node (``g`` the first half of the columns, as transformers'
    ``Phi3MLP`` chunks them).

    Args:
        x: ``[..., H]`` fp32/fp16/bf16 hidden states.
        gate_up: ``(weight, bias, A, B, scaling[, compute_dtype[, dropout]])`` as the arguments of ``lora_linear``,
            weight ``(2I, H)`` (rows ``[W_g; W_u]``), A ``[r, H]``, B ``[2I, r]`` (or both None): one LoRA on the
            fused matrix, as peft puts it on ``gate_up_proj``; with dropout, one mask over ``x``.
        down: weight ``(H, I)``, A ``[r, I]``, B ``[H, r]``, as in :func:`lora_mlp`.
        chunk_tokens: as in :func:`lora_mlp`.

    Returns:
        ``[..., H]`` in ``x.dtype``.

    Backward: as :func:`lora_mlp` with ``gu = [g | u]`` one tensor: the SwiGLU pass writes ``[dg | du]`` over
    ``gu``, then ``dx = dgu @ W_gu + s * M * ((dgu @ B) @ A)``, ``dA = s * (dgu @ B).T @ (M * x)``,
    ``dB = s * dgu.T @ ((M * x) @ A.T)`` (one projection's backward, see ``lora_projection.py``).
    """
    check_tensor("x", x, min_ndim=1)
    _check_chunk_tokens(chunk_tokens)
    gate_up = proj.check_projection("gate_up", x.shape[-1], gate_up, x.device)
    if gate_up[0].shape[0] % 2:
        raise ValueError(f"gate_up weight has {gate_up[0].shape[0]} output features; expected an even number "
                         "(the gate rows, then as many up rows)")
    intermediate = gate_up[0].shape[0] // 2
    return _apply(x, (gate_up,), _check_down(x, intermediate, down), chunk_tokens)
