"""Rotary position embedding (RoPE) for q and k in one launch: Triton forward and backward.

Hugging Face convention (``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``), per head vector ``x``
of length ``D`` whose first ``R`` dims (``R`` even, the length of the cos/sin tables) are split into halves
``[x1, x2]`` and the rest ``xp`` passed through, with ``cos = [c1, c2]``, ``sin = [s1, s2]`` taken at the
token's position (so packed sequences with restarting positions just work)::

    rotate_half(x) = [-x2, x1]
    out = [x1*c1 - x2*s1,  x2*c2 + x1*s2,  xp]      # x[:R] * cos + rotate_half(x[:R]) * sin, then x[R:]

``R = D`` for most models; ``R < D`` is partial rotary embedding (``partial_rotary_factor`` < 1, e.g. Phi-4-mini:
``R = 96`` of ``D = 128``), where Phi3's ``apply_rotary_pos_emb`` rotates ``q[..., :R]`` and concatenates the rest.

The map is linear in ``x``: ``out = C x + S R x`` with ``R = [[0, -I], [I, 0]]``. Its adjoint is
``dx = C g + R^T (S g)`` where ``R^T = [[0, I], [-I, 0]]`` (``rotate_half`` is not self-adjoint)::

    dx = [g1*c1 + g2*s2,  g2*c2 - g1*s1,  gp]       # the passed-through dims: the identity's adjoint

With HF's tables (``c1 == c2``, ``s1 == s2``) that is the forward rotation with ``-sin``. The
kernel implements the general form, so it is exact for any cos/sin tables. ``cos``/``sin`` get no
gradient.

q and k are usually the non-contiguous views HF makes (``proj(x).view(B, T, H, D).transpose(1,
2)``): the kernel reads them through their strides, one program per token ``(b, t)`` handling all
q heads and all k heads. In that layout the heads of one token are adjacent in memory, so each
program reads and writes two contiguous chunks (three with pass-through dims, copied by the same program).
Outputs keep the input's memory layout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_same_device, check_tensor, empty, use_triton


@triton.jit
def _rotate_heads(
    X, OUT, stride_x_head, stride_out_head, n_heads,
    c1, c2, s1, s2, dims, dim_mask,
    HALF_D: tl.constexpr, PASS_D: tl.constexpr, BLOCK_PASS: tl.constexpr, BLOCK_HEADS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """Rotate the first ``2 * HALF_D`` dims of ``n_heads`` head vectors of one token and copy their last ``PASS_D``
    dims; X and OUT point at head 0, dim 0."""
    heads = tl.arange(0, BLOCK_HEADS)
    mask = (heads[:, None] < n_heads) & dim_mask[None, :]
    x_offs = heads[:, None] * stride_x_head + dims[None, :]
    out_offs = heads[:, None] * stride_out_head + dims[None, :]
    x1 = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_offs + HALF_D, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # adjoint of x*cos + rotate_half(x)*sin (see module docstring)
        o1 = x1 * c1[None, :] + x2 * s2[None, :]
        o2 = x2 * c2[None, :] - x1 * s1[None, :]
    else:
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
    tl.store(OUT + out_offs, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(OUT + out_offs + HALF_D, o2.to(OUT.dtype.element_ty), mask=mask)
    if PASS_D > 0:  # partial rotary: the dims after the rotated ones pass through, forward and backward
        pass_dims = tl.arange(0, BLOCK_PASS)
        pass_mask = (heads[:, None] < n_heads) & (pass_dims[None, :] < PASS_D)
        xp = tl.load(X + heads[:, None] * stride_x_head + 2 * HALF_D + pass_dims[None, :], mask=pass_mask)
        tl.store(OUT + heads[:, None] * stride_out_head + 2 * HALF_D + pass_dims[None, :], xp, mask=pass_mask)


@triton.jit
def _rope_kernel(
    Q, K, Q_OUT, K_OUT, COS, SIN,  # pointers
    stride_q_b, stride_q_h, stride_q_t,  # q [B, Hq, T, D], unit stride in D
    stride_k_b, stride_k_h, stride_k_t,
    stride_qo_b, stride_qo_h, stride_qo_t,
    stride_ko_b, stride_ko_h, stride_ko_t,
    stride_cos_b, stride_cos_t,  # batch stride 0 broadcasts a [1, T, D] table over the batch
    stride_sin_b, stride_sin_t,
    seq_len, n_q_heads, n_k_heads,
    HALF_D: tl.constexpr,  # half the rotated dims (R / 2)
    BLOCK_D: tl.constexpr,  # next power of two >= HALF_D
    PASS_D: tl.constexpr,  # dims after the rotated ones, passed through (D - R; 0 without partial rotary)
    BLOCK_PASS: tl.constexpr,  # next power of two >= PASS_D
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)  # int64 offsets: B*T*H*D may pass 2**31
    b = token // seq_len
    t = token % seq_len

    # cos/sin of this token: loaded once, shared by every q and k head
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HALF_D
    cos_row = COS + b * stride_cos_b + t * stride_cos_t
    sin_row = SIN + b * stride_sin_b + t * stride_sin_t
    c1 = tl.load(cos_row + dims, mask=dim_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + HALF_D + dims, mask=dim_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + dims, mask=dim_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + HALF_D + dims, mask=dim_mask, other=0.0).to(tl.float32)

    _rotate_heads(
        Q + b * stride_q_b + t * stride_q_t, Q_OUT + b * stride_qo_b + t * stride_qo_t,
        stride_q_h, stride_qo_h, n_q_heads, c1, c2, s1, s2, dims, dim_mask,
        HALF_D, PASS_D, BLOCK_PASS, BLOCK_HQ, BACKWARD,
    )
    _rotate_heads(
        K + b * stride_k_b + t * stride_k_t, K_OUT + b * stride_ko_b + t * stride_ko_t,
        stride_k_h, stride_ko_h, n_k_heads, c1, c2, s1, s2, dims, dim_mask,
        HALF_D, PASS_D, BLOCK_PASS, BLOCK_HK, BACKWARD,
    )


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # The kernel wants unit stride along D (true for HF's views); anything else is copied once.
    return t if t.stride(-1) == 1 else t.contiguous()


def _is_token_major(t: torch.Tensor) -> bool:
    """True for HF's transposed views: memory ``[B, T, H, D]`` behind a ``[B, H, T, D]`` shape."""
    return t.stride(1) < t.stride(2)


def _new_bhtd(shape, dtype, device, token_major: bool) -> torch.Tensor:
    """A new ``[B, H, T, D]`` buffer, laid out token-major (memory ``[B, T, H, D]``) when the
    input was: reads and writes then stay coalesced, and the gradient flows back into HF's
    ``view``/``transpose`` without a copy."""
    B, H, T, D = shape
    if token_major:
        # detach(): a plain tensor with these strides rather than a view, so callers may modify the
        # outputs in place (autograd forbids that on view outputs of a multi-output Function)
        return empty((B, T, H, D), dtype=dtype, device=device).transpose(1, 2).detach()
    return empty((B, H, T, D), dtype=dtype, device=device)


def _launch(q, k, cos, sin, q_out, k_out, *, backward: bool):
    B, n_q_heads, T, D = q.shape
    n_k_heads = k.shape[1]
    if B * T == 0:
        return q_out, k_out
    rotary_dim = cos.shape[-1]
    half_d, pass_d = rotary_dim // 2, D - rotary_dim
    block_d = triton.next_power_of_2(half_d)
    block_hq, block_hk = triton.next_power_of_2(n_q_heads), triton.next_power_of_2(n_k_heads)
    # the two half tiles of q dominate register use: 4 warps up to 32x64 elements, then 8
    num_warps = 4 if block_hq * block_d <= 2048 else 8
    cos_b = cos.stride(0) if cos.shape[0] > 1 else 0
    sin_b = sin.stride(0) if sin.shape[0] > 1 else 0
    _rope_kernel[(B * T,)](
        q, k, q_out, k_out, cos, sin,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos_b, cos.stride(1),
        sin_b, sin.stride(1),
        T, n_q_heads, n_k_heads,
        HALF_D=half_d, BLOCK_D=block_d, PASS_D=pass_d, BLOCK_PASS=triton.next_power_of_2(max(pass_d, 1)),
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        BACKWARD=backward, num_warps=num_warps,
    )
    return q_out, k_out


class _RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        q, k = _unit_last_stride(q), _unit_last_stride(k)
        cos, sin = _unit_last_stride(cos), _unit_last_stride(sin)
        ctx.save_for_backward(cos, sin)
        # outputs and, later, the input gradients take the inputs' memory layout
        ctx.q_meta = (q.shape, q.dtype, _is_token_major(q))
        ctx.k_meta = (k.shape, k.dtype, _is_token_major(k))
        q_out = _new_bhtd(q.shape, q.dtype, q.device, ctx.q_meta[2])
        k_out = _new_bhtd(k.shape, k.dtype, k.device, ctx.k_meta[2])
        return _launch(q, k, cos, sin, q_out, k_out, backward=False)

    @staticmethod
    def backward(ctx, dq_embed, dk_embed):
        cos, sin = ctx.saved_tensors
        # None grads arrive as zeros (autograd materializes them for Functions by default)
        dq_embed, dk_embed = _unit_last_stride(dq_embed), _unit_last_stride(dk_embed)
        dq = _new_bhtd(*ctx.q_meta[:2], cos.device, ctx.q_meta[2])
        dk = _new_bhtd(*ctx.k_meta[:2], cos.device, ctx.k_meta[2])
        _launch(dq_embed, dk_embed, cos, sin, dq, dk, backward=True)
        return dq, dk, None, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope_torch(q, k, cos, sin):
    rotary_dim = cos.shape[-1]
    cos, sin = cos.float().unsqueeze(1), sin.float().unsqueeze(1)

    def rotate(x):
        x_rot = x[..., :rotary_dim].float()
        out = (x_rot * cos + _rotate_half(x_rot) * sin).to(x.dtype)
        return out if rotary_dim == x.shape[-1] else torch.cat((out, x[..., rotary_dim:]), dim=-1)

    return rotate(q), rotate(k)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q and k, equal to HF's ``apply_rotary_pos_emb(q, k, cos, sin)`` (Phi3's, which
    rotates only the first ``R`` dims when the tables are shorter than the head: partial rotary embedding).

    Args:
        q: ``[B, Hq, T, D]`` fp32/fp16/bf16. Any strides with a unit stride along D --
            HF's ``proj(x).view(B, T, H, D).transpose(1, 2)`` views are read in place, no copy.
        k: ``[B, Hkv, T, D]``, same dtype/device as q; ``Hkv`` may differ from ``Hq`` (GQA).
        cos, sin: ``[B, T, R]`` or ``[1, T, R]`` (broadcast over the batch), any float dtype, the
            tables at each token's position (HF's rotary embedding output; restarting positions of
            packed sequences are just other rows), ``R`` even and at most ``D``: ``R = D`` rotates whole
            heads, ``R < D`` the first ``R`` dims of each head (the rest pass through). They get no gradient:
            passing tensors that require grad is a ValueError.

    Returns:
        ``(q_embed, k_embed)``: new tensors shaped like q and k, same dtype, in the same memory
        layout as the inputs. Computed in fp32 (the passed-through dims are copied).

    Forward, with ``x[:R] = [x1, x2]`` (halves of R), ``xp = x[R:]`` and ``rotate_half(x) = [-x2, x1]``:
    ``out = [x[:R] * cos + rotate_half(x[:R]) * sin, xp] = [x1*c1 - x2*s1, x2*c2 + x1*s2, xp]``.

    Backward (adjoint; ``rotate_half^T(g) = [g2, -g1]``):
    ``dx = [g1*c1 + g2*s2, g2*c2 - g1*s1, gp]``, i.e. the same rotation with ``-sin`` for HF's tables
    (whose halves are equal), the passed-through dims' gradient unchanged. One launch handles q and k.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("cos", cos, ndim=3)
    check_tensor("sin", sin, ndim=3)
    check_same_device(q=q, k=k, cos=cos, sin=sin)
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has dtype {q.dtype}; they must match")
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(
            f"k must be [B, Hkv, T, D] with q's B, T, D: q shape {tuple(q.shape)}, k shape {tuple(k.shape)}"
        )
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape, got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    rotary_dim = cos.shape[2]
    if cos.shape[0] not in (1, B) or cos.shape[1] != T or not 0 < rotary_dim <= D:
        raise ValueError(
            f"cos/sin must be [B, T, R] or [1, T, R] = [{B} or 1, {T}, R] with 0 < R <= D = {D} for q shape "
            f"{tuple(q.shape)}, got {tuple(cos.shape)}"
        )
    if rotary_dim % 2 != 0:
        raise ValueError(f"cos/sin must rotate an even number of dims R (rotate_half splits them in halves), got R="
                         f"{rotary_dim}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.requires_grad:
            raise ValueError(
                f"{name} requires grad, but apply_rope gives no gradient for cos/sin; pass {name}.detach()"
            )
    if not use_triton(q):
        return _apply_rope_torch(q, k, cos, sin)
    return _RoPEFunction.apply(q, k, cos, sin)
