"""Grouped GEMM over mixture-of-experts groups: rows sorted by expert, each row tile multiplied by its own expert's
frozen weight (NF4 dequantized inside the tile loads, or a dense 16/32-bit ``[E, out, in]`` tensor) plus that
expert's LoRA, all experts in one launch. The expert op (``moe_experts.py``) calls it three times per forward and
backward; it owns the autograd, this file only multiplies.

Rows: ``R`` rows in expert order, expert ``e`` owning rows ``bounds[e]:bounds[e + 1]`` (``moe_experts.route``); row
``i`` reads ``x[rows[i]]`` when a gather index ``rows`` is given (the forward's tokens, never copied into expert
order), else ``x[i]``. Per expert ``W[e]`` ``[out, in]``, LoRA ``A[e]`` ``[r, in]``, ``B[e]`` ``[out, r]``, scaling
``s``::

    forward   (transposed=False)   Y_e  = X_e @ W[e].T + s * (X_e @ A[e].T) @ B[e].T          [n_e, out]
    backward  (transposed=True)    dX_e = dY_e @ W[e]  + s * (dY_e @ B[e]) @ A[e]           [n_e, in]

Both are ``Out_e = X_e @ op(W[e]) + s * (X_e @ P[e]) @ Q[e]`` with ``(op(W), P, Q) = (W.T, A.T, B.T)`` forward and
``(W, B, A)`` backward: the kernel reads ``W`` through strides (NF4: through the flat element index ``row * in +
col`` of bitsandbytes' layout), so the transposed product needs no transposed copy. LoRA is never folded into the
weight: ``X_e @ P[e]`` (``[n_e, r]``) is accumulated beside the main product in the same K loop, rounded to the
compute dtype (as the PyTorch engine's ``x @ A.T``) and multiplied by ``Q[e]`` once at the end; on request it is
also written out (``[R, r]``: ``x @ A.T`` for ``dB``, ``dy @ B`` for ``dA``). The frozen weights get no gradient.

LoRA gradients (:func:`grouped_lora_grad`): ``dA[e] = s * (dY_e @ B[e]).T @ X_e`` and ``dB[e] = s * dY_e.T @ (X_e @
A[e].T)`` are both reductions over an expert's rows of the form ``G[e] = s * L_e.T @ diag(w_e) @ R_e`` (``L``
``[R, M]``, ``R`` ``[R, N]`` in expert order, ``R`` optionally read through the gather index ``rows``; ``w`` the
routing weights of the rows, or 1), one launch per gradient over all experts, from the rows the GEMMs above return.

NF4 (per expert exactly as ``moe_experts.NF4Experts`` stores it; math of ``nf4.py``): element ``f = row * in + col``
of expert ``e`` is ``code[nibble] * scale[f // blocksize]``, the nibble the high half of byte ``f // 2`` when ``f``
is even, ``scale`` the block's fp32 ``absmax`` or, double-quantized, ``nested_code[absmax] * nested_absmax[block //
nested_blocksize] + offset[e]`` (multiply and add rounded separately: the compiled kernel turns FMA contraction off
as ``nf4.py`` does), rounded once to the compute dtype: the same operand the dequantize-then-matmul path multiplies.

Kernels: the GEMM's grid is (row tiles of hit experts, column tiles). A row tile never spans two experts (tiles are
cut at the group bounds on the host, which knows them: ``route`` copies the group sizes once), so experts without
rows cost nothing. The gradient's grid is (hit expert, ``[M, N]`` output tile), each program looping over its expert's
rows in blocks; an expert without rows gets no program and keeps the zeros its gradient starts from (as in the
PyTorch engine). fp32
accumulation; fp32 inputs use IEEE fp32 ``tl.dot`` (no tf32), as torch's matmul does by default. With routing
weights, 16-bit ``L`` rows are multiplied by their weight in fp32 and rounded to the compute dtype before the
tensor-core ``tl.dot`` (one rounding, ``EPS / 2`` relative, where the PyTorch engine keeps ``w * L`` in fp32); the
scaling multiplies the fp32 sum; the result is rounded once to the compute dtype (the gradients' dtype).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, compute_capability, empty, gpu_device, mma_operand, on_gpu
from .nf4 import _round_fp32_to_bf16


@triton.jit
def _to_compute(x, DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """``x`` (fp32) rounded to the compute dtype; by hand under the interpreter, whose bf16 casts truncate."""
    if ROUND_BF16:
        return _round_fp32_to_bf16(x)
    return x.to(DTYPE)


@triton.jit
def _nf4_tile(PACKED, ABSMAX, NESTED_ABSMAX, OFFSET, CODE, NESTED_CODE, e, flat, mask,
              packed_stride, absmax_stride, nested_stride,
              BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 values of expert ``e``'s NF4 elements at flat indices ``flat`` (row-major ``[out, in]``)."""
    byte = tl.load(PACKED + e * packed_stride + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 0xF)  # element 2i: the high nibble
    block = flat // BLOCKSIZE
    if DOUBLE_QUANT:
        q = tl.load(ABSMAX + e * absmax_stride + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(NESTED_ABSMAX + e * nested_stride + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = tl.load(NESTED_CODE + q) * nested + tl.load(OFFSET + e)
    else:
        scale = tl.load(ABSMAX + e * absmax_stride + block, mask=mask, other=0.0)
    return tl.load(CODE + nibble) * scale


@triton.jit
def _grouped_gemm_kernel(
    X, ROWS, OUT, XP,  # X [*, K] (compute dtype), ROWS [R] int64 (GATHER), OUT [R, N], XP [R, rank] (STORE_XP)
    TILE_EXPERT, TILE_ROW, BOUNDS,  # int32: each row tile's expert and first row; group bounds [E + 1]
    W, stride_we, stride_wk, stride_wn,  # dense: element strides of op(W[e]) [K, N]; NF4: the packed bytes
    ABSMAX, NESTED_ABSMAX, OFFSET, CODE, NESTED_CODE,  # NF4 scales (see nf4.py)
    absmax_stride, nested_stride,
    P, stride_pe, stride_pk, stride_pr,  # LoRA first factor, [E, K, rank]
    Q, stride_qe, stride_qr, stride_qn,  # LoRA second factor, [E, rank, N]
    scaling, K, N, rank, stride_x, stride_out, stride_xp,
    NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    GATHER: tl.constexpr, LORA: tl.constexpr, STORE_XP: tl.constexpr, RANK_PAD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(TILE_EXPERT + tile).to(tl.int64)
    rows = tl.load(TILE_ROW + tile) + tl.arange(0, BM)
    row_mask = rows < tl.load(BOUNDS + e + 1)
    rows = rows.to(tl.int64)
    if GATHER:
        src = tl.load(ROWS + rows, mask=row_mask, other=0)
    else:
        src = rows
    cols = pid_n * BN + tl.arange(0, BN)
    col_mask = cols < N
    dtype = X.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    ranks = tl.arange(0, RANK_PAD)
    rank_mask = ranks < rank
    xp = tl.zeros((BM, RANK_PAD), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_mask = ks < K
        x = tl.load(X + src[:, None] * stride_x + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        flat = ks[:, None] * stride_wk + cols[None, :] * stride_wn  # int32: one expert has < 2**31 elements
        if NF4:
            w = _nf4_tile(W, ABSMAX, NESTED_ABSMAX, OFFSET, CODE, NESTED_CODE, e, flat, w_mask,
                          stride_we, absmax_stride, nested_stride, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
        else:
            w = tl.load(W + e * stride_we + flat, mask=w_mask, other=0.0).to(tl.float32)
        w = _to_compute(w, dtype, ROUND_BF16)
        x = mma_operand(x, INTERPRET)
        acc = tl.dot(x, mma_operand(w, INTERPRET), acc, input_precision=DOT_PRECISION)
        if LORA:
            p = tl.load(P + e * stride_pe + ks[:, None] * stride_pk + ranks[None, :] * stride_pr,
                        mask=k_mask[:, None] & rank_mask[None, :], other=0.0)
            xp = tl.dot(x, mma_operand(p, INTERPRET), xp, input_precision=DOT_PRECISION)
    if LORA:
        xp = _to_compute(xp, dtype, ROUND_BF16)  # rounded as the PyTorch engine's x @ A.T
        if STORE_XP:
            if pid_n == 0:  # the column tiles compute the same xp: the first one writes it
                tl.store(XP + rows[:, None] * stride_xp + ranks[None, :], xp,
                         mask=row_mask[:, None] & rank_mask[None, :])
        q = tl.load(Q + e * stride_qe + ranks[:, None] * stride_qr + cols[None, :] * stride_qn,
                    mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
        lora = tl.dot(mma_operand(xp, INTERPRET), mma_operand(q, INTERPRET), input_precision=DOT_PRECISION)
        acc += scaling * lora
    tl.store(OUT + rows[:, None] * stride_out + cols[None, :], _to_compute(acc, dtype, ROUND_BF16),
             mask=row_mask[:, None] & col_mask[None, :])


def _tiles(device: torch.device, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, num_warps, num_stages). Rows per tile are few: a group has ``T * k / E`` rows on average
    (Qwen3-30B-A3B: 8 of 128 experts, 16 rows per 256 tokens), so BM stays at 32-64 and BN carries the width."""
    if INTERPRET and not gpu_device(device):  # the interpreter: few, large programs
        return 16, 64, 64, 4, 1
    if dtype == torch.float32:  # IEEE fp32 tl.dot runs on CUDA cores: operands and accumulator in registers
        return 32, 32, 32, 4, 1
    if compute_capability(device) < 80:  # no tensor cores for tl.dot since Triton 3.3: small tiles
        return 32, 64, 16, 4, 1
    return 64, 64, 32, 4, 2


def _row_tiles(bounds: list[int], rows_per_tile: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row tile's expert and first row: tiles cut at the group bounds, experts without rows left out."""
    experts, starts = [], []
    for e in range(len(bounds) - 1):
        for start in range(bounds[e], bounds[e + 1], rows_per_tile):
            experts.append(e)
            starts.append(start)
    tiles = torch.tensor([experts, starts], dtype=torch.int32).to(device, non_blocking=True)
    return tiles[0], tiles[1]


def grouped_matmul(x: torch.Tensor, weights, bounds: list[int], *, rows: torch.Tensor | None = None,
                   transposed: bool = False, lora: tuple | None = None, keep_lora_product: bool = False):
    """``Out_e = X_e @ op(W[e]) + s * (X_e @ P[e]) @ Q[e]`` for every expert group in one launch (module doc).

    Args:
        x: ``[R or T, K]`` in the compute dtype (the result's dtype); row ``i`` of the groups is ``x[rows[i]]``.
        weights: dense ``[E, out, in]`` (any float dtype: tiles are rounded to ``x.dtype``) or ``NF4Experts``.
        bounds: ``E + 1`` row offsets of the groups (``moe_experts.Routing.bounds``).
        rows: int64 ``[R]`` gather index into ``x``, or None (``x`` is already in group order).
        transposed: False: ``op(W) = W.T`` (``K = in``, ``N = out``); True: ``op(W) = W`` (``K = out``, ``N = in``).
        lora: ``(P, Q, s)``, ``P`` ``[E, K, r]`` and ``Q`` ``[E, r, N]`` in ``x.dtype``, any strides; or None.
        keep_lora_product: also return ``X @ P`` (``[R, r]``, rounded to ``x.dtype``).

    Returns:
        ``(out [R, N], xp [R, r] or None)`` in ``x.dtype``.
    """
    nf4 = not isinstance(weights, torch.Tensor)  # moe_experts.NF4Experts (not imported: it imports this file)
    out_features, in_features = weights.shape if nf4 else weights.shape[1:]
    K, N = (out_features, in_features) if transposed else (in_features, out_features)
    R = bounds[-1]
    device, dtype = x.device, x.dtype
    if x.shape[-1] != K or x.stride(-1) != 1:
        raise ValueError(f"grouped_matmul: x must be [rows, {K}] with contiguous rows, got {tuple(x.shape)} "
                         f"strides {x.stride()}")
    rank = lora[0].shape[-1] if lora is not None else 0
    out = empty((R, N), dtype=dtype, device=device)
    xp = empty((R, rank), dtype=dtype, device=device) if keep_lora_product and lora is not None else None
    if R == 0:
        return out, xp
    BM, BN, BK, num_warps, num_stages = _tiles(device, dtype)
    tile_expert, tile_row = _row_tiles(bounds, BM, device)
    bounds_t = torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True)
    launch = {}
    if nf4:
        dq = weights.nested_absmax is not None
        w_args = (weights.packed, weights.packed.stride(0), *((1, in_features) if not transposed else (in_features, 1)),
                  weights.absmax, weights.nested_absmax if dq else weights.absmax,
                  weights.offset if dq else weights.code, weights.code,
                  weights.nested_code if dq else weights.code,
                  weights.absmax.stride(0), weights.nested_absmax.stride(0) if dq else 0)
        nf4_flags = dict(NF4=True, DOUBLE_QUANT=dq, BLOCKSIZE=weights.blocksize,
                         NESTED_BLOCKSIZE=weights.nested_blocksize if dq else 1)
        if on_gpu(x):  # the scale's multiply and add rounded separately, bit-equal to nf4.py's dequantization
            launch["enable_fp_fusion"] = False
    else:
        strides = (weights.stride(1), weights.stride(2)) if transposed else (weights.stride(2), weights.stride(1))
        w_args = (weights, weights.stride(0), *strides, x, x, x, x, x, 0, 0)  # (unused NF4 pointers)
        nf4_flags = dict(NF4=False, DOUBLE_QUANT=False, BLOCKSIZE=1, NESTED_BLOCKSIZE=1)
    if lora is not None:
        P, Q, scaling = lora
        lora_args = (P, *P.stride(), Q, *Q.stride())
    else:
        scaling, lora_args = 0.0, (x, 0, 0, 0, x, 0, 0, 0)
    grid = (tile_expert.numel(), triton.cdiv(N, BN))
    _grouped_gemm_kernel[grid](
        x, rows if rows is not None else tile_expert, out, xp if xp is not None else out,
        tile_expert, tile_row, bounds_t, *w_args, *lora_args,
        float(scaling), K, N, rank, x.stride(0), out.stride(0), xp.stride(0) if xp is not None else 0,
        **nf4_flags, GATHER=rows is not None, LORA=lora is not None, STORE_XP=xp is not None,
        RANK_PAD=max(16, triton.next_power_of_2(max(rank, 1))), BM=BM, BN=BN, BK=BK,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        ROUND_BF16=INTERPRET and dtype == torch.bfloat16 and not on_gpu(x), INTERPRET=INTERPRET,
        num_warps=num_warps, num_stages=num_stages, **launch,
    )
    return out, xp


@triton.jit
def _grouped_lora_grad_kernel(
    L, R, ROWS, ROW_WEIGHTS, OUT,  # L [R, M], R [*, N], ROWS [R] int64, ROW_WEIGHTS [R] fp32, OUT [E, M, N]
    HIT, BOUNDS,  # int32: the experts with rows; group bounds [E + 1]
    M, N, stride_l, stride_r, stride_oe, stride_om, scaling,
    GATHER: tl.constexpr, WEIGHTED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    e, tile = tl.load(HIT + tl.program_id(0)).to(tl.int64), tl.program_id(1)
    tiles_n = tl.cdiv(N, BN)
    ms = (tile // tiles_n) * BM + tl.arange(0, BM)
    ns = (tile % tiles_n) * BN + tl.arange(0, BN)
    m_mask, n_mask = ms < M, ns < N
    start, end = tl.load(BOUNDS + e), tl.load(BOUNDS + e + 1)
    dtype = L.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(start, end, BK):  # the expert's rows
        ks = k0 + tl.arange(0, BK)
        k_mask = ks < end
        ks = ks.to(tl.int64)
        left = tl.load(L + ks[:, None] * stride_l + ms[None, :], mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        if WEIGHTED:
            w = tl.load(ROW_WEIGHTS + ks, mask=k_mask, other=0.0)
            left = _to_compute(left.to(tl.float32) * w[:, None], dtype, ROUND_BF16)
        if GATHER:
            src = tl.load(ROWS + ks, mask=k_mask, other=0)
        else:
            src = ks
        right = tl.load(R + src[:, None] * stride_r + ns[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(mma_operand(left, INTERPRET)), mma_operand(right, INTERPRET), acc,
                     input_precision=DOT_PRECISION)
    tl.store(OUT + e * stride_oe + ms[:, None] * stride_om + ns[None, :], _to_compute(acc * scaling, dtype, ROUND_BF16),
             mask=m_mask[:, None] & n_mask[None, :])


class ExpertGroups(NamedTuple):
    """The expert groups as :func:`grouped_lora_grad` reads them: ``bounds`` on the host (``E + 1`` row offsets,
    ``moe_experts.Routing.bounds``), and on the device (int32) the experts with rows (its grid) and the bounds."""

    bounds: list[int]
    hit: torch.Tensor
    device_bounds: torch.Tensor


def expert_groups(bounds: list[int], device) -> ExpertGroups:
    """One host-to-device copy of the groups, shared by every gradient launch of a backward."""
    hit = [e for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]
    hit_and_bounds = torch.tensor(hit + bounds, dtype=torch.int32).to(device, non_blocking=True)
    return ExpertGroups(bounds, hit_and_bounds[:len(hit)], hit_and_bounds[len(hit):])


def grouped_lora_grad(left: torch.Tensor, right: torch.Tensor, groups: ExpertGroups, *,
                      rows: torch.Tensor | None = None, row_weights: torch.Tensor | None = None,
                      scaling: float = 1.0) -> torch.Tensor:
    """``G[e] = scaling * L_e.T @ diag(w_e) @ R_e`` for every expert in one launch (module doc): ``dA`` or ``dB``.

    Args:
        left: ``[R, M]`` rows in expert order, in the compute dtype (the result's dtype), contiguous rows.
        right: ``[R or T, N]`` in ``left.dtype``, contiguous rows; row ``i`` of the groups is ``right[rows[i]]``.
        groups: the expert groups (:func:`expert_groups`), on ``left``'s device.
        rows: int64 ``[R]`` gather index into ``right``, or None (``right`` is already in group order).
        row_weights: ``[R]`` fp32 weight of each row (the routing weights in expert order), or None.
        scaling: multiplies the sum.

    Returns:
        ``[E, M, N]`` in ``left.dtype``; an expert without rows gets zeros (and no program).
    """
    R, M = left.shape
    N = right.shape[1]
    device, dtype, bounds = left.device, left.dtype, groups.bounds
    if right.dtype != dtype or left.stride(-1) != 1 or right.stride(-1) != 1 or R != bounds[-1]:
        raise ValueError(f"grouped_lora_grad: left {tuple(left.shape)} {left.dtype} and right {tuple(right.shape)} "
                         f"{right.dtype} must share a dtype and have contiguous rows, left {bounds[-1]} of them")
    if row_weights is not None and (row_weights.dtype != torch.float32 or tuple(row_weights.shape) != (R,)):
        raise ValueError(f"grouped_lora_grad: row_weights must be fp32 [{R}], got {tuple(row_weights.shape)} "
                         f"{row_weights.dtype}")
    E = len(bounds) - 1
    out = torch.zeros((E, M, N), dtype=dtype, device=device)
    if not groups.hit.numel():
        return out
    BM, BN, BK, num_warps, num_stages = _tiles(device, dtype)
    BM, BN = (min(block, max(16, triton.next_power_of_2(size))) for block, size in ((BM, M), (BN, N)))  # r-wide side
    grid = (groups.hit.numel(), triton.cdiv(M, BM) * triton.cdiv(N, BN))
    _grouped_lora_grad_kernel[grid](
        left, right, rows if rows is not None else groups.device_bounds,
        row_weights if row_weights is not None else left, out,
        groups.hit, groups.device_bounds, M, N, left.stride(0), right.stride(0), out.stride(0), out.stride(1),
        float(scaling),
        GATHER=rows is not None, WEIGHTED=row_weights is not None, BM=BM, BN=BN, BK=BK,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        ROUND_BF16=INTERPRET and dtype == torch.bfloat16 and not on_gpu(left), INTERPRET=INTERPRET,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
