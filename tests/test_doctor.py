"""fastft-doctor (fastft/doctor/) on the CPU: the report of every section, a broken kernel caught and named with its
switch, and the pieces its verdicts rest on (comparisons, tolerances, tested versions, peak bandwidth).

The quick run (sections 1-2) is the command a user types, in a subprocess, in Triton's interpreter; sections 3-4 run
in a subprocess without the interpreter (fastft's PyTorch engine: the interpreter would take minutes to train), and
section 5 in-process in the interpreter (its measured step must take the GPU code path).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from kernel_testing import assert_help_documents, env_without_interpreter, script_help

import fastft.kernels
from fastft.doctor import cli, environment, numerics, speed
from fastft.doctor.references import EPS
from fastft.kernels._common import DISABLE_ENV, KERNEL_NAMES

REPO = Path(__file__).resolve().parent.parent
DOCTOR = Path(sys.executable).parent / "fastft-doctor"  # the console script pip installed beside this Python
PUBLIC_OPS = sorted(set(fastft.kernels.__all__) - {"NF4Weight", "use_engine", "disabled", "KERNEL_NAMES",
                                                   "KERNEL_GROUPS"})
DTYPES = {"float32", "float16", "bfloat16"}


def _doctor(args, tmp_path, env=None):
    out = subprocess.run([str(DOCTOR), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    return out.returncode, out.stdout, out.stderr


def _finite_positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_quick_run_in_the_interpreter_checks_every_op_in_every_dtype(tmp_path):
    path = tmp_path / "doctor.json"
    code, out, err = _doctor(["--quick", "--json", str(path)], tmp_path)  # TRITON_INTERPRET=1 from conftest
    assert code == 0, out[-4000:] + err[-3000:]
    assert "every check passed (environment, numerics)" in out and "Triton kernels, interpreted" in out
    report = json.loads(path.read_text())
    assert report["exit_code"] == 0 and report["failures"] == [] and report["sections_run"] == ["environment",
                                                                                                 "numerics"]
    assert report["command"] == f"fastft-doctor --quick --json {path}" and report["date"].startswith("20")
    env = report["sections"]["environment"]
    versions = {row["library"]: row for row in env["libraries"]}
    assert versions["torch"]["installed"] == torch.__version__ and versions["triton"]["verdict"] == "tested"
    assert env["device"]["type"] == "cpu" and env["bitsandbytes"]["ok"] is True
    assert env["choices"]["dtype_none"] == "float32" and env["choices"]["attention_routes"]["128"]["attention"]
    rows = report["sections"]["numerics"]["rows"]
    assert {row["op"] for row in rows} == set(PUBLIC_OPS)
    for op in PUBLIC_OPS:
        assert {row["dtype"] for row in rows if row["op"] == op} == DTYPES, op
    for row in rows:
        assert row["status"] == "pass", row
        assert row["switch"] in KERNEL_NAMES and 0 <= row["error"] <= row["tolerance"] < 0.2, row
        assert row["first_call_s"] >= 0 and len(row["tensors"]) >= 1
    switches = {row["switch"] for row in rows}
    assert switches == set(KERNEL_NAMES)  # every kernel a user can switch off is checked


def test_a_broken_kernel_fails_and_the_last_lines_name_its_switch(tmp_path, monkeypatch, capsys):
    """rms_norm returns a value 10% off (beyond even bf16 tolerances), swiglu raises as a failed compilation would:
    both FAIL with their reasons, the doctor goes on, exits 1 and ends with the switches that route the two around."""
    real_rms_norm = numerics.rms_norm

    def ten_percent_off(x, w, eps, **flags):  # (flags: Gemma's unit_offset)
        return real_rms_norm(x, w, eps, **flags) * 1.1

    def compile_error(gate, up, activation="silu"):
        raise RuntimeError("triton compilation failed: out of resources: shared memory")

    monkeypatch.setattr(numerics, "rms_norm", ten_percent_off)
    monkeypatch.setattr(numerics, "swiglu", compile_error)
    path = tmp_path / "doctor.json"
    code = cli.main(["--sections", "numerics", "--ops", "rms_norm,swiglu,rope", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 1
    last = out.strip().splitlines()[-8:]
    assert "  environment:  FASTFT_DISABLE_KERNELS=rms_norm,swiglu" in last, "\n".join(last)
    assert "  Python:       FastModel.from_pretrained(..., disable_kernels=['rms_norm', 'swiglu'])" in last
    report = json.loads(path.read_text())
    rows = report["sections"]["numerics"]["rows"]
    by_op = {op: [r for r in rows if r["op"] == op] for op in ("rms_norm", "swiglu", "apply_rope")}
    assert all(r["status"] == "FAIL" and "> tolerance" in r["problem"] for r in by_op["rms_norm"])
    assert all(r["status"] == "FAIL" and "out of resources" in r["exception"] for r in by_op["swiglu"])
    assert all(r["status"] == "pass" for r in by_op["apply_rope"])  # checked after the failures
    assert report["disable_kernels"] == ["rms_norm", "swiglu"] and report["exit_code"] == 1
    assert "versions" in report and report["versions"]["device"]["type"] == "cpu"


def test_with_the_disable_switch_set_the_doctor_checks_the_kernels_and_says_so(tmp_path, monkeypatch, capsys):
    """FASTFT_DISABLE_KERNELS=rms_norm,attention: the doctor reports what training would route where, then checks the
    Triton kernels themselves (here one broken on purpose, its PyTorch engine right: FAIL), with the variable unset
    in every section (parity and memory build patched models, which would honour it)."""
    rms_norm_module = importlib.import_module("fastft.kernels.rms_norm")
    real = rms_norm_module._RMSNormFunction
    monkeypatch.setattr(rms_norm_module, "_RMSNormFunction",
                        SimpleNamespace(apply=lambda *args: real.apply(*args) * 1.1))
    seen = []
    real_numerics = cli.Doctor.numerics

    def numerics_seeing_the_environment(self, number):
        seen.append(os.environ.get(DISABLE_ENV))
        return real_numerics(self, number)

    monkeypatch.setattr(cli.Doctor, "numerics", numerics_seeing_the_environment)
    monkeypatch.setenv(DISABLE_ENV, "rms_norm,attention")
    path = tmp_path / "doctor.json"
    assert cli.main(["--sections", "numerics", "--ops", "rms_norm", "--json", str(path)]) == 1
    out = capsys.readouterr().out
    assert seen == [None] and os.environ[DISABLE_ENV] == "rms_norm,attention"  # unset inside, restored after
    assert ("FASTFT_DISABLE_KERNELS=rms_norm,attention is set: training here routes rms_norm -> transformers' "
            "RMSNorm forward, attention -> PyTorch SDPA; the doctor checks fastft's kernels themselves") in out
    report = json.loads(path.read_text())
    assert report["FASTFT_DISABLE_KERNELS"] == {
        "value": "rms_norm,attention", "routes_around": ["rms_norm", "attention"], "problem": None,
        "routes": {"rms_norm": "transformers' RMSNorm forward", "attention": "PyTorch SDPA"}}
    rows = report["sections"]["numerics"]["rows"]
    assert rows and all(r["status"] == "FAIL" and "> tolerance" in r["problem"] for r in rows)
    assert report["disable_kernels"] == ["rms_norm"]


def test_speed_and_training_parity_on_the_pytorch_engine(tmp_path):
    path = tmp_path / "doctor.json"
    code, out, err = _doctor(["--sections", "3,4", "--json", str(path)], tmp_path, env_without_interpreter())
    assert code == 0, out[-4000:] + err[-3000:]
    assert "fastft's PyTorch engine" in out and "NOT speed figures" in out
    report = json.loads(path.read_text())
    rows = report["sections"]["speed"]["rows"]
    assert [row["switch"] for row in rows] == ["rms_norm", "rope", "swiglu", "cross_entropy",
                                               "fused_linear_cross_entropy", "linear_log_probs", "nf4", "lora_mlp",
                                               "lora_qkv", "lora_linear", "attention"]
    for row in rows:
        assert row["status"] == "ok", row
        assert _finite_positive(row["speedup"]) and _finite_positive(row["fastft"]["fwd_ms"]), row
        assert _finite_positive(row[row["reference"]]["fwd_ms"])
    assert rows[0]["fastft"]["fwdbwd_gbps"] > 0 and rows[4]["fastft"]["fwdbwd_tflops"] > 0
    parity = report["sections"]["parity"]
    assert parity["status"] == "pass" and parity["dtype"] == "float32"
    assert len(parity["losses_fastft"]) == len(parity["losses_hf"]) == 10
    assert max(parity["loss_abs_diff"]) <= parity["loss_tolerance"] < 1e-3  # fp32: a tight tolerance
    assert parity["lora_grad_error"] <= parity["lora_grad_tolerance"] < 1e-3
    assert parity["lora_weight_error"] <= parity["lora_weight_tolerance"]
    assert _finite_positive(parity["tokens_per_s_ratio"]) and "tiny model" in parity["tokens_per_s_note"]


def test_memory_section_measures_the_accounted_step(tmp_path, capsys):
    path = tmp_path / "doctor.json"
    assert cli.main(["--sections", "memory", "--json", str(path)]) == 0
    memory = json.loads(path.read_text())["sections"]["memory"]
    assert memory["status"] == "ok" and "interpreted" in memory["measured"]
    # the accounting equals the CPU step's live bytes to 16 bytes (tests/test_memory.py); 1% here
    assert 0.99 <= memory["peak_ratio"] <= 1.01 and memory["resident_ratio"] == 1.0
    assert "ratio" in capsys.readouterr().out


def test_help_documents_every_option(tmp_path):
    text = script_help(DOCTOR, cwd=tmp_path)
    assert_help_documents(text, "Check fastft on this machine", {
        "--model": "a known name", "--quick": "sections 1-2 only", "--sections": "by number or name",
        "--ops": "as FASTFT_DISABLE_KERNELS names them", "--json": "as JSON",
        "--device": "cuda, cuda:N or cpu"})
    module = subprocess.run([sys.executable, "-m", "fastft.doctor", "--help"], cwd=tmp_path,
                            env=env_without_interpreter(), capture_output=True, text=True, timeout=300)
    assert module.returncode == 0 and module.stdout == text


@pytest.mark.parametrize("args, message", [(["--ops", "rms_norm,flash"], "--ops: unknown kernel 'flash'"),
                                           (["--sections", "6"], "--sections: unknown section '6'"),
                                           (["--model", "./no-such-model"], "--model: no such directory"),
                                           (["--device", "mps"], "--device: fastft runs on cuda or cpu")])
def test_bad_arguments_are_refused_with_the_reason(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_tested_versions_are_the_ones_ci_installs():
    pins = dict(line.split("==") for line in (REPO / "requirements-cpu.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for library, version in environment.TESTED_VERSIONS.items():
        assert pins[library] == version, library


def test_compare_fails_on_error_non_finite_values_structural_zeros_and_shape():
    expected = torch.tensor([[0.0, 2.0], [-4.0, 1.0]], dtype=torch.float64)
    good = expected.float() * (1 + 1e-7)
    assert numerics.compare("t", good, expected, 1e-6)["problem"] is None
    off = numerics.compare("t", expected.float() + 0.01, expected, 1e-3)
    assert off["error"] == pytest.approx(0.01 / 4) and "> tolerance" in off["problem"]
    nan = expected.float().clone()
    nan[1, 1] = float("nan")  # an element a kernel never wrote (outputs start as NaN)
    assert "1 non-finite elements" in numerics.compare("t", nan, expected, 1.0)["problem"]
    shifted = expected.float().clone()
    shifted[0, 0] = 1e-9  # an ignored row's gradient must be exactly 0, however small the rest allows
    assert numerics.compare("t", shifted, expected, 1e-3)["problem"] is None
    assert "exactly 0" in numerics.compare("t", shifted, expected, 1e-3, zeros=True)["problem"]
    assert "shape (2,)" in numerics.compare("t", good[0], expected, 1.0)["problem"]


def test_tolerance_is_roundings_of_the_dtype_plus_fp32_sums():
    assert numerics.tolerance(torch.bfloat16, 3, 1) == pytest.approx(2 * (3 * 2.0**-7 + 4 * 2.0**-24))
    assert numerics.tolerance(torch.float16, 1, 4096) == pytest.approx(2 * (2.0**-10 + 4 * 64 * 2.0**-24))
    assert numerics.tolerance(torch.float32, 2, 100) == pytest.approx(2 * (2 * EPS[torch.float32] + 40 * 2.0**-24))


def test_dropout_mask_check_catches_wrong_values_and_keep_rates():
    gen = torch.Generator().manual_seed(0)
    good = (torch.rand(64, 200, generator=gen) >= 0.1).float() / 0.9
    assert numerics._mask_failures([good], 0.1) == []
    assert "values other than 0" in numerics._mask_failures([good * 1.5], 0.1)[0]
    assert "kept 1.000" in numerics._mask_failures([torch.full((64, 200), 1 / 0.9)], 0.1)[0]


def test_peak_bandwidth_from_the_memory_clock_or_the_table(monkeypatch):
    cuda = torch.device("cuda", 0)
    h100 = SimpleNamespace(name="NVIDIA H100 80GB HBM3", memory_clock_rate=2619000, memory_bus_width=5120)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h100)
    gbps, source = speed.peak_bandwidth(cuda)
    assert gbps == pytest.approx(3352.3, rel=1e-3) and "memory clock (2619 MHz)" in source
    t4 = SimpleNamespace(name="Tesla T4")  # an older torch: no memory clock reported
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: t4)
    assert speed.peak_bandwidth(cuda) == (320.0, "vendor figure for T4 (torch reports no memory clock here)")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(name="Mystery GPU"))
    assert speed.peak_bandwidth(cuda)[0] is None
    assert speed.peak_bandwidth(torch.device("cpu"))[0] is None


def test_numerics_table_wraps_a_long_case_within_its_column():
    """A case name longer than its column (44) wraps onto continuation lines, never into the dtype column: every
    line keeps each column's text at its header's offset, and the whole name survives."""
    from fastft.doctor.report import NUMERICS_COLUMNS, numerics_header, numerics_line

    case = "packed sequences (cu_seqlens), GQA 4:1, sliding window 13, odd length 37, padded batch of 3"
    row = {"op": "attention_varlen", "case": case, "dtype": "bfloat16", "tensor": "dq", "error": 1.5e-3,
           "tolerance": 7.9e-3, "first_call_s": 2.5, "switch": "attention", "status": "pass"}
    header, lines = numerics_header(), numerics_line(row).split("\n")
    assert len(lines) >= 3  # 92 characters in a 44-wide column
    start = {name: header.index(name) for name, _ in NUMERICS_COLUMNS}
    width = NUMERICS_COLUMNS[1][1]
    case_cells = [line[start["case"]:start["case"] + width].strip() for line in lines]
    assert " ".join(case_cells) == case
    assert all(len(line) <= start["dtype"] or line[start["dtype"] - 1] == " " for line in lines)  # a gap before dtype
    first = lines[0]
    for name, value in (("op", "attention_varlen"), ("dtype", "bfloat16"), ("tensor", "dq"), ("error", "1.5e-03"),
                        ("switch", "attention"), ("status", "pass")):
        assert first[start[name]:].startswith(value), (name, first)
    assert all(line[:start["case"]].strip() == "" and line[start["dtype"]:].strip() == "" for line in lines[1:])
