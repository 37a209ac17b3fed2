#!/usr/bin/env python3
"""Compile every fastft kernel for NVIDIA GPUs on a machine without one.

    python bench/compile_check.py                    # sm_70 (V100) ... sm_90 (H100), the model shapes below
    python bench/compile_check.py --arch 86,89       # RTX 3090 / 4090 only
    python bench/compile_check.py --arch 90 --ops attention --verbose   # one line per compiled variant

The Triton interpreter that the tests use accepts code the GPU compiler rejects, and knows nothing of a
GPU's shared memory. This runs each public op of ``fastft.kernels`` forward and backward on CPU tensors
at real model shapes, with Triton's driver replaced by a stand-in for a GPU of the chosen compute
capability: every kernel a GPU would launch is compiled by Triton's real CUDA backend (to PTX, then to
a cubin by ptxas) and checked against that GPU's shared-memory limit, as Triton checks at load time;
the launch itself does nothing (outputs are garbage, only compilation is checked). ptxas' register
count and spill bytes are reported per kernel; ``--verbose`` adds one line per compiled variant with its
constexprs, warps, stages, registers, spill store / load bytes and the tensor-core instruction shapes in its PTX
(``mma m16n8k16`` on sm_80, ``wgmma m64nNk16`` on sm_90; a narrow N or a spill is a regression to look at).

fp16 and fp32 are compiled for every architecture, bf16 only from sm_80 (fastft picks fp16 below it);
attention only from sm_80 (fastft uses SDPA below it, see ``fastft.attention``). Exit status 1 when
any kernel fails to compile or does not fit. Nothing is timed: speed needs a real GPU (bench/run.py).
Must run WITHOUT ``TRITON_INTERPRET=1`` (the interpreter would skip compilation). Not covered: Python-side
branches that fastft takes only for CUDA tensors (nf4's ``enable_fp_fusion=False`` compile option, the
lm-head ops' ``torch.mm(..., out_dtype=float32)``, rms_norm's grid from the SM count).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import traceback

# Opt-in shared memory per block (bytes) and names of the GPUs fastft's users run.
GPUS = {
    70: (98304, "V100"),
    75: (65536, "T4 / RTX 20xx"),
    80: (166912, "A100"),
    86: (101376, "RTX 3090 / A10"),
    89: (101376, "RTX 4090 / L4"),
    90: (232448, "H100 / H200"),
}
# (hidden, intermediate, heads, kv heads, head dim, vocab) of the models fastft targets.
MODELS = {
    "llama3-8b": (4096, 14336, 32, 8, 128, 128256),
    "qwen2-7b": (3584, 18944, 28, 4, 128, 152064),
    "qwen2-0.5b": (896, 4864, 14, 2, 64, 151936),
    "gemma2-9b": (3584, 14336, 16, 8, 256, 256000),  # head size 256, soft-capped attention and logits, GeGLU
}
# batch, sequence: small and odd. Tile sizes depend on the model dims, not on the token count; the ops whose
# CPU-side matmuls (LoRA, lm head) would make this slow get fewer tokens.
TOKENS = (2, 37)
MATMUL_TOKENS = (1, 5)


class _FakeUtils:
    def __init__(self, max_shared_mem: int):
        self.max_shared_mem = max_shared_mem

    def get_device_properties(self, device):
        return {"max_shared_mem": self.max_shared_mem, "multiprocessor_count": 108, "max_num_regs": 65536,
                "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return object(), object(), 0, 0, 1024  # module, function, n_regs, n_spills, max threads


class FakeGPUDriver:
    """The part of Triton's driver interface that compiling and 'launching' a kernel touches."""

    def __init__(self, arch: int, max_shared_mem: int):
        self.arch, self.utils = arch, _FakeUtils(max_shared_mem)

    def get_current_device(self):
        return self.arch  # device ids key Triton's per-device caches: one per architecture

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def launcher_cls(self, src, metadata):
        return lambda *args, **kwargs: None  # launching does nothing


KERNEL_MODULES = ("attention", "cross_entropy", "fused_linear_cross_entropy", "linear_log_probs", "lora_dropout",
                  "lora_linear", "lora_mlp", "lora_qkv", "moe_experts", "moe_grouped_gemm", "nf4", "rms_norm", "rope",
                  "swiglu", "vocab_rows")


def _force_triton_engine():
    """CPU tensors take the Triton path (fastft would pick its PyTorch path for them)."""
    import fastft.kernels._common as common

    for name in KERNEL_MODULES:
        module = importlib.import_module(f"fastft.kernels.{name}")
        if hasattr(module, "use_triton"):
            module.use_triton = lambda tensor, op: True
    assert not common.INTERPRET


def _nf4(out_features, in_features, dtype):
    import torch

    from fastft.kernels import NF4Weight

    n = out_features * in_features
    blocks = -(-n // 64)
    return NF4Weight(packed=torch.randint(0, 256, (-(-n // 2),), dtype=torch.uint8),
                     absmax=torch.randint(0, 256, (blocks,), dtype=torch.uint8), code=torch.randn(16),
                     blocksize=64, shape=(out_features, in_features), dtype=dtype,
                     nested_absmax=torch.rand(-(-blocks // 256)), nested_code=torch.randn(256), nested_blocksize=256,
                     offset=torch.zeros(1))


def _lora_args(out_features, in_features, dtype, r=16):
    import torch

    A = torch.randn(r, in_features, dtype=dtype, requires_grad=True)
    B = torch.randn(out_features, r, dtype=dtype, requires_grad=True)
    return (_nf4(out_features, in_features, dtype), None, A, B, 2.0)


def _moe_experts(hidden, inter, dtype, nf4: bool, experts=8, top_k=2, r=16):
    """The expert op forward and backward, LoRA on both projections: every grouped-GEMM variant (row gather, LoRA,
    kept LoRA product, forward and transposed weight access) on NF4 (double-quantized) or dense experts an eighth of
    the model's MLP wide (Qwen3-30B-A3B's are 768 of a dense 6144); 8 tokens top-2 (tiles do not depend on the
    token count)."""
    import torch

    from fastft.kernels.moe_experts import ExpertLora, NF4Experts, moe_experts

    def weights(out_features, in_features):
        if not nf4:
            return torch.randn(experts, out_features, in_features, dtype=dtype)
        w = [_nf4(out_features, in_features, dtype) for _ in range(experts)]
        return NF4Experts(packed=torch.stack([e.packed for e in w]), absmax=torch.stack([e.absmax for e in w]),
                          nested_absmax=torch.stack([e.nested_absmax for e in w]),
                          offset=torch.cat([e.offset for e in w]), code=w[0].code, nested_code=w[0].nested_code,
                          blocksize=64, nested_blocksize=256, shape=(out_features, in_features), dtype=dtype)

    def lora(out_features, in_features):
        return ExpertLora(torch.randn(experts, r, in_features, dtype=dtype, requires_grad=True),
                          torch.randn(experts, out_features, r, dtype=dtype, requires_grad=True), 2.0)

    tokens = 8
    x = torch.randn(tokens, hidden, dtype=dtype, requires_grad=True)
    index = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    top_k_weights = torch.rand(tokens, top_k, requires_grad=True)
    out = moe_experts(x, index, top_k_weights, weights(2 * inter, hidden), weights(hidden, inter),
                      lora(2 * inter, hidden), lora(hidden, inter))
    out.backward(torch.ones_like(out))


def _lora_dropout_launches(in_features, dtype):
    """The kernels of lora_dropout.py launched directly (no CPU matmul around them): few tokens (dA in one
    pass, written in the adapter dtype) and 300 tokens (dA in token splits, fp32 partial sums); r = 8 and 64."""
    import torch

    from fastft.kernels.lora_dropout import (
        DropoutMask,
        dropout_lora_a,
        dropout_lora_grad_a,
        dropout_lora_grad_x_,
        dropout_mask,
    )

    mask = DropoutMask(0.05, 2**40 + 7, row0=3)
    for tokens, r in ((5, 8), (300, 64)):
        x = torch.randn(tokens, in_features, dtype=dtype)
        A = torch.randn(r, in_features, dtype=dtype)
        dyB = torch.randn(tokens, r, dtype=dtype)
        dropout_lora_a(x, A, mask)
        dropout_lora_grad_a(dyB, x, mask, 2.0)
        dropout_lora_grad_x_(x, dyB, A, mask, 2.0)
    dropout_mask(mask, (5, in_features), "cpu", engine="triton")


def ops(model: str, dtype, with_attention: bool):
    """(name, thunk) pairs; each thunk runs one op forward and backward."""
    import torch

    from fastft import kernels as K

    hidden, inter, heads, kv_heads, head_dim, vocab = MODELS[model]
    rotary = head_dim * 3 // 4
    B, T = TOKENS
    N = B * T
    b, n = MATMUL_TOKENS

    def t(*shape, grad=True, dt=dtype):
        return torch.randn(*shape, dtype=dt, requires_grad=grad)

    def backward(*outputs):
        torch.autograd.backward([o for o in outputs], [torch.ones_like(o) for o in outputs])

    labels = torch.randint(0, vocab, (N,))
    labels[::5] = -100
    few_labels = labels[: b * n]
    cases = [
        ("rms_norm", lambda: backward(K.rms_norm(t(B, T, hidden), t(hidden), eps=1e-5))),
        ("apply_rope", lambda: backward(*K.apply_rope(t(B, heads, T, head_dim), t(B, kv_heads, T, head_dim),
                                                      t(1, T, head_dim, grad=False), t(1, T, head_dim, grad=False)))),
        # Phi-4-mini's partial rotary: the first 3/4 of each head rotated (96 of 128 dims), the rest passed through
        ("apply_rope partial_rotary", lambda: backward(*K.apply_rope(
            t(B, heads, T, head_dim), t(B, kv_heads, T, head_dim),
            t(1, T, rotary, grad=False), t(1, T, rotary, grad=False)))),
        ("swiglu", lambda: backward(K.swiglu(t(B, T, inter), t(B, T, inter)))),
        ("cross_entropy", lambda: backward(K.cross_entropy(t(N, vocab), labels))),
        ("dequantize_nf4", lambda: K.dequantize_nf4(_nf4(inter, hidden, dtype))),
        ("lora_linear", lambda: backward(K.lora_linear(t(b, n, hidden), *_lora_args(hidden, hidden, dtype)))),
        ("lora_qkv", lambda: backward(*K.lora_qkv(t(b, n, hidden), _lora_args(heads * head_dim, hidden, dtype),
                                                  _lora_args(kv_heads * head_dim, hidden, dtype),
                                                  _lora_args(kv_heads * head_dim, hidden, dtype)))),
        ("lora_mlp", lambda: backward(K.lora_mlp(t(b, n, hidden), _lora_args(inter, hidden, dtype),
                                                 _lora_args(inter, hidden, dtype), _lora_args(hidden, inter, dtype)))),
        # Phi-3's MLP: one LoRA on the fused [2I, H] gate_up weight, SwiGLU over the strided halves of its output
        ("lora_mlp_gate_up", lambda: backward(K.lora_mlp_gate_up(t(b, n, hidden), _lora_args(2 * inter, hidden, dtype),
                                                                 _lora_args(hidden, inter, dtype)))),
        ("lora_linear lora_dropout", lambda: backward(K.lora_linear(t(b, n, hidden), *_lora_args(hidden, hidden, dtype),
                                                                     None, 0.05))),
        ("lora_dropout", lambda: _lora_dropout_launches(hidden, dtype)),
        ("moe_experts", lambda: _moe_experts(hidden, inter // 8, dtype, nf4=True)),
        ("moe_experts dense", lambda: _moe_experts(hidden, inter // 8, dtype, nf4=False)),
    ]
    if model == "qwen2-0.5b":  # the lm-head ops at one vocabulary size: their tiles depend on hidden and vocab
        cases += [
            ("fused_linear_cross_entropy", lambda: backward(K.fused_linear_cross_entropy(
                t(b * n, hidden), t(vocab, hidden), few_labels))),
            ("linear_log_probs", lambda: backward(*K.linear_log_probs(
                t(b * n, hidden), t(vocab, hidden), few_labels,
                outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))[:2])),
        ]
    if head_dim == 256:  # Gemma's flags: (1 + w) norm, GeGLU, soft-capped logits
        cases += [
            ("rms_norm unit_offset", lambda: backward(K.rms_norm(t(B, T, hidden), t(hidden), eps=1e-6,
                                                                 unit_offset=True))),
            ("swiglu gelu_tanh", lambda: backward(K.swiglu(t(B, T, inter), t(B, T, inter), "gelu_tanh"))),
            ("lora_mlp gelu_tanh", lambda: backward(K.lora_mlp(
                t(b, n, hidden), _lora_args(inter, hidden, dtype), _lora_args(inter, hidden, dtype),
                _lora_args(hidden, inter, dtype), activation="gelu_tanh"))),
            ("cross_entropy softcap", lambda: backward(K.cross_entropy(t(N, vocab), labels, softcap=30.0))),
            ("fused_linear_cross_entropy softcap", lambda: backward(K.fused_linear_cross_entropy(
                t(b * n, hidden), t(vocab, hidden), few_labels, softcap=30.0))),
            ("linear_log_probs softcap", lambda: backward(K.linear_log_probs(
                t(b * n, hidden), t(vocab, hidden, grad=False), few_labels, softcap=30.0))),  # frozen head
        ]
    if with_attention:
        cu = torch.tensor([0, 5, 30, N], dtype=torch.int32)  # sequences of 5, 25 and N - 30 tokens
        cases += [
            ("attention", lambda: backward(K.attention(t(B, heads, T, head_dim), t(B, kv_heads, T, head_dim),
                                                       t(B, kv_heads, T, head_dim)))),
            ("attention sliding_window", lambda: backward(K.attention(
                t(B, heads, T, head_dim), t(B, kv_heads, T, head_dim), t(B, kv_heads, T, head_dim),
                sliding_window=16))),
            ("attention_varlen", lambda: backward(K.attention_varlen(
                t(N, heads, head_dim), t(N, kv_heads, head_dim), t(N, kv_heads, head_dim), cu, max(25, N - 30)))),
        ]
        if head_dim == 256:  # Gemma 2: soft-capped scores
            cases += [
                ("attention softcap", lambda: backward(K.attention(
                    t(B, heads, T, head_dim), t(B, kv_heads, T, head_dim), t(B, kv_heads, T, head_dim),
                    scale=head_dim ** -0.5, softcap=50.0))),
                ("attention_varlen softcap sliding_window", lambda: backward(K.attention_varlen(
                    t(N, heads, head_dim), t(N, kv_heads, head_dim), t(N, kv_heads, head_dim), cu, max(25, N - 30),
                    sliding_window=16, softcap=50.0))),
            ]
    return cases


def ptxas_usage(kernel, arch: int) -> tuple[int, int, int] | None:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` on the kernel's PTX; None when it
    cannot tell."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptx = kernel.asm.get("ptx")
    if ptx is None:
        return None
    ptxas = get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        result = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                                capture_output=True, text=True)
    regs = re.findall(r"Used (\d+) registers", result.stderr)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    if not regs or not spills:
        return None
    return max(map(int, regs)), max(int(s) for s, _ in spills), max(int(s) for _, s in spills)


# Tensor-core instructions in Triton's PTX: mma.sync (sm_80+: m16n8k16 for 16-bit inputs, m16n8k8 for tf32) and
# Hopper's warpgroup wgmma.mma_async (m64nNk16, N up to 256: a narrow N means many small instructions).
_MMA = re.compile(r"^\s*(wgmma\.mma_async|mma)\.sync\.aligned\.(m\d+n\d+k\d+)\.(?:row\.col\.)?f32\.(\w+)\.",
                  re.MULTILINE)


def mma_shapes(kernel) -> dict[str, int]:
    """``{"wgmma m64n64k16 bf16": count, ...}``: the tensor-core instructions in the kernel's PTX (static
    counts: loops are counted once per unrolled copy); empty when the dots run on CUDA cores."""
    counts: dict[str, int] = {}
    for op, shape, dtype in _MMA.findall(kernel.asm.get("ptx") or ""):
        key = f"{op.split('.')[0]} {shape} {dtype}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def compiled_kernels(arch: int):
    """``{kernel name: [CompiledKernel, ...]}`` from the Triton caches of fastft's kernel modules for ``arch``."""
    import triton

    found = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"fastft.kernels.{name}")
        for attr, fn in vars(module).items():
            if isinstance(fn, triton.runtime.JITFunction) and arch in fn.device_caches:
                found[f"{name}.{attr}"] = list(fn.device_caches[arch][0].values())
    return {name: kernels for name, kernels in found.items() if kernels}


def check(arch: int, models, dtypes, verbose: bool = False, max_shared_kib: int | None = None,
          only: str | None = None) -> list[str]:
    import torch
    from triton.runtime.driver import driver

    import fastft.kernels._common as common

    failures = []
    smem, gpu = GPUS[arch]
    if max_shared_kib is not None:
        smem, gpu = max_shared_kib * 1024, f"{gpu} with the shared memory limit overridden"
    driver.set_active(FakeGPUDriver(arch, smem))
    with common.gpu_simulation(compute_capability=arch):  # launchers that pick tiles per architecture read it
        print(f"== sm_{arch} ({gpu}, {smem // 1024} KiB shared memory per block)", flush=True)
        for model in models:
            for dtype in dtypes:
                if dtype == torch.bfloat16 and arch < 80:
                    continue
                for name, run in ops(model, dtype, with_attention=arch >= 80):
                    if only is not None and not any(name.startswith(prefix) for prefix in only.split(",")):
                        continue
                    label = f"{model} {str(dtype).replace('torch.', '')} {name}"
                    try:
                        run()
                    except Exception as exc:  # a compile error or OutOfResources: report, go on
                        failures.append(f"sm_{arch} {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                        print(f"  FAIL {label}: {type(exc).__name__}: {exc}"[:2000], flush=True)
                        if os.environ.get("FASTFT_COMPILE_CHECK_TRACE"):
                            traceback.print_exc()
    for name, kernels in sorted(compiled_kernels(arch).items()):
        shared = max(k.metadata.shared for k in kernels)
        usage = [ptxas_usage(k, arch) for k in kernels]
        regs = max((u[0] for u in usage if u), default=None)
        spilled = max((u[1] + u[2] for u in usage if u), default=None)
        print(f"  {name:45s} {len(kernels):3d} variants, shared memory <= {shared / 1024:5.1f} KiB"
              + (f", <= {regs} registers, <= {spilled} B spilled" if regs is not None else ""))
        if verbose:
            # one line per variant, e.g. "... 8 warps ...: shared 48.0 KiB, 168 registers, spill stores 0 B,
            # spill loads 0 B, wgmma m64n64k16 bf16 x16": greppable facts for regressions
            for kernel, use in zip(kernels, usage):
                mma = ", ".join(f"{key} x{n}" for key, n in mma_shapes(kernel).items()) or "no mma"
                print(f"      {name} {describe(kernel)}: shared {kernel.metadata.shared / 1024:.1f} KiB"
                      + (f", {use[0]} registers, spill stores {use[1]} B, spill loads {use[2]} B" if use else "")
                      + f", {mma}")
    return failures


def describe(kernel) -> str:
    """A compiled variant's pointer dtypes and tl.constexpr values, num_warps and num_stages."""
    src = kernel.src
    names = src.fn.arg_names
    constants = {names[path[0]]: value for path, value in src.constants.items() if len(path) == 1}
    dtypes = sorted({ty for ty in src.signature.values() if isinstance(ty, str) and ty[:3] in ("*fp", "*bf")})
    shown = ", ".join(f"{k}={v}" for k, v in constants.items() if k.isupper())
    return f"{'/'.join(dtypes)} {shown} warps={kernel.metadata.num_warps} stages={kernel.metadata.num_stages}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=",".join(map(str, GPUS)), help="compute capabilities, e.g. 80,86,90")
    parser.add_argument("--models", default=",".join(MODELS), help=f"any of {','.join(MODELS)}")
    parser.add_argument("--dtypes", default="float16,bfloat16,float32")
    parser.add_argument("--verbose", action="store_true",
                        help="one line per compiled variant: tiles, warps, registers, spills, mma/wgmma shapes")
    parser.add_argument("--ops", help="only the ops whose names start with one of these, e.g. attention,rms_norm")
    parser.add_argument("--max-shared-kib", type=int, help="pretend the GPU has this much shared memory per block")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("run without TRITON_INTERPRET=1: the interpreter compiles nothing")
    import torch

    _force_triton_engine()
    torch.manual_seed(0)
    archs = [int(a) for a in args.arch.split(",")]
    unknown = [a for a in archs if a not in GPUS]
    if unknown:
        parser.error(f"unknown compute capability {unknown}; known: {sorted(GPUS)}")
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    failures = []
    for arch in archs:
        failures += check(arch, args.models.split(","), dtypes, args.verbose, args.max_shared_kib, args.ops)
    print(f"\n{len(failures)} failure(s)" + "".join(f"\n  {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
