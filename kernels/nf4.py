"""NF4 dequantization: bitsandbytes' packed 4-bit weights -> a 16/32-bit matrix, in one Triton pass.

The weight arrives as plain tensors (this file never imports bitsandbytes; ``fastft.quant`` reads a
``bitsandbytes.nn.Params4bit`` into an :class:`NF4Weight`). bitsandbytes' layout, for a weight of
``n = out * in`` elements taken in row-major order:

* ``packed``: uint8 ``[ceil(n / 2)]``; byte ``i`` holds element ``2i`` in its HIGH nibble and element
  ``2i + 1`` in its LOW nibble (an odd ``n`` leaves the last low nibble unused);
* quantization blocks of ``blocksize`` consecutive elements (across row ends), one scale each:
  ``absmax`` fp32 ``[ceil(n / blocksize)]``;
* with double quantization (``compress_statistics=True``) ``absmax`` is uint8 codes into a 256-entry
  table, themselves block-quantized by 256 (``nested_blocksize``) with an fp32 scale and a global
  ``offset``.

Math, per element ``e`` with block ``b = e // blocksize`` (all in fp32, rounded once at the end)::

    scale[b] = absmax[b]                                                        # plain
    scale[b] = nested_code[absmax[b]] * nested_absmax[b // nested_blocksize] + offset   # double quant
    W[e]     = code[nibble(e)] * scale[b]  -> rounded to the output dtype

There is no backward: the base weight is frozen. The multiply and the add of the double-quant scale
are rounded separately, as bitsandbytes does, so results are bit-equal to
``bitsandbytes.functional.dequantize_4bit`` (the CUDA launch turns FMA contraction off for that).

Kernel: memory bound (reads n/2 bytes, writes 2n or 4n bytes). Each program takes
``_BYTES_PER_PROGRAM`` consecutive packed bytes, splits each byte into its two nibbles, gathers the
16-entry code table and the per-block scale (both stay in L1: every block shares one scale) and
writes the two values interleaved, so the stores are contiguous.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, INTERPRET, check_tensor, empty, on_gpu, use_triton

_BYTES_PER_PROGRAM = 1024  # -> 2048 outputs per program: 4 warps x 32 threads x 16 values
_NUM_WARPS = 4
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
_TORCH_CHUNK = 1 << 22  # elements per step of the PyTorch engine (a multiple of every blocksize)


@dataclasses.dataclass
class NF4Weight:
    """A frozen NF4 weight in bitsandbytes' layout, as plain tensors (see the module docstring).

    Attributes:
        packed: uint8, ``ceil(out * in / 2)`` elements (any shape; read flat), two codes per byte,
            element ``2i`` in the high nibble.
        absmax: fp32 ``[ceil(n / blocksize)]`` per-block scales, or uint8 codes of them when
            double-quantized (then the ``nested_*`` fields and ``offset`` are required).
        code: fp32 ``[16]`` NF4 value table.
        blocksize: elements per quantization block (32 ... 4096, a power of two).
        shape: ``(out, in)`` of the dequantized weight.
        dtype: dtype :func:`dequantize_nf4` returns by default (bitsandbytes' ``quant_state.dtype``).
        nested_absmax: fp32 ``[ceil(len(absmax) / nested_blocksize)]``.
        nested_code: fp32 ``[256]`` table of the uint8 ``absmax`` codes.
        nested_blocksize: ``absmax`` entries per nested block (256 in bitsandbytes).
        offset: added to every dequantized ``absmax``; a float or a 0-d/1-element fp32 tensor
            (bitsandbytes keeps a tensor; keeping it a tensor avoids a GPU sync per call).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple
    dtype: torch.dtype
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int | None = None
    offset: float | torch.Tensor | None = None

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"NF4Weight.shape must be (out, in) with positive sizes, got {self.shape}")
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"NF4Weight.dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if self.blocksize not in _BLOCKSIZES:
            raise ValueError(f"NF4Weight.blocksize must be one of {_BLOCKSIZES}, got {self.blocksize}")
        n = self.numel
        check_tensor("NF4Weight.packed", self.packed, dtypes=(torch.uint8,))
        if self.packed.numel() != (n + 1) // 2:
            raise ValueError(
                f"NF4Weight.packed has {self.packed.numel()} bytes; shape {self.shape} needs {(n + 1) // 2}"
            )
        check_tensor("NF4Weight.code", self.code, dtypes=(torch.float32,))
        if self.code.numel() != 16:
            raise ValueError(f"NF4Weight.code must have 16 entries, got {self.code.numel()}")
        n_blocks = triton.cdiv(n, self.blocksize)
        check_tensor("NF4Weight.absmax", self.absmax, dtypes=(torch.float32, torch.uint8))
        if self.absmax.numel() != n_blocks:
            raise ValueError(
                f"NF4Weight.absmax has {self.absmax.numel()} entries; shape {self.shape} with blocksize "
                f"{self.blocksize} needs {n_blocks}"
            )
        tensors = {"packed": self.packed, "absmax": self.absmax, "code": self.code}
        if self.double_quant:
            if (self.nested_absmax is None or self.nested_code is None or self.nested_blocksize is None
                    or self.offset is None):
                raise ValueError(
                    "NF4Weight.absmax is uint8 (double quantization): nested_absmax, nested_code, "
                    "nested_blocksize and offset are required"
                )
            if not (isinstance(self.nested_blocksize, int) and self.nested_blocksize > 0):
                raise ValueError(f"NF4Weight.nested_blocksize must be a positive int, got {self.nested_blocksize!r}")
            check_tensor("NF4Weight.nested_absmax", self.nested_absmax, dtypes=(torch.float32,))
            if self.nested_absmax.numel() != triton.cdiv(n_blocks, self.nested_blocksize):
                raise ValueError(
                    f"NF4Weight.nested_absmax has {self.nested_absmax.numel()} entries; "
                    f"{n_blocks} absmax codes in blocks of {self.nested_blocksize} need "
                    f"{triton.cdiv(n_blocks, self.nested_blocksize)}"
                )
            check_tensor("NF4Weight.nested_code", self.nested_code, dtypes=(torch.float32,))
            if self.nested_code.numel() != 256:
                raise ValueError(f"NF4Weight.nested_code must have 256 entries, got {self.nested_code.numel()}")
            if not isinstance(self.offset, torch.Tensor):
                self.offset = torch.tensor([float(self.offset)], dtype=torch.float32, device=self.packed.device)
            check_tensor("NF4Weight.offset", self.offset, dtypes=(torch.float32,))
            if self.offset.numel() != 1:
                raise ValueError(f"NF4Weight.offset must hold one value, got {self.offset.numel()}")
            tensors.update(nested_absmax=self.nested_absmax, nested_code=self.nested_code, offset=self.offset)
        for name, t in tensors.items():
            if not t.is_contiguous():
                raise ValueError(f"NF4Weight.{name} must be contiguous")
        devices = {name: t.device for name, t in tensors.items()}
        if len(set(devices.values())) > 1:
            listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
            raise ValueError(f"NF4Weight tensors must be on one device: {listed}")

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantize(self, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Same as :func:`dequantize_nf4` ``(self, out, dtype)``."""
        return dequantize_nf4(self, out=out, dtype=dtype)


@triton.jit
def _round_fp32_to_bf16(x):
    """fp32 -> bf16 rounding to nearest even, by integer arithmetic. Used under the interpreter
    only, whose float casts truncate; a GPU's ``.to(tl.bfloat16)`` already rounds this way."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # NaN/inf do not occur here
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _nf4_dequant_kernel(
    PACKED, ABSMAX, CODE, OUT,  # pointers: uint8 bytes, fp32 (or uint8) scales, fp32[16], output
    NESTED_ABSMAX, NESTED_CODE, OFFSET,  # double quantization: fp32 scales, fp32[256], fp32[1]
    n_bytes, n_out,
    BLOCKSIZE: tl.constexpr,  # elements per quantization block (even)
    NESTED_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BYTES: tl.constexpr,  # packed bytes per program
    ROUND_BF16: tl.constexpr,  # interpreter + bf16 output: round by hand (its casts truncate)
):
    byte = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)  # int64: 2 * n_bytes may pass 2**31
    mask = byte < n_bytes
    packed = tl.load(PACKED + byte, mask=mask, other=0).to(tl.int32)

    # Both nibbles of a byte share a block: BLOCKSIZE is even.
    block = byte // (BLOCKSIZE // 2)
    if DOUBLE_QUANT:
        q = tl.load(ABSMAX + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(NESTED_ABSMAX + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        # multiply, round, then add: bitsandbytes dequantizes the scales first and adds `offset` after
        scale = tl.load(NESTED_CODE + q) * nested + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + block, mask=mask, other=0.0)

    high = tl.load(CODE + (packed >> 4)) * scale  # element 2i
    low = tl.load(CODE + (packed & 0xF)) * scale  # element 2i + 1
    values = tl.interleave(high, low)  # [2 * BYTES]: element order

    out_offs = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    if ROUND_BF16:
        values = _round_fp32_to_bf16(values)
    else:
        values = values.to(OUT.dtype.element_ty)
    tl.store(OUT + out_offs, values, mask=out_offs < n_out)  # an odd n drops the last low nibble


def _dequantize_nf4_torch(w: NF4Weight, out: torch.Tensor) -> torch.Tensor:
    """The same math in PyTorch (the engine for CPU tensors without the Triton interpreter, and for any tensor with
    "nf4" disabled), ``_TORCH_CHUNK`` elements at a time: the int64 / fp32 temporaries of a whole 8B-model MLP
    weight would take a GiB of GPU memory."""
    n = w.numel
    packed, flat = w.packed.reshape(-1), out.view(-1)
    if w.double_quant:
        nested = w.nested_absmax.repeat_interleave(w.nested_blocksize)[: w.absmax.numel()]
        scales = w.nested_code[w.absmax.reshape(-1).long()] * nested
        scales = scales + w.offset.reshape(())
    else:
        scales = w.absmax.reshape(-1)
    for start in range(0, n, _TORCH_CHUNK):  # whole quantization blocks, whole bytes: _TORCH_CHUNK is a multiple
        end = min(start + _TORCH_CHUNK, n)
        chunk = packed[start // 2: (end + 1) // 2]
        nibbles = torch.stack([chunk >> 4, chunk & 0xF], dim=1).reshape(-1)[: end - start].long()
        values = w.code[nibbles]  # fp32, element order
        scale = scales[start // w.blocksize: triton.cdiv(end, w.blocksize)].repeat_interleave(w.blocksize)
        flat[start:end].copy_(values.mul_(scale[: end - start]))  # the one rounding to the output dtype
    return out


def dequantize_nf4(w: NF4Weight, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize an NF4 weight: ``W[e] = code[nibble(e)] * scale[e // blocksize]`` (see module doc).

    Args:
        w: the packed weight.
        out: optional contiguous ``[out, in]`` buffer to write into (reused across calls by the fused
            LoRA layers); its dtype is the result dtype.
        dtype: result dtype when ``out`` is not given (default ``w.dtype``, as bitsandbytes returns).

    Returns:
        ``[out, in]`` in ``dtype`` (or ``out`` itself). Values are computed in fp32 and rounded once.
        No autograd: the weight is frozen.
    """
    if not isinstance(w, NF4Weight):
        raise TypeError(f"w must be an NF4Weight, got {type(w).__name__}")
    if out is None:
        dtype = dtype or w.dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        out = empty(w.shape, dtype=dtype, device=w.device)
    else:
        check_tensor("out", out)
        if tuple(out.shape) != w.shape or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous tensor of shape {w.shape}, got {tuple(out.shape)} "
                             f"(contiguous={out.is_contiguous()})")
        if out.device != w.device:
            raise ValueError(f"out is on {out.device} but the weight is on {w.device}")
        if dtype is not None and dtype != out.dtype:
            raise TypeError(f"dtype {dtype} contradicts out's dtype {out.dtype}")

    if not use_triton(w.packed, "nf4"):
        return _dequantize_nf4_torch(w, out)

    n_bytes = w.packed.numel()
    dq = w.double_quant
    launch_kwargs = {}
    if on_gpu(w.packed):
        # keep `code * scale` and `nested * absmax + offset` as separate roundings: bit-equal to bitsandbytes
        launch_kwargs["enable_fp_fusion"] = False
    _nf4_dequant_kernel[(triton.cdiv(n_bytes, _BYTES_PER_PROGRAM),)](
        w.packed, w.absmax, w.code, out,
        w.nested_absmax if dq else w.absmax, w.nested_code if dq else w.code, w.offset if dq else w.code,
        n_bytes, w.numel,
        BLOCKSIZE=w.blocksize,
        NESTED_BLOCKSIZE=w.nested_blocksize if dq else 1,
        DOUBLE_QUANT=dq,
        BYTES=_BYTES_PER_PROGRAM,
        ROUND_BF16=INTERPRET and out.dtype == torch.bfloat16 and not on_gpu(out),
        num_warps=_NUM_WARPS,
        **launch_kwargs,
    )
    return out
