#!/usr/bin/env python3
"""Kernel micro-benchmarks: each fastft kernel against its PyTorch/library counterpart, on a GPU.

    python bench/microbench.py                       # everything, writes bench/results/<date>-<gpu>-kernels.{json,md}
    python bench/microbench.py --ops rms_norm,nf4    # a subset
    python bench/microbench.py --cpu-dry-run --out-dir /tmp/k   # tiny shapes on CPU: checks the harness, no figures

First two ceilings are measured on the device itself:

* copy bandwidth: ``torch.empty_like(x).copy_(x)`` on a 1 GiB bf16 tensor, counting bytes read + written;
* bf16 matmul rate: ``a @ b`` at 8192 x 8192 x 8192.

Then every op gets forward time and forward+backward time (``triton.testing.do_bench``: median of
repeated runs with the L2 cache flushed between them, gradients reset), against the eager PyTorch
implementation of the same op (or the library that fastft replaces: bitsandbytes, peft, TRL, SDPA):

* memory-bound ops (RMSNorm, RoPE, SwiGLU, cross-entropy, NF4 dequant): achieved GB/s, counting the
  minimum traffic of the op (each input read once, each output written once; stated per op in
  ``bytes_note``), and the fraction of the measured copy bandwidth;
* matmul-bound ops (fused linear cross-entropy, linear log-probs, fused LoRA layers, attention):
  TFLOP/s where the FLOPs are well defined (attention, the lm-head GEMMs) and the fraction of the
  measured matmul rate, the speed-up over the reference and the peak memory of one forward+backward
  (``max_memory_allocated`` minus what was allocated before it: inputs excluded, outputs and
  gradients included), with its ratio to the reference's.

Each op's target (from the project's issues) is printed beside it; a missing kernel gives a
``not_available`` row instead of stopping the suite.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

# bench/ is not a package: its scripts import _shared.py as a sibling module. Run as a script, bench/ is
# sys.path[0] already; loaded by path (the tests) it is added here. Never the repository root (clean_sys_path).
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)
import _shared as shared  # noqa: E402

_DROPPED_FROM_PATH: list[str] = []

OPS = ("rms_norm", "rope", "swiglu", "cross_entropy", "fused_linear_cross_entropy", "linear_log_probs", "nf4",
       "lora", "attention")
KEY = ("op", "shape", "impl", "device_kind")
TARGETS = {
    "rms_norm": "fastft fwd and fwd+bwd >= 80% of copy bandwidth (H100)",
    "rope": "fastft fwd and fwd+bwd >= 80% of copy bandwidth (H100)",
    "swiglu": "fastft fwd and fwd+bwd >= 80% of copy bandwidth (H100)",
    "cross_entropy": "fastft fwd and fwd+bwd >= 80% of copy bandwidth (H100)",
    "fused_linear_cross_entropy": "peak memory <= 25% of F.cross_entropy(hidden @ W.T), time <= 1.1x",
    "linear_log_probs": "faster than TRL's ChunkedLogProbFunction (else no reason to replace it)",
    "nf4": ">= 80% of copy bandwidth (H100)",
    "lora_mlp": ">= 1.5x faster than peft Linear4bit LoRA fwd+bwd and <= 70% of its peak memory (H100)",
    "lora_qkv": "faster than peft, less memory",
    "lora_linear": "faster than peft, less memory",
    "attention": "fwd+bwd >= 0.9x SDPA flash backend; no T x T tensor (H100)",
}


# --------------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, device, dry_run: bool):
        self.device = device
        self.dry_run = dry_run
        self.cuda = device.type == "cuda"

    def time_ms(self, fn, grad_to_none=None) -> dict:
        """Median (and p20/p80) milliseconds of ``fn``; on a GPU with ``triton.testing.do_bench``."""
        if self.cuda:
            import triton.testing

            median, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                                       quantiles=[0.5, 0.2, 0.8])
            return {"median": median, "p20": p20, "p80": p80}
        # CPU dry run: one call, wall clock (the figures mean nothing; the code paths are what is checked)
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return {"median": ms, "p20": ms, "p80": ms}

    def peak_extra_gb(self, fn) -> float | None:
        """Peak memory of one call of ``fn`` above what was allocated before it (GiB), outputs included."""
        if not self.cuda:
            fn()
            return None
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return peak / shared.GIB

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(bench: Bench, forward, inputs_with_grad, *, backward_arg=None, memory=False) -> dict:
    """Time ``forward()`` alone and ``forward()`` + backward; optionally the peak memory of fwd+bwd.

    ``forward`` returns a tensor (or tuple of tensors); backward runs ``sum(out_i * g_i)`` with fixed random
    ``g_i`` (``backward_arg``) or ``out.backward()`` for a scalar.
    """
    def fwd():
        return forward()

    def fwd_bwd():
        out = forward()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if backward_arg is None:
            torch.autograd.backward(list(outs))
        else:
            torch.autograd.backward(list(outs), list(backward_arg))
        return None

    result = {}
    f = bench.time_ms(fwd, grad_to_none=inputs_with_grad)
    fb = bench.time_ms(fwd_bwd, grad_to_none=inputs_with_grad)
    result["fwd_ms"], result["fwdbwd_ms"] = f["median"], fb["median"]
    result["fwd_ms_p20_p80"], result["fwdbwd_ms_p20_p80"] = [f["p20"], f["p80"]], [fb["p20"], fb["p80"]]
    result["bwd_ms"] = max(fb["median"] - f["median"], 0.0)
    if memory:
        for t in inputs_with_grad:
            t.grad = None
        result["peak_extra_gb"] = bench.peak_extra_gb(fwd_bwd)
        for t in inputs_with_grad:
            t.grad = None
    return result


def _bw(row: dict, fwd_bytes: float, bwd_bytes: float, copy_gbps: float | None) -> None:
    row["fwd_gbps"] = fwd_bytes / (row["fwd_ms"] * 1e-3) / 1e9
    row["fwdbwd_gbps"] = (fwd_bytes + bwd_bytes) / (row["fwdbwd_ms"] * 1e-3) / 1e9
    if copy_gbps:
        row["fwd_frac_of_copy_bw"] = row["fwd_gbps"] / copy_gbps
        row["fwdbwd_frac_of_copy_bw"] = row["fwdbwd_gbps"] / copy_gbps


def _flops(row: dict, fwd_flops: float, bwd_flops: float, matmul_tflops: float | None) -> None:
    row["fwd_tflops"] = fwd_flops / (row["fwd_ms"] * 1e-3) / 1e12
    row["fwdbwd_tflops"] = (fwd_flops + bwd_flops) / (row["fwdbwd_ms"] * 1e-3) / 1e12
    if matmul_tflops:
        row["fwd_frac_of_matmul"] = row["fwd_tflops"] / matmul_tflops
        row["fwdbwd_frac_of_matmul"] = row["fwdbwd_tflops"] / matmul_tflops


def _compare(rows: list[dict], ref_impl: str) -> None:
    """speed-up (reference time / this time) and memory ratio (this / reference) for non-reference rows."""
    ref = {(r["op"], r["shape"]): r for r in rows if r["impl"] == ref_impl and r["status"] == "ok"}
    for row in rows:
        base = ref.get((row["op"], row["shape"]))
        if row["impl"] == ref_impl or row["status"] != "ok" or base is None:
            continue
        row["vs"] = ref_impl
        row["fwd_speedup"] = base["fwd_ms"] / row["fwd_ms"] if row.get("fwd_ms") else None
        if row.get("fwdbwd_ms") and base.get("fwdbwd_ms"):
            row["fwdbwd_speedup"] = base["fwdbwd_ms"] / row["fwdbwd_ms"]
        if row.get("peak_extra_gb") is not None and base.get("peak_extra_gb"):
            row["peak_memory_ratio"] = row["peak_extra_gb"] / base["peak_extra_gb"]


def _row(op, shape, impl, device_kind, **fields) -> dict:
    return {"op": op, "shape": shape, "impl": impl, "device_kind": device_kind, "status": "ok", "message": None,
            **fields}


def _missing(exc: BaseException) -> bool:
    """A kernel (module or function) that does not exist yet, as opposed to a crash inside one."""
    if isinstance(exc, ImportError):
        return True
    return isinstance(exc, AttributeError) and "module" in str(exc) and "has no attribute" in str(exc)


def run_case(rows: list[dict], op: str, shape: str, impl: str, device_kind: str, body) -> None:
    """Run one (op, shape, impl) measurement; a missing kernel or a crash becomes a row, not an abort."""
    try:
        fields = body()
        rows.append(_row(op, shape, impl, device_kind, **fields))
    except Exception as exc:  # noqa: BLE001 - recorded
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]).strip()
        if _missing(exc):
            status, text = "not_available", f"{type(exc).__name__}: {exc}"
        else:
            status = "oom" if "out of memory" in str(exc).lower() else "error"
        rows.append(_row(op, shape, impl, device_kind, status=status, message=text[-1500:]))
    last = rows[-1]
    if last["status"] == "ok" and last.get("fwdbwd_ms") is not None:
        brief = f"fwd {last['fwd_ms']:.3f} ms, fwd+bwd {last['fwdbwd_ms']:.3f} ms"
    elif last["status"] == "ok":
        brief = f"{last['fwd_ms']:.3f} ms"
    else:
        brief = (last["message"] or "").strip().splitlines()[-1:]
    print(f"  {op:<28} {shape:<44} {impl:<14} {last['status']}: {brief}", flush=True)
    _free()


# --------------------------------------------------------------------------------------------------------
# Ceilings
# --------------------------------------------------------------------------------------------------------
def ceilings(bench: Bench) -> dict:
    copy_gbps, copy_mib = _copy_gbps(bench)
    matmul_tflops, matmul_note = _matmul_tflops(bench)
    _free()
    return {"copy_gbps": copy_gbps, "copy_note": f"torch.empty_like(x).copy_(x), x {copy_mib} MiB bf16, "
                                                 "read + written bytes",
            "matmul_tflops": matmul_tflops, "matmul_note": matmul_note}


def _copy_gbps(bench: Bench) -> tuple[float, int]:
    n_bytes = (1 << 30) if bench.cuda else (1 << 20)
    x = torch.randn(n_bytes // 2, device=bench.device, dtype=torch.bfloat16)
    t = bench.time_ms(lambda: torch.empty_like(x).copy_(x))["median"]
    return 2 * n_bytes / (t * 1e-3) / 1e9, n_bytes >> 20


def _matmul_tflops(bench: Bench) -> tuple[float, str]:
    n = 8192 if bench.cuda else 256
    dtype = torch.bfloat16 if bench.cuda else torch.float32
    a = torch.randn(n, n, device=bench.device, dtype=dtype)
    b = torch.randn(n, n, device=bench.device, dtype=dtype)
    t = bench.time_ms(lambda: a @ b)["median"]
    return 2 * n ** 3 / (t * 1e-3) / 1e12, f"{n}x{n}x{n} {str(dtype).replace('torch.', '')} a @ b"


# --------------------------------------------------------------------------------------------------------
# The ops
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


def bench_rms_norm(bench, rows, S, ceil, dtype):
    dev, N, H = bench.device, S["rows"], S["hidden"]
    x = torch.randn(N, H, device=dev, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(H, device=dev, dtype=dtype))  # frozen, as in QLoRA training
    dy = torch.randn(N, H, device=dev, dtype=dtype)
    e = x.element_size()
    shape = f"{N}x{H} {str(dtype)[6:]}"
    note = "fwd: read x, write y; bwd: read dy, x, write dx (weight, rstd negligible)"

    def fastft_impl():
        from fastft.kernels.rms_norm import rms_norm

        r = measure(bench, lambda: rms_norm(x, w, 1e-5), [x], backward_arg=[dy])
        _bw(r, 2 * N * H * e, 3 * N * H * e, ceil["copy_gbps"])
        return {**r, "bytes_note": note}

    def eager():
        def f():  # transformers' LlamaRMSNorm.forward
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
            return w * h.to(dtype)

        r = measure(bench, f, [x], backward_arg=[dy])
        _bw(r, 2 * N * H * e, 3 * N * H * e, ceil["copy_gbps"])
        return {**r, "bytes_note": note}

    run_case(rows, "rms_norm", shape, "fastft", bench.device.type, fastft_impl)
    run_case(rows, "rms_norm", shape, "torch-eager", bench.device.type, eager)


def bench_rope(bench, rows, S, ceil, dtype):
    dev = bench.device
    B, Hq, Hkv, T, D = S["rope"]
    q = torch.randn(B, Hq, T, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, device=dev, dtype=dtype, requires_grad=True)
    pos = torch.arange(T, device=dev, dtype=torch.float32)
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D))
    freqs = torch.outer(pos, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos = emb.cos().to(dtype)[None].expand(B, T, D).contiguous()
    sin = emb.sin().to(dtype)[None].expand(B, T, D).contiguous()
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    e = q.element_size()
    qk = (q.numel() + k.numel()) * e
    cs = 2 * cos.numel() * cos.element_size()
    shape = f"q[{B},{Hq},{T},{D}] k[{B},{Hkv},{T},{D}] {str(dtype)[6:]}"
    note = "fwd and bwd: read q, k, cos, sin, write q', k'"

    def fastft_impl():
        from fastft.kernels.rope import apply_rope

        r = measure(bench, lambda: apply_rope(q, k, cos, sin), [q, k], backward_arg=[dq, dk])
        _bw(r, 2 * qk + cs, 2 * qk + cs, ceil["copy_gbps"])
        return {**r, "bytes_note": note}

    def eager():
        try:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        except ImportError:
            apply_rotary_pos_emb = None

        def rotate_half(t):
            return torch.cat((-t[..., D // 2:], t[..., : D // 2]), dim=-1)

        def f():
            if apply_rotary_pos_emb is not None:
                return apply_rotary_pos_emb(q, k, cos, sin)
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s

        r = measure(bench, f, [q, k], backward_arg=[dq, dk])
        _bw(r, 2 * qk + cs, 2 * qk + cs, ceil["copy_gbps"])
        return {**r, "bytes_note": note + " (transformers' apply_rotary_pos_emb)"}

    run_case(rows, "rope", shape, "fastft", dev.type, fastft_impl)
    run_case(rows, "rope", shape, "torch-eager", dev.type, eager)


def bench_swiglu(bench, rows, S, ceil, dtype):
    dev, N, inter = bench.device, S["rows"], S["inter"]
    g = torch.randn(N, inter, device=dev, dtype=dtype, requires_grad=True)
    u = torch.randn(N, inter, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(N, inter, device=dev, dtype=dtype)
    e = g.element_size()
    shape = f"{N}x{inter} {str(dtype)[6:]}"
    note = "fwd: read g, u, write h; bwd: read dh, g, u, write dg, du"

    def fastft_impl():
        from fastft.kernels.swiglu import swiglu

        r = measure(bench, lambda: swiglu(g, u), [g, u], backward_arg=[dy])
        _bw(r, 3 * N * inter * e, 5 * N * inter * e, ceil["copy_gbps"])
        return {**r, "bytes_note": note}

    def eager():
        r = measure(bench, lambda: F.silu(g) * u, [g, u], backward_arg=[dy])
        _bw(r, 3 * N * inter * e, 5 * N * inter * e, ceil["copy_gbps"])
        return {**r, "bytes_note": note}

    run_case(rows, "swiglu", shape, "fastft", dev.type, fastft_impl)
    run_case(rows, "swiglu", shape, "torch-eager", dev.type, eager)


def bench_cross_entropy(bench, rows, S, ceil, dtype):
    dev, N, V = bench.device, S["lm_tokens"][-1], S["vocab"]
    logits = torch.randn(N, V, device=dev, dtype=dtype).mul_(2).requires_grad_(True)
    labels = torch.randint(0, V, (N,), device=dev)
    labels[::7] = -100  # a share of ignored labels, as in SFT with prompt masking
    e = logits.element_size()
    shape = f"{N}x{V} {str(dtype)[6:]}"
    note = "fwd: read logits; bwd: read logits, write dlogits"

    def fastft_impl():
        from fastft.kernels.cross_entropy import cross_entropy

        r = measure(bench, lambda: cross_entropy(logits, labels), [logits], memory=True)
        _bw(r, N * V * e, 2 * N * V * e, ceil["copy_gbps"])
        return {**r, "bytes_note": note}

    def eager():  # transformers' ForCausalLMLoss upcasts the logits to fp32
        r = measure(bench, lambda: F.cross_entropy(logits.float(), labels, ignore_index=-100), [logits],
                    memory=True)
        _bw(r, N * V * e, 2 * N * V * e, ceil["copy_gbps"])
        return {**r, "bytes_note": note}

    run_case(rows, "cross_entropy", shape, "fastft", dev.type, fastft_impl)
    run_case(rows, "cross_entropy", shape, "torch-eager", dev.type, eager)


def _lm_head_inputs(bench, S, dtype, N):
    dev, H, V = bench.device, S["hidden"], S["vocab"]
    hidden = torch.randn(N, H, device=dev, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(V, H, device=dev, dtype=dtype) * (1.0 / math.sqrt(H)))  # frozen lm_head, as in QLoRA
    labels = torch.randint(0, V, (N,), device=dev)
    labels[::7] = -100
    return hidden, weight, labels, f"N={N} H={H} V={V} {str(dtype)[6:]}, W frozen", (N, H, V)


def bench_flce(bench, rows, S, ceil, dtype):
    for tokens in S["lm_tokens"]:
        _bench_flce(bench, rows, S, ceil, dtype, tokens)


def _bench_flce(bench, rows, S, ceil, dtype, tokens):
    hidden, weight, labels, shape, (N, H, V) = _lm_head_inputs(bench, S, dtype, tokens)
    flops_f, flops_b = 2 * N * H * V, 2 * N * H * V  # logits GEMM; backward: d hidden GEMM only (W frozen)

    def fastft_impl():
        from fastft.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

        r = measure(bench, lambda: fused_linear_cross_entropy(hidden, weight, labels), [hidden], memory=True)
        _flops(r, flops_f, flops_b, ceil["matmul_tflops"])
        return r

    def eager():
        r = measure(bench, lambda: F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100),
                    [hidden], memory=True)
        _flops(r, flops_f, flops_b, ceil["matmul_tflops"])
        return r

    run_case(rows, "fused_linear_cross_entropy", shape, "fastft", bench.device.type, fastft_impl)
    run_case(rows, "fused_linear_cross_entropy", shape, "torch-eager", bench.device.type, eager)


def bench_linear_log_probs(bench, rows, S, ceil, dtype):
    for tokens in S["lm_tokens"]:
        _bench_linear_log_probs(bench, rows, S, ceil, dtype, tokens)


def _bench_linear_log_probs(bench, rows, S, ceil, dtype, tokens):
    hidden, weight, labels, shape, (N, H, V) = _lm_head_inputs(bench, S, dtype, tokens)
    labels = labels.clamp(min=0)  # TRL scores only valid positions (it compacts them before the call)
    flops_f, flops_b = 2 * N * H * V, 2 * N * H * V

    def fastft_impl():
        from fastft.kernels.linear_log_probs import linear_log_probs

        r = measure(bench, lambda: -linear_log_probs(hidden, weight, labels).mean(), [hidden], memory=True)
        _flops(r, flops_f, flops_b, ceil["matmul_tflops"])
        return r

    def trl_impl():
        from trl.kernels import ChunkedLogProbFunction

        # the call TRL 1.16's fused lm head makes (trl/trainer/utils.py: chunk 32768, log-probs only)
        def f():
            out = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 32768, None, 1.0, ("log_probs",))
            return -out[0].mean()

        r = measure(bench, f, [hidden], memory=True)
        _flops(r, flops_f, flops_b, ceil["matmul_tflops"])
        return r

    run_case(rows, "linear_log_probs", shape, "fastft", bench.device.type, fastft_impl)
    run_case(rows, "linear_log_probs", shape, "trl", bench.device.type, trl_impl)


def _linear4bit(in_f, out_f, dtype, device):
    """A bitsandbytes NF4 (double-quantized, blocksize 64) layer, quantized by moving it to the device."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, compress_statistics=True,
                              quant_type="nf4")
    with torch.no_grad():
        layer.weight.data.normal_(0, 0.02)
    return layer.to(device)


def _nf4_weight(param):
    """fastft.quant.nf4_weight_of, or the same fields read directly when that module is missing."""
    try:
        from fastft.quant import nf4_weight_of

        return nf4_weight_of(param)
    except ImportError:
        from fastft.kernels.nf4 import NF4Weight

        qs = param.quant_state
        nested = {}
        if qs.nested:
            nested = dict(nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
                          nested_blocksize=qs.state2.blocksize, offset=qs.offset)
        return NF4Weight(packed=param.data.view(-1), absmax=qs.absmax, code=qs.code, blocksize=qs.blocksize,
                         shape=tuple(qs.shape), dtype=qs.dtype, **nested)


def bench_nf4(bench, rows, S, ceil, dtype):
    for out_f, in_f in S["nf4"]:
        _bench_nf4(bench, rows, ceil, dtype, out_f, in_f)
        _free()


def _bench_nf4(bench, rows, ceil, dtype, out_f, in_f):
    try:
        layer = _linear4bit(in_f, out_f, dtype, bench.device)
    except Exception as exc:  # noqa: BLE001 - bitsandbytes missing or broken on this machine
        rows.append(_row("nf4_dequant", f"{out_f}x{in_f}", "bitsandbytes", bench.device.type,
                         status="not_available", message=f"{type(exc).__name__}: {exc}"))
        return
    param = layer.weight
    n = out_f * in_f
    blocksize = param.quant_state.blocksize
    out_bytes = n * torch.tensor([], dtype=dtype).element_size()
    moved = n / 2 + n / blocksize + out_bytes  # packed codes, uint8 absmax codes, output
    shape = f"{out_f}x{in_f} -> {str(dtype)[6:]}, blocksize {blocksize}, double quant"
    note = "read packed nibbles (n/2) + uint8 absmax (n/blocksize), write n 16-bit values"

    def result(ms):
        gbps = moved / (ms * 1e-3) / 1e9
        return {"fwd_ms": ms, "fwd_gbps": gbps, "fwd_frac_of_copy_bw": gbps / ceil["copy_gbps"],
                "bytes_note": note}

    def fastft_alloc():
        from fastft.kernels.nf4 import dequantize_nf4

        w = _nf4_weight(param)
        return result(bench.time_ms(lambda: dequantize_nf4(w))["median"])

    def fastft_into():
        from fastft.kernels.nf4 import dequantize_nf4

        w = _nf4_weight(param)
        buf = torch.empty(out_f, in_f, device=bench.device, dtype=dtype)
        return result(bench.time_ms(lambda: dequantize_nf4(w, out=buf))["median"])

    def bnb_impl():
        import bitsandbytes.functional as bnbf

        return result(bench.time_ms(lambda: bnbf.dequantize_4bit(param.data, param.quant_state))["median"])

    run_case(rows, "nf4_dequant", shape, "fastft", bench.device.type, fastft_alloc)
    run_case(rows, "nf4_dequant", shape, "fastft-out=buf", bench.device.type, fastft_into)
    run_case(rows, "nf4_dequant", shape, "bitsandbytes", bench.device.type, bnb_impl)


def _peft_block(hidden, inter, kv_out, r, dtype, device):
    """Llama-shaped q/k/v/o and gate/up/down as bitsandbytes NF4 layers wrapped by peft's LoRA
    (lora.Linear4bit), LoRA weights random (B non-zero) and cast to the compute dtype as TRL does."""
    import peft

    block = torch.nn.Module()
    block.q_proj = _linear4bit(hidden, hidden, dtype, device)
    block.k_proj = _linear4bit(hidden, kv_out, dtype, device)
    block.v_proj = _linear4bit(hidden, kv_out, dtype, device)
    block.o_proj = _linear4bit(hidden, hidden, dtype, device)
    block.gate_proj = _linear4bit(hidden, inter, dtype, device)
    block.up_proj = _linear4bit(hidden, inter, dtype, device)
    block.down_proj = _linear4bit(inter, hidden, dtype, device)
    config = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, bias="none",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    block = peft.inject_adapter_in_model(config, block)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for name, param in block.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                param.data = (torch.randn(param.shape, generator=gen) * 0.02).to(device=device, dtype=dtype)
            param.requires_grad_(True)
    return block


def bench_lora(bench, rows, S, ceil, dtype):
    H, inter, r = S["hidden"], S["inter"], 16
    kv_out = S["kv_heads"] * (S["attn_dim"])
    try:
        block = _peft_block(H, inter, kv_out, r, dtype, bench.device)
    except Exception as exc:  # noqa: BLE001
        for op in ("lora_mlp", "lora_qkv", "lora_linear"):
            rows.append(_row(op, f"H={H} I={inter} r={r}", "peft", bench.device.type, status="not_available",
                             message=f"building the peft Linear4bit block failed: {type(exc).__name__}: {exc}"))
        return
    lora_params = [p for n, p in block.named_parameters() if "lora_" in n]
    for tokens in S["lora_tokens"]:
        _bench_lora(bench, rows, ceil, dtype, block, lora_params, tokens, (H, inter, kv_out, r))
        _free()


def _bench_lora(bench, rows, ceil, dtype, block, lora_params, tokens, dims):
    H, inter, kv_out, r = dims
    x = torch.randn(tokens, H, device=bench.device, dtype=dtype, requires_grad=True)
    dy_h = torch.randn(tokens, H, device=bench.device, dtype=dtype)
    dy_kv = torch.randn(tokens, kv_out, device=bench.device, dtype=dtype)
    grads = [x, *lora_params]
    # FLOPs: the frozen base GEMMs only, fwd 2*T*in*out per projection, bwd the same (dx; W gets no
    # gradient); the r=16 LoRA GEMMs add < 1% and are not counted
    gemm_mlp = 2 * tokens * 3 * H * inter
    gemm_qkv = 2 * tokens * H * (H + 2 * kv_out)
    gemm_o = 2 * tokens * H * H
    cases = {
        "lora_mlp": (f"T={tokens} H={H} I={inter} r={r} nf4 {str(dtype)[6:]}",
                     lambda: block.down_proj(F.silu(block.gate_proj(x)) * block.up_proj(x)), [dy_h], gemm_mlp),
        "lora_qkv": (f"T={tokens} H={H} kv={kv_out} r={r} nf4 {str(dtype)[6:]}",
                     lambda: (block.q_proj(x), block.k_proj(x), block.v_proj(x)), [dy_h, dy_kv, dy_kv],
                     gemm_qkv),
        "lora_linear": (f"T={tokens} {H}->{H} r={r} nf4 {str(dtype)[6:]} (o_proj)",
                        lambda: block.o_proj(x), [dy_h], gemm_o),
    }

    def fused_mlp():
        from fastft.kernels.lora_mlp import lora_mlp
        from fastft.quant import fused_linear_args

        g, u, d = (fused_linear_args(m) for m in (block.gate_proj, block.up_proj, block.down_proj))
        return lambda: lora_mlp(x, g, u, d)

    def fused_qkv():
        from fastft.kernels.lora_qkv import lora_qkv
        from fastft.quant import fused_linear_args

        q, k, v = (fused_linear_args(m) for m in (block.q_proj, block.k_proj, block.v_proj))
        return lambda: lora_qkv(x, q, k, v)

    def fused_linear():
        from fastft.kernels.lora_linear import lora_linear
        from fastft.quant import fused_linear_args

        o = fused_linear_args(block.o_proj)
        return lambda: lora_linear(x, *o)

    fused = {"lora_mlp": fused_mlp, "lora_qkv": fused_qkv, "lora_linear": fused_linear}
    for op, (shape, reference, dys, flops) in cases.items():
        note = "FLOPs: frozen base GEMMs only: fwd 2*T*in*out per projection, bwd the same (dx)"

        def fastft_impl(op=op, dys=dys, flops=flops):
            fn = fused[op]()
            res = measure(bench, fn, grads, backward_arg=dys, memory=True)
            _flops(res, flops, flops, ceil["matmul_tflops"])
            return {**res, "flops_note": note}

        def peft_impl(reference=reference, dys=dys, flops=flops):
            res = measure(bench, reference, grads, backward_arg=dys, memory=True)
            _flops(res, flops, flops, ceil["matmul_tflops"])
            return {**res, "flops_note": note}

        run_case(rows, op, shape, "fastft", bench.device.type, fastft_impl)
        run_case(rows, op, shape, "peft", bench.device.type, peft_impl)


def bench_attention(bench, rows, S, ceil, dtype):
    for T in S["attn_T"]:
        _bench_attention(bench, rows, ceil, dtype, T, max(1, S["attn_tokens"] // T), S["attn_heads"], S["attn_dim"])
        _free()


def _bench_attention(bench, rows, ceil, dtype, T, B, heads, D):
    Hq, Hkv = heads
    dev = bench.device
    q = torch.randn(B, Hq, T, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, device=dev, dtype=dtype, requires_grad=True)
    do = torch.randn(B, Hq, T, D, device=dev, dtype=dtype)
    flops_f = 4 * B * Hq * T * T * D / 2  # two GEMMs (QK^T, PV), causal halves them
    flops_b = 2.5 * flops_f  # five GEMMs in the backward (recompute QK^T, dV, dP, dQ, dK)
    shape = f"B={B} T={T} Hq={Hq} Hkv={Hkv} D={D} causal {str(dtype)[6:]}"

    def fastft_impl():
        from fastft.kernels.attention import attention

        r = measure(bench, lambda: attention(q, k, v, causal=True), [q, k, v], backward_arg=[do], memory=True)
        _flops(r, flops_f, flops_b, ceil["matmul_tflops"])
        return r

    def sdpa_flash():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # k/v repeated for GQA outside the timing, as leaves (the flash backend takes Hq == Hkv)
        kr = k.detach().repeat_interleave(Hq // Hkv, dim=1).requires_grad_(True)
        vr = v.detach().repeat_interleave(Hq // Hkv, dim=1).requires_grad_(True)
        backend = SDPBackend.FLASH_ATTENTION if bench.cuda else SDPBackend.MATH

        def f():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

        r = measure(bench, f, [q, kr, vr], backward_arg=[do], memory=True)
        _flops(r, flops_f, flops_b, ceil["matmul_tflops"])
        return {**r, "note": "k/v repeated to Hq heads before the call (not timed)"
                             + ("" if bench.cuda else "; CPU dry run uses the math backend")}

    run_case(rows, "attention", shape, "fastft", dev.type, fastft_impl)
    run_case(rows, "attention", shape, "sdpa-flash", dev.type, sdpa_flash)


BENCHES = {
    "rms_norm": (bench_rms_norm, "torch-eager"),
    "rope": (bench_rope, "torch-eager"),
    "swiglu": (bench_swiglu, "torch-eager"),
    "cross_entropy": (bench_cross_entropy, "torch-eager"),
    "fused_linear_cross_entropy": (bench_flce, "torch-eager"),
    "linear_log_probs": (bench_linear_log_probs, "trl"),
    "nf4": (bench_nf4, "bitsandbytes"),
    "lora": (bench_lora, "peft"),
    "attention": (bench_attention, "sdpa-flash"),
}


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------
def markdown(data: dict) -> str:
    c = data.get("ceilings", {})
    out = []
    if data.get("cpu_dry_run"):
        out.append("# CPU DRY RUN: a check of the kernel benchmark code paths at tiny shapes, NOT figures\n")
    else:
        out.append(f"# fastft kernel micro-benchmarks: {data['gpu']}, {data['date']}\n")
    fastft = data.get("fastft") or {}
    out.append(f"- GPU: {data['gpu']}; torch {data['torch']} (CUDA {data.get('cuda')}), triton {data['triton']}, "
               f"transformers {data['transformers']}, peft {data['peft']}, bitsandbytes {data['bitsandbytes']}, "
               f"trl {data['trl']}; fastft {fastft.get('version')}, source digest {fastft.get('source_digest')}, "
               f"git commit {fastft.get('git_commit')}"
               + (" (uncommitted changes)" if fastft.get("git_dirty") else ""))
    out.append(f"- measured ceilings: copy {shared.fmt(c.get('copy_gbps'), '.0f')} GB/s ({c.get('copy_note')}); "
               f"matmul {shared.fmt(c.get('matmul_tflops'), '.0f')} TFLOP/s ({c.get('matmul_note')})")
    for i, run in enumerate(data.get("runs", [])):
        out.append(f"- run {i}: `{run['command']}` ({run['started']})")
    out.append("- times: median of `triton.testing.do_bench`; bwd = fwd+bwd - fwd; GB/s count the minimum traffic "
               "(bytes_note in the JSON); peak = max_memory_allocated during one fwd+bwd minus memory allocated "
               "before it (inputs excluded); speed-up = reference time / this time; memory ratio = this / "
               "reference")
    out.append("")
    out.append("| op | shape | impl | status | fwd ms | bwd ms | fwd+bwd ms | fwd GB/s (of copy) | fwd+bwd GB/s "
               "(of copy) | fwd TFLOP/s | fwd+bwd TFLOP/s (of matmul) | speed-up fwd / fwd+bwd | peak GiB | "
               "mem ratio |")
    out.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in data["rows"]:
        def pct(v):
            return f" ({v * 100:.0f}%)" if v is not None else ""

        gb_f = (shared.fmt(r.get("fwd_gbps"), ".0f") + pct(r.get("fwd_frac_of_copy_bw"))) if r.get("fwd_gbps") else "-"
        gb_fb = (shared.fmt(r.get("fwdbwd_gbps"), ".0f") + pct(r.get("fwdbwd_frac_of_copy_bw"))
                 if r.get("fwdbwd_gbps") else "-")
        tf_fb = (shared.fmt(r.get("fwdbwd_tflops"), ".0f") + pct(r.get("fwdbwd_frac_of_matmul"))
                 if r.get("fwdbwd_tflops") else "-")
        speed = (f"{shared.fmt(r.get('fwd_speedup'), '.2f')} / {shared.fmt(r.get('fwdbwd_speedup'), '.2f')}"
                 if r.get("vs") else "-")
        status = (r["status"] if r["status"] == "ok"
                  else f"{r['status']}: {(r.get('message') or '').splitlines()[-1][:80]}")
        out.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {status} | {shared.fmt(r.get('fwd_ms'), '.3f')} "
                   f"| {shared.fmt(r.get('bwd_ms'), '.3f')} | {shared.fmt(r.get('fwdbwd_ms'), '.3f')} "
                   f"| {gb_f} | {gb_fb} "
                   f"| {shared.fmt(r.get('fwd_tflops'), '.0f')} | {tf_fb} | {speed} "
                   f"| {shared.fmt(r.get('peak_extra_gb'), '.2f')} | {shared.fmt(r.get('peak_memory_ratio'), '.2f')} |")
    out.append("\n## Targets (from the issues)\n")
    for op, target in TARGETS.items():
        out.append(f"- **{op}**: {target}")
    return "\n".join(out) + "\n"


def build_parser():
    p = argparse.ArgumentParser(prog="bench/microbench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {', '.join(OPS)}")
    p.add_argument("--out-dir", default=None, help="default bench/results (dry run: a temp folder)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="start no further op after this many seconds (its rows: skipped)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run every benchmark's code path at tiny shapes on CPU (checks the harness; no figures)")
    return p


def main(argv=None) -> int:
    _DROPPED_FROM_PATH[:] = shared.clean_sys_path()  # before anything imports transformers
    args = build_parser().parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in BENCHES]
    if unknown:
        print(f"bench/microbench.py: unknown op(s) {unknown}; choose from {', '.join(OPS)}", file=sys.stderr)
        return 2
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("bench/microbench.py: no CUDA GPU found. Kernel micro-benchmarks need one: figures exist only when "
              "measured on a GPU (see bench/README.md); --cpu-dry-run checks the code paths on CPU.", file=sys.stderr)
        return 2
    shared.warn_dropped(_DROPPED_FROM_PATH, "bench/microbench.py")
    device = torch.device("cpu") if args.cpu_dry_run else torch.device("cuda", 0)
    bench = Bench(device, args.cpu_dry_run)
    dtype = torch.float32 if args.cpu_dry_run else (torch.bfloat16 if torch.cuda.is_bf16_supported() else
                                                    torch.float16)
    date = shared.utc_date()
    if args.cpu_dry_run:
        gpu, stem = "cpu (dry run)", f"{date}-cpu-dry-run-kernels"
        out_dir = args.out_dir or os.path.join(tempfile.gettempdir(), "fastft-bench-kernels-dry-run")
    else:
        gpu = torch.cuda.get_device_name(0)
        stem = f"{date}-{shared.slug(gpu)}-kernels"
        out_dir = args.out_dir or shared.DEFAULT_RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    header = {**shared.environment(gpu), "date": date, "command": shared.command_line(),
              "cpu_dry_run": bool(args.cpu_dry_run)}
    print(f"bench/microbench.py: {gpu}; torch {header['torch']}, triton {header['triton']}", flush=True)
    started = time.time()
    ceil = ceilings(bench)
    print(f"  ceilings: copy {ceil['copy_gbps']:.0f} GB/s, matmul {ceil['matmul_tflops']:.1f} TFLOP/s", flush=True)
    S = shapes(args.cpu_dry_run)
    rows: list[dict] = []
    for op in ops:
        fn, ref = BENCHES[op]
        start = len(rows)
        if args.time_budget_s and time.time() - started > args.time_budget_s:
            rows.append(_row(op, "-", "-", device.type, status="skipped", message="not run: --time-budget-s exhausted"))
            print(f"  {op}: skipped (time budget)", flush=True)
            continue
        try:
            fn(bench, rows, S, ceil, dtype)
        except Exception as exc:  # noqa: BLE001 - setup failure of a whole op
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]).strip()
            rows.append(_row(op, "-", "setup", device.type, status="error", message=text[-1500:]))
            print(f"  {op}: setup failed: {text.splitlines()[-1]}", flush=True)
        _compare(rows[start:], ref)
        _free()
    run_info = {"started": shared.utc_now(), "seconds": round(time.time() - started, 1), "command": header["command"],
                "ceilings": ceil, **{k: header[k] for k in ("gpu", "torch", "triton", "transformers", "peft",
                                                           "bitsandbytes", "trl", "fastft")}}
    header["ceilings"] = ceil
    json_path = os.path.join(out_dir, stem + ".json")
    data = shared.merge_results(json_path, header, run_info, rows, KEY)
    data["ceilings"] = ceil  # the latest measurement (each run's own is under runs[i].ceilings)
    shared.write_json_atomic(json_path, data)
    md_path = os.path.join(out_dir, stem + ".md")
    with open(md_path, "w") as f:
        f.write(markdown(data))
    print(f"wrote {json_path}\n      {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
