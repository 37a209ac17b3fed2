"""Every kernel compiles for real GPUs: Triton's CUDA backend and ptxas, no GPU needed (bench/compile_check.py).

The interpreter the other tests use accepts code the GPU compiler rejects and has no shared-memory limit;
this compiles what a GPU would launch, at real model shapes, for an RTX 3090/4090 class GPU (sm_86: the
least shared memory of the GPUs fastft serves attention on), an H100 (sm_90) and a V100 (sm_70, fp16,
no fastft attention there), and checks each kernel fits that GPU's shared memory.
"""
import os
import re
import subprocess
import sys

import pytest
from kernel_testing import env_without_interpreter

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "compile_check.py")


def compile_check(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          env=env_without_interpreter(), cwd="/", timeout=1800)


@pytest.mark.parametrize("arch, dtypes", [("86", "bfloat16,float16"), ("90", "bfloat16,float32"),
                                          ("70", "float16")])
def test_every_kernel_compiles_and_fits(arch, dtypes):
    result = compile_check("--arch", arch, "--models", "llama3-8b,qwen2-0.5b", "--dtypes", dtypes)
    assert result.returncode == 0 and "\n0 failure(s)" in result.stdout, result.stdout[-4000:] + result.stderr[-4000:]
    expected = ["rms_norm._rms_norm_bwd_kernel", "rope._rope_kernel", "swiglu._swiglu_bwd_kernel",
                "vocab_rows._fwd_kernel", "vocab_rows._bwd_kernel", "nf4._nf4_dequant_kernel",
                "moe_grouped_gemm._grouped_gemm_kernel", "moe_grouped_gemm._grouped_lora_grad_kernel"]
    if arch != "70":
        expected += ["attention._attn_fwd_kernel", "attention._attn_bwd_dkdv_kernel", "attention._attn_bwd_dq_kernel"]
    for kernel in expected:  # compiled (the line is printed from Triton's cache) and measured by ptxas
        assert any(line.split()[:1] == [kernel] and "registers" in line for line in result.stdout.splitlines()), \
            f"{kernel} was not compiled for sm_{arch}:\n{result.stdout[-4000:]}"


# a --verbose variant line: "      <kernel> <dtypes> <constexprs> warps=W stages=S: shared X KiB, R registers,
# spill stores A B, spill loads B B, <mma shapes or 'no mma'>"
VARIANT = re.compile(r"^\s+(\S+) (.*) warps=(\d+) stages=(\d+): shared [\d.]+ KiB, (\d+) registers, "
                     r"spill stores (\d+) B, spill loads (\d+) B, (.+)$")


def verbose_variants(stdout: str, kernel: str) -> list[dict]:
    """The --verbose lines of one kernel, parsed: constexprs, warps, stages, registers, spills, mma shapes."""
    variants = []
    for line in stdout.splitlines():
        match = VARIANT.match(line)
        if match and match[1] == kernel:
            constexprs = dict(re.findall(r"([A-Z_]+)=(\w+)", match[2]))
            mma = {} if match[8] == "no mma" else {
                shape: int(n) for shape, n in re.findall(r"((?:wgmma|mma) m\d+n\d+k\d+ \w+) x(\d+)", match[8])}
            variants.append(dict(constexprs=constexprs, warps=int(match[3]), stages=int(match[4]),
                                 registers=int(match[5]), spill_stores=int(match[6]), spill_loads=int(match[7]),
                                 mma=mma))
    return variants


def test_verbose_reports_mma_shapes_registers_and_spills():
    result = compile_check("--arch", "80", "--models", "qwen2-0.5b", "--dtypes", "bfloat16,float32",
                           "--ops", "attention", "--verbose")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    fwd = verbose_variants(result.stdout, "attention._attn_fwd_kernel")
    # causal, sliding window and varlen, each in bf16 and fp32: six compiled variants, each with a parsed line
    assert len(fwd) == 6, result.stdout[-4000:]
    for variant in fwd:
        assert 0 < variant["registers"] <= 255 and variant["constexprs"]["HEAD_DIM"] == "64"
        if variant["constexprs"]["DOT_PRECISION"] == "tf32":  # bf16 inputs: Ampere's mma.sync on tensor cores
            assert set(variant["mma"]) == {"mma m16n8k16 bf16"} and variant["mma"]["mma m16n8k16 bf16"] >= 8
        else:  # fp32 inputs take exact fp32 products on CUDA cores: no tensor-core instruction at all
            assert variant["mma"] == {}
    # the per-kernel summary's spill bound is the worst variant's stores + loads
    summary = re.search(r"attention\._attn_fwd_kernel +6 variants, .*, <= (\d+) registers, <= (\d+) B spilled",
                        result.stdout)
    assert summary, result.stdout[-4000:]
    assert int(summary[1]) == max(v["registers"] for v in fwd)
    assert int(summary[2]) == max(v["spill_stores"] + v["spill_loads"] for v in fwd)
    # and --ops kept the other ops out
    assert "rms_norm." not in result.stdout and "attention._attn_bwd_dq_kernel" in result.stdout


def test_phi_variants_compile_with_their_constexprs():
    """Phi-4-mini's partial rotary (96 of 128 dims rotated, 32 passed through: a variant of the RoPE kernel of its own)
    and Phi-3's fused gate/up MLP (SwiGLU over the strided halves of the gate_up output) compile for an H100."""
    result = compile_check("--arch", "90", "--models", "llama3-8b", "--dtypes", "bfloat16",
                           "--ops", "apply_rope partial_rotary,lora_mlp_gate_up", "--verbose")
    assert result.returncode == 0 and "\n0 failure(s)" in result.stdout, result.stdout[-4000:] + result.stderr[-4000:]
    rope = verbose_variants(result.stdout, "rope._rope_kernel")
    assert {(v["constexprs"]["HALF_D"], v["constexprs"]["PASS_D"], v["constexprs"]["BACKWARD"]) for v in rope} == {
        ("48", "32", "False"), ("48", "32", "True")}, rope
    assert all(v["spill_stores"] == v["spill_loads"] == 0 for v in rope)
    for kernel in ("swiglu._swiglu_fwd_kernel", "swiglu._swiglu_bwd_kernel", "nf4._nf4_dequant_kernel"):
        assert verbose_variants(result.stdout, kernel), f"{kernel} was not compiled:\n{result.stdout[-4000:]}"


ATTENTION_KERNELS = {"fwd": "attention._attn_fwd_kernel", "dkdv": "attention._attn_bwd_dkdv_kernel",
                     "dq": "attention._attn_bwd_dq_kernel"}


@pytest.mark.parametrize("arch", [80, 90])
def test_attention_compiles_with_its_architectures_tiles(arch):
    """The launcher hands each architecture its entry of attention's tile table (compile_check tells fastft which
    GPU it compiles for), and Hopper's entries compile spill-free with wide wgmma shapes."""
    import torch

    from fastft.kernels.attention import _tile_config

    result = compile_check("--arch", str(arch), "--models", "llama3-8b,qwen2-0.5b", "--dtypes", "bfloat16,float16",
                           "--ops", "attention", "--verbose")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for kernel, name in ATTENTION_KERNELS.items():
        variants = verbose_variants(result.stdout, name)
        assert len(variants) == 12, f"{name}: {len(variants)} variants"  # D 64/128 x bf16/fp16 x causal/window/varlen
        for variant in variants:
            head_dim = int(variant["constexprs"]["HEAD_DIM"])
            entry = _tile_config(arch, head_dim, kernel, torch.bfloat16)
            compiled = dict(BLOCK_M=int(variant["constexprs"]["BLOCK_M"]), num_warps=variant["warps"],
                            BLOCK_N=int(variant["constexprs"]["BLOCK_N"]), num_stages=variant["stages"])
            assert compiled == {key: entry[key] for key in compiled}, (name, head_dim, compiled, entry)
            shapes = set(variant["mma"])
            if arch == 80:
                assert shapes and all(shape.startswith("mma m16n8k16") for shape in shapes), (name, shapes)
                continue
            assert variant["spill_stores"] == variant["spill_loads"] == 0, (name, variant)
            assert shapes and all(shape.startswith("wgmma m64n") for shape in shapes), (name, shapes)
            widths = {int(shape.split("n")[1].split("k")[0]) for shape in shapes}
            if kernel == "dq":  # 128 x 64 tiles, 8 warps: no m64n32 / m64n16 left
                assert min(widths) >= 64, (name, head_dim, shapes)
            if kernel == "dkdv" and head_dim == 128:  # dK and dV accumulate in m64n128 (was m64n64)
                assert 128 in widths, (name, head_dim, shapes)


def test_attention_tile_table_entries_per_architecture():
    import torch

    from fastft.kernels.attention import _TILES, _tile_config

    # Hopper has its own row; every other architecture (Blackwell included: not compile-checked) takes sm_80's
    for capability, row in ((70, 80), (75, 80), (80, 80), (86, 80), (89, 80), (90, 90), (100, 80), (120, 80)):
        for kernel in ("fwd", "dkdv", "dq"):
            # head dims run in power-of-two tiles; those up to 64 share the 64 column
            for head_dim, block_d, column in ((16, 16, 64), (64, 64, 64), (80, 128, 128), (128, 128, 128),
                                              (256, 256, 256)):
                for dtype in (torch.float16, torch.bfloat16):
                    cfg = _tile_config(capability, head_dim, kernel, dtype)
                    assert cfg["BLOCK_D"] == block_d
                    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]) == \
                        _TILES[row][kernel][column], (capability, kernel, head_dim)
    # the rows really differ where compile_check found better tiles for Hopper
    assert _tile_config(90, 128, "dq", torch.bfloat16)["BLOCK_M"] == 128
    assert _tile_config(80, 128, "dq", torch.bfloat16)["BLOCK_M"] == 64
    assert _tile_config(90, 128, "dkdv", torch.float16)["BLOCK_N"] == 128
    # fp32 inputs (CUDA-core products) take 32 x 32 tiles on every architecture; one stage at D=256 (shared memory)
    for capability in (80, 90):
        assert {_tile_config(capability, 64, k, torch.float32)["BLOCK_M"] for k in ("fwd", "dkdv", "dq")} == {32}
        assert _tile_config(capability, 256, "fwd", torch.float32)["num_stages"] == 1


def test_a_kernel_that_does_not_fit_fails_the_check():
    result = compile_check("--arch", "90", "--models", "qwen2-0.5b", "--dtypes", "bfloat16", "--max-shared-kib", "16")
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-4000:]
    assert "OutOfResources" in result.stdout and "attention" in result.stdout


def test_refuses_to_run_under_the_interpreter():
    result = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, cwd="/",
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 2 and "run without TRITON_INTERPRET=1" in result.stderr


@pytest.mark.parametrize("arch", [80, 90])
def test_attention_head_256_compiles_spill_free_with_its_tiles(arch):
    """Gemma's head size 256 (Gemma 2 2B/9B, Gemma 3 1B-12B), with and without the soft-capped scores of Gemma 2:
    each kernel compiles with its architecture's D=256 entry of the tile table, within shared memory (the sm_80 row
    also serves sm_86/89's 99 KiB: test_every_kernel_compiles_and_fits), with no register spills, on tensor cores."""
    import torch

    from fastft.kernels.attention import _tile_config

    result = compile_check("--arch", str(arch), "--models", "gemma2-9b", "--dtypes", "bfloat16", "--ops", "attention",
                           "--verbose")
    assert result.returncode == 0 and "\n0 failure(s)" in result.stdout, result.stdout[-4000:] + result.stderr[-4000:]
    for kernel, name in ATTENTION_KERNELS.items():
        variants = verbose_variants(result.stdout, name)
        # causal, sliding window, varlen, and the soft-capped causal and varlen + window
        assert len(variants) == 5 and {v["constexprs"]["SOFTCAP"] for v in variants} == {"True", "False"}, name
        entry = _tile_config(arch, 256, kernel, torch.bfloat16)
        for variant in variants:
            assert variant["constexprs"]["HEAD_DIM"] == "256"
            compiled = dict(BLOCK_M=int(variant["constexprs"]["BLOCK_M"]), num_warps=variant["warps"],
                            BLOCK_N=int(variant["constexprs"]["BLOCK_N"]), num_stages=variant["stages"])
            assert compiled == {key: entry[key] for key in compiled}, (name, compiled, entry)
            assert variant["spill_stores"] == variant["spill_loads"] == 0, (name, variant)
            assert variant["mma"], (name, variant)  # tensor cores (mma.sync on sm_80, wgmma or mma.sync on sm_90)
