"""bench/device_session.py, the one-call device session, checked on CPU with stub steps (seconds, no GPU, no doctor):
a step whose estimate does not fit the time left is skipped, a running step is cut at the budget, a failing one is
recorded as failed, and the dry run writes one results folder whose manifest says what ran, what did not and why."""
from __future__ import annotations

import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path

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
    headline sleeps and is cut at the budget, the wheels step is skipped (none carried)."""
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
    assert [r["step"] for r in manifest["steps"]] == ["wheels", "versions", "doctor", "headline"]
    assert [r["status"] for r in manifest["steps"]] == ["skipped", "ok", "ok", "cut"]
    assert set(manifest["skipped"]) == {"wheels"} and "no wheels in" in manifest["skipped"]["wheels"]
    assert set(manifest["cut"]) == {"headline"} and manifest["failed"] == {}
    # the commands recorded are the device's, with the headline's exact flags
    assert "pip install -q --no-index --find-links" in steps["wheels"]["command"]
    assert steps["doctor"]["command"].endswith(f"-m fastft.doctor --json {out / 'doctor.json'}")
    assert "--sections" not in steps["doctor"]["command"] and "--quick" not in steps["doctor"]["command"]
    assert ("bench/run.py --models llama3-8b --contenders hf,fastft --seq-lens 2048 --batch-sizes 1,4 --loss trl "
            f"--out-dir {out} --time-budget-s 1") in steps["headline"]["command"]  # its own limit: at least 1 s
    assert steps["headline"]["stand_in"] == shlex.join(SLEEP)
    assert all(r["estimate_s"] == 0.5 for r in manifest["steps"]) and manifest["seconds"] < 4.0 + 3.0
    # fastft's tree was copied for PYTHONPATH, with kernels/ inside the package
    assert (work / "fastft-src" / "fastft" / "kernels" / "__init__.py").exists()


def test_steps_can_be_chosen_and_bad_arguments_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    args = ds.build_parser().parse_args(["--steps", "headline", "--wheels", str(tmp_path)])
    steps = ds.plan_steps(args, str(out), str(tmp_path))
    # the versions step always runs: the manifest needs them
    assert [s.skip_reason is None for s in steps] == [False, True, False, True]
    assert steps[0].skip_reason == "not chosen (--steps headline)"
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
