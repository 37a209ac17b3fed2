"""Plumbing shared by the scripts in ``bench/``: import hygiene, environment facts (GPU, versions),
result-file naming and merging.

The entry scripts import this file as the module ``_shared``, putting ``bench/`` (their own folder, which is
``sys.path[0]`` when they run as scripts) on ``sys.path`` when they are loaded by path. The repository root must
never be on ``sys.path``: its ``kernels/`` folder is installed as ``fastft.kernels`` only, and would
otherwise be importable as a top-level package named ``kernels``, which transformers probes for (and may
import: ``is_kernels_available``). ``clean_sys_path()`` removes it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import signal
import subprocess
import sys
import threading

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
DEFAULT_RESULTS_DIR = os.path.join(BENCH_DIR, "results")
GIB = float(1 << 30)


def clean_sys_path() -> list[str]:
    """Drop the repository root (and ``''``/``'.'`` when it is the cwd) from ``sys.path``; returns what was
    dropped so the caller can say so."""
    root = os.path.realpath(REPO_ROOT)
    kept, dropped = [], []
    for entry in sys.path:
        (dropped if os.path.realpath(entry or os.getcwd()) == root else kept).append(entry)
    sys.path[:] = kept
    return dropped


def warn_dropped(dropped: list[str], script: str) -> None:
    if dropped:
        print(f"{script}: removed {dropped} from sys.path: the repository root must not be importable "
              "(its kernels/ folder would shadow Hugging Face's `kernels` package); fastft must be installed "
              "(pip install -e .) or put on PYTHONPATH as a package tree (see bench/device_run.sh)",
              file=sys.stderr)


def refuse_without_gpu(script: str, cpu_flag: str = "--cpu-dry-run") -> int:
    """Say why nothing was measured (no CUDA GPU) and what the CPU check is; the exit status to return."""
    print(f"{script}: no CUDA GPU found. Its figures exist only when measured on a GPU (see bench/README.md); "
          f"{cpu_flag} checks the code paths on CPU.", file=sys.stderr)
    return 2


def add_run_options(parser, unit: str, dry_run_help: str) -> None:
    """--out-dir, --time-budget-s and --cpu-dry-run, as every micro-benchmark script takes them."""
    parser.add_argument("--out-dir", default=None, help="default bench/results (dry run: a temp folder)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help=f"start no further {unit} after this many seconds (its rows: skipped)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help=f"{dry_run_help} (checks the harness; no figures)")


def result_names(kind: str, dry_run: bool, out_dir: str | None, date: str) -> tuple[str, str, str]:
    """(device name, result file stem, output folder) of a micro-benchmark: ``<date>-<gpu>-<kind>`` in
    ``--out-dir`` or bench/results; a CPU dry run's ``<date>-cpu-dry-run-<kind>`` in a temp folder."""
    if dry_run:
        import tempfile

        folder = out_dir or os.path.join(tempfile.gettempdir(), f"fastft-bench-{kind}-dry-run")
        return "cpu (dry run)", f"{date}-cpu-dry-run-{kind}", folder
    import torch

    gpu = torch.cuda.get_device_name(0)
    return gpu, f"{date}-{slug(gpu)}-{kind}", out_dir or DEFAULT_RESULTS_DIR


def utc_date() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def dist_version(name: str) -> str | None:
    """Installed version of a distribution without importing it (works for wheels installed with
    ``pip --target`` onto PYTHONPATH too, since their dist-info travels with them)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def source_digest(fastft_dir: str, kernels_dir: str) -> str:
    """sha256 over the ``*.py`` files of fastft/ and its kernels/ (names and contents): identifies the
    code that was measured even where the tree travelled without git (the GPU machine's copy).
    ``python bench/_shared.py`` prints it for this checkout."""
    import hashlib

    digest = hashlib.sha256()
    for label, folder in (("fastft", fastft_dir), ("kernels", kernels_dir)):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                digest.update(f"{label}/{name}\0".encode())
                with open(os.path.join(folder, name), "rb") as f:
                    digest.update(f.read())
                digest.update(b"\0")
    return digest.hexdigest()[:16]


def fastft_source() -> dict:
    """Which fastft the figures belong to: its version, where it was imported from, a digest of its
    sources, and the git commit of this checkout (plus whether the tree had uncommitted changes) when
    git is available."""
    info: dict = {"version": None, "path": None, "source_digest": None, "git_commit": None, "git_dirty": None}
    try:
        import fastft
        import fastft.kernels

        info["version"] = getattr(fastft, "__version__", None)
        info["path"] = os.path.dirname(os.path.abspath(fastft.__file__))
        info["source_digest"] = source_digest(info["path"], os.path.dirname(os.path.abspath(fastft.kernels.__file__)))
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        info["import_error"] = f"{type(exc).__name__}: {exc}"
    try:
        commit = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            info["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def environment(device_name: str) -> dict:
    """The header every result file carries: GPU and library versions."""
    import torch

    env = {
        "gpu": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": dist_version("triton"),
        "transformers": dist_version("transformers"),
        "peft": dist_version("peft"),
        "bitsandbytes": dist_version("bitsandbytes"),
        "trl": dist_version("trl"),
        "liger_kernel": dist_version("liger-kernel") or dist_version("liger_kernel"),
        "unsloth": dist_version("unsloth"),
        "xformers": dist_version("xformers"),
        "python": sys.version.split()[0],
        "fastft": fastft_source(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_gb"] = round(props.total_memory / GIB, 2)
        env["gpu_sm_count"] = props.multi_processor_count
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    return env


def command_line() -> str:
    return " ".join([os.path.relpath(sys.argv[0], REPO_ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0],
                     *sys.argv[1:]])


def run_process_group(command: list[str], timeout: float | None, on_line, env: dict | None = None,
                      cwd: str | None = None, grace_s: float = 0.0) -> tuple[int | None, bool]:
    """Run ``command`` in a process group of its own, passing each line of its output (stdout and stderr) to
    ``on_line``. Past ``timeout`` the group gets SIGTERM and, ``grace_s`` later, SIGKILL (at once when ``grace_s``
    is 0). Returns (exit code, or None when it was stopped; whether it was stopped)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            start_new_session=True, errors="replace")

    def relay():
        for line in proc.stdout:
            on_line(line.rstrip())

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=None if timeout is None else max(0.0, timeout))
        stopped = False
    except subprocess.TimeoutExpired:
        stopped = True
        for sig in ((signal.SIGTERM, signal.SIGKILL) if grace_s > 0 else (signal.SIGKILL,)):
            try:
                os.killpg(proc.pid, sig)  # the process group this call started
                proc.wait(timeout=grace_s if sig == signal.SIGTERM else None)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=10)
    return (None if stopped else proc.returncode), stopped


def timed_ms(device, fn, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn`` on ``device``: CUDA events, ``reps`` calls after ``warmup``; on a CPU (the dry
    runs) one wall-clock call, which is no figure."""
    import statistics
    import time

    import torch

    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def write_json_atomic(path: str, data) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def merge_results(path: str, header: dict, run_info: dict, new_rows: list[dict], key_fields: tuple) -> dict:
    """Merge this run's rows into the day's result file for this GPU.

    The file's header (gpu, versions, date, command) is the first run's and is kept; every run appends
    itself to ``runs`` (its own command, versions and time) and its rows carry ``run`` (index into
    ``runs``). A new row replaces an older row with the same key (a re-measurement supersedes), any other
    row is kept. Ratios are never recomputed across runs: each row's ratios are against ``hf`` measured
    in the row's own run.
    """
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or "rows" not in data or "runs" not in data:
            raise ValueError(f"{path} exists but is not a bench result file (no 'rows'/'runs'); move it away")
    else:
        data = {**header, "runs": [], "rows": []}
    run_index = len(data["runs"])
    data["runs"].append(run_info)
    for key in ("torch", "triton", "transformers", "peft", "bitsandbytes", "trl", "gpu"):
        if data.get(key) != header.get(key):
            data.setdefault("mixed_versions", []).append(
                {"run": run_index, "field": key, "header": data.get(key), "this_run": header.get(key)})
    new_keys = {tuple(r.get(k) for k in key_fields) for r in new_rows}
    data["rows"] = [r for r in data["rows"] if tuple(r.get(k) for k in key_fields) not in new_keys]
    for row in new_rows:
        row["run"] = run_index
        data["rows"].append(row)
    write_json_atomic(path, data)
    return data


def write_results(out_dir: str, stem: str, header: dict, run_info: dict, rows: list[dict], key_fields: tuple,
                  markdown, latest: dict | None = None) -> dict:
    """Merge this run's rows into ``<stem>.json`` (``merge_results``), then write ``<stem>.md`` from the merged
    data with ``markdown(data)``. ``latest``: top-level fields that take this run's value, not the first run's."""
    json_path = os.path.join(out_dir, stem + ".json")
    data = merge_results(json_path, header, run_info, rows, key_fields)
    if latest:
        data.update(latest)
        write_json_atomic(json_path, data)
    md_path = os.path.join(out_dir, stem + ".md")
    with open(md_path, "w") as f:
        f.write(markdown(data))
    print(f"wrote {json_path}\n      {md_path}")
    return data


def pyplot(script: str):
    """``matplotlib.pyplot`` drawing to files, or None (saying so) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{script}: matplotlib is not installed (pip install -e '.[bench]'); skipping the plot")
        return None
    return plt


def message_lines(rows: list[dict], label) -> list[str]:
    """A report's "Messages" section: the last line of each row's message, after ``label(row)`` and its status."""
    rows = [r for r in rows if r.get("message")]
    if not rows:
        return []
    return ["", "## Messages", ""] + [f"- {label(r)} ({r['status']}): {r['message'].strip().splitlines()[-1][:300]}"
                                      for r in rows]


def fmt(value, spec: str = ".3g", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


if __name__ == "__main__":
    print(source_digest(os.path.join(REPO_ROOT, "fastft"), os.path.join(REPO_ROOT, "kernels")))
