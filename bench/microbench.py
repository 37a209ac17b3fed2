#!/usr/bin/env python3
"""Kernel micro-benchmarks: each fastft kernel against its PyTorch/library counterpart, on a GPU.

    python bench/microbench.py                       # everything, writes bench/results/<date>-<gpu>-kernels.{json,md}
    python bench/microbench.py --ops rms_norm,nf4    # a subset
    python bench/microbench.py --cpu-dry-run --out-dir /tmp/k   # tiny shapes on CPU: checks the harness, no figures

First two ceilings are measured on the device itself:

* copy bandwidth: ``torch.empty_like(x).copy_(x)`` on a 1 GiB bf16 tensor, counting bytes read + written;
* bf16 matmul rate: ``a @ b`` at 8192 x 8192 x 8192.

Then every op gets forward time and forward+backward time (``triton.testing.do_bench``: median of
repeated runs with the L2 cache flushed between them, gradients reset), against the eager PyTorch
implementation of the same op (or the library that fastft replaces: bitsandbytes, peft, TRL, SDPA):

* memory-bound ops (RMSNorm, RoPE, SwiGLU, cross-entropy, NF4 dequant): achieved GB/s, counting the
  minimum traffic of the op (each input read once, each output written once; stated per op in
  ``bytes_note``), and the fraction of the measured copy bandwidth;
* matmul-bound ops (fused linear cross-entropy, linear log-probs, fused LoRA layers, attention):
  TFLOP/s where the FLOPs are well defined (attention, the lm-head GEMMs; stated per op in ``flops_note``)
  and the fraction of the measured matmul rate, the speed-up over the reference and the peak memory of one
  forward+backward (``max_memory_allocated`` minus what was allocated before it: inputs excluded, outputs
  and gradients included), with its ratio to the reference's.

The ops are one table, ``CASES`` (in the manner of ``triton.testing.perf_report``): per op its sizes, an
input builder, its implementations, the reference they are compared with, and its bytes or FLOPs formula;
one loop (``run_cases``) measures them all. Each op's target (from the project's issues) is printed beside
it; a missing kernel gives a ``not_available`` row instead of stopping the suite.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback

import torch

# bench/ is not a package: its scripts import _shared.py as a sibling module. Run as a script, bench/ is
# sys.path[0] already; loaded by path (the tests) it is added here. Never the repository root (clean_sys_path).
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)
import _shared as shared  # noqa: E402

from fastft.microbench_cases import CASES, OPS, TARGETS, Case, Run, dtype_name, measure, shapes  # noqa: E402

_DROPPED_FROM_PATH: list[str] = []
KEY = ("op", "shape", "impl", "device_kind")
DEFINITIONS = {
    "times": "median of triton.testing.do_bench (L2 flushed, gradients reset between runs); bwd = fwd+bwd - fwd",
    "gbps": "minimum traffic of the op (each input read once, each output written once; bytes_note) / time",
    "tflops": "FLOPs of the op's GEMMs (flops_note) / time",
    "peak": "max_memory_allocated during one fwd+bwd minus memory allocated before it (inputs excluded)",
    "ratios": "speed-up = reference time / this time; memory ratio = this / reference (same run, same shape)",
}


# --------------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, device, dry_run: bool):
        self.device = device
        self.dry_run = dry_run
        self.cuda = device.type == "cuda"

    def time_ms(self, fn, grad_to_none=None) -> dict:
        """Median (and p20/p80) milliseconds of ``fn``; on a GPU with ``triton.testing.do_bench``."""
        if self.cuda:
            import triton.testing

            median, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                                       quantiles=[0.5, 0.2, 0.8])
            return {"median": median, "p20": p20, "p80": p80}
        # CPU dry run: one call, wall clock (the figures mean nothing; the code paths are what is checked)
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return {"median": ms, "p20": ms, "p80": ms}

    def peak_extra_gb(self, fn) -> float | None:
        """Peak memory of one call of ``fn`` above what was allocated before it (GiB), outputs included."""
        if not self.cuda:
            fn()
            return None
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return peak / shared.GIB


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _rate(row: dict, amounts: tuple[float, float], unit: str, scale: float, ceiling: float | None,
          frac: str) -> None:
    """``fwd_<unit>`` and ``fwdbwd_<unit>`` (amount / time / scale) and their fractions of the ceiling."""
    fwd, bwd = amounts
    row[f"fwd_{unit}"] = fwd / (row["fwd_ms"] * 1e-3) / scale
    if "fwdbwd_ms" in row:
        row[f"fwdbwd_{unit}"] = (fwd + bwd) / (row["fwdbwd_ms"] * 1e-3) / scale
    if ceiling:
        for phase in ("fwd", "fwdbwd"):
            if f"{phase}_{unit}" in row:
                row[f"{phase}_{frac}"] = row[f"{phase}_{unit}"] / ceiling


def _compare(rows: list[dict], ref_impl: str) -> None:
    """speed-up (reference time / this time) and memory ratio (this / reference) for non-reference rows."""
    ref = {(r["op"], r["shape"]): r for r in rows if r["impl"] == ref_impl and r["status"] == "ok"}
    for row in rows:
        base = ref.get((row["op"], row["shape"]))
        if row["impl"] == ref_impl or row["status"] != "ok" or base is None:
            continue
        row["vs"] = ref_impl
        row["fwd_speedup"] = base["fwd_ms"] / row["fwd_ms"] if row.get("fwd_ms") else None
        if row.get("fwdbwd_ms") and base.get("fwdbwd_ms"):
            row["fwdbwd_speedup"] = base["fwdbwd_ms"] / row["fwdbwd_ms"]
        if row.get("peak_extra_gb") is not None and base.get("peak_extra_gb"):
            row["peak_memory_ratio"] = row["peak_extra_gb"] / base["peak_extra_gb"]


def _row(op, shape, impl, device_kind, **fields) -> dict:
    return {"op": op, "shape": shape, "impl": impl, "device_kind": device_kind, "status": "ok", "message": None,
            **fields}


def _missing(exc: BaseException) -> bool:
    """A kernel (module or function) that does not exist yet, as opposed to a crash inside one."""
    if isinstance(exc, ImportError):
        return True
    return isinstance(exc, AttributeError) and "module" in str(exc) and "has no attribute" in str(exc)


def _failed_row(op, shape, impl, device_kind, exc: BaseException, context: str = "") -> dict:
    """A missing kernel or library is ``not_available``; a crash ``oom`` or ``error`` with its traceback."""
    if _missing(exc):
        status, text = "not_available", f"{type(exc).__name__}: {exc}"
    else:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]).strip()
        status = "oom" if "out of memory" in str(exc).lower() else "error"
    return _row(op, shape, impl, device_kind, status=status, message=(context + text)[-1500:])


def _print_row(row: dict) -> None:
    if row["status"] == "ok" and row.get("fwdbwd_ms") is not None:
        brief = f"fwd {row['fwd_ms']:.3f} ms, fwd+bwd {row['fwdbwd_ms']:.3f} ms"
    elif row["status"] == "ok":
        brief = f"{row['fwd_ms']:.3f} ms"
    else:
        brief = (row["message"] or "").strip().splitlines()[-1:]
    print(f"  {row['op']:<28} {row['shape']:<44} {row['impl']:<14} {row['status']}: {brief}", flush=True)


# --------------------------------------------------------------------------------------------------------
# Ceilings
# --------------------------------------------------------------------------------------------------------
def ceilings(bench: Bench) -> dict:
    copy_gbps, copy_mib = _copy_gbps(bench)
    matmul_tflops, matmul_note = _matmul_tflops(bench)
    _free()
    return {"copy_gbps": copy_gbps, "copy_note": f"torch.empty_like(x).copy_(x), x {copy_mib} MiB bf16, "
                                                 "read + written bytes",
            "matmul_tflops": matmul_tflops, "matmul_note": matmul_note}


def _copy_gbps(bench: Bench) -> tuple[float, int]:
    n_bytes = (1 << 30) if bench.cuda else (1 << 20)
    x = torch.randn(n_bytes // 2, device=bench.device, dtype=torch.bfloat16)
    t = bench.time_ms(lambda: torch.empty_like(x).copy_(x))["median"]
    return 2 * n_bytes / (t * 1e-3) / 1e9, n_bytes >> 20


def _matmul_tflops(bench: Bench) -> tuple[float, str]:
    n = 8192 if bench.cuda else 256
    dtype = torch.bfloat16 if bench.cuda else torch.float32
    a = torch.randn(n, n, device=bench.device, dtype=dtype)
    b = torch.randn(n, n, device=bench.device, dtype=dtype)
    t = bench.time_ms(lambda: a @ b)["median"]
    return 2 * n ** 3 / (t * 1e-3) / 1e12, f"{n}x{n}x{n} {dtype_name(dtype)} a @ b"


# --------------------------------------------------------------------------------------------------------
# The measuring loop
# --------------------------------------------------------------------------------------------------------
def measure_impl(bench: Bench, case: Case, x, impl, ceil: dict) -> dict:
    """One implementation on one input: times, peak memory, and the GB/s or TFLOP/s of the case's formula."""
    made = impl(x)
    run = made if isinstance(made, Run) else Run(made)
    row = measure(bench, run.forward, x.grads if run.grads is None else run.grads, x.dys, backward=case.backward,
                  memory=case.memory)
    if case.traffic:
        _rate(row, case.traffic(x), "gbps", 1e9, ceil["copy_gbps"], "frac_of_copy_bw")
        row["bytes_note"] = case.note
    if case.flops:
        _rate(row, case.flops(x), "tflops", 1e12, ceil["matmul_tflops"], "frac_of_matmul")
        row["flops_note"] = case.note
    if run.note:
        row["note"] = run.note
    return row


def run_cases(bench: Bench, cases, S: dict, ceil: dict, dtype, deadline: float | None = None) -> list[dict]:
    """Every (case, size, implementation): a row each, compared with the case's reference; a missing kernel
    or a crash becomes a row, not an abort; cases not started before ``deadline`` are one ``skipped`` row."""
    rows, setups, kind = [], {}, bench.device.type
    for case in cases:
        if deadline and time.time() > deadline:
            rows.append(_row(case.op, "-", "-", kind, status="skipped", message="not run: --time-budget-s exhausted"))
            print(f"  {case.op}: skipped (time budget)", flush=True)
            continue
        start = len(rows)
        for size in case.sizes(S):
            try:
                if case.setup is not None and case.setup not in setups:
                    setups[case.setup] = _try(case.setup, bench, S, dtype)
                setup = setups.get(case.setup)
                if isinstance(setup, Exception):
                    raise setup
                x = case.build(bench, S, dtype, size, setup)
            except Exception as exc:  # noqa: BLE001 - recorded, for every implementation
                for impl in case.impls:
                    rows.append(_failed_row(case.op, "-" if size is None else str(size), impl, kind, exc,
                                            "building the inputs failed: "))
                    _print_row(rows[-1])
                continue
            for name, impl in case.impls.items():
                try:
                    rows.append(_row(case.op, x.shape, name, kind, **measure_impl(bench, case, x, impl, ceil)))
                except Exception as exc:  # noqa: BLE001 - recorded
                    rows.append(_failed_row(case.op, x.shape, name, kind, exc))
                _print_row(rows[-1])
                _free()
            del x
            _free()
        _compare(rows[start:], case.reference)
    return rows


def _try(fn, *args):
    """``fn(*args)``, or the exception it raised (kept, so that a failed shared setup is not retried)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - re-raised by each case that needs it
        return exc


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------
def _pct(v) -> str:
    return f" ({v * 100:.0f}%)" if v is not None else ""


def _with_pct(r: dict, key: str, frac: str, spec: str = ".0f") -> str:
    return shared.fmt(r.get(key), spec) + _pct(r.get(frac)) if r.get(key) else "-"


def markdown(data: dict) -> str:
    c = data.get("ceilings", {})
    out = []
    if data.get("cpu_dry_run"):
        out.append("# CPU DRY RUN: a check of the kernel benchmark code paths at tiny shapes, NOT figures\n")
    else:
        out.append(f"# fastft kernel micro-benchmarks: {data['gpu']}, {data['date']}\n")
    fastft = data.get("fastft") or {}
    out.append(f"- GPU: {data['gpu']}; torch {data['torch']} (CUDA {data.get('cuda')}), triton {data['triton']}, "
               f"transformers {data['transformers']}, peft {data['peft']}, bitsandbytes {data['bitsandbytes']}, "
               f"trl {data['trl']}; fastft {fastft.get('version')}, source digest {fastft.get('source_digest')}, "
               f"git commit {fastft.get('git_commit')}"
               + (" (uncommitted changes)" if fastft.get("git_dirty") else ""))
    out.append(f"- measured ceilings: copy {shared.fmt(c.get('copy_gbps'), '.0f')} GB/s ({c.get('copy_note')}); "
               f"matmul {shared.fmt(c.get('matmul_tflops'), '.0f')} TFLOP/s ({c.get('matmul_note')})")
    for i, run in enumerate(data.get("runs", [])):
        out.append(f"- run {i}: `{run['command']}` ({run['started']})")
    out += [f"- {name}: {text}" for name, text in (data.get("definitions") or DEFINITIONS).items()]
    out.append("")
    out.append("| op | shape | impl | status | fwd ms | bwd ms | fwd+bwd ms | fwd GB/s (of copy) | fwd+bwd GB/s "
               "(of copy) | fwd TFLOP/s | fwd+bwd TFLOP/s (of matmul) | speed-up fwd / fwd+bwd | peak GiB | "
               "mem ratio |")
    out.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in data["rows"]:
        speed = (f"{shared.fmt(r.get('fwd_speedup'), '.2f')} / {shared.fmt(r.get('fwdbwd_speedup'), '.2f')}"
                 if r.get("vs") else "-")
        status = (r["status"] if r["status"] == "ok"
                  else f"{r['status']}: {(r.get('message') or '').splitlines()[-1][:80]}")
        out.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {status} | {shared.fmt(r.get('fwd_ms'), '.3f')} "
                   f"| {shared.fmt(r.get('bwd_ms'), '.3f')} | {shared.fmt(r.get('fwdbwd_ms'), '.3f')} "
                   f"| {_with_pct(r, 'fwd_gbps', 'fwd_frac_of_copy_bw')} "
                   f"| {_with_pct(r, 'fwdbwd_gbps', 'fwdbwd_frac_of_copy_bw')} "
                   f"| {shared.fmt(r.get('fwd_tflops'), '.0f')} "
                   f"| {_with_pct(r, 'fwdbwd_tflops', 'fwdbwd_frac_of_matmul')} "
                   f"| {speed} | {shared.fmt(r.get('peak_extra_gb'), '.2f')} "
                   f"| {shared.fmt(r.get('peak_memory_ratio'), '.2f')} |")
    out.append("\n## Targets (from the issues)\n")
    for op, target in TARGETS.items():
        out.append(f"- **{op}**: {target}")
    return "\n".join(out) + "\n"


def build_parser():
    p = argparse.ArgumentParser(prog="bench/microbench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {', '.join(OPS)}")
    shared.add_run_options(p, "op", "run every benchmark's code path at tiny shapes on CPU")
    return p


def main(argv=None) -> int:
    _DROPPED_FROM_PATH[:] = shared.clean_sys_path()  # before anything imports transformers
    args = build_parser().parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        print(f"bench/microbench.py: unknown op(s) {unknown}; choose from {', '.join(OPS)}", file=sys.stderr)
        return 2
    if not args.cpu_dry_run and not torch.cuda.is_available():
        return shared.refuse_without_gpu("bench/microbench.py")
    shared.warn_dropped(_DROPPED_FROM_PATH, "bench/microbench.py")
    device = torch.device("cpu") if args.cpu_dry_run else torch.device("cuda", 0)
    bench = Bench(device, args.cpu_dry_run)
    dtype = torch.float32 if args.cpu_dry_run else (torch.bfloat16 if torch.cuda.is_bf16_supported() else
                                                    torch.float16)
    date = shared.utc_date()
    gpu, stem, out_dir = shared.result_names("kernels", args.cpu_dry_run, args.out_dir, date)
    os.makedirs(out_dir, exist_ok=True)
    header = {**shared.environment(gpu), "date": date, "command": shared.command_line(),
              "cpu_dry_run": bool(args.cpu_dry_run), "definitions": DEFINITIONS}
    print(f"bench/microbench.py: {gpu}; torch {header['torch']}, triton {header['triton']}", flush=True)
    started = time.time()
    ceil = ceilings(bench)
    print(f"  ceilings: copy {ceil['copy_gbps']:.0f} GB/s, matmul {ceil['matmul_tflops']:.1f} TFLOP/s", flush=True)
    deadline = started + args.time_budget_s if args.time_budget_s else None
    rows = run_cases(bench, [c for c in CASES if c.group in ops], shapes(args.cpu_dry_run), ceil, dtype, deadline)
    run_info = {"started": shared.utc_now(), "seconds": round(time.time() - started, 1), "command": header["command"],
                "ceilings": ceil, **{k: header[k] for k in ("gpu", "torch", "triton", "transformers", "peft",
                                                           "bitsandbytes", "trl", "fastft")}}
    # the header's ceilings are the latest measurement (each run's own is under runs[i].ceilings)
    shared.write_results(out_dir, stem, {**header, "ceilings": ceil}, run_info, rows, KEY, markdown,
                         latest={"ceilings": ceil})
    return 0


if __name__ == "__main__":
    sys.exit(main())
