"""The doctor's output: a readable table per section, printed as it completes, the closing verdict with the switches
that route a failing kernel around, and the JSON of everything for a bug report."""
from __future__ import annotations

import json
import math


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  " + "  ".join(str(cell).ljust(width) for cell, width in zip(header, widths)).rstrip()]
    lines += ["  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def heading(number: int, title: str, detail: str = "") -> str:
    return f"\n== {number}. {title}" + (f" ({detail})" if detail else "")


# ---------------------------------------------------------------------------------------------
# Sections


def environment_lines(env: dict) -> str:
    rows = [["python", env["python"], env["python_verdict"], ""]]
    for lib in env["libraries"]:
        rows.append([lib["library"], lib["installed"] or "-", lib["verdict"],
                     f"accepted {lib['accepted']}, tested {lib['tested']}"])
    lines = [table(rows, ["library", "installed", "verdict", "fastft's ranges"])]
    dev = env["device"]
    if dev["type"] == "cuda":
        lines.append(f"  device: {dev['name']} (cuda:{dev['index']}, {dev['gpu_count']} visible), compute capability "
                     f"{dev['compute_capability']}, {dev['total_memory_gib']:.1f} GiB, {dev['sm_count']} SMs, bf16 "
                     f"{'yes' if dev['bf16'] else 'no'}, driver {dev['driver']}, "
                     + (f"ROCm {dev['rocm']}" if dev["rocm"] else f"CUDA runtime {dev['cuda_runtime']}"))
    else:
        lines.append(f"  device: CPU {dev['name']} ({dev['cpu_count']} threads), torch {dev['torch_build']} build")
    bnb = env["bitsandbytes"]
    bnb_state = "ok" if bnb.get("ok") else f"PROBLEM: {bnb.get('problem')}"
    error = f" (error {fmt(bnb['nf4_roundtrip_error'])})" if "nf4_roundtrip_error" in bnb else ""
    lines.append(f"  bitsandbytes: native library {bnb.get('native_library')}; NF4 quantize + dequantize on this "
                 f"device: {bnb_state}{error}")
    xf = env["xformers"]
    if xf.get("problem"):
        lines.append(f"  xformers: {xf['problem']}")
    else:
        built = xf.get("built_for") or {}
        lines.append(f"  xformers {xf['version']}: compiled library {' '.join(xf['compiled_library'].split()[:40])}"
                     + (f" (built for torch {built.get('torch')}, CUDA {built.get('cuda')})" if built else ""))
        accepted = [name for name, verdict in xf["ops"].items() if verdict == "accepts"]
        lines.append(f"    attention ops accepting a packed causal batch here: {', '.join(accepted) or 'none'}")
        if dev["type"] == "cuda":  # (on the CPU every op refuses the device)
            lines += [f"    {name}: {verdict[:160]}" for name, verdict in xf["ops"].items() if verdict != "accepts"]
    if env["float32_matmul_precision"] != "highest" or env["NVIDIA_TF32_OVERRIDE"] not in (None, "0"):
        lines.append(f"  fp32 matmuls may run in TF32 (torch.get_float32_matmul_precision() = "
                     f"{env['float32_matmul_precision']!r}, NVIDIA_TF32_OVERRIDE={env['NVIDIA_TF32_OVERRIDE']}): the "
                     "float32 rows of section 2 then show TF32's error")
    choices = env["choices"]
    lines.append(f"  dtype=None loads the model in {choices['dtype_none']}")
    for head_dim, route in choices["attention_routes"].items():
        mark = " (the model's)" if head_dim == choices["model_head_dim"] else ""
        lines.append(f"  attention, head size {head_dim}{mark}: {route['attention']} -- {route['why']}")
    return "\n".join(lines)


# the numerics table is printed a row at a time (as each check completes): fixed column widths
NUMERICS_COLUMNS = (("op", 26), ("case", 44), ("dtype", 8), ("tensor", 9), ("error", 8), ("tolerance", 10),
                    ("1st call", 8), ("switch", 26), ("status", 0))


def _fixed(cells) -> str:
    return "  " + " ".join(str(cell)[:width].ljust(width) if width else str(cell)
                           for cell, (_, width) in zip(cells, NUMERICS_COLUMNS)).rstrip()


def numerics_header() -> str:
    return _fixed([name for name, _ in NUMERICS_COLUMNS])


def numerics_line(row: dict) -> str:
    first = f"{row['first_call_s']:.2f}s" if row.get("first_call_s") is not None else "-"
    status = row["status"] if row["status"] == "pass" else f"FAIL: {row.get('exception') or row.get('problem')}"
    return _fixed([row["op"], row["case"], row["dtype"], row.get("tensor") or "-", fmt(row.get("error"), ".1e"),
                   fmt(row.get("tolerance"), ".1e"), first, row["switch"], status[:300]])


def speed_lines(section: dict) -> str:
    rows = []
    for r in section["rows"]:
        if r["status"] != "ok":
            rows.append([r["op"], r.get("shape") or "-", "-", "-", r["reference"], "-", "-", "-",
                         f"error: {r.get('message', '')[:120]}"])
            continue
        key = "fwdbwd" if r["timed"] == "fwd+bwd" else "fwd"
        fast, ref = r["fastft"], r[r["reference"]]
        rate = "-"
        if f"{key}_gbps" in fast:
            frac = fast.get(f"{key}_frac_of_peak_bw")
            rate = f"{fast[f'{key}_gbps']:.3g} GB/s" + (f" ({frac:.0%} of peak)" if frac else "")
        elif f"{key}_tflops" in fast:
            rate = f"{fast[f'{key}_tflops']:.3g} TFLOP/s"
        rows.append([r["op"], (r["shape"] or "-")[:56], r["timed"], f"{fast[key + '_ms']:.3f}", r["reference"],
                     f"{ref[key + '_ms']:.3f}", f"{r['speedup']:.2f}x", rate, ""])
    return table(rows, ["op", "shape", "timed", "fastft ms", "reference", "ref ms", "speed-up", "fastft rate", ""])


def parity_lines(p: dict) -> str:
    if p.get("status") == "error":
        return f"  ERROR: {p['problem']}"
    rows = [[str(step + 1), f"{a:.6f}", f"{b:.6f}", f"{d:.2e}"]
            for step, (a, b, d) in enumerate(zip(p["losses_fastft"], p["losses_hf"], p["loss_abs_diff"]))]
    lines = [f"  {p['model']}; {p['dtype']}, batch {p['batch']}, {p['optimizer']}; fastft: {p['engine']}",
             table(rows, ["step", "loss fastft", "loss hf+peft+bnb", "|diff|"]),
             f"  loss |diff| max {max(p['loss_abs_diff']):.2e}, tolerance {p['loss_tolerance']:.2e}",
             f"  summed LoRA gradients: error {p['lora_grad_error']:.2e} (worst {p['lora_grad_worst']}), "
             f"tolerance {p['lora_grad_tolerance']:.2e}",
             f"  final LoRA weights: error {p['lora_weight_error']:.2e}, tolerance {p['lora_weight_tolerance']:.2e}",
             f"  tokens/s: fastft {p['tokens_per_s_fastft']:.0f}, hf {p['tokens_per_s_hf']:.0f}, ratio "
             f"{p['tokens_per_s_ratio']:.2f} ({p['tokens_per_s_note']})",
             f"  {p['status'] if p['status'] == 'pass' else 'FAIL: ' + p['problem']}"]
    return "\n".join(lines)


def memory_lines(m: dict) -> str:
    if m.get("status") != "ok":
        return f"  {m.get('status')}: {m.get('problem')}"
    return "\n".join([
        f"  {m['setup']}; measured: {m['measured']}",
        f"  peak: measured {m['measured_peak_bytes'] / 2**20:.2f} MiB, accounted "
        f"{m['accounted_peak_bytes'] / 2**20:.2f} MiB, ratio {m['peak_ratio']:.3f} (accounted peak in the "
        f"{m['accounted_peak_phase']})",
        f"  resident (weights, adapters, gradients, optimizer state): measured "
        f"{m['measured_resident_bytes'] / 2**20:.2f} MiB, accounted {m['accounted_resident_bytes'] / 2**20:.2f} MiB, "
        f"ratio {m['resident_ratio']:.3f}"])


# ---------------------------------------------------------------------------------------------
# Verdict and JSON


def disable_switches(names: list[str]) -> list[str]:
    listed = ",".join(names)
    return [f"  environment:  FASTFT_DISABLE_KERNELS={listed}",
            f"  Python:       FastModel.from_pretrained(..., disable_kernels={names!r})"]


def _plain(value):
    """``value`` with what JSON cannot hold made plain: non-finite floats as strings ("inf", "nan"), tuples as
    lists, dict keys and anything else (dtypes, devices) as strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # dtypes, devices


def write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(_plain(report), f, indent=1, allow_nan=False)
        f.write("\n")
