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

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "compile_check.py")


def compile_check(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, cwd="/",
                          timeout=1800)


@pytest.mark.parametrize("arch, dtypes", [("86", "bfloat16,float16"), ("90", "bfloat16,float32"),
                                          ("70", "float16")])
def test_every_kernel_compiles_and_fits(arch, dtypes):
    result = compile_check("--arch", arch, "--models", "llama3-8b,qwen2-0.5b", "--dtypes", dtypes)
    assert result.returncode == 0 and "\n0 failure(s)" in result.stdout, result.stdout[-4000:] + result.stderr[-4000:]
    expected = ["rms_norm._rms_norm_bwd_kernel", "rope._rope_kernel", "swiglu._swiglu_bwd_kernel",
                "cross_entropy._ce_bwd_kernel", "linear_log_probs._bwd_kernel", "nf4._nf4_dequant_kernel"]
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


def test_a_kernel_that_does_not_fit_fails_the_check():
    result = compile_check("--arch", "90", "--models", "qwen2-0.5b", "--dtypes", "bfloat16", "--max-shared-kib", "16")
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-4000:]
    assert "OutOfResources" in result.stdout and "attention" in result.stdout


def test_refuses_to_run_under_the_interpreter():
    result = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, cwd="/",
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 2 and "run without TRITON_INTERPRET=1" in result.stderr
