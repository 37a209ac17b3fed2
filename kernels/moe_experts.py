"""Mixture-of-experts MLP: every token through its top-k experts' SwiGLU MLPs (frozen NF4 or 16/32-bit weights,
LoRA on each expert), summed with the router's weights. The expert layout of transformers 5 (Qwen3-MoE,
Qwen2-MoE, Mixtral): ``gate_up`` ``[E, 2I, H]`` (gate rows first, then up), ``down`` ``[E, H, I]``.

Forward (``x`` [T, H]; ``top_k_index`` / ``top_k_weights`` [T, k] from the router; per expert ``e`` its LoRA
``A_gu[e]`` [r, H], ``B_gu[e]`` [2I, r], ``A_d[e]`` [r, I], ``B_d[e]`` [H, r], scalings ``s_gu``, ``s_d``)::

    S_e   = the (token t, slot j) with top_k_index[t, j] == e, in token order      (tokens sorted by expert)
    x_e   = x[t for (t, j) in S_e]                                              [n_e, H]
    gu    = x_e @ W_gu[e].T + s_gu * (x_e @ A_gu[e].T) @ B_gu[e].T              [n_e, 2I]
    g, u  = gu[:, :I], gu[:, I:]
    h     = silu(g) * u                                                         [n_e, I]
    y_e   = h @ W_d[e].T + s_d * (h @ A_d[e].T) @ B_d[e].T                      [n_e, H]
    out[t] += (y_e * top_k_weights[t, j]).to(x.dtype)    for (t, j) in S_e      (summed in fp32, rounded once)

LoRA is applied as two small matmuls per expert, never as ``W + s * B @ A``: peft's ``ParamWrapper`` computes the
same function by folding the product into the weight (``baddbmm``). An expert no token chose is skipped; top-k = E
sends every token to every expert.

Backward (``dy`` = d out, gathered per expert to ``dy_e`` [n_e, H]; ``w_e`` the routing weights of ``S_e``)::

    c_d     = s_d * dy_e @ B_d[e]                                [n_e, r]
    dh_raw  = dy_e @ W_d[e] + c_d @ A_d[e]                       [n_e, I]   d out / d h, before the routing weight
    dw[S_e] = sum(h * dh_raw, -1)                                           (= <dy_e, y_e>; y_e is not recomputed)
    dh      = w_e * dh_raw
    dA_d[e] = (w_e * c_d).T @ h          dB_d[e] = s_d * (w_e * dy_e).T @ (h @ A_d[e].T)
    dg      = dh * u * sig(g) * (1 + g * (1 - sig(g)))       du = dh * silu(g)
    c_gu    = s_gu * [dg, du] @ B_gu[e]                          [n_e, r]
    dx[t]  += [dg, du] @ W_gu[e] + c_gu @ A_gu[e]                (summed over the token's k experts in fp32)
    dA_gu[e] = c_gu.T @ x_e              dB_gu[e] = s_gu * [dg, du].T @ (x_e @ A_gu[e].T)

Recompute, not storage: the autograd Function keeps only ``x``, the routing (index, weights, token order) and the
LoRA weights. Its backward dequantizes each hit expert again and recomputes ``gu`` and ``h`` (two more GEMMs per
expert: the trade ``lora_mlp.py`` makes under token chunks); no dequantized weight and no per-token
intermediate (``[T * k, 2I]``) outlives the call. The frozen weights get no gradient.

Weights: a dense ``[E, out, in]`` tensor (a 16/32-bit model) or :class:`NF4Experts`, E NF4 weights in
bitsandbytes' layout stacked on dim 0, each quantized on its own (own blocks, own double-quantization scales):
expert ``e`` is the :class:`~.nf4.NF4Weight` ``expert(e)``, dequantized by ``nf4.py`` into the shared workspace of
``lora_projection.py`` right before its matmul.

Dtypes: the matmuls run in the compute dtype (``torch.autocast``'s when it is on, else ``x.dtype``; weights
dequantized into it, A and B cast to it differentiably, as peft casts the LoRA factors to the weight's dtype);
``silu(g) * u`` and ``y_e * w`` as transformers computes them (the weight product in the promoted dtype, e.g. fp32
for Mixtral's fp32 router weights); the result is in ``x.dtype``. Gradients of A and B are accumulated in fp32 and
returned in their dtypes; ``dw`` in ``top_k_weights.dtype``.

Engines: on a GPU (and under ``TRITON_INTERPRET=1``) each projection is one launch of the Triton grouped GEMM of
``moe_grouped_gemm.py`` over all experts, rows in the sorted token order above (``route``: experts without tokens
get no tile), NF4 dequantized inside its tile loads, LoRA as ``s * (X @ A.T) @ B.T`` per group: three launches
forward (gate_up with the token gather, down), three backward (the gate_up recompute keeping ``x @ A_gu.T``, ``dh``
through ``W_d`` keeping ``dy @ B_d``, ``dx`` through ``W_gu`` keeping ``dgu @ B_gu``); the SwiGLU gradient runs over
all rows at once; ``h @ A_d.T`` is one more grouped GEMM (``A_d`` as the weights), and each of ``dA_gu``, ``dB_gu``,
``dA_d``, ``dB_d`` is one launch of the grouped gradient kernel of ``moe_grouped_gemm.py`` over all experts
(``G[e] = s * L_e.T @ diag(w_e) @ R_e`` over expert e's rows, ``x`` read through the token gather; ``r``-wide: a few
percent of the GEMM work), written in the compute dtype; an expert without tokens gets zeros. The PyTorch loop over the
hit experts (one GEMM per expert and projection, the dequantization kernel of ``nf4.py`` on GPU) is the CPU engine
and the reference the grouped engine is tested against; ``FASTFT_DISABLE_KERNELS=moe_experts`` selects it on any
device (with every kernel inside it on its PyTorch engine, as the fused LoRA ops do).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._common import (
    FLOAT_DTYPES,
    autocast_dtype,
    check_tensor,
    composite_op,
    disabled_kernels,
    disabled_scope,
    use_triton,
)
from .lora_projection import autocast_off, dequant_workspace
from .moe_grouped_gemm import expert_groups, grouped_lora_grad, grouped_matmul
from .nf4 import NF4Weight, dequantize_nf4


@dataclasses.dataclass(kw_only=True)
class NF4Experts:
    """E frozen experts of one shape ``(out, in)``, each an NF4 weight in bitsandbytes' layout (see ``nf4.py``)
    quantized on its own, stacked on dim 0. Expert ``e`` is the :class:`~.nf4.NF4Weight` ``expert(e)``.

    Per expert, stacked on dim 0:
        packed: uint8 ``[E, ceil(out * in / 2)]``.
        absmax: ``[E, n_blocks]``: uint8 codes (double quantization) or fp32 scales.
        nested_absmax: fp32 ``[E, n_nested]`` (double quantization).
        offset: fp32 ``[E]``, each expert's double-quantization offset.
    Shared by the experts:
        code: fp32 ``[16]``, the NF4 table; nested_code: fp32 ``[256]`` (double quantization).
        blocksize / nested_blocksize: elements per quantization block / ``absmax`` entries per nested block.
        shape: ``(out, in)`` of one expert; dtype: what an expert dequantizes to by default.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    code: torch.Tensor
    nested_code: torch.Tensor | None = None
    blocksize: int
    nested_blocksize: int | None = None
    shape: tuple
    dtype: torch.dtype

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        stacked = {"packed": self.packed, "absmax": self.absmax}
        if self.nested_absmax is not None:
            stacked.update(nested_absmax=self.nested_absmax, offset=self.offset)
        for name, t in stacked.items():
            if not isinstance(t, torch.Tensor) or t.dim() != (1 if name == "offset" else 2):
                raise ValueError(f"NF4Experts.{name} must be a {'1' if name == 'offset' else '2'}-D tensor "
                                 f"(experts on dim 0), got {getattr(t, 'shape', type(t).__name__)}")
            if t.shape[0] != self.packed.shape[0]:
                raise ValueError(f"NF4Experts.{name} holds {t.shape[0]} experts, packed {self.packed.shape[0]}")
        # every expert is a valid NF4Weight (NF4Weight checks sizes, dtypes, contiguity, devices); built once
        self._experts = [self._expert(e) for e in range(self.num_experts)]

    @property
    def num_experts(self) -> int:
        return self.packed.shape[0]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def _expert(self, e: int) -> NF4Weight:
        nested = {}
        if self.nested_absmax is not None:
            nested = dict(nested_absmax=self.nested_absmax[e], nested_code=self.nested_code,
                          nested_blocksize=self.nested_blocksize, offset=self.offset[e:e + 1])
        return NF4Weight(packed=self.packed[e], absmax=self.absmax[e], code=self.code, blocksize=self.blocksize,
                         shape=self.shape, dtype=self.dtype, **nested)

    def expert(self, e: int) -> NF4Weight:
        """Expert ``e`` as an :class:`NF4Weight` (views of the stacked tensors)."""
        return self._experts[e]


class ExpertLora(NamedTuple):
    """LoRA of every expert of one projection: ``W[e] + scaling * B[e] @ A[e]``."""

    A: torch.Tensor  # [E, r, in] (any strides)
    B: torch.Tensor  # [E, out, r]
    scaling: float


def _shape_of(weights) -> tuple[int, int, int]:
    if isinstance(weights, NF4Experts):
        return (weights.num_experts, *weights.shape)
    return tuple(weights.shape)


def _check_weights(name: str, weights, device) -> tuple[int, int, int]:
    if isinstance(weights, NF4Experts):
        w_device = weights.device
    else:
        check_tensor(name, weights, ndim=3)
        if weights.requires_grad:
            raise ValueError(f"{name} requires grad; the expert op trains LoRA on frozen experts only")
        w_device = weights.device
    if w_device != device:
        raise ValueError(f"{name} is on {w_device} but x is on {device}")
    return _shape_of(weights)


def _check_lora(name: str, lora, shape, device) -> None:
    if lora is None:
        return
    if not isinstance(lora, ExpertLora):
        raise TypeError(f"{name} must be an ExpertLora(A, B, scaling) or None, got {type(lora).__name__}")
    E, out_features, in_features = shape
    check_tensor(f"{name}.A", lora.A, ndim=3)
    check_tensor(f"{name}.B", lora.B, ndim=3)
    r = lora.A.shape[1]
    if tuple(lora.A.shape) != (E, r, in_features) or tuple(lora.B.shape) != (E, out_features, r):
        raise ValueError(f"{name}: A {tuple(lora.A.shape)} and B {tuple(lora.B.shape)} do not fit experts of shape "
                         f"{(out_features, in_features)}: expected A [{E}, r, {in_features}], "
                         f"B [{E}, {out_features}, r]")
    if lora.A.dtype != lora.B.dtype:
        raise TypeError(f"{name}: B has dtype {lora.B.dtype} but A has {lora.A.dtype}")
    if lora.A.device != device or lora.B.device != device:
        raise ValueError(f"{name} is on {lora.A.device} / {lora.B.device} but x is on {device}")


def _weight(weights, e: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Expert ``e`` as a dense ``[out, in]`` matrix in ``dtype``. An NF4 expert is dequantized into ``out``, or
    into the shared workspace (valid until the next dequantization)."""
    if isinstance(weights, NF4Experts):
        w = weights.expert(e)
        return dequantize_nf4(w, out=out if out is not None else dequant_workspace(w.shape, dtype, w.device))
    return weights[e] if weights.dtype == dtype else weights[e].to(dtype)


class Routing(NamedTuple):
    """Token slots sorted by expert: ``order`` indexes the flat ``[T * k]`` slots; expert e owns
    ``order[bounds[e]:bounds[e + 1]]`` (in token order: a stable sort)."""

    order: torch.Tensor
    bounds: list[int]
    k: int


def route(top_k_index: torch.Tensor, num_experts: int) -> Routing:
    """Sort the ``[T, k]`` expert choices by expert (one device-to-host copy: the group sizes)."""
    flat = top_k_index.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts)
    if counts.numel() > num_experts:
        raise ValueError(f"top_k_index holds expert ids up to {counts.numel() - 1}, but there are {num_experts} "
                         "experts")
    bounds = [0, *torch.cumsum(counts, 0).tolist()]
    return Routing(torch.argsort(flat, stable=True), bounds, top_k_index.shape[1])


def _lora_term(z, lora: ExpertLora | None, e: int, out: torch.Tensor) -> None:
    """``out += s * (z @ A[e].T) @ B[e].T``: two small matmuls, no ``[out, in]`` product."""
    if lora is not None:
        out.add_((z @ lora.A[e].t()) @ lora.B[e].t(), alpha=lora.scaling)


def _gate_up(x_e, W_gu, lora_gu, e):
    """``gu`` and ``h = silu(g) * u`` of expert ``e`` (see the module doc)."""
    gu = x_e @ W_gu.t()
    _lora_term(x_e, lora_gu, e, gu)
    g, u = gu.chunk(2, dim=-1)
    return gu, F.silu(g) * u


def _swiglu_grad(gu: torch.Tensor, dh: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[dg, du]`` of ``h = silu(g) * u`` (``gu = [g, u]``, ``dh`` fp32), in fp32 math, returned in ``dtype``."""
    g, u = gu.float().chunk(2, dim=-1)
    sig = torch.sigmoid(g)
    return torch.cat([dh * u * sig * (1 + g * (1 - sig)), dh * g * sig], dim=-1).to(dtype)


def _add_lora_grads(grads, name: str, e: int, c, z, dz, za, s: float) -> None:
    """One expert's LoRA gradients, summed in fp32: ``dA[e] += c.T @ z`` and ``dB[e] += s * dz.T @ za`` (``c = s *
    (dz @ B[e])``, ``za = z @ A[e].T``: what the module doc writes for each projection)."""
    grads["A_" + name][e] += c.float().t() @ z.float()
    grads["B_" + name][e] += s * (dz.float().t() @ za.float())


def _zero_grads(lora_gu: ExpertLora | None, lora_d: ExpertLora | None) -> dict:
    """fp32 zeros for the LoRA gradients the loop engine sums into (None where a projection has no LoRA)."""
    return {f"{factor}_{name}": None if lora is None else torch.zeros(getattr(lora, factor).shape,
                                                                      dtype=torch.float32, device=lora.A.device)
            for name, lora in (("gu", lora_gu), ("d", lora_d)) for factor in "AB"}


class _MoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, top_k_weights, A_gu, B_gu, A_d, B_d, routing, gate_up, down, s_gu, s_d, out_dtype):
        lora_gu = None if A_gu is None else ExpertLora(A_gu, B_gu, s_gu)
        lora_d = None if A_d is None else ExpertLora(A_d, B_d, s_d)
        ctx.grouped = use_triton(x, "moe_experts")
        engine = _grouped_forward if ctx.grouped else _loop_forward
        out = engine(x, top_k_weights.reshape(-1), lora_gu, lora_d, routing, gate_up, down, out_dtype)
        ctx.save_for_backward(x, top_k_weights, A_gu, B_gu, A_d, B_d)
        ctx.routing, ctx.gate_up, ctx.down, ctx.scalings = routing, gate_up, down, (s_gu, s_d)
        ctx.disabled = disabled_kernels()  # the backward dequantizes on the engine the forward did
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, dout):
        x, top_k_weights, A_gu, B_gu, A_d, B_d = ctx.saved_tensors
        s_gu, s_d = ctx.scalings
        lora_gu = None if A_gu is None else ExpertLora(A_gu, B_gu, s_gu)
        lora_d = None if A_d is None else ExpertLora(A_d, B_d, s_d)
        engine = _grouped_backward if ctx.grouped else _loop_backward
        with disabled_scope(ctx.disabled):
            dx, dw, grads = engine(x, dout.to(x.dtype), top_k_weights.reshape(-1), lora_gu, lora_d, ctx.routing,
                                   ctx.gate_up, ctx.down)

        def cast(name, like):
            return None if grads.get(name) is None else grads[name].to(like.dtype)

        return (dx.to(x.dtype), dw.view(top_k_weights.shape).to(top_k_weights.dtype),
                cast("A_gu", A_gu), cast("B_gu", B_gu), cast("A_d", A_d), cast("B_d", B_d),
                None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# The PyTorch engine: a loop over the hit experts


def _loop_forward(x, flat_weights, lora_gu, lora_d, routing, gate_up, down, out_dtype):
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(len(routing.bounds) - 1):
        slots = routing.order[routing.bounds[e]:routing.bounds[e + 1]]
        if slots.numel() == 0:
            continue
        tokens = slots // routing.k
        _, h = _gate_up(x[tokens], _weight(gate_up, e, x.dtype), lora_gu, e)
        y = h @ _weight(down, e, x.dtype).t()
        _lora_term(h, lora_d, e, y)
        out.index_add_(0, tokens, (y * flat_weights[slots, None]).to(out_dtype).float())
    return out


def _loop_backward(x, dout, flat_weights, lora_gu, lora_d, routing, gate_up, down):
    """``(dx, dw, LoRA gradients)``, all in fp32."""
    dtype = x.dtype
    grads = _zero_grads(lora_gu, lora_d)
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    dw = torch.zeros(flat_weights.shape, dtype=torch.float32, device=x.device)
    gate_up_buffer = None  # W_gu of one expert, used twice: recompute and dx
    for e in range(len(routing.bounds) - 1):
        slots = routing.order[routing.bounds[e]:routing.bounds[e + 1]]
        if slots.numel() == 0:
            continue
        tokens = slots // routing.k
        x_e, dy = x[tokens], dout[tokens]
        if isinstance(gate_up, NF4Experts) and gate_up_buffer is None:
            gate_up_buffer = torch.empty(gate_up.shape, dtype=dtype, device=x.device)
        W_gu = _weight(gate_up, e, dtype, out=gate_up_buffer)
        gu, h = _gate_up(x_e, W_gu, lora_gu, e)  # recomputed, not kept from the forward
        w = flat_weights[slots, None].float()

        # through down: dh_raw = dy @ W_d + s_d * (dy @ B_d) @ A_d
        dh_raw = dy @ _weight(down, e, dtype)
        if lora_d is not None:
            c = (dy @ lora_d.B[e]) * lora_d.scaling
            dh_raw.addmm_(c, lora_d.A[e])
            _add_lora_grads(grads, "d", e, w * c.float(), h, w * dy.float(), h @ lora_d.A[e].t(), lora_d.scaling)
        dh_raw = dh_raw.float()
        dw[slots] = (h.float() * dh_raw).sum(-1)
        dgu = _swiglu_grad(gu, w * dh_raw, dtype)

        # through gate_up: dx_e = dgu @ W_gu + s_gu * (dgu @ B_gu) @ A_gu
        dx_e = dgu @ W_gu
        if lora_gu is not None:
            c = (dgu @ lora_gu.B[e]) * lora_gu.scaling
            dx_e.addmm_(c, lora_gu.A[e])
            _add_lora_grads(grads, "gu", e, c, x_e, dgu, x_e @ lora_gu.A[e].t(), lora_gu.scaling)
        dx.index_add_(0, tokens, dx_e.float())
    return dx, dw, grads


# ---------------------------------------------------------------------------------------------
# The Triton engine: one grouped GEMM launch per projection (moe_grouped_gemm.py)


def _forward_factors(lora: ExpertLora | None):
    """``(P, Q, s)`` of ``Y = X W.T + s (X A.T) B.T``: ``P = A.T``, ``Q = B.T`` (views)."""
    return None if lora is None else (lora.A.transpose(1, 2), lora.B.transpose(1, 2), lora.scaling)


def _backward_factors(lora: ExpertLora | None):
    """``(P, Q, s)`` of ``dX = dY W + s (dY B) A``: ``P = B``, ``Q = A``."""
    return None if lora is None else (lora.B, lora.A, lora.scaling)


def _grouped_gate_up(x, tokens, routing, gate_up, lora_gu, keep_lora_product=False):
    """``(gu, h, x @ A_gu.T)`` of every (token, expert) row in expert order."""
    gu, xa = grouped_matmul(x, gate_up, routing.bounds, rows=tokens, lora=_forward_factors(lora_gu),
                            keep_lora_product=keep_lora_product)
    g, u = gu.chunk(2, dim=-1)
    return gu, F.silu(g) * u, xa


def _grouped_forward(x, flat_weights, lora_gu, lora_d, routing, gate_up, down, out_dtype):
    tokens = routing.order // routing.k
    _, h, _ = _grouped_gate_up(x, tokens, routing, gate_up, lora_gu)
    y, _ = grouped_matmul(h, down, routing.bounds, lora=_forward_factors(lora_d))
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, tokens, (y * flat_weights[routing.order, None]).to(out_dtype).float())
    return out


def _grouped_backward(x, dout, flat_weights, lora_gu, lora_d, routing, gate_up, down):
    """:func:`_loop_backward` over all rows at once: three grouped GEMMs (the gate_up recompute, ``dh`` through
    down, ``dx`` through gate_up), the SwiGLU gradient over all rows, ``h @ A_d.T`` (a grouped GEMM) and one grouped
    gradient launch per LoRA factor (module doc); the LoRA gradients come back in the compute dtype."""
    dtype, order, bounds = x.dtype, routing.order, routing.bounds
    tokens = order // routing.k
    gu, h, xa_gu = _grouped_gate_up(x, tokens, routing, gate_up, lora_gu, keep_lora_product=True)
    dy = dout[tokens]
    dh_raw, dyB_d = grouped_matmul(dy, down, bounds, transposed=True, lora=_backward_factors(lora_d),
                                   keep_lora_product=True)
    w = flat_weights[order, None].float()
    dh_raw = dh_raw.float()
    dw = torch.zeros(flat_weights.shape, dtype=torch.float32, device=x.device)
    dw[order] = (h.float() * dh_raw).sum(-1)
    dgu = _swiglu_grad(gu, w * dh_raw, dtype)
    del gu, dh_raw
    dx_rows, dgB_gu = grouped_matmul(dgu, gate_up, bounds, transposed=True, lora=_backward_factors(lora_gu),
                                     keep_lora_product=True)
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    dx.index_add_(0, tokens, dx_rows.float())
    del dx_rows
    grads = {}
    has_lora = lora_d is not None or lora_gu is not None
    groups = expert_groups(bounds, x.device) if has_lora else None  # one copy for the four gradient launches
    if lora_d is not None:  # dA_d = s (w dy B_d).T @ h, dB_d = s (w dy).T @ (h @ A_d.T)
        s, w = lora_d.scaling, w.view(-1)
        hA_d, _ = grouped_matmul(h, lora_d.A, bounds)
        grads["A_d"] = grouped_lora_grad(dyB_d, h, groups, row_weights=w, scaling=s)
        grads["B_d"] = grouped_lora_grad(dy, hA_d, groups, row_weights=w, scaling=s)
    if lora_gu is not None:  # dA_gu = s (dgu B_gu).T @ x, dB_gu = s dgu.T @ (x @ A_gu.T)
        s = lora_gu.scaling
        grads["A_gu"] = grouped_lora_grad(dgB_gu, x, groups, rows=tokens, scaling=s)
        grads["B_gu"] = grouped_lora_grad(dgu, xa_gu, groups, scaling=s)
    return dx, dw, grads


def moe_experts(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up, down,
                gate_up_lora: ExpertLora | None = None, down_lora: ExpertLora | None = None) -> torch.Tensor:
    """The routed experts' SwiGLU MLPs with LoRA, summed with the routing weights (see the module doc).

    Args:
        x: ``[T, H]`` float tokens.
        top_k_index: ``[T, k]`` integer expert ids (distinct per token), from the router.
        top_k_weights: ``[T, k]`` float routing weights (differentiable: the router gets its gradient).
        gate_up: the ``[E, 2I, H]`` gate-and-up weights: a frozen float tensor or :class:`NF4Experts` of shape
            ``(2I, H)``.
        down: the ``[E, H, I]`` down weights, likewise.
        gate_up_lora, down_lora: :class:`ExpertLora` (``A`` ``[E, r, in]``, ``B`` ``[E, out, r]``, scaling) or None.

    Returns:
        ``[T, H]`` in ``x.dtype``; differentiable in ``x``, ``top_k_weights`` and the LoRA ``A`` / ``B``.
    """
    check_tensor("x", x, ndim=2)
    check_tensor("top_k_weights", top_k_weights, ndim=2)
    check_tensor("top_k_index", top_k_index, dtypes=(torch.int64, torch.int32), ndim=2)
    if top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != x.shape[0]:
        raise ValueError(f"top_k_index {tuple(top_k_index.shape)} and top_k_weights {tuple(top_k_weights.shape)} "
                         f"must both be [T, k] with T = {x.shape[0]} tokens of x")
    gu_shape = _check_weights("gate_up", gate_up, x.device)
    d_shape = _check_weights("down", down, x.device)
    E, two_i, hidden = gu_shape
    if two_i % 2 or hidden != x.shape[1] or d_shape != (E, hidden, two_i // 2):
        raise ValueError(f"gate_up {gu_shape} and down {d_shape} are not [E, 2I, H] and [E, H, I] experts for x "
                         f"with H = {x.shape[1]}")
    _check_lora("gate_up_lora", gate_up_lora, gu_shape, x.device)
    _check_lora("down_lora", down_lora, d_shape, x.device)

    out_dtype = x.dtype
    compute = autocast_dtype(x.device.type) or x.dtype
    if compute not in FLOAT_DTYPES:
        raise TypeError(f"compute dtype {compute} is not supported")
    x = x.to(compute)
    loras = []
    for lora in (gate_up_lora, down_lora):  # cast to the compute dtype differentiably, as peft casts the factors
        loras += [None, None] if lora is None else [lora.A.to(compute), lora.B.to(compute)]
    with autocast_off(x.device.type), composite_op(x, "moe_experts"):
        return _MoEExperts.apply(x, top_k_weights, *loras, route(top_k_index, E), gate_up, down,
                                 gate_up_lora.scaling if gate_up_lora else 1.0,
                                 down_lora.scaling if down_lora else 1.0, out_dtype)
