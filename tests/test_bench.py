"""The benchmark harness (bench/), checked on CPU: figures need a GPU, the harness does not.

* ``bench/run.py --cpu-smoke`` trains the tiny config for a few steps with ``hf`` and ``fastft``, each in its
  own subprocess, and must write a complete result file whose two contenders agree on the loss;
* ``bench/run.py --cpu-smoke --attention sdpa`` forces the fastft contender's attention backend;
* ``bench/microbench.py --cpu-dry-run`` runs every micro-benchmark's code path at tiny shapes;
* ``bench/attention_backends.py --cpu-dry-run`` compares fastft's attention backends at tiny shapes;
* without a GPU, the scripts must refuse with a clear message and a non-zero exit.

The subprocesses are started together (module fixture) so the slow ones overlap.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "bench" / "run.py"
MICROBENCH = REPO / "bench" / "microbench.py"
ATTENTION = REPO / "bench" / "attention_backends.py"
TIMEOUT = 600

ROW_FIELDS = ("contender", "model", "seq_len", "batch_size", "tokens_per_s", "step_time_median_s",
              "step_time_spread_s", "peak_vram_gb", "peak_reserved_gb", "loss_first_steps", "status",
              "tokens_per_s_vs_hf", "peak_vram_vs_hf", "peak_reserved_vs_hf", "loss_max_abs_diff_vs_hf", "flags",
              "loss_tol", "message")
HEADER_FIELDS = ("gpu", "torch", "triton", "transformers", "peft", "bitsandbytes", "trl", "date", "command", "rows",
                 "runs", "definitions")
STATUSES = {"ok", "oom", "not_installed", "error", "skipped"}


def _env(**extra):
    env = dict(os.environ)
    # the smoke runs fastft's plain PyTorch paths (the Triton interpreter is exercised by the kernel tests
    # and would make this test minutes long); CUDA hidden so the no-GPU checks hold on any machine
    env.pop("TRITON_INTERPRET", None)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


def _start(args, cwd):
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    procs = {
        # from the repo root on purpose: the scripts must keep the root (and its kernels/) off sys.path
        "smoke": _start([RUN, "--cpu-smoke", "--out-dir", tmp / "smoke", "--cache-dir", tmp / "cache"], REPO),
        "smoke_sdpa": _start([RUN, "--cpu-smoke", "--contenders", "fastft", "--attention", "sdpa", "--out-dir",
                              tmp / "smoke_sdpa", "--cache-dir", tmp / "cache_sdpa"], REPO),
        "dry": _start([MICROBENCH, "--cpu-dry-run", "--out-dir", tmp / "dry"], REPO),
        "attention_dry": _start([ATTENTION, "--cpu-dry-run", "--out-dir", tmp / "attention_dry"], REPO),
        "attention_no_gpu": _start([ATTENTION, "--out-dir", tmp / "attention_no_gpu"], tmp),
        "run_no_gpu": _start([RUN, "--quick", "--out-dir", tmp / "run_no_gpu"], tmp),
        "microbench_no_gpu": _start([MICROBENCH, "--out-dir", tmp / "microbench_no_gpu"], tmp),
        "help": _start([RUN, "--help"], tmp),
    }
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=TIMEOUT)
            results[name] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return tmp, results


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {folder}, found {found}"
    return found[0]


def test_cpu_smoke_writes_complete_results(runs):
    tmp, results = runs
    code, out, err = results["smoke"]
    assert code == 0, f"cpu smoke failed ({code}):\n{out[-3000:]}\n{err[-3000:]}"
    data = json.loads(_one(tmp / "smoke", "*-cpu-smoke.json").read_text())
    for field in HEADER_FIELDS:
        assert field in data, f"missing top-level field {field}"
    assert data["cpu_smoke"] is True
    assert data["gpu"].startswith("cpu")
    assert data["torch"] and data["transformers"] and data["peft"] and data["bitsandbytes"]
    assert "--cpu-smoke" in data["command"]
    assert len(data["runs"]) == 1 and data["runs"][0]["checkpoints"]["tiny"]["reused"] is False

    rows = {row["contender"]: row for row in data["rows"]}
    assert set(rows) == {"hf", "fastft"}, rows.keys()
    for name, row in rows.items():
        for field in ROW_FIELDS:
            assert field in row, f"{name}: missing row field {field}"
        assert row["status"] in STATUSES
        assert row["status"] == "ok", f"{name}: {row['status']}: {row['message']}"
        assert (row["model"], row["seq_len"], row["batch_size"]) == ("tiny", 32, 2)
        assert row["tokens_per_s"] > 0 and row["step_time_median_s"] > 0
        spread = row["step_time_spread_s"]
        assert spread["min"] <= spread["p25"] <= row["step_time_median_s"] <= spread["p75"] <= spread["max"]
        assert len(row["step_times_s"]) == 2  # --cpu-smoke: 1 warm-up step (untimed) + 2 timed
        assert len(row["loss_first_steps"]) == 3
        assert all(math.isfinite(v) for v in row["loss_first_steps"])
        # random weights, vocab 128: the loss starts near ln(128) = 4.85
        assert abs(row["loss_first_steps"][0] - math.log(128)) < 0.5
        assert row["peak_vram_gb"] is None  # CPU: no VRAM figure, not a made-up one
    # --attention defaults to fastft's own choice (its kernel serves head dim 64); hf runs SDPA
    assert (rows["fastft"]["attention"], rows["fastft"]["attention_impl"]) == ("auto", "fastft")
    assert (rows["hf"]["attention"], rows["hf"]["attention_impl"]) == (None, "sdpa")

    hf, fast = rows["hf"], rows["fastft"]
    # fp32 on CPU: the stated tolerance must be tight (correct paths agree to ~1e-6) ...
    assert fast["loss_tol"] <= 1e-3
    # ... and the two contenders must meet it on every one of the first steps
    diffs = [abs(a - b) for a, b in zip(fast["loss_first_steps"], hf["loss_first_steps"])]
    assert max(diffs) <= fast["loss_tol"], (fast["loss_first_steps"], hf["loss_first_steps"])
    assert fast["loss_max_abs_diff_vs_hf"] == pytest.approx(max(diffs))
    assert "loss_mismatch" not in fast["flags"]
    assert fast["tokens_per_s_vs_hf"] == pytest.approx(fast["tokens_per_s"] / hf["tokens_per_s"])
    assert hf["tokens_per_s_vs_hf"] is None  # hf is the baseline
    # every step has its own batch (the same ones for both contenders)
    assert hf["losses"][0] != hf["losses"][1]

    md = _one(tmp / "smoke", "*-cpu-smoke.md").read_text()
    assert "CPU SMOKE RUN" in md and "NOT performance figures" in md
    assert "| model | seq | batch | contender |" in md
    assert "| tiny | 32 | 2 | hf | ok |" in md and "| tiny | 32 | 2 | fastft | ok |" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert _one(tmp / "smoke", "*-cpu-smoke.png").stat().st_size > 1000
    else:
        assert "skipping the PNG" in out


def test_kernels_dry_run_covers_every_op(runs):
    tmp, results = runs
    code, out, err = results["dry"]
    assert code == 0, f"kernels dry run failed ({code}):\n{out[-3000:]}\n{err[-3000:]}"
    data = json.loads(_one(tmp / "dry", "*-kernels.json").read_text())
    assert data["cpu_dry_run"] is True
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_tflops"] > 0
    ops = {row["op"] for row in data["rows"]}
    assert ops == {"rms_norm", "rope", "swiglu", "cross_entropy", "fused_linear_cross_entropy", "linear_log_probs",
                   "nf4_dequant", "lora_mlp", "lora_qkv", "lora_linear", "attention"}, ops
    problems = [(r["op"], r["impl"], r["status"], r["message"]) for r in data["rows"]
                if r["status"] not in ("ok", "not_available")]
    assert not problems, problems
    for row in data["rows"]:
        if row["status"] == "ok":
            assert row["fwd_ms"] > 0, row
    # every fastft row that ran has its reference comparison
    refs = {(r["op"], r["shape"]) for r in data["rows"] if r["impl"] != "fastft" and r["status"] == "ok"}
    for row in data["rows"]:
        if row["impl"] == "fastft" and row["status"] == "ok" and (row["op"], row["shape"]) in refs:
            assert row.get("vs") and row.get("fwd_speedup"), row
    md = _one(tmp / "dry", "*-kernels.md").read_text()
    assert "CPU DRY RUN" in md and "| op | shape | impl |" in md


def test_cpu_smoke_with_a_forced_attention_backend(runs):
    tmp, results = runs
    code, out, err = results["smoke_sdpa"]
    assert code == 0, f"cpu smoke --attention sdpa failed ({code}):\n{out[-3000:]}\n{err[-3000:]}"
    data = json.loads(_one(tmp / "smoke_sdpa", "*-cpu-smoke.json").read_text())
    [row] = data["rows"]
    assert ((row["contender"], row["status"], row["attention"], row["attention_impl"])
            == ("fastft", "ok", "sdpa", "sdpa"))
    assert data["runs"][0]["attention"] == "sdpa"
    assert "| labels, on | sdpa |" in _one(tmp / "smoke_sdpa", "*-cpu-smoke.md").read_text()


def test_attention_backends_dry_run(runs):
    tmp, results = runs
    code, out, err = results["attention_dry"]
    assert code == 0, f"attention dry run failed ({code}):\n{out[-3000:]}\n{err[-3000:]}"
    data = json.loads(_one(tmp / "attention_dry", "*-attention.json").read_text())
    assert data["cpu_dry_run"] is True and data["xformers"]
    rows = {(r["batch"], r["backend"]): r for r in data["rows"]}
    assert set(rows) == {(b, n) for b in ("packed", "padded") for n in ("fastft", "fastft_xformers", "sdpa")}
    for batch in ("packed", "padded"):
        for backend in ("fastft", "sdpa"):
            row = rows[(batch, backend)]
            assert row["status"] == "ok" and row["flags"] == [], row
            assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
            for field in ("fwd", "dq", "dk", "dv"):  # fp32 against fp32 math: rounding only
                assert row[f"{field}_rel_err"] < 1e-5, (batch, backend, field, row[f"{field}_rel_err"])
        # xformers has no CPU kernel: the row says so, in xformers' words
        xformers_row = rows[(batch, "fastft_xformers")]
        assert xformers_row["status"] == "not_available" and "device=cpu" in xformers_row["message"]
    assert rows[("padded", "sdpa")]["mask_mb"] > 0
    md = _one(tmp / "attention_dry", "*-attention.md").read_text()
    assert "CPU DRY RUN" in md and "| batch | shape | dtype | backend |" in md


def test_attention_backends_measure_the_xformers_route(monkeypatch):
    """The xformers row's code path, with xformers' op replaced by the CPU reference: it agrees with fp32 math."""
    from xformers_reference import use_reference_op

    seen = use_reference_op(monkeypatch)
    bench = _load(ATTENTION, "fastft_bench_attention_under_test")
    import torch

    for batch in ("packed", "padded"):
        row = bench.measure("fastft_xformers", batch, bench.SHAPES["dry"], torch.device("cpu"), torch.float32)
        assert row["status"] == "ok" and row["flags"] == [], row
        assert all(row[f"{f}_rel_err"] < 1e-5 for f in ("fwd", "dq", "dk", "dv")), row
    assert 4 in seen and 5 in seen  # with gradients (K/V repeated) and without (grouped layout)


@pytest.mark.parametrize("name, script", [("run_no_gpu", "bench/run.py"), ("microbench_no_gpu", "bench/microbench.py"),
                                          ("attention_no_gpu", "bench/attention_backends.py")])
def test_without_gpu_the_scripts_refuse(runs, name, script):
    tmp, results = runs
    code, out, err = results[name]
    assert code != 0
    assert f"{script}: no CUDA GPU found" in err, err
    assert "figures exist only when measured on a GPU" in err
    assert not (tmp / name).exists(), "nothing may be written without a GPU"


def test_help(runs):
    _, results = runs
    code, out, _ = results["help"]
    assert code == 0
    for flag in ("--quick", "--cpu-smoke", "--models", "--seq-lens", "--batch-sizes", "--contenders", "--steps",
                 "--warmup", "--out-dir", "--attention"):
        assert flag in out


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratios_flag_a_loss_mismatch_and_merge_keeps_the_header(tmp_path):
    run = _load(RUN, "fastft_bench_run_under_test")

    def row(contender, losses, tokens_per_s, peak, status="ok"):
        return {"contender": contender, "model": "m", "seq_len": 512, "batch_size": 1, "loss_path": "labels",
                "checkpointing": "on", "device_kind": "cuda", "dtype": "bfloat16", "status": status,
                "loss_first_steps": losses, "tokens_per_s": tokens_per_s, "step_time_median_s": 512 / tokens_per_s,
                "peak_vram_gb": peak, "peak_reserved_gb": peak + 1}

    rows = [row("hf", [12.60, 12.55, 12.50], 1000.0, 20.0), row("fastft", [12.61, 12.56, 12.49], 2500.0, 8.0),
            row("liger", [12.60, 12.70, 12.50], 1500.0, 15.0)]
    run.add_ratios(rows)
    hf, fast, liger = rows
    assert fast["tokens_per_s_vs_hf"] == pytest.approx(2.5) and fast["peak_vram_vs_hf"] == pytest.approx(0.4)
    assert fast["loss_max_abs_diff_vs_hf"] == pytest.approx(0.01) and fast["flags"] == []
    assert liger["loss_max_abs_diff_vs_hf"] == pytest.approx(0.15) and liger["flags"] == ["loss_mismatch"]
    assert hf["flags"] == [] and hf["tokens_per_s_vs_hf"] is None
    assert fast["loss_tol"] == pytest.approx(0.65 / 512 ** 0.5)  # 16-bit: scales with the tokens per step

    shared = _load(REPO / "bench" / "_shared.py", "fastft_bench_shared_under_test")
    path = str(tmp_path / "day.json")
    header = {"gpu": "G", "torch": "1", "triton": "t", "transformers": "x", "peft": "p", "bitsandbytes": "b",
              "trl": "r", "date": "d", "command": "first"}
    shared.merge_results(path, header, {"command": "first"}, [dict(r) for r in rows], run.ROW_KEY)
    again = [dict(rows[1], tokens_per_s=3000.0), dict(rows[0], model="other")]
    data = shared.merge_results(path, {**header, "command": "second", "torch": "2"}, {"command": "second"}, again,
                                run.ROW_KEY)
    assert data["command"] == "first" and [r["command"] for r in data["runs"]] == ["first", "second"]
    assert data["mixed_versions"] == [{"run": 1, "field": "torch", "header": "1", "this_run": "2"}]
    by_key = {(r["contender"], r["model"]): r for r in data["rows"]}
    assert len(data["rows"]) == 4  # hf, liger kept; fastft replaced; hf on 'other' added
    assert by_key[("fastft", "m")]["tokens_per_s"] == 3000.0 and by_key[("fastft", "m")]["run"] == 1
    assert by_key[("liger", "m")]["run"] == 0 and by_key[("hf", "other")]["run"] == 1
    assert json.loads(Path(path).read_text()) == data
