#!/usr/bin/env python3
"""One device call that records what matters: the carried wheels, ``fastft-doctor``, the headline comparison and the
MoE expert benchmark, under one results folder with a manifest, inside a time budget.

    bash bench/device_run.sh record                     # on the lent GPU machine (the `device` tool's `run`)
    python bench/device_session.py --budget-s 540       # the same, on any machine with a GPU
    python bench/device_session.py --dry-run            # on CPU: every step walked with tiny stand-ins

Steps, in order (each a subprocess; the estimate is what the budget check uses, see STEPS):

1. ``wheels``: ``pip install --no-index --find-links .whl --no-deps --target /tmp/site .whl/*.whl`` (the GPU image
   lacks bitsandbytes, trl and trl's ``datasets``; nothing outside the machine can be reached);
2. ``versions``: imports fastft from a copy of the package tree (``fastft/`` with ``kernels/`` as
   ``fastft/kernels``; the repository root never goes on ``sys.path``) and records every library's version;
3. ``doctor``: ``python -m fastft.doctor --json <folder>/doctor.json``, all five sections;
4. ``headline``: ``bench/run.py --models llama3-8b --contenders hf,fastft --seq-lens 2048 --batch-sizes 1,4 --loss
   trl``: fastft against transformers + peft + bitsandbytes, Llama-3-8B's shape with random weights, LoRA r=16,
   TRL's fused lm-head loss path; tokens/s and peak memory of both in the same run;
5. ``moe``: ``bench/moe_experts.py``: the MoE expert MLP forward + backward, fastft's expert op on NF4 experts
   against transformers' ``experts_implementation`` eager and grouped_mm on 16-bit experts (peft LoRA r=16 on every
   expert), Qwen3-30B-A3B and Mixtral-8x7B shapes, 2048 and 8192 tokens; each contender checked against a float32
   reference before it is timed.

Budget: before each step, the step runs only if its stated estimate fits the time left (budget minus a reserve
for writing the record); a step that does not fit is ``skipped``, with the reason, in the manifest and on stdout.
A running step gets the time left as its timeout (at most its own cap): past it, its process group gets SIGTERM,
then SIGKILL, and the step is recorded as ``cut``. ``bench/run.py`` and ``bench/moe_experts.py`` are also given the
time left as their own ``--time-budget-s``, so they stop and write their partial rows themselves before the cut.

Output folder (``--out-dir``; default ``$OUT/<stamp>`` where the device tool's ``OUT`` is set, else
``bench/results/<stamp>``; dry run: under the system temp folder): ``manifest.json`` (versions, device, date, the
exact command of every step, estimates, what ran, was skipped or cut and why), ``session.log`` (every step's
output), ``doctor.json``, the headline's ``<date>-<gpu>.json/.md/.png`` and the MoE benchmark's
``<date>-<gpu>-moe-experts.json/.md``: at most 8 files, as the device tool
returns. The driver itself imports only the standard library (and ``bench/_shared.py``, which does too).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)
import _shared as shared  # noqa: E402

DEFAULT_BUDGET_S = 540.0  # 9 minutes: a device call may last 10, and the reply's transfers need the rest
RESERVE_S = 10.0  # kept back from every step for writing the manifest
KILL_GRACE_S = 10.0  # between SIGTERM and SIGKILL of a step past its time
SELF_STOP_S = 30.0  # a step that stops itself (bench/run.py) gets its time less this, to stop its workers and write
MAX_RETURNED_FILES = 8  # the device tool brings back at most 8 files from $OUT
# what the GPU image lacks (KINDS.md's package list): fastft needs bitsandbytes and trl; --loss trl imports
# trl.trainer.utils, which imports datasets (whose dill and multiprocess the image lacks too)
EXPECTED_WHEELS = {"bitsandbytes": "0.50.2", "trl": "1.16.0", "datasets": "5.2.0", "dill": "0.4.1",
                   "multiprocess": "0.70.19"}
LIBRARIES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets", "xformers",
             "liger-kernel", "safetensors", "numpy")
HEADLINE = ["--models", "llama3-8b", "--contenders", "hf,fastft", "--seq-lens", "2048", "--batch-sizes", "1,4",
            "--loss", "trl"]  # r=16, alpha 16, all seven linear layers: bench/training/config.py
TIME_LEFT = "@time_left_s@"  # replaced in a step's command by the seconds it may run, when it starts
# Estimates (not yet measured on a GPU), sized so that with the defaults the headline keeps its estimate even when
# the doctor runs to its cap: 20 + 20 + 200 + 280 = 520 s <= 540 - RESERVE_S. The MoE benchmark comes after it and
# runs when the steps before it left its estimate (they usually take less than theirs), else is skipped; alone:
# --steps moe
ESTIMATES_S = {"wheels": 20.0, "versions": 20.0, "doctor": 150.0, "headline": 280.0, "moe": 120.0}
STEP_NAMES = ("wheels", "doctor", "headline", "moe")  # what --steps chooses from (versions always runs)
DOCTOR_CAP_S = 200.0


@dataclasses.dataclass
class Step:
    """One step of the session: ``command`` is what runs on the device, ``stand_in`` what a dry run runs instead
    (None: print the command only). ``estimate_s`` decides whether it fits; ``cap_s`` bounds its run."""

    name: str
    what: str
    command: list[str]
    estimate_s: float
    stand_in: list[str] | None = None
    cap_s: float | None = None
    skip_reason: str | None = None  # known before the session starts (e.g. no wheels carried)


# --------------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------------
def wheel_files(wheels_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(wheels_dir, "*.whl")))


def missing_wheels(files: list[str]) -> list[str]:
    """The expected distributions with no wheel among ``files`` (wheel names: ``<name>-<version>-...whl``)."""
    have = {os.path.basename(f).split("-")[0].lower().replace("_", "-") for f in files}
    return [name for name in EXPECTED_WHEELS if name not in have]


def plan_steps(args, folder: str, work: str) -> list[Step]:
    python = sys.executable
    site = os.path.join(work, "site")
    probe = [python, os.path.abspath(__file__), "--versions-probe", os.path.join(work, "versions.json")]
    wheels = wheel_files(args.wheels)
    install = [python, "-m", "pip", "install", "-q", "--no-index", "--find-links", args.wheels, "--no-deps",
               "--no-compile", "--no-cache-dir", "--upgrade", "--target", site, *wheels]
    doctor_json = os.path.join(folder, "doctor.json")
    run_py = os.path.join(_BENCH_DIR, "run.py")
    moe_py = os.path.join(_BENCH_DIR, "moe_experts.py")
    steps = [
        Step("wheels", f"install the carried wheels ({len(wheels)} in {args.wheels}) into {site}", install,
             ESTIMATES_S["wheels"], stand_in=None,
             skip_reason=None if wheels else f"no wheels in {args.wheels}: bitsandbytes and trl will be missing "
                                             "(python bench/device_session.py --download-wheels, on a machine "
                                             "with network)"),
        Step("versions", "import fastft from the copied tree; record the library versions",
             probe, ESTIMATES_S["versions"], stand_in=probe),
        Step("doctor", "fastft-doctor, all five sections", [python, "-m", "fastft.doctor", "--json", doctor_json],
             ESTIMATES_S["doctor"], cap_s=args.doctor_cap_s,
             stand_in=[python, "-m", "fastft.doctor", "--sections", "environment", "--json", doctor_json]),
        Step("headline", "fastft vs transformers + peft + bitsandbytes: Llama-3-8B shape, seq 2048, batch 1 and 4, "
                         "r=16, TRL's loss path", [python, run_py, *HEADLINE, "--out-dir", folder,
                                                   "--time-budget-s", TIME_LEFT],
             ESTIMATES_S["headline"],
             stand_in=[python, run_py, "--cpu-smoke", "--contenders", "hf,fastft", "--loss", "trl", "--no-plot",
                       "--out-dir", folder, "--cache-dir", os.path.join(work, "bench-cache"),
                       "--time-budget-s", TIME_LEFT]),
        Step("moe", "MoE expert MLP fwd+bwd: fastft (NF4 experts) vs transformers eager and grouped_mm (16-bit "
                    "experts), Qwen3-30B-A3B and Mixtral-8x7B shapes, 2048 and 8192 tokens, LoRA r=16",
             [python, moe_py, "--out-dir", folder, "--time-budget-s", TIME_LEFT], ESTIMATES_S["moe"],
             stand_in=[python, moe_py, "--cpu-dry-run", "--out-dir", folder, "--time-budget-s", TIME_LEFT]),
    ]
    chosen = set(args.steps) if args.steps else None
    for step in steps:
        if chosen is not None and step.name not in chosen and step.name != "versions":  # the manifest needs them
            step.skip_reason = f"not chosen (--steps {','.join(args.steps)})"
    return steps


# --------------------------------------------------------------------------------------------------------
# Running the steps within the budget
# --------------------------------------------------------------------------------------------------------
class Log:
    """Prints to stdout and appends to session.log."""

    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)
            self.file.write(text + "\n")

    def close(self) -> None:
        self.file.close()


def run_command(command: list[str], timeout_s: float, env: dict | None, cwd: str, log: Log,
                prefix: str) -> tuple[int | None, bool]:
    """Run ``command`` in its own process group, relaying its output; past ``timeout_s`` the group gets SIGTERM,
    then SIGKILL after KILL_GRACE_S. Returns (exit code, or None when cut; cut)."""
    return shared.run_process_group(command, timeout_s, lambda line: log(f"  {prefix} | {line}"), env=env, cwd=cwd,
                                    grace_s=KILL_GRACE_S)


def run_steps(steps: list[Step], budget_s: float, log: Log, env: dict | None, cwd: str, dry_run: bool,
              reserve_s: float = RESERVE_S, started: float | None = None) -> list[dict]:
    """Run ``steps`` in order within ``budget_s`` seconds from ``started``; one record per step."""
    started = time.monotonic() if started is None else started
    records = []
    for step in steps:
        left = budget_s - reserve_s - (time.monotonic() - started)
        timeout = left if step.cap_s is None else min(left, step.cap_s)
        own_limit = f"{max(1.0, timeout - SELF_STOP_S):.0f}"  # for bench/run.py's --time-budget-s

        def filled(command):
            return None if command is None else [own_limit if part == TIME_LEFT else part for part in command]

        command, stand_in = filled(step.command), filled(step.stand_in)
        record = {"step": step.name, "what": step.what, "command": shlex.join(command), "estimate_s": step.estimate_s,
                  "cap_s": step.cap_s, "time_left_s": round(left, 1), "status": None, "reason": None,
                  "exit_code": None, "seconds": None}
        if dry_run:
            record["stand_in"] = shlex.join(stand_in) if stand_in else None
        records.append(record)
        if step.skip_reason or step.estimate_s > left:
            record.update(status="skipped", reason=step.skip_reason or (
                f"does not fit: estimated {step.estimate_s:.0f} s, {max(0.0, left):.0f} s left of the budget"))
            log(f"== {step.name}: SKIPPED: {record['reason']}")
            continue
        log(f"== {step.name}: {step.what} (estimate {step.estimate_s:.0f} s, stopped after {timeout:.0f} s)")
        log(f"   $ {record['command']}")
        if dry_run:
            if stand_in is None:
                record.update(status="dry-run", reason="dry run: command printed, not run")
                continue
            log(f"   dry run, stand-in: $ {record['stand_in']}")
        begin = time.monotonic()
        code, cut = run_command(stand_in if dry_run else command, timeout, env, cwd, log, step.name)
        record.update(seconds=round(time.monotonic() - begin, 1), exit_code=code)
        if cut:
            capped = step.cap_s is not None and step.cap_s < left
            record.update(status="cut", reason=f"stopped at {timeout:.0f} s: "
                          + (f"its cap ({step.cap_s:.0f} s)" if capped else "past the budget"))
        elif code != 0:
            record.update(status="failed", reason=f"exit code {code} (its output is in session.log)")
        else:
            record["status"] = "ok"
        log(f"== {step.name}: {record['status'].upper()} after {record['seconds']} s"
            + (f": {record['reason']}" if record["reason"] else ""))
    return records


# --------------------------------------------------------------------------------------------------------
# Session: folder, environment, manifest
# --------------------------------------------------------------------------------------------------------
def device_facts(dry_run: bool) -> dict:
    """The GPU as nvidia-smi reports it (the driver makes no CUDA context: the steps get the whole GPU)."""
    if dry_run:
        return {"name": "cpu (dry run)", "note": "a dry run on CPU: no figures"}
    query = "name,driver_version,memory.total,compute_cap"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"name": "unknown", "problem": f"nvidia-smi: {exc}"}
    if out.returncode != 0 or not out.stdout.strip():
        return {"name": "unknown", "problem": f"nvidia-smi exit {out.returncode}: {out.stderr.strip()[:300]}"}
    gpus = [dict(zip(query.split(","), (cell.strip() for cell in line.split(","))))
            for line in out.stdout.strip().splitlines()]
    return {**gpus[0], "gpu_count": len(gpus)}


def versions_probe(path: str) -> int:
    """The versions step (in the steps' environment): fastft must import from the copied tree, with no top-level
    ``kernels`` from this repository; writes the versions to ``path``."""
    import importlib.util
    import platform

    import fastft
    import fastft.kernels

    spec = importlib.util.find_spec("kernels")
    if spec is not None and "fastft" in (spec.origin or ""):
        raise SystemExit(f"a top-level kernels module from this repository is importable: {spec.origin}")
    versions = {"python": platform.python_version(), "python_executable": sys.executable,
                "fastft": {"version": getattr(fastft, "__version__", None), "path": fastft.__file__,
                           "kernels": fastft.kernels.__file__},
                "libraries": {name: shared.dist_version(name) for name in LIBRARIES}}
    print(json.dumps(versions))
    shared.write_json_atomic(path, versions)
    return 0


def copy_package_tree(dest: str) -> str:
    """fastft/ with kernels/ as fastft/kernels, as pip installs them, under ``dest`` (for PYTHONPATH)."""
    shutil.rmtree(dest, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(os.path.join(shared.REPO_ROOT, "fastft"), os.path.join(dest, "fastft"), ignore=ignore)
    shutil.copytree(os.path.join(shared.REPO_ROOT, "kernels"), os.path.join(dest, "fastft", "kernels"), ignore=ignore)
    return dest


def child_env(site: str, src: str) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # a dry run takes fastft's PyTorch engine on CPU (the interpreter is slow)
    env["PYTHONPATH"] = os.pathsep.join([site, src])  # the carried wheels first, then fastft's copy
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def default_folder(dry_run: bool, device: dict) -> str:
    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    name = f"{stamp}-{'cpu-dry-run' if dry_run else shared.slug(device.get('name', 'unknown'))}"
    if dry_run:
        return os.path.join(tempfile.gettempdir(), "fastft-device-session", name)
    base = os.environ.get("OUT") or shared.DEFAULT_RESULTS_DIR
    return os.path.join(base, name)


def read_versions(work: str) -> dict | None:
    """What the versions step wrote (None when it did not run)."""
    path = os.path.join(work, "versions.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def session(args, argv: list[str]) -> int:
    started = time.monotonic()
    device = device_facts(args.dry_run)
    folder = os.path.abspath(args.out_dir or default_folder(args.dry_run, device))
    os.makedirs(folder, exist_ok=True)
    work = args.work_dir or (tempfile.mkdtemp(prefix="fastft-session-") if args.dry_run else "/tmp")
    os.makedirs(work, exist_ok=True)
    if os.path.exists(os.path.join(work, "versions.json")):  # an earlier session's
        os.remove(os.path.join(work, "versions.json"))
    site, src = os.path.join(work, "site"), os.path.join(work, "fastft-src")
    log = Log(os.path.join(folder, "session.log"))
    date = shared.utc_now()
    command = shlex.join([os.path.relpath(os.path.abspath(__file__), shared.REPO_ROOT), *argv])
    log(f"== device session ({'DRY RUN on CPU, no figures' if args.dry_run else device.get('name')}), {date}, "
        f"budget {args.budget_s:.0f} s")
    log(f"   {command}\n   results: {folder}")
    copy_package_tree(src)
    steps = plan_steps(args, folder, work)
    wheels = wheel_files(args.wheels)
    if missing_wheels(wheels):
        log(f"   WARNING: no wheel carried for {', '.join(missing_wheels(wheels))} (expected: "
            + ", ".join(f"{k}=={v}" for k, v in EXPECTED_WHEELS.items()) + ")")
    records = run_steps(steps, args.budget_s, log, child_env(site, src), cwd=tempfile.gettempdir(),
                        dry_run=args.dry_run, reserve_s=args.reserve_s, started=started)
    manifest = {
        "tool": "bench/device_session.py", "dry_run": args.dry_run, "date": date,
        "finished": shared.utc_now(), "seconds": round(time.monotonic() - started, 1), "budget_s": args.budget_s,
        "command": command, "device": device, "versions": read_versions(work),
        "fastft_source_digest": shared.source_digest(os.path.join(shared.REPO_ROOT, "fastft"),
                                                     os.path.join(shared.REPO_ROOT, "kernels")),
        "git_commit": _git_commit(),
        "wheels": [os.path.basename(f) for f in wheels], "missing_wheels": missing_wheels(wheels),
        "steps": records,
        "skipped": {r["step"]: r["reason"] for r in records if r["status"] == "skipped"},
        "cut": {r["step"]: r["reason"] for r in records if r["status"] == "cut"},
        "failed": {r["step"]: r["reason"] for r in records if r["status"] == "failed"},
    }
    manifest["files"] = sorted({*os.listdir(folder), "manifest.json"})
    if len(manifest["files"]) > MAX_RETURNED_FILES:
        log(f"   WARNING: {len(manifest['files'])} files in {folder}: the device tool returns only "
            f"{MAX_RETURNED_FILES}")
    shared.write_json_atomic(os.path.join(folder, "manifest.json"), manifest)
    summary = ", ".join(f"{r['step']} {r['status']}" for r in records)
    log(f"== done after {manifest['seconds']} s: {summary}\n   manifest: {os.path.join(folder, 'manifest.json')}")
    log.close()
    return 1 if manifest["failed"] or manifest["cut"] else 0


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", shared.REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None  # the device's copy travels without .git


def download_wheels(wheels_dir: str) -> int:
    """On a machine with network: the wheels the GPU image lacks, for its Python 3.12 on x86-64 Linux."""
    os.makedirs(wheels_dir, exist_ok=True)
    platforms = [arg for tag in ("manylinux_2_24_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                                 "manylinux2014_x86_64") for arg in ("--platform", tag)]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", *platforms, "-d", wheels_dir,
               *(f"{name}=={version}" for name, version in EXPECTED_WHEELS.items())]
    print("$", shlex.join(command), flush=True)
    code = subprocess.run(command).returncode
    if code == 0:
        size = sum(os.path.getsize(f) for f in wheel_files(wheels_dir))
        print(f"{len(wheel_files(wheels_dir))} wheels in {wheels_dir}, {size / 2**20:.1f} MiB (the device tool "
              "carries 64 MiB with the tree)")
    return code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/device_session.py",
        description="One device call: install the carried wheels, run fastft-doctor, then the headline comparison "
                    "(fastft vs transformers + peft + bitsandbytes, Llama-3-8B shape, seq 2048, batch 1 and 4, r=16, "
                    "TRL's loss path), then the MoE expert benchmark (fastft's NF4 experts vs transformers' eager and "
                    "grouped_mm) under one results folder with a manifest, within a time budget.")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="the whole session's time: a step whose estimate does not fit the time left is skipped, a "
                        "running step is cut at it")
    p.add_argument("--dry-run", action="store_true",
                   help="on CPU: walk every step with tiny stand-ins (commands printed); writes the folder and "
                        "manifest, no figures")
    p.add_argument("--steps", type=lambda text: [s.strip() for s in text.split(",") if s.strip()], default=None,
                   help=f"comma-separated subset of {', '.join(STEP_NAMES)} (default: all; the versions step always "
                        "runs)")
    p.add_argument("--reserve-s", type=float, default=RESERVE_S,
                   help="seconds of the budget kept back for writing the manifest")
    p.add_argument("--doctor-cap-s", type=float, default=DOCTOR_CAP_S,
                   help="the doctor is cut after this many seconds, leaving the headline its time")
    p.add_argument("--wheels", default=os.path.join(shared.REPO_ROOT, ".whl"),
                   help="the folder of carried wheels (the device tool's carry: [\".whl\"])")
    p.add_argument("--out-dir", default=None,
                   help="the results folder (default $OUT/<stamp>-<gpu> when OUT is set, else "
                        "bench/results/<stamp>-<gpu>; dry run: a temp folder)")
    p.add_argument("--work-dir", default=None,
                   help="where the wheels are installed (site/) and fastft's tree is copied (fastft-src/) "
                        "(default /tmp; dry run: a temp folder)")
    p.add_argument("--versions-probe", metavar="PATH", help=argparse.SUPPRESS)  # the versions step
    p.add_argument("--download-wheels", action="store_true",
                   help="instead of a session: download the wheels the GPU image lacks (needs network) into the wheels "
                        "folder")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.download_wheels:
        return download_wheels(args.wheels)
    if args.versions_probe:
        return versions_probe(args.versions_probe)
    names = set(STEP_NAMES)
    if args.steps and not set(args.steps) <= names:
        raise SystemExit(f"bench/device_session.py: --steps: unknown {sorted(set(args.steps) - names)}; choose from "
                         f"{', '.join(sorted(names))}")
    if args.budget_s <= 0:
        raise SystemExit("bench/device_session.py: --budget-s must be positive")
    return session(args, argv)


if __name__ == "__main__":
    sys.exit(main())
