"""Section 2, kernels' numerics: every public op of ``fastft.kernels``, forward and backward, on this device, in
every dtype the device supports, against the float64 references of ``references.py`` run on the same device.

A case builds seeded random inputs of one shape (from the model config, or tiny ones on the CPU), runs the op
and its backward with fixed output gradients (timed: the first call includes Triton's compilation), runs the
reference, and compares every output and gradient by its **normwise relative error**
``max|actual - reference| / max|reference|``. Besides, where a case names a tensor's zeros as structural (an
ignored label's row of a gradient or a loss) an element the reference gives as exactly 0 must be exactly 0, and a
non-finite element where the reference is finite fails (kernel outputs start as NaN here: ``poison_outputs``, so an
element a kernel never writes shows).

Tolerances (:func:`tolerance`) are derived, not tuned: an output that passed through ``k`` roundings to the
dtype (``eps``: 1 ulp at 1.0, what one rounding costs at most relative to the value rounded; the interpreter's
truncating bf16 casts too) and fp32 sums of ``n`` terms (random-sign rounding errors grow like ``sqrt(n)``
units of 2^-24, counted 4x) is allowed ``2 * (k * eps + 4 * sqrt(n) * 2^-24)``. The factor 2 covers
intermediate values up to twice the result's largest element. Each case states its ``k`` and ``n`` per tensor
and why. Rounding counts assume a GPU's kernels: its bf16 ``tl.dot`` takes 16-bit operands (attention rounds P
and dS to bf16 there), where Triton's CPU interpreter upcasts them (``kernels/_common.mma_operand``), so
interpreted runs have errors well inside these tolerances, GPU runs closer to them.
"""
from __future__ import annotations

import dataclasses
import math
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from ..kernels import (
    NF4Weight,
    apply_rope,
    attention,
    attention_varlen,
    cross_entropy,
    dequantize_nf4,
    fused_linear_cross_entropy,
    linear_log_probs,
    lora_linear,
    lora_mlp,
    lora_mlp_gate_up,
    lora_qkv,
    moe_experts,
    rms_norm,
    swiglu,
)
from ..kernels._common import poison_outputs
from ..kernels.lora_dropout import DropoutMask, dropout_mask
from ..kernels.moe_experts import ExpertLora, NF4Experts
from . import references as ref
from .references import EPS

MARGIN = 2.0
FP32_GROWTH = 4.0
# The published NF4 table (bitsandbytes' get_4bit_type("nf4")): the dequantization math is checked on random
# codes with it, so no bitsandbytes native library is needed for this section.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)


def tolerance(dtype: torch.dtype, roundings: int, terms: int = 1) -> float:
    """Normwise relative tolerance of a result that went through ``roundings`` roundings to ``dtype`` and fp32
    sums of ``terms`` terms (see the module docstring)."""
    return MARGIN * (roundings * EPS[dtype] + FP32_GROWTH * math.sqrt(terms) * 2.0**-24)


# ---------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class Sizes:
    """The dimensions the cases take from a model config: ``tokens`` per sequence, ``batch`` sequences."""

    label: str
    tokens: int
    batch: int
    hidden: int
    intermediate: int
    vocab: int
    q_heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    rank: int = 16

    @property
    def window(self) -> int:
        """A sliding window shorter than the sequence (the models' own windows are far longer than its tokens)."""
        return self.tokens // 3 + 1

    @property
    def q_dim(self) -> int:
        return self.q_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def sizes_from_config(config, name: str, tiny: bool, max_vocab: int | None = None) -> Sizes:
    """The model's dimensions with 37 tokens per sequence (odd); ``tiny``: a small stand-in for the CPU with the
    model's head size and GQA ratio (the interpreter is slow). ``max_vocab`` caps the vocabulary (the float64
    reference of the lm-head ops holds a ``[V, H]`` copy and its gradient)."""
    q_heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    kv_heads = kv_heads or q_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    if tiny:
        group = max(1, q_heads // kv_heads)
        kv = 2 if group <= 2 else 1
        return Sizes(f"{name} (tiny CPU stand-in: its head size and GQA ratio)", tokens=13, batch=1, hidden=72,
                     intermediate=136, vocab=5003, q_heads=kv * group, kv_heads=kv, head_dim=head_dim,
                     rope_theta=_rope_theta(config), rank=4)
    vocab = config.vocab_size if max_vocab is None else min(config.vocab_size, max_vocab)
    tokens = 37
    return Sizes(name if vocab == config.vocab_size else f"{name} (vocabulary capped at {vocab})", tokens=tokens,
                 batch=2, hidden=config.hidden_size, intermediate=config.intermediate_size, vocab=vocab,
                 q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, rope_theta=_rope_theta(config))


# ---------------------------------------------------------------------------------------------
# Inputs


class Inputs:
    """Seeded random tensors on one device."""

    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def randn(self, *shape, dtype=torch.float32, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        t = (torch.randn(shape, generator=self.gen, device=self.device) * scale).to(dtype)
        return t.requires_grad_(grad)

    def labels(self, n: int, vocab: int) -> torch.Tensor:
        """Labels with about 30% ignored (-100, as prompt and padding tokens are) and the last class present."""
        labels = torch.randint(0, vocab, (n,), generator=self.gen, device=self.device)
        labels[torch.rand(n, generator=self.gen, device=self.device) < 0.3] = -100
        labels[0] = vocab - 1
        return labels

    def nf4(self, out_f: int, in_f: int, dtype: torch.dtype) -> NF4Weight:
        """A double-quantized NF4 weight (blocksize 64, nested blocks of 256) with random codes, scaled so that
        ``x @ W.T`` is O(1) for O(1) inputs."""
        n = out_f * in_f
        blocks = -(-n // 64)
        rand_bytes = torch.randint(0, 256, ((n + 1) // 2,), generator=self.gen, device=self.device)
        return NF4Weight(
            packed=rand_bytes.to(torch.uint8),
            absmax=torch.randint(0, 256, (blocks,), generator=self.gen, device=self.device).to(torch.uint8),
            code=torch.tensor(NF4_CODE, device=self.device), blocksize=64, shape=(out_f, in_f), dtype=dtype,
            nested_absmax=self.randn(-(-blocks // 256)).abs() * 0.5 / math.sqrt(in_f) + 0.1 / math.sqrt(in_f),
            nested_code=torch.linspace(-1, 1, 256, device=self.device), nested_blocksize=256,
            offset=torch.tensor([2.0 / math.sqrt(in_f)], device=self.device))

    def lora(self, out_f: int, in_f: int, rank: int, dtype: torch.dtype):
        """LoRA A ``[r, in]`` and B ``[out, r]`` scaled so that the LoRA term is as large as the base output
        (peft starts B at zero; a missing or mis-scaled LoRA term must show)."""
        return (self.randn(rank, in_f, dtype=dtype, scale=1 / math.sqrt(in_f), grad=True),
                self.randn(out_f, rank, dtype=dtype, scale=1 / math.sqrt(rank), grad=True))


def _leaves64(tensors: dict) -> dict:
    return {name: None if t is None else t.detach().double().requires_grad_(t.requires_grad)
            for name, t in tensors.items()}


def _backward(outputs: dict, grads_out: dict, leaves: dict) -> dict:
    """Backward of the named ``outputs`` with ``grads_out`` (same names); returns the outputs, detached, and
    ``d<name>`` of every leaf that requires grad."""
    names = [n for n in outputs if n in grads_out]
    torch.autograd.backward([outputs[n] for n in names],
                            [grads_out[n].to(outputs[n].device, outputs[n].dtype) for n in names])
    results = {name: t.detach() for name, t in outputs.items()}
    results.update({f"d{name}": t.grad for name, t in leaves.items() if t is not None and t.requires_grad})
    return results


def _reference_of(forward: Callable, inputs: dict, grads_out: dict) -> dict:
    """A forward reference function of float64 tensors run on float64 copies of ``inputs``, with its backward."""
    leaves = _leaves64(inputs)
    return _backward(forward(**leaves), {n: g.double() for n, g in grads_out.items()}, leaves)


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    """One op on one shape: ``make(dtype, device)`` -> the case's inputs (a namespace); ``run(inputs)`` -> the
    op's outputs and gradients by name; ``reference(inputs)`` -> the same names in float64; ``tolerances``:
    name -> (roundings, fp32 terms); ``checks(inputs)`` -> extra failures (messages); ``zeros``: the tensors whose
    exact zeros are structural (ignored labels), which must then be exactly 0."""

    op: str  # the public function of fastft.kernels
    switch: str  # its name in FASTFT_DISABLE_KERNELS / disable_kernels (kernels._common.KERNEL_NAMES)
    case: str  # what this case exercises
    shape: str
    make: Callable
    run: Callable
    reference: Callable
    tolerances: dict
    checks: Callable | None = None
    zeros: tuple = ()


class _Namespace(dict):
    __getattr__ = dict.__getitem__


def _rms_norm_case(s: Sizes, rows: int, hidden: int, case: str, unit_offset: bool = False) -> Case:
    def make(dtype, device):
        r = Inputs(device, 1)
        x = r.randn(rows, hidden, dtype=dtype, scale=3.0, grad=True)
        # Gemma (unit_offset) stores the weight as an offset from 1: values around 0
        w = ((0 if unit_offset else 1) + r.randn(hidden, scale=0.5)).to(dtype).requires_grad_()
        return _Namespace(x=x, w=w, dy=r.randn(rows, hidden, dtype=dtype))

    def run(i):
        y = rms_norm(i.x, i.w, 1e-5, unit_offset=True) if unit_offset else rms_norm(i.x, i.w, 1e-5)
        return _backward({"y": y}, {"y": i.dy}, {"x": i.x, "w": i.w})

    def reference(i):
        y, dx, dw, _ = ref.rms_norm_reference(i.x, i.w, i.dy, 1e-5, unit_offset=unit_offset)
        return {"y": y, "dx": dx, "dw": dw}

    # y: xhat rounded to the dtype, then the product (2; Gemma's: the fp32 product rounded once, within it); dx:
    # one rounding after fp32 math; dw: rows of dy * rounded xhat summed in fp32, rounded (2). fp32: sums of
    # squares over the hidden size, of dw over rows.
    return Case("rms_norm", "rms_norm", case, f"x [{rows}, {hidden}]", make, run, reference,
                {"y": (2, hidden), "dx": (2, hidden), "dw": (2, rows)})


def _rope_case(s: Sizes, packed: bool) -> Case:
    B, T, D = s.batch, s.tokens, s.head_dim

    def make(dtype, device):
        r = Inputs(device, 2)
        # q/k as transposed views of the projections' [B, T, H, D] outputs, as the attention hands them over
        q = r.randn(B, T, s.q_heads, D, dtype=dtype).transpose(1, 2).detach().requires_grad_()
        k = r.randn(B, T, s.kv_heads, D, dtype=dtype).transpose(1, 2).detach().requires_grad_()
        positions = torch.arange(T, device=device)[None].expand(B, T)
        if packed:  # each row packs several documents whose positions restart at 0, one row offset by 1000
            positions = torch.stack([torch.arange(T, device=device) % p for p in (T // 2 + 1, 5)][:B])
            positions = positions + 1000 * torch.arange(B, device=device)[:, None]
        cos, sin = ref.rope_tables(positions, D, dtype, base=s.rope_theta)
        return _Namespace(q=q, k=k, cos=cos, sin=sin, dq=r.randn(B, s.q_heads, T, D, dtype=dtype),
                          dk=r.randn(B, s.kv_heads, T, D, dtype=dtype))

    def run(i):
        q_embed, k_embed = apply_rope(i.q, i.k, i.cos, i.sin)
        return _backward({"q_embed": q_embed, "k_embed": k_embed}, {"q_embed": i.dq, "k_embed": i.dk},
                         {"q": i.q, "k": i.k})

    def reference(i):
        q_embed, k_embed, dq, dk = ref.rope_reference(i.q, i.k, i.cos, i.sin, i.dq, i.dk)
        return {"q_embed": q_embed, "k_embed": k_embed, "dq": dq, "dk": dk}

    # a * cos + b * sin in fp32, rounded once; the two products may cancel (2 fp32 terms)
    case = "packed rows, positions restarting, per-row tables" if packed else "GQA, HF's transposed layout"
    return Case("apply_rope", "rope", case, f"q [{B}, {s.q_heads}, {T}, {D}], k [{B}, {s.kv_heads}, {T}, {D}]",
                make, run, reference, {name: (1, 2) for name in ("q_embed", "k_embed", "dq", "dk")})


def _swiglu_case(rows: int, width: int, case: str, activation: str = "silu") -> Case:
    def make(dtype, device):
        r = Inputs(device, 3)
        # a spread of +-12 reaches sigmoid's flat tails and silu's minimum near -1.28 (gelu_tanh's near -0.75)
        return _Namespace(gate=r.randn(rows, width, dtype=dtype, scale=4.0, grad=True),
                          up=r.randn(rows, width, dtype=dtype, grad=True), dy=r.randn(rows, width, dtype=dtype))

    def run(i):
        y = swiglu(i.gate, i.up) if activation == "silu" else swiglu(i.gate, i.up, activation)
        return _backward({"y": y}, {"y": i.dy}, {"gate": i.gate, "up": i.up})

    def reference(i):
        y, dgate, dup = ref.swiglu_reference(i.gate, i.up, i.dy, activation)
        return {"y": y, "dgate": dgate, "dup": dup}

    # fp32 math rounded once to the dtype: a few ulps of fp32 from exp and the division (4 terms); gelu_tanh
    # computes a cubic, its derivative and a sigmoid of it, about four times the fp32 operations (16)
    terms = 4 if activation == "silu" else 16
    return Case("swiglu", "swiglu", case, f"gate, up [{rows}, {width}]", make, run, reference,
                {name: (1, terms) for name in ("y", "dgate", "dup")})


def _cross_entropy_case(s: Sizes) -> Case:
    n, V = s.tokens, s.vocab

    def make(dtype, device):
        r = Inputs(device, 4)
        return _Namespace(logits=r.randn(n, V, dtype=dtype, scale=3.0, grad=True), labels=r.labels(n, V),
                          device=device)

    def run(i):
        return _backward({"loss": cross_entropy(i.logits, i.labels)}, {"loss": torch.ones(())},
                         {"logits": i.logits})

    def reference(i):
        loss, dlogits = ref.cross_entropy_reference(i.logits, i.labels, "mean", torch.ones((), device=i.device))
        return {"loss": loss, "dlogits": dlogits}

    # loss: an fp32 log-sum-exp over V terms (no rounding to the dtype); dlogits: fp32 softmax rounded once
    return Case("cross_entropy", "cross_entropy", "mean over non-ignored labels (30% -100)", f"logits [{n}, {V}]",
                make, run, reference, {"loss": (0, V), "dlogits": (1, V)}, zeros=("dlogits",))


def _lm_head_inputs(s: Sizes, dtype, device, seed: int, head_grad: bool):
    r = Inputs(device, seed)
    return _Namespace(hidden=r.randn(s.tokens, s.hidden, dtype=dtype, grad=True),
                      weight=r.randn(s.vocab, s.hidden, dtype=dtype, scale=2 / math.sqrt(s.hidden), grad=head_grad),
                      labels=r.labels(s.tokens, s.vocab), dy=r.randn(s.tokens), dentropy=r.randn(s.tokens))


def _fused_linear_cross_entropy_case(s: Sizes) -> Case:
    def run(i):
        loss = fused_linear_cross_entropy(i.hidden, i.weight, i.labels, reduction="none")
        return _backward({"loss": loss}, {"loss": i.dy}, {"hidden": i.hidden, "weight": i.weight})

    def reference(i):
        loss, dh, dw = ref.linear_cross_entropy_reference(i.hidden, i.weight, i.labels, "none", i.dy)
        return {"loss": loss, "dhidden": dh, "dweight": dw}

    # loss: fp32 logits (GEMM over H) and log-sum-exp (over V), no rounding to the dtype; gradients: dlogits
    # rounded to the dtype, the GEMM result rounded, the scaling by the incoming gradient rounded (3), fp32 sums
    # over V (dhidden) or the tokens (dweight)
    return Case("fused_linear_cross_entropy", "fused_linear_cross_entropy", "per-token losses, trainable head",
                f"hidden [{s.tokens}, {s.hidden}], weight [{s.vocab}, {s.hidden}]",
                lambda dtype, device: _lm_head_inputs(s, dtype, device, 5, True), run, reference,
                {"loss": (0, s.hidden + s.vocab), "dhidden": (3, s.vocab), "dweight": (3, s.tokens)},
                zeros=("loss", "dhidden"))


def _linear_log_probs_case(s: Sizes, frozen_head: bool) -> Case:
    outputs = ("log_probs",) if frozen_head else ("log_probs", "entropy", "is_top1")

    def run(i):
        results = linear_log_probs(i.hidden, i.weight, i.labels, outputs=outputs)
        if frozen_head:
            return _backward({"log_probs": results}, {"log_probs": i.dy}, {"hidden": i.hidden})
        log_probs, entropy = results[0], results[1]
        return _backward({"log_probs": log_probs, "entropy": entropy}, {"log_probs": i.dy, "entropy": i.dentropy},
                         {"hidden": i.hidden, "weight": i.weight})

    def reference(i):
        (log_probs, entropy, *_), (dh, dw, _) = ref.linear_log_probs_reference(
            i.hidden, i.weight, None, i.labels, i.dy, None if frozen_head else i.dentropy)
        if frozen_head:
            return {"log_probs": log_probs, "dhidden": dh}
        return {"log_probs": log_probs, "entropy": entropy, "dhidden": dh, "dweight": dw}

    # as fused_linear_cross_entropy; the frozen head's saved direction rounds p_j and the gradient twice (3)
    tolerances = {"log_probs": (0, s.hidden + s.vocab), "entropy": (0, s.hidden + s.vocab),
                  "dhidden": (3, s.vocab), "dweight": (3, s.tokens)}
    case = ("frozen head (QLoRA), log-probs only: the saved-direction backward" if frozen_head
            else "trainable head, log-probs + entropy (TRL's SFT outputs)")
    return Case("linear_log_probs", "linear_log_probs", case,
                f"hidden [{s.tokens}, {s.hidden}], weight [{s.vocab}, {s.hidden}]",
                lambda dtype, device: _lm_head_inputs(s, dtype, device, 6, not frozen_head), run, reference,
                tolerances, zeros=("log_probs", "entropy", "dhidden"))


def _nf4_case(out_f: int, in_f: int, case: str) -> Case:
    def make(dtype, device):
        return _Namespace(w=Inputs(device, 7).nf4(out_f, in_f, dtype))

    # table look-ups and fp32 products (up to 3 roundings in fp32 for the double-quantized scale), rounded once
    return Case("dequantize_nf4", "nf4", case, f"weight [{out_f}, {in_f}], blocksize 64, double quant", make,
                lambda i: {"weight": dequantize_nf4(i.w)}, lambda i: {"weight": ref.nf4_reference(i.w)},
                {"weight": (1, 3)}, zeros=("weight",))


# ---- LoRA ------------------------------------------------------------------------------------


def drawn_dropout_masks(seed: int, draws, device="cpu") -> list[torch.Tensor]:
    """The multipliers ``M`` that fastft's fused LoRA calls drew after ``torch.manual_seed(seed)``: ``draws`` lists
    ``(p, [T, in])`` in the order the calls drew their seeds (one per projection with an adapter and p > 0),
    materialised on ``device`` by the engine in use."""
    torch.manual_seed(seed)
    masks = [DropoutMask.draw(p, torch.device(device)) for p, _ in draws]
    return [dropout_mask(mask, shape, device) for mask, (_, shape) in zip(masks, draws)]


def _mask_failures(masks, p: float) -> list[str]:
    """A drawn mask holds 0 or 1 / (1 - p) only, and keeps a share of 1 - p within 5 binomial sigma."""
    failures = []
    for index, m in enumerate(masks):
        scale = torch.tensor(1 / (1 - p), dtype=torch.float32).item()
        if not bool(((m == 0) | (m == scale)).all()):
            failures.append(f"dropout mask {index}: values other than 0 and {scale:.6g}")
        kept, n = float((m != 0).sum()), m.numel()
        if abs(kept - n * (1 - p)) > 5 * math.sqrt(n * p * (1 - p)):
            failures.append(f"dropout mask {index}: kept {kept / n:.3f} of the elements, expected {1 - p:.3f}")
    return failures


DROPOUT_SEED = 2024


class _LoraCase:
    """Shared machinery of the three fused LoRA ops: NF4 base weights, adapters, masks, float64 reference."""

    def __init__(self, s: Sizes, projections: dict, dropout: float, seed: int):
        self.s, self.projections, self.dropout, self.seed = s, projections, dropout, seed  # name -> (out, in)

    def make(self, dtype, device):
        r = Inputs(device, self.seed)
        x = r.randn(self.s.batch, self.s.tokens, next(iter(self.projections.values()))[1], dtype=dtype, grad=True)
        parts = {}
        for name, (out_f, in_f) in self.projections.items():
            A, B = r.lora(out_f, in_f, self.s.rank, dtype)
            parts[name] = (r.nf4(out_f, in_f, dtype), A, B)
        return _Namespace(x=x, parts=parts, dys={name: r.randn(self.s.batch, self.s.tokens, out_f, dtype=dtype)
                                                 for name, (out_f, _) in self.projections.items()})

    def args(self, i, name):
        w, A, B = i.parts[name]
        return (w, None, A, B, 2.0, None, self.dropout)

    def leaves(self, i):
        return {"x": i.x, **{f"{k}_{n}": t for n, (_, A, B) in i.parts.items() for k, t in (("A", A), ("B", B))}}

    def reference_projections(self, i, leaves, masks):
        """Per projection the float64 arguments of ``lora_projection_reference``."""
        return {n: (ref.nf4_reference(w), None, leaves[f"A_{n}"], leaves[f"B_{n}"], 2.0, masks.get(n))
                for n, (w, _, _) in i.parts.items()}

    def run_seeded(self, fn):
        torch.manual_seed(DROPOUT_SEED)
        return fn()

    def masks(self, i, shapes: dict) -> dict:
        """The dropout multipliers the fused call drew (per projection name) over inputs of ``shapes``."""
        if not self.dropout:
            return {}
        drawn = drawn_dropout_masks(DROPOUT_SEED, [(self.dropout, shape) for shape in shapes.values()], i.x.device)
        i["drawn"] = drawn
        return {name: m.double() for name, m in zip(shapes, drawn)}

    def checks(self, i):
        return _mask_failures(i.get("drawn", []), self.dropout) if self.dropout else []


# A LoRA projection's rounding counts (eps of the dtype): forward, the dequantized weight, the base result and the
# LoRA product x @ A.T rounded, the LoRA term accumulated into the output (3), fp32 sums over its input features;
# dx, the weight, dy @ W, dy @ B and the accumulation (4), sums over the output features; dA and dB, the [T, r]
# product, the GEMM and the scaling (3), sums over the tokens. Dropout rounds M * x once more.
def _lora_tolerances(outputs, adapters, dropout: float, in_terms: int, out_terms: int, tokens: int,
                     extra: int = 0) -> dict:
    d = extra + (1 if dropout else 0)
    tol = {name: (3 + d, in_terms) for name in outputs}
    tol.update({f"d{kind}_{name}": (3 + d, tokens) for name in adapters for kind in "AB"})
    tol["dx"] = (4 + d, out_terms)
    return tol


def _lora_linear_case(s: Sizes, dropout: float) -> Case:
    lc = _LoraCase(s, {"o": (s.hidden, s.q_dim)}, dropout, 8)

    def run(i):
        y = lc.run_seeded(lambda: lora_linear(i.x, *lc.args(i, "o")))
        return _backward({"y": y}, {"y": i.dys["o"]}, lc.leaves(i))

    def reference(i):
        masks = lc.masks(i, {"o": (s.batch * s.tokens, s.q_dim)})
        masks = {n: m.reshape(i.x.shape) for n, m in masks.items()}

        def forward(x, **adapters):
            projections = lc.reference_projections(i, {"x": x, **adapters}, masks)
            return {"y": ref.lora_projection_reference(x, *projections["o"])}

        return _reference_of(forward, lc.leaves(i), {"y": i.dys["o"]})

    tol = _lora_tolerances(["y"], ["o"], dropout, s.q_dim, s.hidden, s.tokens * s.batch)
    case = f"NF4 + LoRA r={s.rank}" + (f", dropout p={dropout}" if dropout else "")
    return Case("lora_linear", "lora_linear", case, f"x [{s.batch}, {s.tokens}, {s.q_dim}] -> {s.hidden} (o_proj)",
                lc.make, run, reference, tol, lc.checks)


def _lora_qkv_case(s: Sizes, dropout: float) -> Case:
    shapes = {"q": (s.q_dim, s.hidden), "k": (s.kv_dim, s.hidden), "v": (s.kv_dim, s.hidden)}
    lc = _LoraCase(s, shapes, dropout, 9)

    def run(i):
        q, k, v = lc.run_seeded(lambda: lora_qkv(i.x, *(lc.args(i, n) for n in "qkv")))
        return _backward({"q": q, "k": k, "v": v}, i.dys, lc.leaves(i))

    def reference(i):
        masks = lc.masks(i, {n: (s.batch * s.tokens, s.hidden) for n in "qkv"})
        masks = {n: m.reshape(i.x.shape) for n, m in masks.items()}

        def forward(x, **adapters):
            projections = lc.reference_projections(i, {"x": x, **adapters}, masks)
            return {n: ref.lora_projection_reference(x, *projections[n]) for n in "qkv"}

        return _reference_of(forward, lc.leaves(i), i.dys)

    # one more rounding: the three projections' dx terms meet in one accumulation
    tol = _lora_tolerances("qkv", "qkv", dropout, s.hidden, s.q_dim + 2 * s.kv_dim, s.tokens * s.batch, extra=1)
    case = f"NF4 + LoRA r={s.rank} on q, k, v" + (f", dropout p={dropout} (a mask each)" if dropout else "")
    return Case("lora_qkv", "lora_qkv", case,
                f"x [{s.batch}, {s.tokens}, {s.hidden}] -> q {s.q_dim}, k/v {s.kv_dim}", lc.make, run, reference,
                tol, lc.checks)


def _mlp_case(s: Sizes, dropout: float, op: str, shapes: dict, seed: int, fused_mlp, reference_mlp, case: str,
              variant: str, shape: str) -> Case:
    """A fused LoRA MLP (``lora_mlp`` or ``lora_mlp_gate_up``: its projections ``shapes``, name -> (out, in), the
    last one ``down``) against ``reference_mlp`` on the float64 projections, a dropout mask over each one's input."""
    lc = _LoraCase(s, shapes, dropout, seed)

    def run(i):
        y = lc.run_seeded(lambda: fused_mlp(i.x, *(lc.args(i, n) for n in shapes)))
        return _backward({"y": y}, {"y": i.dys["down"]}, lc.leaves(i))

    def reference(i):
        masks = lc.masks(i, {n: (s.batch * s.tokens, in_f) for n, (_, in_f) in shapes.items()})
        masks = {n: m.reshape(s.batch, s.tokens, -1) for n, m in masks.items()}

        def forward(x, **adapters):
            p = lc.reference_projections(i, {"x": x, **adapters}, masks)
            return {"y": reference_mlp(x, *(p[n] for n in shapes))}

        return _reference_of(forward, lc.leaves(i), {"y": i.dys["down"]})

    # two projections in a row and SwiGLU between them (its own rounding): the errors of gate/up carry into
    # down's input, so twice a projection's count (and its backward through SwiGLU likewise)
    tol = {name: (2 * r + 1, terms) for name, (r, terms) in _lora_tolerances(
        ["y"], shapes, dropout, max(s.hidden, s.intermediate), s.intermediate, s.tokens * s.batch).items()}
    case += (f", dropout p={dropout}" if dropout else "") + variant
    return Case(op, "lora_mlp", case, shape, lc.make, run, reference, tol, lc.checks)


def _lora_mlp_case(s: Sizes, dropout: float, activation: str = "silu") -> Case:
    shapes = {"gate": (s.intermediate, s.hidden), "up": (s.intermediate, s.hidden), "down": (s.hidden, s.intermediate)}
    gelu = {} if activation == "silu" else {"activation": activation}
    return _mlp_case(s, dropout, "lora_mlp", shapes, 10, lambda x, *p: lora_mlp(x, *p, **gelu),
                     lambda x, *p: ref.lora_mlp_reference(x, *p, activation),
                     f"NF4 + LoRA r={s.rank} on gate, up, down", ", GeGLU (gelu_tanh: Gemma)" if gelu else "",
                     f"x [{s.batch}, {s.tokens}, {s.hidden}], intermediate {s.intermediate}")


def _lora_mlp_gate_up_case(s: Sizes, dropout: float) -> Case:
    shapes = {"gate_up": (2 * s.intermediate, s.hidden), "down": (s.hidden, s.intermediate)}
    return _mlp_case(s, dropout, "lora_mlp_gate_up", shapes, 11, lora_mlp_gate_up, ref.lora_mlp_gate_up_reference,
                     f"NF4 + LoRA r={s.rank} on fused gate_up, down", "",
                     f"x [{s.batch}, {s.tokens}, {s.hidden}], gate_up 2 x {s.intermediate} (Phi-3)")


# ---- Mixture of experts ----------------------------------------------------------------------

MOE_EXPERTS, MOE_TOP_K, MOE_IDLE_EXPERT = 8, 2, 5


def _moe_experts_case(s: Sizes) -> Case:
    """The routed experts (NF4, LoRA on gate_up and down) on the model's hidden size: 8 experts, top-2, one expert
    without tokens, experts an eighth of the model's MLP wide (Qwen3-30B-A3B's are 768 of a dense 6144)."""
    E, k, H, inter, rows = MOE_EXPERTS, MOE_TOP_K, s.hidden, max(16, s.intermediate // 8), s.batch * s.tokens
    shapes = {"gate_up": (2 * inter, H), "down": (H, inter)}

    def make(dtype, device):
        r = Inputs(device, 13)
        hit = torch.tensor([e for e in range(E) if e != MOE_IDLE_EXPERT], device=device)
        index = hit[torch.rand(rows, E - 1, generator=r.gen, device=device).topk(k, dim=-1).indices]
        parts = {}
        for name, (out_f, in_f) in shapes.items():
            w = [r.nf4(out_f, in_f, dtype) for _ in range(E)]
            experts = NF4Experts(
                packed=torch.stack([e.packed for e in w]), absmax=torch.stack([e.absmax for e in w]),
                nested_absmax=torch.stack([e.nested_absmax for e in w]), offset=torch.cat([e.offset for e in w]),
                code=w[0].code, nested_code=w[0].nested_code, blocksize=64, nested_blocksize=256,
                shape=(out_f, in_f), dtype=dtype)
            parts[name] = (experts, r.randn(E, s.rank, in_f, dtype=dtype, scale=1 / math.sqrt(in_f), grad=True),
                           r.randn(E, out_f, s.rank, dtype=dtype, scale=1 / math.sqrt(s.rank), grad=True))
        return _Namespace(x=r.randn(rows, H, dtype=dtype, grad=True), index=index, parts=parts,
                          weights=torch.softmax(r.randn(rows, k), dim=-1).requires_grad_(),
                          dy=r.randn(rows, H, dtype=dtype))

    def leaves(i):
        return {"x": i.x, "weights": i.weights,
                **{f"{kind}_{n}": t for n, (_, A, B) in i.parts.items() for kind, t in (("A", A), ("B", B))}}

    def run(i):
        (gu, A_gu, B_gu), (d, A_d, B_d) = i.parts["gate_up"], i.parts["down"]
        y = moe_experts(i.x, i.index, i.weights, gu, d, ExpertLora(A_gu, B_gu, 2.0), ExpertLora(A_d, B_d, 2.0))
        return _backward({"y": y}, {"y": i.dy}, leaves(i))

    def reference(i):
        weights64 = {n: torch.stack([ref.nf4_reference(experts.expert(e)) for e in range(E)])
                     for n, (experts, _, _) in i.parts.items()}

        def forward(x, weights, **adapters):
            gate_up, down = ((weights64[n], adapters[f"A_{n}"], adapters[f"B_{n}"], 2.0) for n in shapes)
            return {"y": ref.moe_experts_reference(x, i.index, weights, gate_up, down)}

        return _reference_of(forward, leaves(i), {"y": i.dy})

    # lora_mlp's counts (two projections and SwiGLU between them) plus the routing weight's product and the sum
    # over a token's k experts (2); d weights: <h, dh> as dx's count (one GEMM through down, h rounded)
    mlp = _lora_tolerances(["y"], shapes, 0.0, max(H, inter), max(H, 2 * inter), rows)
    mlp["dweights"] = mlp["dx"][0], inter
    tol = {name: (2 * r + 3, terms) for name, (r, terms) in mlp.items()}
    # the expert without tokens: its LoRA gradients are exactly 0 (the grouped engine launches no program for it)
    return Case("moe_experts", "moe_experts", f"{E} NF4 experts, top-{k}, expert {MOE_IDLE_EXPERT} without tokens, "
                f"LoRA r={s.rank} on gate_up and down", f"x [{rows}, {H}], expert intermediate {inter}",
                make, run, reference, tol, zeros=tuple(f"d{kind}_{n}" for n in shapes for kind in "AB"))


# ---- Attention -------------------------------------------------------------------------------

# out: P (fp32) rounded to the dtype for the P @ V tensor-core dot on a GPU, the result rounded (2); gradients:
# dS and P rounded for their dots, O rounded in the forward enters delta = rowsum(dO * O), the result rounded (4).
# fp32 inputs take exact (ieee) fp32 dots. fp32 sums over the keys (or the head size).
def _attention_tolerances(keys: int, head_dim: int) -> dict:
    terms = max(keys, head_dim)
    return {"out": (2, terms), "dq": (4, terms), "dk": (4, terms), "dv": (4, terms)}


def _attention_case(s: Sizes, window: int | None, softcap: float | None = None) -> Case:
    B, T, D = s.batch, s.tokens, s.head_dim

    def make(dtype, device):
        r = Inputs(device, 11)
        return _Namespace(q=r.randn(B, s.q_heads, T, D, dtype=dtype, grad=True),
                          k=r.randn(B, s.kv_heads, T, D, dtype=dtype, grad=True),
                          v=r.randn(B, s.kv_heads, T, D, dtype=dtype, grad=True),
                          dout=r.randn(B, s.q_heads, T, D, dtype=dtype))

    def run(i):
        capped = {} if softcap is None else {"softcap": softcap}
        out = attention(i.q, i.k, i.v, causal=True, sliding_window=window, **capped)
        return _backward({"out": out}, {"out": i.dout}, {"q": i.q, "k": i.k, "v": i.v})

    def reference(i):
        def forward(q, k, v):
            return {"out": ref.attention_reference(q, k, v, True, 1 / math.sqrt(D), window, softcap)}
        return _reference_of(forward, {"q": i.q, "k": i.k, "v": i.v}, {"out": i.dout})

    group = f"GQA {s.q_heads}:{s.kv_heads}"
    case = f"causal, {group}" + (f", sliding window {window}" if window else "")
    if softcap is not None:
        case += f", scores soft-capped at {softcap} (Gemma 2)"
    return Case("attention", "attention", case, f"q [{B}, {s.q_heads}, {T}, {D}], k/v [{B}, {s.kv_heads}, {T}, {D}]",
                make, run, reference, _attention_tolerances(T, D))


def _attention_varlen_case(s: Sizes) -> Case:
    lengths = [1, s.tokens // 2 + 3, s.tokens, 5]  # a one-token sequence, odd lengths
    n, D = sum(lengths), s.head_dim

    def make(dtype, device):
        r = Inputs(device, 12)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        # q/k/v as slices of one packed projection [N, Hq + 2 Hkv, D] (strided, as a model hands them over)
        qkv = r.randn(n, s.q_heads + 2 * s.kv_heads, D, dtype=dtype)
        q, k, v = (t.detach().requires_grad_() for t in qkv.split([s.q_heads, s.kv_heads, s.kv_heads], dim=1))
        return _Namespace(q=q, k=k, v=v, cu=cu, dout=r.randn(n, s.q_heads, D, dtype=dtype))

    def run(i):
        out = attention_varlen(i.q, i.k, i.v, i.cu, max(lengths), causal=True)
        return _backward({"out": out}, {"out": i.dout}, {"q": i.q, "k": i.k, "v": i.v})

    def reference(i):
        def forward(q, k, v):
            return {"out": ref.attention_varlen_reference(q, k, v, i.cu, True, 1 / math.sqrt(D), None)}
        return _reference_of(forward, {"q": i.q, "k": i.k, "v": i.v}, {"out": i.dout})

    return Case("attention_varlen", "attention", f"packed sequences {lengths}, causal, GQA {s.q_heads}:{s.kv_heads}",
                f"q [{n}, {s.q_heads}, {D}], k/v [{n}, {s.kv_heads}, {D}]", make, run, reference,
                _attention_tolerances(max(lengths), D))


# Gemma's attention on a GPU: head size 256 (its own tiles) with soft-capped scores. The cap is far below Gemma 2's
# 50 because these scores are O(1): at 50 the cap would change nothing a wrong cap could show.
GEMMA_ATTENTION = dict(tokens=13, batch=1, q_heads=2, kv_heads=1, head_dim=256)
SCORE_SOFTCAP = 1.5


def gemma_attention_sizes(s: Sizes) -> Sizes:
    """A small attention shape with Gemma's head size 256 (the model's other sizes kept)."""
    return dataclasses.replace(s, label=f"{s.label}, Gemma's head size 256", **GEMMA_ATTENTION)


def build_cases(s: Sizes) -> list[Case]:
    """Every public op of ``fastft.kernels`` on the model's shapes, plus awkward ones, plus the variants Gemma
    models run (small shapes: ``(1 + w)`` norm, GeGLU, soft-capped attention scores at head size 256)."""
    rows = s.batch * s.tokens
    return [
        _rms_norm_case(s, rows, s.hidden, "rows of the hidden size"),
        _rms_norm_case(s, 5, 123, "awkward: 5 rows of 123"),
        _rms_norm_case(s, 5, 123, "Gemma's (1 + w) norm (unit_offset), 5 rows of 123", unit_offset=True),
        _rope_case(s, packed=False),
        _rope_case(s, packed=True),
        _swiglu_case(rows, s.intermediate, "rows of the intermediate size"),
        _swiglu_case(7, 333, "awkward: 7 rows of 333"),
        _swiglu_case(7, 333, "GeGLU (gelu_tanh: Gemma), 7 rows of 333", activation="gelu_tanh"),
        _cross_entropy_case(s),
        _fused_linear_cross_entropy_case(s),
        _linear_log_probs_case(s, frozen_head=True),
        _linear_log_probs_case(s, frozen_head=False),
        _nf4_case(s.intermediate, s.hidden, "an MLP weight [intermediate, hidden]"),
        _nf4_case(7, 9, "awkward: 63 elements, a half-used last byte"),
        _lora_linear_case(s, 0.0),
        _lora_linear_case(s, 0.1),
        _lora_qkv_case(s, 0.0),
        _lora_qkv_case(s, 0.1),
        _lora_mlp_case(s, 0.0),
        _lora_mlp_case(s, 0.1),
        _lora_mlp_case(s, 0.0, activation="gelu_tanh"),
        _lora_mlp_gate_up_case(s, 0.0),
        _lora_mlp_gate_up_case(s, 0.1),
        _moe_experts_case(s),
        _attention_case(s, None),
        _attention_case(s, s.window),
        _attention_case(gemma_attention_sizes(s), None, softcap=SCORE_SOFTCAP),
        _attention_varlen_case(s),
    ]


# ---------------------------------------------------------------------------------------------
# Running and comparing


def compare(name: str, actual: torch.Tensor | None, expected: torch.Tensor, tol: float, zeros: bool = False) -> dict:
    """The normwise relative error of one tensor and what fails (see the module docstring)."""
    result = {"tensor": name, "error": math.inf, "tolerance": tol, "problem": None}
    if actual is None or tuple(actual.shape) != tuple(expected.shape):
        got = "no result" if actual is None else f"shape {tuple(actual.shape)}"
        result["problem"] = f"{got}, expected shape {tuple(expected.shape)}"
        return result
    a, e = actual.detach().double(), expected.detach().to(actual.device, torch.float64)
    finite = torch.isfinite(e)
    non_finite = int((~torch.isfinite(a) & finite).sum())
    if non_finite:
        result["problem"] = f"{non_finite} non-finite elements where the reference is finite"
        return result
    scale = e[finite].abs().max().item() if finite.any() else 0.0
    worst = (a - e)[finite].abs().max().item() if finite.any() else 0.0
    result["error"] = worst / scale if scale > 0 else worst
    nonzero = int(((e == 0) & (a != 0)).sum()) if zeros else 0
    if nonzero:
        result["problem"] = f"{nonzero} nonzero elements where the reference is exactly 0"
    elif not result["error"] <= tol:
        result["problem"] = f"error {result['error']:.3g} > tolerance {tol:.3g}"
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case, dtype: torch.dtype, device: torch.device) -> dict:
    """One case in one dtype: a row of the report (status "pass" / "FAIL", the worst tensor, every tensor's error,
    the first call's time, or the error text of an exception)."""
    row = {"op": case.op, "switch": case.switch, "case": case.case, "shape": case.shape,
           "dtype": str(dtype).replace("torch.", "")}
    try:
        with poison_outputs():
            inputs = case.make(dtype, device)
            _synchronize(device)
            start = time.perf_counter()
            actual = case.run(inputs)
            _synchronize(device)
            row["first_call_s"] = time.perf_counter() - start
            expected = case.reference(inputs)
            failures = case.checks(inputs) if case.checks else []
        tensors = [compare(name, actual.get(name), expected[name], tolerance(dtype, *case.tolerances[name]),
                           zeros=name in case.zeros) for name in expected]
    except Exception as exc:  # noqa: BLE001 - recorded as this op's failure; the doctor goes on
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        row.update(status="FAIL", error=None, tolerance=None, tensor=None, problem=f"{type(exc).__name__}",
                   exception=text, traceback="".join(traceback.format_exception(exc))[-4000:])
        return row
    worst = max(tensors, key=lambda t: (t["problem"] is not None, t["error"] / t["tolerance"]))
    problems = [f"{t['tensor']}: {t['problem']}" for t in tensors if t["problem"]] + failures
    row.update(status="FAIL" if problems else "pass", tensor=worst["tensor"], error=worst["error"],
               tolerance=worst["tolerance"], problem="; ".join(problems) or None, tensors=tensors)
    return row
