"""bench/device_session.py, the one-call device session, checked on CPU with stub steps (seconds, no GPU, no doctor):
a step whose estimate does not fit the time left is skipped, a running step is cut at the budget, a failing one is
recorded as failed, and the dry run writes one results folder whose manifest says what ran, what did not and why."""
from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from kernel_testing import env_without_interpreter

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def _load():
    spec = importlib.util.spec_from_file_location("fastft_device_session", REPO / "bench" / "device_session.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


ds = _load()


def _python(code: str, *args: str) -> list[str]:
    return [PY, "-c", code, *args]


SLEEP = _python("import time; print('started', flush=True); time.sleep(60)")


def test_budget_skips_what_does_not_fit_and_cuts_a_step_at_the_budget(tmp_path):
    steps = [
        ds.Step("first", "prints the time it may run", _python("import sys; print('limit', sys.argv[1])", ds.TIME_LEFT),
                estimate_s=1.0),
        ds.Step("too_big", "estimated past the budget", _python("print('must not run')"), estimate_s=1000.0),
        ds.Step("failing", "exits 3", _python("raise SystemExit(3)"), estimate_s=1.0),
        ds.Step("slow", "sleeps past the budget", SLEEP, estimate_s=1.0),
        ds.Step("after", "no time left for it", _python("print('must not run')"), estimate_s=1.0),
    ]
    log = ds.Log(str(tmp_path / "session.log"))
    began = time.monotonic()
    records = ds.run_steps(steps, budget_s=4.0, log=log, env=None, cwd=str(tmp_path), dry_run=False, reserve_s=0.0)
    elapsed = time.monotonic() - began
    log.close()
    by = {r["step"]: r for r in records}
    assert [r["step"] for r in records] == ["first", "too_big", "failing", "slow", "after"]
    assert (by["first"]["status"], by["first"]["exit_code"]) == ("ok", 0)
    assert by["too_big"]["status"] == "skipped" and by["too_big"]["reason"].startswith("does not fit: estimated 1000 s")
    assert by["too_big"]["exit_code"] is None and by["too_big"]["seconds"] is None
    assert (by["failing"]["status"], by["failing"]["exit_code"]) == ("failed", 3) and "exit code 3" in \
        by["failing"]["reason"]
    assert by["slow"]["status"] == "cut" and by["slow"]["exit_code"] is None
    assert by["slow"]["reason"].endswith("past the budget")
    assert by["after"]["status"] == "skipped" and "does not fit" in by["after"]["reason"]
    assert elapsed < 4.0 + 3.0, elapsed  # the sleeper was stopped at the budget, not after its 60 s
    text = (tmp_path / "session.log").read_text()
    # the command's own limit replaced the placeholder (at least 1 s); what was skipped says so in the log
    assert "  first | limit " in text and ds.TIME_LEFT not in text.split("first | limit ")[1].split("\n")[0]
    assert "  slow | started" in text and "must not run" not in text  # (a skipped step's command is not printed)
    assert "== too_big: SKIPPED: does not fit" in text and "== slow: CUT after" in text


def test_a_step_is_cut_at_its_own_cap(tmp_path):
    log = ds.Log(str(tmp_path / "session.log"))
    step = ds.Step("doctor", "capped", SLEEP, estimate_s=1.0, cap_s=1.0)
    [record] = ds.run_steps([step], budget_s=60.0, log=log, env=None, cwd=str(tmp_path), dry_run=False,
                            reserve_s=0.0)
    log.close()
    assert record["status"] == "cut" and record["reason"] == "stopped at 1 s: its cap (1 s)" and record["seconds"] < 10


def test_dry_run_writes_one_folder_with_the_manifest(tmp_path, monkeypatch):
    """The real plan (device commands recorded) with stand-ins stubbed: versions and doctor write their files, the
    headline sleeps and is cut at the budget, the wheels step is skipped (none carried), and so is the MoE benchmark
    after the headline (no time left)."""
    real_plan = ds.plan_steps
    out, work = tmp_path / "out", tmp_path / "work"

    def stubbed_plan(args, folder, work_dir):
        steps = {step.name: step for step in real_plan(args, folder, work_dir)}
        steps["versions"].stand_in = _python(
            "import json, sys; json.dump({'libraries': {'torch': 'stub'}}, open(sys.argv[1], 'w'))",
            str(Path(work_dir) / "versions.json"))
        steps["doctor"].stand_in = _python("import sys; open(sys.argv[1], 'w').write('{}')",
                                           str(Path(folder) / "doctor.json"))
        steps["headline"].stand_in = SLEEP
        steps["moe"].stand_in = _python("print('must not run')")
        for step in steps.values():
            step.estimate_s = 0.5
        return list(steps.values())

    monkeypatch.setattr(ds, "plan_steps", stubbed_plan)
    argv = ["--dry-run", "--budget-s", "4", "--reserve-s", "0", "--out-dir", str(out), "--work-dir", str(work),
            "--wheels", str(tmp_path / "no-wheels")]
    assert ds.main(argv) == 1  # a step was cut
    assert sorted(p.name for p in out.iterdir()) == ["doctor.json", "manifest.json", "session.log"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dry_run"] is True and manifest["device"]["name"] == "cpu (dry run)"
    assert manifest["budget_s"] == 4.0 and manifest["command"] == "bench/device_session.py " + " ".join(argv)
    assert manifest["versions"] == {"libraries": {"torch": "stub"}}
    assert manifest["wheels"] == [] and manifest["missing_wheels"] == list(ds.EXPECTED_WHEELS)
    assert manifest["files"] == ["doctor.json", "manifest.json", "session.log"]
    steps = {r["step"]: r for r in manifest["steps"]}
    assert [r["step"] for r in manifest["steps"]] == ["wheels", "versions", "doctor", "headline", "moe"]
    assert [r["status"] for r in manifest["steps"]] == ["skipped", "ok", "ok", "cut", "skipped"]
    assert set(manifest["skipped"]) == {"wheels", "moe"} and "no wheels in" in manifest["skipped"]["wheels"]
    assert manifest["skipped"]["moe"].startswith("does not fit")
    assert set(manifest["cut"]) == {"headline"} and manifest["failed"] == {}
    # the commands recorded are the device's, with the headline's exact flags
    assert "pip install -q --no-index --find-links" in steps["wheels"]["command"]
    assert steps["doctor"]["command"].endswith(f"-m fastft.doctor --json {out / 'doctor.json'}")
    assert "--sections" not in steps["doctor"]["command"] and "--quick" not in steps["doctor"]["command"]
    assert ("bench/run.py --models llama3-8b --contenders hf,fastft --seq-lens 2048 --batch-sizes 1,4 --loss trl "
            f"--out-dir {out} --time-budget-s 1") in steps["headline"]["command"]  # its own limit: at least 1 s
    assert steps["headline"]["stand_in"] == shlex.join(SLEEP)
    assert steps["moe"]["command"].endswith(f"bench/moe_experts.py --out-dir {out} --time-budget-s 1")
    assert "must not run" not in (out / "session.log").read_text()
    assert all(r["estimate_s"] == 0.5 for r in manifest["steps"]) and manifest["seconds"] < 4.0 + 3.0
    # fastft's tree was copied for PYTHONPATH, with kernels/ inside the package
    assert (work / "fastft-src" / "fastft" / "kernels" / "__init__.py").exists()


def test_steps_can_be_chosen_and_bad_arguments_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    args = ds.build_parser().parse_args(["--steps", "headline", "--wheels", str(tmp_path)])
    steps = ds.plan_steps(args, str(out), str(tmp_path))
    # the versions step always runs: the manifest needs them
    assert [s.name for s in steps] == ["wheels", "versions", "doctor", "headline", "moe"]
    assert [s.skip_reason is None for s in steps] == [False, True, False, True, False]
    assert steps[0].skip_reason == "not chosen (--steps headline)"
    args = ds.build_parser().parse_args(["--steps", "moe", "--wheels", str(tmp_path)])
    assert [s.skip_reason is None for s in ds.plan_steps(args, str(out), str(tmp_path))] == [False, True, False,
                                                                                             False, True]
    for argv, message in ((["--steps", "headline,bogus"], "unknown ['bogus']"), (["--budget-s", "0"], "positive")):
        try:
            ds.main(argv)
        except SystemExit as exc:
            assert message in str(exc)
        else:
            raise AssertionError(f"{argv} was accepted")


def test_missing_wheels_are_named():
    files = ["/w/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", "/w/trl-1.16.0-py3-none-any.whl"]
    assert ds.missing_wheels(files) == ["datasets", "dill", "multiprocess"]


def test_moe_step_dry_run_checks_every_contender(tmp_path):
    """The moe step's own dry-run stand-in (bench/moe_experts.py --cpu-dry-run): at tiny Qwen3-MoE and Mixtral
    shapes, fastft's expert op on NF4 experts, transformers' grouped_mm (torch's CPU kernel) and eager paths each
    agree with the float64 reference in output and every gradient, and the rows land in the folder's result file."""
    args = ds.build_parser().parse_args(["--dry-run", "--wheels", str(tmp_path)])
    [step] = [s for s in ds.plan_steps(args, str(tmp_path), str(tmp_path)) if s.name == "moe"]
    command = [str(part).replace(ds.TIME_LEFT, "300") for part in step.stand_in]
    proc = subprocess.run(command, cwd=tmp_path, env=env_without_interpreter(CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [result] = tmp_path.glob("*-cpu-dry-run-moe-experts.json")
    assert result.with_suffix(".md").read_text().startswith("# CPU DRY RUN")
    data = json.loads(result.read_text())
    rows = {(r["model"], r["contender"]): r for r in data["rows"]}
    assert sorted(rows) == sorted((m, c) for m in ("qwen3-30b-a3b", "mixtral-8x7b")
                                  for c in ("fastft", "hf_grouped_mm", "hf_eager"))
    for (model, contender), row in rows.items():
        assert row["status"] == "ok" and row["dtype"] == "float32", row
        assert row["expert_storage"] == ("nf4" if contender == "fastft" else "float32")
        for field, tol in row["tolerance"].items():
            assert row[f"{field}_rel_err"] <= tol, (model, contender, field)
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["peak_extra_gb"] is None  # (no GPU: no memory)
        assert ("speedup_vs_grouped_mm" in row) == (contender != "hf_grouped_mm")
    assert rows[("qwen3-30b-a3b", "fastft")]["shape"] == "E=8 k=4 H=64 I=48"


def test_moe_benchmark_does_not_time_a_contender_that_computes_something_else(monkeypatch):
    """The agreement check before timing: fastft's contender with the down projection's LoRA dropped (a real bug's
    size: the LoRA term is as large as the weight's) is a ``mismatch`` row, not timed; the intact one agrees."""
    import fastft.moe
    from fastft.kernels import use_engine

    spec = importlib.util.spec_from_file_location("fastft_moe_bench", REPO / "bench" / "moe_experts.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shape = bench.DRY_MODELS["qwen3-30b-a3b"]
    with use_engine("torch"):
        layer = bench.Layer(shape, bench.torch.device("cpu"), bench.torch.float32)
        inputs = layer.inputs(11)
        ref = bench.reference(layer, *inputs)
        tol = bench.tolerance(bench.torch.float32, shape["top_k"], {**shape, "tokens": 11})
        assert bench.measure(layer, "fastft", inputs, ref, tol)["status"] == "ok"
        real_expert_lora = fastft.moe.expert_lora

        def without_down_lora(experts):
            base, loras = real_expert_lora(experts)
            return base, {**loras, "down_proj": None}

        monkeypatch.setattr(fastft.moe, "expert_lora", without_down_lora)
        row = bench.measure(layer, "fastft", inputs, ref, tol)
    assert row["status"] == "mismatch" and "fwd_ms" not in row, row
    assert row["message"].startswith("not timed: out rel err") and row["out_rel_err"] > 100 * tol["out"]
