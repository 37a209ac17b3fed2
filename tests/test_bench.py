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
import subprocess
import sys
from pathlib import Path

import pytest
from kernel_testing import assert_help_documents, env_without_interpreter, script_help

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "bench" / "run.py"
MICROBENCH = REPO / "bench" / "microbench.py"
ATTENTION = REPO / "bench" / "attention_backends.py"
MOE = REPO / "bench" / "moe_experts.py"  # its dry run: tests/test_device_session.py (the record's moe step)
TIMEOUT = 600

ROW_FIELDS = ("contender", "model", "seq_len", "batch_size", "tokens_per_s", "step_time_median_s",
              "step_time_spread_s", "peak_vram_gb", "peak_reserved_gb", "loss_first_steps", "status",
              "tokens_per_s_vs_hf", "peak_vram_vs_hf", "peak_reserved_vs_hf", "loss_max_abs_diff_vs_hf", "flags",
              "loss_tol", "message")
HEADER_FIELDS = ("gpu", "torch", "triton", "transformers", "peft", "bitsandbytes", "trl", "date", "command", "rows",
                 "runs", "definitions")
STATUSES = {"ok", "oom", "not_installed", "error", "skipped"}


def _start(args, cwd):
    # the smoke runs fastft's plain PyTorch paths (the Triton interpreter is exercised by the kernel tests
    # and would make this test minutes long); CUDA hidden so the no-GPU checks hold on any machine
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=env_without_interpreter(
        CUDA_VISIBLE_DEVICES=""), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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
        "moe_no_gpu": _start([MOE, "--out-dir", tmp / "moe_no_gpu"], tmp),
        "run_no_gpu": _start([RUN, "--quick", "--out-dir", tmp / "run_no_gpu"], tmp),
        "microbench_no_gpu": _start([MICROBENCH, "--out-dir", tmp / "microbench_no_gpu"], tmp),
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
                                          ("attention_no_gpu", "bench/attention_backends.py"),
                                          ("moe_no_gpu", "bench/moe_experts.py")])
def test_without_gpu_the_scripts_refuse(runs, name, script):
    tmp, results = runs
    code, out, err = results[name]
    assert code != 0
    assert f"{script}: no CUDA GPU found" in err, err
    assert "figures exist only when measured on a GPU" in err
    assert not (tmp / name).exists(), "nothing may be written without a GPU"


DRY_RUN_OPTIONS = {"--out-dir": "default bench/results (dry run: a temp folder)",
                   "--time-budget-s": "after this many seconds", "--cpu-dry-run": "checks the harness; no figures"}
HELP = {  # per script: its description and, per option, words of the option's help
    "run.py": ("QLoRA training benchmark: fastft vs Hugging Face", {
        "--quick": "the 'small' model, seq 512 and 2048, batch 1", "--cpu-smoke": "harness check on CPU",
        "--models": "comma-separated, from llama3-8b, qwen2-7b, small, tiny, tiny-qwen2",
        "--seq-lens": "default 512,2048,4096", "--batch-sizes": "default 1,4",
        "--contenders": "default hf,fastft,liger,unsloth", "--steps": "timed steps per setting",
        "--warmup": "untimed warm-up steps", "--loss": "fused lm-head path", "--checkpointing": "offload",
        "--attention": "attention of the fastft contender", "--lr": "AdamW learning rate", "--seed": "data seed",
        "--loss-tol": "absolute loss tolerance vs hf", "--out-dir": "where results go",
        "--cache-dir": "random-weight checkpoints", "--worker-timeout-s": "a contender's process is killed",
        "--time-budget-s": "stop starting settings", "--no-plot": "skip the PNG"}),
    "microbench.py": ("Kernel micro-benchmarks: each fastft kernel against its PyTorch/library counterpart, on a GPU.",
                      {"--ops": "comma-separated subset of rms_norm, rope, swiglu, cross_entropy, "
                                "fused_linear_cross_entropy, linear_log_probs, nf4, lora, attention",
                       **DRY_RUN_OPTIONS}),
    "attention_backends.py": ("fastft's three attention backends side by side",
                              {"--dtype": "GPU dtype (V100/T4 have no bf16", **DRY_RUN_OPTIONS}),
    "moe_experts.py": ("The routed expert MLP of a mixture-of-experts layer, forward + backward", {
        "--models": "comma-separated subset of qwen3-30b-a3b, mixtral-8x7b", "--tokens": "default 2048,8192",
        "--contenders": "comma-separated subset of fastft, hf_grouped_mm, hf_eager", **DRY_RUN_OPTIONS}),
    "device_session.py": ("One device call: install the carried wheels, run fastft-doctor, then the headline", {
        "--budget-s": "a step whose estimate does not fit the time left is skipped", "--dry-run": "tiny stand-ins",
        "--steps": "wheels, doctor, headline, moe", "--reserve-s": "writing the manifest",
        "--doctor-cap-s": "leaving the headline its time", "--wheels": "carried wheels",
        "--out-dir": "$OUT/<stamp>-<gpu>", "--work-dir": "fastft-src/", "--download-wheels": "needs network"}),
    "memory.py": ("Accounted GPU memory of QLoRA training, fastft against the Hugging Face baseline", {
        "--models": "known names", "--seq-lens": "SEQ_LENS", "--batch-sizes": "BATCH_SIZES",
        "--checkpointing": "CHECKPOINTING", "--r": "LoRA rank of the rows", "--loss": "{trl,labels}",
        "--contenders": "CONTENDERS", "--vram": "card sizes (GiB)", "--no-max-context": "",
        "--mlp-chunk-tokens": "fastft's MLP chunk", "--quick": "Llama-3.1-8B", "--out-dir": "OUT_DIR",
        "--no-rows": "the max-context table alone", "--max-context-rs": "LoRA ranks of the max-context table",
        "--raw": "against the whole card, without the headroom",
        "--gpu-check": "compare max_memory_allocated with the accounting"}),
}


@pytest.mark.parametrize("script", sorted(HELP))
def test_help_documents_every_option(script, tmp_path):
    description, options = HELP[script]
    assert_help_documents(script_help(REPO / "bench" / script, cwd=tmp_path), description, options)


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


def test_microbench_case_table_rates_ratios_and_failures(capsys):
    """One loop for the whole table: times from the bench, GB/s and TFLOP/s from each case's formula,
    fractions of the ceilings, ratios against the case's reference, and a missing kernel, a crash and an
    exhausted time budget as rows."""
    from types import SimpleNamespace

    import torch

    mb = _load(MICROBENCH, "fastft_bench_microbench_under_test")
    times = iter([1.0, 3.0, 2.0, 9.0, 4.0, 8.0])  # ms, in call order: fwd then fwd+bwd of each implementation

    class FixedTimes(mb.Bench):
        def time_ms(self, fn, grad_to_none=None):
            fn()
            ms = next(times)
            return {"median": ms, "p20": ms, "p80": ms}

    def build(bench, S, dtype, size, setup):
        x = torch.ones(3, requires_grad=True)
        return SimpleNamespace(shape=f"n={size}", grads=[x], dys=None, x=x)

    def missing(x):
        raise ImportError("no module named fastft.kernels.nothing")

    def crash(x):
        return lambda: torch.ones(2) @ torch.ones(3)

    impls = {"fast": lambda x: lambda: (2 * x.x).sum(), "ref": lambda x: lambda: (3 * x.x).sum(),
             "gone": missing, "broken": crash}
    memory_bound = mb.Case("copyish", "g", "t", build, reference="ref", impls=impls, note="bytes",
                           traffic=lambda x: (1e9, 2e9), sizes=lambda S: [7])
    gemm = mb.Case("gemmish", "g", "t", build, reference="ref", impls={"fast": impls["fast"]}, note="flops",
                   flops=lambda x: (4e12, 12e12), sizes=lambda S: [5])
    ceil = {"copy_gbps": 2000.0, "matmul_tflops": 1000.0}
    rows = mb.run_cases(FixedTimes(torch.device("cpu"), True), [memory_bound, gemm], {}, ceil, torch.float32)
    fast, ref, gone, broken, gemm_row = rows
    assert [r["impl"] for r in rows] == ["fast", "ref", "gone", "broken", "fast"]
    assert (fast["fwd_ms"], fast["fwdbwd_ms"], fast["bwd_ms"]) == (1.0, 3.0, 2.0)
    assert fast["fwd_gbps"] == pytest.approx(1000.0) and fast["fwdbwd_gbps"] == pytest.approx(1000.0)
    assert fast["fwd_frac_of_copy_bw"] == pytest.approx(0.5) and fast["bytes_note"] == "bytes"
    assert ref["fwd_gbps"] == pytest.approx(500.0) and ref["fwdbwd_gbps"] == pytest.approx(1e3 / 3)
    assert fast["vs"] == "ref" and fast["fwd_speedup"] == pytest.approx(2.0)
    assert fast["fwdbwd_speedup"] == pytest.approx(3.0) and "vs" not in ref
    assert gone["status"] == "not_available" and "fastft.kernels.nothing" in gone["message"]
    assert broken["status"] == "error" and "RuntimeError" in broken["message"]
    assert gemm_row["shape"] == "n=5" and gemm_row["flops_note"] == "flops"
    assert gemm_row["fwd_tflops"] == pytest.approx(1000.0) and gemm_row["fwdbwd_tflops"] == pytest.approx(2000.0)
    assert gemm_row["fwdbwd_frac_of_matmul"] == pytest.approx(2.0) and "vs" not in gemm_row  # no reference row

    late = mb.run_cases(FixedTimes(torch.device("cpu"), True), [gemm], {}, ceil, torch.float32, deadline=1.0)
    assert [(r["op"], r["status"]) for r in late] == [("gemmish", "skipped")]
    assert "copyish" in capsys.readouterr().out  # every row is printed as it is measured
