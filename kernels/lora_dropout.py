"""LoRA's input dropout without a dropped copy of the input: the mask is regenerated from a seed, tile by tile.

peft's LoRA layer computes ``y = base(x) + s * B(A(dropout(x)))``: the LoRA branch sees ``dropout(x)``, the
base matmul sees ``x``. With ``M`` the dropout multipliers (``1 / (1 - p)`` where kept, with probability
``1 - p``, else 0), ``x`` ``[T, in]``, ``A`` ``[r, in]``, ``dyB = dy @ B`` ``[T, r]``::

    xa   = (M * x) @ A.T           # [T, r]  forward; kept (small) for dB = s * dy.T @ xa
    dA   = s * dyB.T @ (M * x)     # [r, in] backward
    dx  += s * M * (dyB @ A)       # [T, in] backward: the LoRA term of dx, accumulated into dx in place

``M * x`` and ``M`` are never stored: element ``(t, k)`` of ``M`` is draw ``k % 4`` of Triton's Philox
(``tl.rand4x``, 10 rounds) keyed by ``seed`` at counter ``t * ceil(in / 4) + k // 4``, kept when that uniform
draw is ``>= p``; so each of the three kernels draws exactly the elements of the tile it works on (one
Philox call per 4 elements). Row ``t`` counts from ``row0``: a caller working on rows
``row0 ..`` of a longer matrix (lora_mlp's token chunks) passes the global row, so every chunk sees its own
part of one mask, never a repeat of the first chunk's.

The seed of a call (:meth:`DropoutMask.draw`) comes from torch's generator of the tensors' device: the
CUDA generator's Philox state for CUDA tensors (read and advanced on the host: no device sync), the CPU
default generator otherwise. ``torch.utils.checkpoint`` restores both generators before it recomputes a
forward (``preserve_rng_state``, its default), so the recomputed forward draws the same seed, hence the same
mask, as the original one, as peft's ``nn.Dropout`` does under checkpointing. The autograd functions keep
the :class:`DropoutMask` (an int seed) for their backward.

Kernels (small-N GEMMs: ``r`` columns): ``tl.dot`` over tiles, the mask drawn for each ``[BLOCK_T, BLOCK_K]``
tile of ``x`` (or of ``dyB @ A``) and applied in registers. ``dA`` reduces over the tokens: its grid is
``in``-tiles x ``r``-tiles x token splits (enough programs to fill the GPU when ``in / BLOCK_K`` is small),
the splits' fp32 partial sums added by PyTorch (deterministic, no atomics). The PyTorch engine (CPU tensors
without the interpreter, or the op disabled) draws its mask with a seeded ``torch.Generator`` per block of 64
rows, on the tensors' device (CUDA) or the CPU (else); it draws other masks than the Triton kernels, but the same
ones in forward, backward and recompute.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, compute_capability, empty, multiprocessor_count, use_triton
from ._common import mma_operand as _mma_operand

_TORCH_BLOCK_ROWS = 64  # rows per torch.Generator of the PyTorch engine's mask
_GOLDEN = 0x9E3779B97F4A7C15  # mixes a row block's index into the seed (Weyl sequence step)


class DropoutMask(NamedTuple):
    """The dropout mask of one call: element ``(t, k)`` of a ``[T, in]`` input is kept (times ``1 / (1 - p)``)
    or zeroed by a draw keyed by ``seed`` at row ``row0 + t``, column ``k`` (the module docstring says how).
    ``op``: the fused LoRA op that drew it; the kernels of this file are that op's, and run on its engine
    (``use_triton(x, op)``: disabling the op disables them)."""

    p: float
    seed: int
    row0: int = 0
    op: str = "lora_linear"

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p)

    def rows_from(self, start: int) -> "DropoutMask":
        """The same mask seen from row ``start`` on (for a chunk of rows ``start ..``)."""
        return self._replace(row0=self.row0 + start)

    @classmethod
    def draw(cls, p: float, device: torch.device, op: str = "lora_linear") -> "DropoutMask":
        """A mask with a fresh seed from torch's generator of ``device`` (see the module doc), for the op ``op``."""
        return cls(p, _draw_seed(device), op=op)


def _draw_seed(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        gen = torch.cuda.default_generators[index]
        # As PyTorch's CUDA dropout does: reserve Philox offsets on the host (4 = one Philox call per thread).
        offset = gen.get_offset()
        gen.set_offset(offset + 4)
        return ((gen.initial_seed() ^ (offset * _GOLDEN)) & (2**63 - 1))
    return int(torch.randint(2**62, (), dtype=torch.int64))  # CPU default generator (meta tensors too)


# ---------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _keep_scale(seed, p, scale, rows, k0, n_cols, BLOCK_K: tl.constexpr):
    """``[len(rows), BLOCK_K]`` fp32 multipliers of columns ``k0 ..`` (``k0`` a multiple of 4): ``scale`` where
    the element is kept, else 0. One Philox call gives the draws of 4 consecutive columns of a row."""
    groups = (n_cols + 3) // 4  # Philox counters per row
    counters = rows.to(tl.int64)[:, None] * groups + (k0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :]
    u0, u1, u2, u3 = tl.rand4x(seed, counters)
    u = tl.interleave(tl.interleave(u0, u2), tl.interleave(u1, u3))  # columns 4c, 4c+1, 4c+2, 4c+3: u0..u3
    return tl.where(u >= p, scale, 0.0)


@triton.jit(do_not_specialize=["seed", "row0"])
def _xa_kernel(
    X, A, XA,  # pointers: x [T, K], A [R, K], out [T, R]; unit column strides
    seed, row0, p, scale,
    T, K, R,
    stride_x, stride_a, stride_xa,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """xa[t, j] = sum_k M[t, k] * x[t, k] * A[j, k] for one [BLOCK_T, BLOCK_R] tile of xa."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok, rank_ok = rows < T, ranks < R
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        x_dropped = (x * _keep_scale(seed, p, scale, row0 + rows, k0, K, BLOCK_K)).to(A.dtype.element_ty)
        a = tl.load(A + ranks[:, None] * stride_a + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(_mma_operand(x_dropped, INTERPRET), _mma_operand(tl.trans(a), INTERPRET),
                      input_precision=DOT_PRECISION)
    tl.store(XA + rows[:, None].to(tl.int64) * stride_xa + ranks[None, :], acc.to(XA.dtype.element_ty),
             mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit(do_not_specialize=["seed", "row0"])
def _da_kernel(
    DYB, X, OUT,  # pointers: dyB [T, R], x [T, K], out [SPLITS, R, K] (SPLITS = 1: dA itself); unit column strides
    seed, row0, p, scale, alpha,
    T, K, R, rows_per_split,
    stride_dyb, stride_x,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """out[split, j, k] = alpha * sum_t dyB[t, j] * M[t, k] * x[t, k] over the split's rows,
    one [BLOCK_R, BLOCK_K] tile."""
    k0 = tl.program_id(0) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    col_ok, rank_ok = cols < K, ranks < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, T)
    for t0 in range(first, last, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < last
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        x_dropped = (x * _keep_scale(seed, p, scale, row0 + rows, k0, K, BLOCK_K)).to(DYB.dtype.element_ty)
        dyb = tl.load(DYB + rows[:, None].to(tl.int64) * stride_dyb + ranks[None, :],
                      mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        acc += tl.dot(_mma_operand(tl.trans(dyb), INTERPRET), _mma_operand(x_dropped, INTERPRET),
                      input_precision=DOT_PRECISION)
    out = OUT + split.to(tl.int64) * R * K + ranks[:, None] * K + cols[None, :]
    tl.store(out, (acc * alpha).to(OUT.dtype.element_ty), mask=rank_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["seed", "row0"])
def _dx_kernel(
    DX, DYB, A,  # pointers: dx [T, K] (read and written), dyB [T, R], A [R, K]; unit column strides
    seed, row0, p, scale, alpha,
    T, K, R,
    stride_dx, stride_dyb, stride_a,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """dx[t, k] += alpha * M[t, k] * sum_j dyB[t, j] * A[j, k] for one [BLOCK_T, BLOCK_K] tile of dx."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < T, cols < K
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for j0 in range(0, R, BLOCK_R):
        ranks = j0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        dyb = tl.load(DYB + rows[:, None].to(tl.int64) * stride_dyb + ranks[None, :],
                      mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        a = tl.load(A + ranks[:, None] * stride_a + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(_mma_operand(dyb, INTERPRET), _mma_operand(a, INTERPRET), input_precision=DOT_PRECISION)
    tile = DX + rows[:, None].to(tl.int64) * stride_dx + cols[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    dx = tl.load(tile, mask=tile_ok, other=0.0).to(tl.float32)
    dx += acc * alpha * _keep_scale(seed, p, scale, row0 + rows, k0, K, BLOCK_K)
    tl.store(tile, dx.to(DX.dtype.element_ty), mask=tile_ok)


@triton.jit(do_not_specialize=["seed", "row0"])
def _mask_kernel(OUT, seed, row0, p, scale, T, K, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[t, k] = M[t, k] (fp32, contiguous): the multipliers the other kernels draw, for tests."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    keep = _keep_scale(seed, p, scale, row0 + rows, k0, K, BLOCK_K)
    tl.store(OUT + rows[:, None].to(tl.int64) * K + cols[None, :], keep, mask=(rows < T)[:, None] & (cols < K)[None, :])


# ---------------------------------------------------------------------------------------------
# Launch code


def _blocks(r: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Fixed tile sizes (no autotune: it fails in the interpreter), checked by compiling for sm_70 ... sm_90 and
    reading ptxas' register and spill counts (bench/compile_check.py; not timed on a GPU). ``BLOCK_R``: the
    rank padded to tl.dot's minimum of 16, at most 64 (a larger rank takes several r-tiles).

    16-bit operands on sm_80+ (tensor cores): 64 x 64 tiles, 4 warps (<= 127 registers, no spills). fp32
    operands (exact fp32 products) and every dtype below sm_80 (no tensor-core tl.dot since Triton 3.3):
    products on CUDA cores, whose operand tiles live in registers: 32 x 32 tiles, 8 warps (64 x 64 spilled).
    Under the interpreter: small tiles, so the awkward test shapes span several tiles in every direction
    (and BLOCK_T != BLOCK_K, so a mix-up of the two shows)."""
    block_r = min(64, max(16, triton.next_power_of_2(r)))
    if INTERPRET and device.type == "cpu":  # (meta tensors of the memory accounting: the GPU's tiles)
        return dict(BLOCK_T=16, BLOCK_K=32, BLOCK_R=block_r)
    if dtype != torch.float32 and compute_capability(device) >= 80:
        return dict(BLOCK_T=64, BLOCK_K=64, BLOCK_R=block_r, num_warps=4, num_stages=2)
    return dict(BLOCK_T=32, BLOCK_K=32, BLOCK_R=block_r, num_warps=8, num_stages=2)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 adapters: exact fp32 products, as torch.mm


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _torch_keep(mask: DropoutMask, n_rows: int, n_cols: int, device) -> torch.Tensor:
    """The PyTorch engine's keep decisions (bool ``[n_rows, n_cols]``) for rows ``mask.row0 ..``: one
    ``torch.Generator`` per block of 64 global rows, seeded from the call's seed and the block's index; on a CUDA
    device there (drawing a [T, in] mask on the host would cost seconds per layer), else on the CPU."""
    first = mask.row0 // _TORCH_BLOCK_ROWS
    last = (mask.row0 + n_rows - 1) // _TORCH_BLOCK_ROWS
    on = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
    draws = []
    for block in range(first, last + 1):
        gen = torch.Generator(on).manual_seed((mask.seed + block * _GOLDEN) % 2**64)
        draws.append(torch.rand(_TORCH_BLOCK_ROWS, n_cols, generator=gen, device=on))
    start = mask.row0 - first * _TORCH_BLOCK_ROWS
    return (torch.cat(draws)[start:start + n_rows] >= mask.p).to(device)


def _torch_dropped(x: torch.Tensor, mask: DropoutMask, dtype: torch.dtype) -> torch.Tensor:
    """``M * x`` in ``dtype`` on the PyTorch engine (``x`` cast first, as peft casts before its dropout)."""
    return x.to(dtype).mul(mask.scale).masked_fill_(~_torch_keep(mask, *x.shape, x.device), 0)


def dropout_mask(mask: DropoutMask, shape, device, engine: str | None = None) -> torch.Tensor:
    """The multipliers ``M`` (fp32 ``shape`` = ``[T, in]``: ``mask.scale`` or 0) that the kernels of this file
    draw for ``mask``, materialised: for tests and references (fastft never builds it). ``engine``:
    ``"triton"`` or ``"torch"`` (default: the engine a tensor on ``device`` runs)."""
    T, K = shape
    if engine is None:
        engine = "triton" if use_triton(torch.empty(0, device=device), mask.op) else "torch"
    if engine == "torch":
        return _torch_keep(mask, T, K, device).float() * mask.scale
    out = empty((T, K), dtype=torch.float32, device=device)
    if out.numel():
        _mask_kernel[(triton.cdiv(T, 16), triton.cdiv(K, 32))](out, mask.seed, mask.row0, mask.p, mask.scale, T, K,
                                                              BLOCK_T=16, BLOCK_K=32)
    return out


def dropout_lora_a(x: torch.Tensor, A: torch.Tensor, mask: DropoutMask) -> torch.Tensor:
    """``xa = (M * x) @ A.T``: LoRA's A on the dropped-out input, the mask drawn inside the kernel.

    Args:
        x: ``[T, in]`` fp32/fp16/bf16 (the rows ``mask.row0 ..`` of the masked matrix).
        A: ``[r, in]``; the product runs in ``A.dtype`` (``M * x`` rounded to it, as peft casts ``x`` to the
            adapter's dtype before its dropout), accumulated in fp32.
        mask: the call's :class:`DropoutMask`.

    Returns:
        ``[T, r]`` in ``A.dtype``.
    """
    T, K = x.shape
    R = A.shape[0]
    if not use_triton(x, mask.op):
        return torch.mm(_torch_dropped(x, mask, A.dtype), A.t())
    x, A = _unit_columns(x), _unit_columns(A)
    xa = empty((T, R), dtype=A.dtype, device=x.device)
    if T:
        blocks = _blocks(R, A.dtype, x.device)
        grid = (triton.cdiv(T, blocks["BLOCK_T"]), triton.cdiv(R, blocks["BLOCK_R"]))
        _xa_kernel[grid](x, A, xa, mask.seed, mask.row0, mask.p, mask.scale, T, K, R,
                         x.stride(0), A.stride(0), xa.stride(0),
                         DOT_PRECISION=_dot_precision(A.dtype), INTERPRET=INTERPRET, **blocks)
    return xa


def dropout_lora_grad_a(dyB: torch.Tensor, x: torch.Tensor, mask: DropoutMask, alpha: float) -> torch.Tensor:
    """``dA = alpha * dyB.T @ (M * x)``, the mask regenerated tile by tile.

    Args:
        dyB: ``[T, r]`` (``dy @ B``); the product runs in ``dyB.dtype``, accumulated in fp32.
        x: ``[T, in]``, the input :func:`dropout_lora_a` saw, with the same ``mask``.
        alpha: the LoRA scaling ``s`` (or 1 when ``dyB`` is already scaled).

    Returns:
        ``[r, in]`` in ``dyB.dtype``.
    """
    T, K = x.shape
    R = dyB.shape[1]
    if not use_triton(x, mask.op):
        return torch.mm(dyB.t(), _torch_dropped(x, mask, dyB.dtype)).mul_(alpha)
    x, dyB = _unit_columns(x), _unit_columns(dyB)
    blocks = _blocks(R, dyB.dtype, x.device)
    tiles = triton.cdiv(K, blocks["BLOCK_K"]) * triton.cdiv(R, blocks["BLOCK_R"])
    # Split the tokens when the tiles alone leave the GPU half empty (e.g. in = 4096: 64 tiles).
    row_blocks = max(1, triton.cdiv(T, blocks["BLOCK_T"]))
    splits = min(row_blocks, max(1, triton.cdiv(2 * multiprocessor_count(x.device), tiles)))
    rows_per_split = triton.cdiv(row_blocks, splits) * blocks["BLOCK_T"]
    splits = max(1, triton.cdiv(T, rows_per_split))
    if splits == 1:
        out = dA = empty((R, K), dtype=dyB.dtype, device=x.device)
    else:
        out = empty((splits, R, K), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(K, blocks["BLOCK_K"]), triton.cdiv(R, blocks["BLOCK_R"]), splits)
    _da_kernel[grid](dyB, x, out, mask.seed, mask.row0, mask.p, mask.scale, alpha, T, K, R, rows_per_split,
                     dyB.stride(0), x.stride(0),
                     DOT_PRECISION=_dot_precision(dyB.dtype), INTERPRET=INTERPRET, **blocks)
    if splits > 1:
        dA = out.sum(0).to(dyB.dtype)
    return dA


def dropout_lora_grad_x_(dx: torch.Tensor, dyB: torch.Tensor, A: torch.Tensor, mask: DropoutMask,
                         alpha: float) -> torch.Tensor:
    """``dx += alpha * M * (dyB @ A)`` in place: the LoRA term of the input gradient, never a ``[T, in]``
    temporary on the Triton path.

    Args:
        dx: ``[T, in]`` with unit column stride, any float dtype; the sum is formed in fp32 and rounded once.
        dyB: ``[T, r]``; A: ``[r, in]``, both in the adapter's dtype (the product runs in it).
        alpha: the LoRA scaling ``s`` (or 1 when ``dyB`` is already scaled).

    Returns:
        ``dx``.
    """
    T, K = dx.shape
    R = A.shape[0]
    if not use_triton(dx, mask.op):
        term = torch.mm(dyB, A).float().mul_(alpha * mask.scale).masked_fill_(~_torch_keep(mask, T, K, dx.device), 0)
        return dx.add_(term)
    if dx.stride(-1) != 1:
        raise ValueError("dx must have unit column stride (it is written in place)")
    dyB, A = _unit_columns(dyB), _unit_columns(A)
    if T:
        blocks = _blocks(R, A.dtype, dx.device)
        grid = (triton.cdiv(T, blocks["BLOCK_T"]), triton.cdiv(K, blocks["BLOCK_K"]))
        _dx_kernel[grid](dx, dyB, A, mask.seed, mask.row0, mask.p, mask.scale, alpha, T, K, R,
                         dx.stride(0), dyB.stride(0), A.stride(0),
                         DOT_PRECISION=_dot_precision(A.dtype), INTERPRET=INTERPRET, **blocks)
    return dx
