"""The kernel micro-benchmarks' case table: per op its sizes, an input builder, its implementations (fastft's
kernel, the reference it replaces), the bytes or FLOPs formula of its rates and its target, in the manner of
``triton.testing.perf_report``'s benchmark specs, and :func:`measure`, which times one implementation.
``bench/microbench.py`` measures every case in one loop on a GPU; ``fastft-doctor``'s speed section
(``fastft/doctor/speed.py``) measures each op against its reference on the user's device. (In the package, not in
``bench/``, so that the doctor reuses the byte and FLOP counts.)

An op's input builder ``build(bench, S, dtype, size, setup)`` returns a namespace with ``shape`` (the row's
label), ``grads`` (the tensors whose gradients are reset between runs), ``dys`` (the backward's output
gradients, None for a scalar loss) and whatever the implementations and the formulas of its case read. An
implementation takes those inputs and returns the call to time, or a ``Run``: the call, the gradients it
resets instead of the inputs' and a note. Implementations import what they call, so a missing kernel or
library gives a ``not_available`` row.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------------------
# Shapes and inputs: a builder returns a namespace with ``shape`` (the row's label), ``grads`` (the tensors
# whose gradients are reset between runs), ``dys`` (the backward's output gradients, None for a scalar
# loss) and whatever the implementations and the formulas of its case read.
# --------------------------------------------------------------------------------------------------------
def shapes(dry: bool) -> dict:
    if dry:  # tiny: the CPU dry run only checks that every code path runs
        return dict(rows=37, hidden=64, inter=96, vocab=300, rope=(2, 4, 2, 24, 16), lm_tokens=[33],
                    nf4=[(96, 64), (64, 64)], lora_tokens=[17], attn_T=[32], attn_tokens=64, attn_heads=(4, 2),
                    attn_dim=64, kv_heads=1)
    return dict(rows=16384, hidden=4096, inter=14336, vocab=128256, rope=(4, 32, 8, 4096, 128),
                lm_tokens=[2048, 8192],  # batch 1 x 2048 (where the lm-head chunking shows) and a long batch
                nf4=[(4096, 14336), (4096, 4096)], lora_tokens=[4096, 16384], attn_T=[1024, 2048, 4096, 8192],
                attn_tokens=16384, attn_heads=(32, 8), attn_dim=128, kv_heads=8)


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _randn(bench, *shape, dtype, grad=False):
    return torch.randn(*shape, device=bench.device, dtype=dtype).requires_grad_(grad)


def rms_norm_inputs(bench, S, dtype, size, setup):
    N, H = S["rows"], S["hidden"]
    x = _randn(bench, N, H, dtype=dtype, grad=True)
    return SimpleNamespace(shape=f"{N}x{H} {dtype_name(dtype)}", grads=[x], dys=[_randn(bench, N, H, dtype=dtype)], x=x,
                           w=1 + 0.1 * _randn(bench, H, dtype=dtype),  # frozen, as in QLoRA training
                           n=N * H, e=x.element_size())


def rope_inputs(bench, S, dtype, size, setup):
    B, Hq, Hkv, T, D = S["rope"]
    q = _randn(bench, B, Hq, T, D, dtype=dtype, grad=True)
    k = _randn(bench, B, Hkv, T, D, dtype=dtype, grad=True)
    pos = torch.arange(T, device=bench.device, dtype=torch.float32)
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=bench.device, dtype=torch.float32) / D))
    emb = torch.cat([torch.outer(pos, inv)] * 2, dim=-1)
    cos, sin = (f().to(dtype)[None].expand(B, T, D).contiguous() for f in (emb.cos, emb.sin))
    return SimpleNamespace(shape=f"q[{B},{Hq},{T},{D}] k[{B},{Hkv},{T},{D}] {dtype_name(dtype)}", grads=[q, k],
                           dys=[torch.randn_like(q), torch.randn_like(k)], q=q, k=k, cos=cos, sin=sin, D=D,
                           qk_bytes=(q.numel() + k.numel()) * q.element_size(),
                           cos_sin_bytes=2 * cos.numel() * cos.element_size())


def swiglu_inputs(bench, S, dtype, size, setup):
    N, inter = S["rows"], S["inter"]
    g, u = (_randn(bench, N, inter, dtype=dtype, grad=True) for _ in range(2))
    return SimpleNamespace(shape=f"{N}x{inter} {dtype_name(dtype)}", grads=[g, u], g=g, u=u, n=N * inter,
                           dys=[_randn(bench, N, inter, dtype=dtype)], e=g.element_size())


def _labels(bench, N, V):
    labels = torch.randint(0, V, (N,), device=bench.device)
    labels[::7] = -100  # a share of ignored labels, as in SFT with prompt masking
    return labels


def cross_entropy_inputs(bench, S, dtype, size, setup):
    N, V = S["lm_tokens"][-1], S["vocab"]
    logits = _randn(bench, N, V, dtype=dtype).mul_(2).requires_grad_(True)
    return SimpleNamespace(shape=f"{N}x{V} {dtype_name(dtype)}", grads=[logits], dys=None, logits=logits,
                           labels=_labels(bench, N, V), n=N * V, e=logits.element_size())


def lm_head_inputs(bench, S, dtype, N, setup):
    H, V = S["hidden"], S["vocab"]
    hidden = _randn(bench, N, H, dtype=dtype, grad=True)
    weight = _randn(bench, V, H, dtype=dtype) * (1.0 / math.sqrt(H))  # frozen lm_head, as in QLoRA
    return SimpleNamespace(shape=f"N={N} H={H} V={V} {dtype_name(dtype)}, W frozen", grads=[hidden], dys=None,
                           hidden=hidden, weight=weight, labels=_labels(bench, N, V), gemm=2 * N * H * V)


def log_probs_inputs(bench, S, dtype, N, setup):
    x = lm_head_inputs(bench, S, dtype, N, setup)
    x.labels = x.labels.clamp(min=0)  # TRL scores only valid positions (it compacts them before the call)
    return x


def _linear4bit(in_f, out_f, dtype, device):
    """A bitsandbytes NF4 (double-quantized, blocksize 64) layer, quantized by moving it to the device."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, compress_statistics=True,
                              quant_type="nf4")
    with torch.no_grad():
        layer.weight.data.normal_(0, 0.02)
    return layer.to(device)


def nf4_inputs(bench, S, dtype, size, setup):
    out_f, in_f = size
    param = _linear4bit(in_f, out_f, dtype, bench.device).weight
    blocksize = param.quant_state.blocksize
    return SimpleNamespace(shape=f"{out_f}x{in_f} -> {dtype_name(dtype)}, blocksize {blocksize}, double quant",
                           grads=[], dys=None, param=param, out_f=out_f, in_f=in_f, n=out_f * in_f, blocksize=blocksize,
                           e=torch.tensor([], dtype=dtype).element_size(), dtype=dtype, device=bench.device)


def peft_block(bench, S, dtype):
    """Llama-shaped q/k/v/o and gate/up/down as bitsandbytes NF4 layers wrapped by peft's LoRA
    (lora.Linear4bit), LoRA weights random (B non-zero) and cast to the compute dtype as TRL does."""
    import peft

    H, inter, kv_out, r = S["hidden"], S["inter"], S["kv_heads"] * S["attn_dim"], 16
    block = torch.nn.Module()
    for name, (in_f, out_f) in {"q_proj": (H, H), "k_proj": (H, kv_out), "v_proj": (H, kv_out), "o_proj": (H, H),
                                "gate_proj": (H, inter), "up_proj": (H, inter), "down_proj": (inter, H)}.items():
        setattr(block, name, _linear4bit(in_f, out_f, dtype, bench.device))
    config = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, bias="none",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    block = peft.inject_adapter_in_model(config, block)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for name, param in block.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                param.data = (torch.randn(param.shape, generator=gen) * 0.02).to(device=bench.device, dtype=dtype)
            param.requires_grad_(True)
    return SimpleNamespace(block=block, lora_params=[p for n, p in block.named_parameters() if "lora_" in n],
                           H=H, I=inter, kv=kv_out, r=r)


def _lora_inputs(bench, dtype, tokens, setup, shape, dy_widths):
    x = _randn(bench, tokens, setup.H, dtype=dtype, grad=True)
    dys = [_randn(bench, tokens, width, dtype=dtype) for width in dy_widths]
    return SimpleNamespace(shape=f"T={tokens} {shape} r={setup.r} nf4 {dtype_name(dtype)}",
                           grads=[x, *setup.lora_params], dys=dys, x=x, T=tokens, block=setup.block, H=setup.H,
                           I=setup.I, kv=setup.kv)


def lora_mlp_inputs(bench, S, dtype, tokens, setup):
    return _lora_inputs(bench, dtype, tokens, setup, f"H={setup.H} I={setup.I}", [setup.H])


def lora_qkv_inputs(bench, S, dtype, tokens, setup):
    return _lora_inputs(bench, dtype, tokens, setup, f"H={setup.H} kv={setup.kv}", [setup.H, setup.kv, setup.kv])


def lora_linear_inputs(bench, S, dtype, tokens, setup):
    x = _lora_inputs(bench, dtype, tokens, setup, f"{setup.H}->{setup.H}", [setup.H])
    x.shape += " (o_proj)"
    return x


def attention_inputs(bench, S, dtype, T, setup):
    (Hq, Hkv), D, B = S["attn_heads"], S["attn_dim"], max(1, S["attn_tokens"] // T)
    q = _randn(bench, B, Hq, T, D, dtype=dtype, grad=True)
    k, v = (_randn(bench, B, Hkv, T, D, dtype=dtype, grad=True) for _ in range(2))
    return SimpleNamespace(shape=f"B={B} T={T} Hq={Hq} Hkv={Hkv} D={D} causal {dtype_name(dtype)}", grads=[q, k, v],
                           dys=[_randn(bench, B, Hq, T, D, dtype=dtype)], q=q, k=k, v=v, B=B, T=T, Hq=Hq, Hkv=Hkv,
                           D=D, cuda=bench.cuda)


# --------------------------------------------------------------------------------------------------------
# Implementations: each takes the inputs and returns the call to time (or a Run: the call plus the
# gradients it resets instead of the inputs' and a note). Imports inside, so a missing kernel or library
# is a not_available row.
# --------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    forward: Callable
    grads: list | None = None
    note: str | None = None


def fastft(module: str, call: Callable, name: str | None = None) -> Callable:
    """The implementation that calls ``fastft.kernels.<module>.<name>`` (default: the module's name) as
    ``call(function, inputs)``."""
    def impl(x):
        function = getattr(importlib.import_module(f"fastft.kernels.{module}"), name or module)
        return lambda: call(function, x)

    return impl


def eager_rms_norm(x):
    def f():  # transformers' LlamaRMSNorm.forward
        h = x.x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        return x.w * h.to(x.x.dtype)

    return f


def eager_rope(x):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return Run(lambda: apply_rotary_pos_emb(x.q, x.k, x.cos, x.sin), note="transformers' apply_rotary_pos_emb")


def trl_log_probs(x):
    from trl.kernels import ChunkedLogProbFunction

    # the call TRL 1.16's fused lm head makes (trl/trainer/utils.py: chunk 32768, log-probs only)
    def f():
        out = ChunkedLogProbFunction.apply(x.hidden, x.weight, None, x.labels, 1.0, 32768, None, 1.0, ("log_probs",))
        return -out[0].mean()

    return f


def fastft_nf4(into: bool) -> Callable:
    def impl(x):
        from fastft.kernels.nf4 import dequantize_nf4
        from fastft.quant import nf4_weight_of

        w = nf4_weight_of(x.param)
        buf = torch.empty(x.out_f, x.in_f, device=x.device, dtype=x.dtype) if into else None
        return lambda: dequantize_nf4(w, out=buf)

    return impl


def bnb_nf4(x):
    import bitsandbytes.functional as bnbf

    return lambda: bnbf.dequantize_4bit(x.param.data, x.param.quant_state)


def fastft_lora(kernel: str, projections: tuple[str, ...]) -> Callable:
    """fastft's fused LoRA kernel over the peft block's projections (their weights as fastft reads them)."""
    def impl(x):
        from fastft.quant import fused_linear_args

        function = getattr(importlib.import_module(f"fastft.kernels.{kernel}"), kernel)
        args = [fused_linear_args(getattr(x.block, p)) for p in projections]
        if len(args) == 1:  # lora_linear takes its one projection's fields as arguments
            args = list(args[0])
        return lambda: function(x.x, *args)

    return impl


def sdpa_flash(x):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # k/v repeated for GQA outside the timing, as leaves (the flash backend takes Hq == Hkv)
    kr, vr = (t.detach().repeat_interleave(x.Hq // x.Hkv, dim=1).requires_grad_(True) for t in (x.k, x.v))
    backend = SDPBackend.FLASH_ATTENTION if x.cuda else SDPBackend.MATH

    def f():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(x.q, kr, vr, is_causal=True)

    return Run(f, grads=[x.q, kr, vr], note="k/v repeated to Hq heads before the call (not timed)"
                                            + ("" if x.cuda else "; CPU dry run uses the math backend"))


def measure(bench, forward, grads, dys=None, *, backward=True, memory=False) -> dict:
    """Time ``forward()`` alone and (``backward``) ``forward()`` + backward with ``bench.time_ms``; optionally the
    peak memory of fwd+bwd (``bench.peak_extra_gb``). Backward runs ``sum(out_i * dys_i)`` with fixed random
    ``dys``, or ``out.backward()`` for a scalar output (``dys`` None)."""
    def fwd_bwd():
        out = forward()
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        torch.autograd.backward(outs, None if dys is None else list(dys))

    f = bench.time_ms(forward, grad_to_none=grads)
    result = {"fwd_ms": f["median"], "fwd_ms_p20_p80": [f["p20"], f["p80"]]}
    if not backward:
        return result
    fb = bench.time_ms(fwd_bwd, grad_to_none=grads)
    result.update(fwdbwd_ms=fb["median"], fwdbwd_ms_p20_p80=[fb["p20"], fb["p80"]],
                  bwd_ms=max(fb["median"] - f["median"], 0.0))
    if memory:
        for t in grads:
            t.grad = None
        result["peak_extra_gb"] = bench.peak_extra_gb(fwd_bwd)
        for t in grads:
            t.grad = None
    return result


# --------------------------------------------------------------------------------------------------------
# The case table
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    op: str  # the rows' op
    group: str  # its name in --ops
    target: str  # from the issues
    build: Callable  # (bench, S, dtype, size, setup) -> inputs
    reference: str  # the implementation the others are compared with
    impls: dict  # implementation name -> implementation, the reference among them
    note: str  # what the bytes or FLOPs formula counts
    traffic: Callable | None = None  # inputs -> (fwd bytes, bwd bytes): GB/s
    flops: Callable | None = None  # inputs -> (fwd FLOPs, bwd FLOPs): TFLOP/s
    sizes: Callable = lambda S: [None]  # S -> the sizes handed to build, one row per size
    setup: Callable | None = None  # (bench, S, dtype) -> what the cases naming it share, built once
    backward: bool = True  # False: forward only
    memory: bool = False  # measure the peak memory of fwd+bwd


COPY_BW_TARGET = "fastft fwd and fwd+bwd >= 80% of copy bandwidth (H100)"
LORA_NOTE = ("FLOPs: frozen base GEMMs only: fwd 2*T*in*out per projection, bwd the same (dx; W gets no gradient); "
             "the r=16 LoRA GEMMs add < 1% and are not counted")
LM_HEAD_NOTE = "FLOPs: the logits GEMM 2*N*H*V; bwd the d hidden GEMM only (W frozen)"
CASES = (
    Case("rms_norm", "rms_norm", COPY_BW_TARGET, rms_norm_inputs, reference="torch-eager",
         impls={"fastft": fastft("rms_norm", lambda f, x: f(x.x, x.w, 1e-5)), "torch-eager": eager_rms_norm},
         note="fwd: read x, write y; bwd: read dy, x, write dx (weight, rstd negligible)",
         traffic=lambda x: (2 * x.n * x.e, 3 * x.n * x.e)),
    Case("rope", "rope", COPY_BW_TARGET, rope_inputs, reference="torch-eager",
         impls={"fastft": fastft("rope", lambda f, x: f(x.q, x.k, x.cos, x.sin), "apply_rope"),
                "torch-eager": eager_rope},
         note="fwd and bwd: read q, k, cos, sin, write q', k'",
         traffic=lambda x: (2 * x.qk_bytes + x.cos_sin_bytes,) * 2),
    Case("swiglu", "swiglu", COPY_BW_TARGET, swiglu_inputs, reference="torch-eager",
         impls={"fastft": fastft("swiglu", lambda f, x: f(x.g, x.u)),
                "torch-eager": lambda x: lambda: F.silu(x.g) * x.u},
         note="fwd: read g, u, write h; bwd: read dh, g, u, write dg, du",
         traffic=lambda x: (3 * x.n * x.e, 5 * x.n * x.e)),
    Case("cross_entropy", "cross_entropy", COPY_BW_TARGET, cross_entropy_inputs, reference="torch-eager",
         impls={"fastft": fastft("cross_entropy", lambda f, x: f(x.logits, x.labels)),
                # transformers' ForCausalLMLoss upcasts the logits to fp32
                "torch-eager": lambda x: lambda: F.cross_entropy(x.logits.float(), x.labels, ignore_index=-100)},
         note="fwd: read logits; bwd: read logits, write dlogits",
         traffic=lambda x: (x.n * x.e, 2 * x.n * x.e), memory=True),
    Case("fused_linear_cross_entropy", "fused_linear_cross_entropy",
         "peak memory <= 25% of F.cross_entropy(hidden @ W.T), time <= 1.1x", lm_head_inputs,
         reference="torch-eager",
         impls={"fastft": fastft("fused_linear_cross_entropy", lambda f, x: f(x.hidden, x.weight, x.labels)),
                "torch-eager": lambda x: lambda: F.cross_entropy((x.hidden @ x.weight.T).float(), x.labels,
                                                                 ignore_index=-100)},
         note=LM_HEAD_NOTE, flops=lambda x: (x.gemm, x.gemm), sizes=lambda S: S["lm_tokens"], memory=True),
    Case("linear_log_probs", "linear_log_probs",
         "faster than TRL's ChunkedLogProbFunction (else no reason to replace it)", log_probs_inputs,
         reference="trl",
         impls={"fastft": fastft("linear_log_probs", lambda f, x: -f(x.hidden, x.weight, x.labels).mean()),
                "trl": trl_log_probs},
         note=LM_HEAD_NOTE, flops=lambda x: (x.gemm, x.gemm), sizes=lambda S: S["lm_tokens"], memory=True),
    Case("nf4_dequant", "nf4", ">= 80% of copy bandwidth (H100)", nf4_inputs, reference="bitsandbytes",
         impls={"fastft": fastft_nf4(into=False), "fastft-out=buf": fastft_nf4(into=True), "bitsandbytes": bnb_nf4},
         note="read packed nibbles (n/2) + uint8 absmax (n/blocksize), write n values of the compute dtype",
         traffic=lambda x: (x.n / 2 + x.n / x.blocksize + x.n * x.e, 0), sizes=lambda S: S["nf4"],
         backward=False),
    Case("lora_mlp", "lora", ">= 1.5x faster than peft Linear4bit LoRA fwd+bwd and <= 70% of its peak memory (H100)",
         lora_mlp_inputs, reference="peft",
         impls={"fastft": fastft_lora("lora_mlp", ("gate_proj", "up_proj", "down_proj")),
                "peft": lambda x: lambda: x.block.down_proj(F.silu(x.block.gate_proj(x.x)) * x.block.up_proj(x.x))},
         note=LORA_NOTE, flops=lambda x: (2 * x.T * 3 * x.H * x.I,) * 2, sizes=lambda S: S["lora_tokens"],
         setup=peft_block, memory=True),
    Case("lora_qkv", "lora", "faster than peft, less memory", lora_qkv_inputs, reference="peft",
         impls={"fastft": fastft_lora("lora_qkv", ("q_proj", "k_proj", "v_proj")),
                "peft": lambda x: lambda: (x.block.q_proj(x.x), x.block.k_proj(x.x), x.block.v_proj(x.x))},
         note=LORA_NOTE, flops=lambda x: (2 * x.T * x.H * (x.H + 2 * x.kv),) * 2, sizes=lambda S: S["lora_tokens"],
         setup=peft_block, memory=True),
    Case("lora_linear", "lora", "faster than peft, less memory", lora_linear_inputs, reference="peft",
         impls={"fastft": fastft_lora("lora_linear", ("o_proj",)), "peft": lambda x: lambda: x.block.o_proj(x.x)},
         note=LORA_NOTE, flops=lambda x: (2 * x.T * x.H * x.H,) * 2, sizes=lambda S: S["lora_tokens"],
         setup=peft_block, memory=True),
    Case("attention", "attention", "fwd+bwd >= 0.9x SDPA flash backend; no T x T tensor (H100)", attention_inputs,
         reference="sdpa-flash",
         impls={"fastft": fastft("attention", lambda f, x: f(x.q, x.k, x.v, causal=True)), "sdpa-flash": sdpa_flash},
         note="FLOPs: fwd two GEMMs (QK^T, PV) 4*B*Hq*T*T*D halved by the causal mask; bwd 2.5x that (five "
              "GEMMs: QK^T recomputed, dV, dP, dQ, dK)",
         flops=lambda x: (2 * x.B * x.Hq * x.T * x.T * x.D, 5 * x.B * x.Hq * x.T * x.T * x.D),
         sizes=lambda S: S["attn_T"], memory=True),
)
OPS = tuple(dict.fromkeys(case.group for case in CASES))  # the --ops names, in table order
TARGETS = {case.op: case.target for case in CASES}
