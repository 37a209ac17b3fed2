"""Section 3, kernels' speed: each op of the micro-benchmarks' case table (``fastft.microbench_cases``, shared with
``bench/microbench.py``) against the implementation it replaces (PyTorch eager, bitsandbytes' dequantize, peft's
LoRA layers, TRL's log-prob kernel, SDPA), at the model's shapes on a GPU.

Times: the median of ``REPEATS`` runs after ``WARMUP`` runs, each timed by CUDA events, gradients reset between
runs; on the CPU one call each, timed by ``time.perf_counter``, at the case table's tiny shapes (labelled: the
interpreted Triton kernels, or fastft's PyTorch engine, give no speed figure; this checks that every op runs).
Memory-bound ops also get their achieved GB/s (the case's byte count: each input read once, each output written
once) as a fraction of the device's peak memory bandwidth.
"""
from __future__ import annotations

import gc
import statistics
import time

import torch

from ..microbench_cases import CASES, Run, measure, shapes

WARMUP, REPEATS = 5, 20
# Peak memory bandwidth (GB/s, vendor figures) of cards whose memory clock torch does not report; the first name
# found in the device's name wins (so the more specific names come first).
KNOWN_BANDWIDTH_GBPS = (
    ("H200", 4800), ("H100 NVL", 3938), ("H100 PCIe", 2039), ("H100", 3352), ("GH200", 4000),
    ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("A10G", 600), ("A10", 600),
    ("L40S", 864), ("L40", 864), ("L4", 300), ("V100", 900), ("T4", 320), ("RTX 4090", 1008), ("RTX 3090", 936),
    ("RTX A6000", 768), ("MI300X", 5300), ("MI250X", 3277),
)


def peak_bandwidth(device: torch.device) -> tuple[float | None, str]:
    """The device's peak memory bandwidth in GB/s and where the figure comes from."""
    if device.type != "cuda":
        return None, "CPU: no peak bandwidth figure"
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        # double data rate: two transfers per memory clock, bus_bits / 8 bytes each
        gbps = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
        return gbps, f"from the memory clock ({clock_khz / 1e3:.0f} MHz) and bus width ({bus_bits} bits) torch reports"
    for name, gbps in KNOWN_BANDWIDTH_GBPS:
        if name in props.name:
            return float(gbps), f"vendor figure for {name} (torch reports no memory clock here)"
    return None, f"unknown: torch reports no memory clock and {props.name!r} is not in the table of known cards"


class Timer:
    """The timing interface ``microbench_cases.measure`` expects (``time_ms``), by CUDA events or perf_counter."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.dry_run = not self.cuda  # the case table's tiny CPU shapes

    def time_ms(self, fn, grad_to_none=None) -> dict:
        def once():
            for t in grad_to_none or []:
                t.grad = None
            if not self.cuda:
                start = time.perf_counter()
                fn()
                return (time.perf_counter() - start) * 1e3
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        warmup, repeats = (WARMUP, REPEATS) if self.cuda else (0, 1)
        for _ in range(warmup):
            once()
        times = sorted(once() for _ in range(repeats))
        return {"median": statistics.median(times), "p20": times[len(times) // 5], "p80": times[4 * len(times) // 5]}

    def peak_extra_gb(self, fn):
        return None


def model_shapes(config, tiny: bool) -> dict:
    """The case table's sizes for this model: a training step's shapes (4096 tokens) on a GPU, the table's tiny
    dry-run shapes on the CPU."""
    if tiny:
        return shapes(dry=True)
    q_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    H, inter = config.hidden_size, config.intermediate_size
    return dict(rows=4096, hidden=H, inter=inter, vocab=config.vocab_size, rope=(1, q_heads, kv_heads, 4096, head_dim),
                lm_tokens=[2048], nf4=[(inter, H)], lora_tokens=[4096], attn_T=[4096], attn_tokens=4096,
                attn_heads=(q_heads, kv_heads), attn_dim=head_dim, kv_heads=kv_heads)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_case(case, timer: Timer, S: dict, dtype: torch.dtype, setups: dict, peak_gbps: float | None) -> dict:
    """One op: fastft's implementation and the case's reference on the first of its sizes."""
    size = case.sizes(S)[0]
    row = {"op": case.op, "switch": switch_of(case), "reference": case.reference, "shape": None}
    try:
        if case.setup is not None and case.setup not in setups:
            setups[case.setup] = case.setup(timer, S, dtype)
        x = case.build(timer, S, dtype, size, setups.get(case.setup))
        row["shape"] = x.shape
        for name in ("fastft", case.reference):
            made = case.impls[name](x)
            run = made if isinstance(made, Run) else Run(made)
            grads = x.grads if run.grads is None else run.grads
            row[name] = measure(timer, run.forward, grads, x.dys, backward=case.backward)
            if case.traffic:
                for phase, amount in zip(("fwd", "fwdbwd"), _cumulative(case.traffic(x))):
                    if f"{phase}_ms" in row[name]:
                        gbps = amount / (row[name][f"{phase}_ms"] * 1e-3) / 1e9
                        row[name][f"{phase}_gbps"] = gbps
                        row[name][f"{phase}_frac_of_peak_bw"] = gbps / peak_gbps if peak_gbps else None
            if case.flops:
                for phase, amount in zip(("fwd", "fwdbwd"), _cumulative(case.flops(x))):
                    if f"{phase}_ms" in row[name]:
                        row[name][f"{phase}_tflops"] = amount / (row[name][f"{phase}_ms"] * 1e-3) / 1e12
            if run.note:
                row[name]["note"] = run.note
        key = "fwdbwd_ms" if case.backward else "fwd_ms"
        row["speedup"] = row[case.reference][key] / row["fastft"][key]
        row["timed"] = "fwd+bwd" if case.backward else "fwd"
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - recorded; the doctor goes on
        row.update(status="error", message=f"{type(exc).__name__}: {exc}"[:1500])
    finally:
        _free(timer.device)
    return row


def _cumulative(amounts):
    """(fwd, bwd) byte or FLOP counts -> (fwd, fwd + bwd)."""
    fwd, bwd = amounts
    return fwd, fwd + bwd


def switch_of(case) -> str:
    """The kernel's name in FASTFT_DISABLE_KERNELS of a case (the table's ``lora`` group holds three kernels)."""
    return case.op if case.group == "lora" else case.group


def selected_cases(switches: set[str] | None) -> list:
    """The case table's cases whose kernel is among ``switches`` (None: all)."""
    return [case for case in CASES if switches is None or switch_of(case) in switches]
