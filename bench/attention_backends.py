#!/usr/bin/env python3
"""fastft's three attention backends side by side, called as a patched model calls them, at seq 2048 (GPU).

    python bench/attention_backends.py  # writes <out-dir>/<date>-<gpu>-attention.{json,md}
    python bench/attention_backends.py --cpu-dry-run --out-dir /tmp/a  # CPU: every code path at tiny shapes, no figures

Backends (the transformers attention functions a fastft model is routed to):

* ``fastft``: fastft's Triton flash-attention kernel (varlen for packed and padded batches);
* ``fastft_xformers``: xformers' memory-efficient kernel with a block-diagonal mask (fastft's route below sm_80);
* ``sdpa``: PyTorch SDPA with the dense boolean ``[B, 1, T, T]`` mask transformers builds for it (the fallback).

Batches, with Llama-3-8B's attention shape (32 query heads, 8 kv heads, head dim 128):

* ``packed``: one row of 2048 tokens holding 5 sequences, described by restarting position_ids and by the
  cu_seq_lens a padding-free collator sends (each backend reads what it uses);
* ``padded``: 4 rows of 2048 positions holding 2048, 1536, 1024 and 700 real tokens (right padding, 2D mask).

Per backend and batch: the forward's and dq/dk/dv's max abs error against float32 math on the same inputs (real
tokens; the gradient of the output is zero on pads), relative to the reference's largest magnitude; the median
milliseconds of a forward and of a forward+backward (CUDA events, after warm-up; packing metadata is derived on
the first call and reused, as layers 2..L of a forward reuse it); the peak memory of one forward+backward above
what was allocated before (outputs and gradients included; SDPA's mask is built once per model forward, not per
layer, so it is made beforehand and reported on its own as ``mask_mb``). A backend that cannot run here (xformers
not installed, or its CUDA build not loading beside this torch) gets a ``not_available`` row saying why.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

# bench/ is not a package: its scripts import _shared.py as a sibling module. Run as a script, bench/ is
# sys.path[0] already; loaded by path (the tests) it is added here. Never the repository root (clean_sys_path).
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)
import _shared as shared  # noqa: E402

_DROPPED_FROM_PATH: list[str] = []

BACKENDS = ("fastft", "fastft_xformers", "sdpa")
BATCHES = ("packed", "padded")
KEY = ("backend", "batch", "shape", "dtype", "device_kind")
SHAPES = {  # per mode: heads, head dim, row length, and the sequence lengths of each batch
    "gpu": dict(q_heads=32, kv_heads=8, head_dim=128, seq_len=2048, packed=[512, 300, 700, 236, 300],
                padded=[2048, 1536, 1024, 700]),
    "dry": dict(q_heads=6, kv_heads=2, head_dim=64, seq_len=48, packed=[20, 17, 11], padded=[48, 30]),
}
# relative max abs error (error / the reference's largest magnitude) above which a row is flagged "mismatch":
# 16-bit inputs and outputs round at 2**-11 (fp16) / 2**-8 (bf16) relative; the kernels accumulate in fp32
TOLERANCE = {"float16": 1e-2, "bfloat16": 4e-2, "float32": 1e-4}
WARMUP, REPS = 3, 20


class AttentionModule:
    """What transformers' attention functions read from the attention module."""

    is_causal = True

    def __init__(self, q_heads: int, kv_heads: int):
        self.num_key_value_groups = q_heads // kv_heads


def make_batch(kind: str, S: dict, device):
    """(mask for fastft's and xformers' functions, their kwargs, SDPA's 4D bool mask, real tokens [B, T])."""
    T = S["seq_len"]
    if kind == "packed":
        lengths = torch.tensor(S["packed"])
        assert int(lengths.sum()) == T
        positions = torch.cat([torch.arange(n) for n in S["packed"]])[None]
        sequence = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[None]
        real = torch.ones(1, T, dtype=torch.bool)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        kwargs = dict(position_ids=positions.to(device), cu_seq_lens_q=cu.to(device), cu_seq_lens_k=cu.to(device),
                      max_length_q=max(S["packed"]), max_length_k=max(S["packed"]))
        mask_2d = None
    else:
        lengths = torch.tensor(S["padded"])
        positions = torch.arange(T)[None].expand(len(lengths), T)
        sequence = torch.zeros_like(positions)
        real = positions < lengths[:, None]
        kwargs = dict(position_ids=torch.arange(T, device=device)[None])
        mask_2d = real.long().to(device)
    # key j is visible from query i: same sequence, not later, not a pad (what transformers' sdpa_mask builds)
    allowed = ((sequence[:, :, None] == sequence[:, None, :]) & (positions[:, None, :] <= positions[:, :, None])
               & real[:, None, :])
    return mask_2d, kwargs, allowed[:, None].to(device), real.to(device)


def reference(q, k, v, sdpa_mask, scale, grad_out):
    """float32 attention and its q/k/v gradients, one (row, kv head) at a time so the scores stay [group, T, T].
    q/k/v ``[B, T, H, D]``; returns out, dq, dk, dv in that layout."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv
    out, dq = torch.zeros(q.shape, device=q.device), torch.zeros(q.shape, device=q.device)
    dk, dv = torch.zeros(k.shape, device=q.device), torch.zeros(k.shape, device=q.device)
    for b in range(B):
        for g in range(Hkv):
            heads = slice(g * group, (g + 1) * group)
            qs = q[b, :, heads].float().transpose(0, 1).requires_grad_()
            ks, vs = k[b, :, g].float().requires_grad_(), v[b, :, g].float().requires_grad_()
            scores = (qs @ ks.T * scale).masked_fill(~sdpa_mask[b], float("-inf"))
            o = scores.softmax(-1) @ vs
            o.backward(grad_out[b, :, heads].float().transpose(0, 1))
            out[b, :, heads] = o.detach().transpose(0, 1)
            dq[b, :, heads] = qs.grad.transpose(0, 1)
            dk[b, :, g], dv[b, :, g] = ks.grad, vs.grad
    return out, dq, dk, dv


def backend_function(name: str, device, dtype, head_dim: int):
    """The attention function, or the reason it cannot run here."""
    if name == "fastft":
        from fastft.attention import fastft_attention

        return fastft_attention, None
    if name == "fastft_xformers":
        from fastft.xformers_attention import unavailable_reason, xformers_attention

        return xformers_attention, unavailable_reason(device, dtype, head_dim)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward, None


def measure(name: str, kind: str, S: dict, device, dtype) -> dict:
    dtype_name = str(dtype).replace("torch.", "")
    B = 1 if kind == "packed" else len(S["padded"])
    row = {"backend": name, "batch": kind, "device_kind": device.type, "dtype": dtype_name,
           "shape": f"B={B} T={S['seq_len']} Hq={S['q_heads']} Hkv={S['kv_heads']} D={S['head_dim']}",
           "sequences": S[kind], "status": "ok", "message": None, "flags": []}
    fn, why_not = backend_function(name, device, dtype, S["head_dim"])
    if why_not is not None:
        return {**row, "status": "not_available", "message": why_not}

    mask_2d, kwargs, sdpa_mask, real = make_batch(kind, S, device)
    gen = torch.Generator(device=device).manual_seed(0)
    T, Hq, Hkv, D = S["seq_len"], S["q_heads"], S["kv_heads"], S["head_dim"]
    # leaves in [B, T, H, D]; the functions get [B, H, T, D] views, as the model's attention hands them over
    q, k, v = (torch.randn(B, T, h, D, generator=gen, device=device, dtype=dtype).requires_grad_()
               for h in (Hq, Hkv, Hkv))
    grad_out = torch.randn(B, T, Hq, D, generator=gen, device=device, dtype=dtype) * real[:, :, None, None]
    scale = D ** -0.5
    module = AttentionModule(Hq, Hkv)
    mask = sdpa_mask if name == "sdpa" else mask_2d
    if name == "sdpa":
        row["mask_mb"] = sdpa_mask.numel() * sdpa_mask.element_size() / 2**20

    def forward():
        return fn(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, dropout=0.0,
                  scaling=scale, sliding_window=None, **kwargs)[0]

    def forward_backward():
        forward().backward(grad_out)
        q.grad = k.grad = v.grad = None

    out = forward()
    out.backward(grad_out)
    ref = reference(q.detach(), k.detach(), v.detach(), sdpa_mask, scale, grad_out)
    for field, got, expected in (("fwd", out, ref[0]), ("dq", q.grad, ref[1]), ("dk", k.grad, ref[2]),
                                 ("dv", v.grad, ref[3])):
        got, expected = got.detach()[real].float(), expected[real]
        err = (got - expected).abs().max().item()
        row[f"{field}_max_abs_err"] = err
        row[f"{field}_rel_err"] = err / max(expected.abs().max().item(), 1e-30)
        if not row[f"{field}_rel_err"] <= TOLERANCE[dtype_name]:  # NaN counts as a mismatch
            row["flags"].append(f"{field}_mismatch")
    del out, ref
    q.grad = k.grad = v.grad = None

    with torch.no_grad():
        row["fwd_no_grad_ms"] = shared.timed_ms(device, forward, WARMUP, REPS)
    row["fwd_ms"] = shared.timed_ms(device, forward, WARMUP, REPS)
    row["fwd_bwd_ms"] = shared.timed_ms(device, forward_backward, WARMUP, REPS)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        forward_backward()
        torch.cuda.synchronize()
        row["peak_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return row


def markdown(data: dict) -> str:
    out = ["# CPU DRY RUN: code paths only, NOT performance figures\n" if data.get("cpu_dry_run") else
           f"# fastft attention backends: {data['gpu']}, {data['date']}\n",
           f"- torch {data['torch']} (CUDA {data.get('cuda')}), triton {data['triton']}, transformers "
           f"{data['transformers']}, xformers {data.get('xformers')}; GPU capability {data.get('gpu_capability')}",
           f"- fastft source digest {(data.get('fastft') or {}).get('source_digest')}", "",
           "| batch | shape | dtype | backend | status | fwd ms | fwd no-grad ms | fwd+bwd ms | peak MB | mask MB "
           "| rel err fwd / dq / dk / dv |",
           "|---|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for row in sorted(data["rows"], key=lambda r: (r["batch"], r["shape"], r["dtype"], BACKENDS.index(r["backend"]))):
        status = row["status"] + (f" ({', '.join(row['flags'])})" if row.get("flags") else "")
        errors = " / ".join(shared.fmt(row.get(f"{f}_rel_err"), ".1e") for f in ("fwd", "dq", "dk", "dv"))
        out.append(f"| {row['batch']} | {row['shape']} | {row['dtype']} | {row['backend']} | {status} "
                   f"| {shared.fmt(row.get('fwd_ms'), '.3f')} | {shared.fmt(row.get('fwd_no_grad_ms'), '.3f')} "
                   f"| {shared.fmt(row.get('fwd_bwd_ms'), '.3f')} | {shared.fmt(row.get('peak_mb'), '.1f')} "
                   f"| {shared.fmt(row.get('mask_mb'), '.3g')} | {errors} |")
    out += shared.message_lines(data["rows"], lambda r: f"{r['backend']} {r['batch']}")
    out += ["", "## Definitions", "", __doc__.split("\n\n", 2)[2].strip(),
            f"\nTolerance (relative max abs error flagged as mismatch): {TOLERANCE}"]
    return "\n".join(out) + "\n"


def build_parser():
    p = argparse.ArgumentParser(prog="bench/attention_backends.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16",
                   help="GPU dtype (V100/T4 have no bf16; xformers' kernels take bf16 from sm_80)")
    shared.add_run_options(p, "measurement", "every code path at tiny shapes on CPU, float32")
    return p


def main(argv=None) -> int:
    _DROPPED_FROM_PATH[:] = shared.clean_sys_path()  # before anything imports transformers
    args = build_parser().parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        return shared.refuse_without_gpu("bench/attention_backends.py")
    shared.warn_dropped(_DROPPED_FROM_PATH, "bench/attention_backends.py")
    date = shared.utc_date()
    if args.cpu_dry_run:
        device, dtype, S = torch.device("cpu"), torch.float32, SHAPES["dry"]
    else:
        device, dtype, S = torch.device("cuda", 0), getattr(torch, args.dtype), SHAPES["gpu"]
    gpu, stem, out_dir = shared.result_names("attention", args.cpu_dry_run, args.out_dir, date)
    os.makedirs(out_dir, exist_ok=True)
    header = {**shared.environment(gpu), "date": date, "command": shared.command_line(),
              "cpu_dry_run": bool(args.cpu_dry_run)}
    print(f"bench/attention_backends.py: {gpu}; torch {header['torch']}, xformers {header['xformers']}", flush=True)
    started = time.time()
    rows = []
    for kind in BATCHES:
        for name in BACKENDS:
            if args.time_budget_s and time.time() - started > args.time_budget_s:
                rows.append({"backend": name, "batch": kind, "device_kind": device.type, "shape": "-",
                             "dtype": str(dtype).replace("torch.", ""), "status": "skipped", "flags": [],
                             "message": "not run: --time-budget-s exhausted"})
                continue
            try:
                row = measure(name, kind, S, device, dtype)
            except Exception as exc:  # noqa: BLE001 - recorded in the row, the others still run
                text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]).strip()
                row = {"backend": name, "batch": kind, "device_kind": device.type, "shape": "-", "flags": [],
                       "dtype": str(dtype).replace("torch.", ""), "status": "error", "message": text[-1500:]}
            rows.append(row)
            print(f"  {kind:>6} {name:>15}: {row['status']} {row.get('flags') or ''} "
                  + " ".join(f"{f}={row[f]:.3g}" for f in ("fwd_ms", "fwd_bwd_ms", "peak_mb", "fwd_rel_err",
                                                            "dq_rel_err") if row.get(f) is not None)
                  + (f" ({row['message'].strip().splitlines()[-1][:200]})" if row.get("message") else ""), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    run_info = {"started": shared.utc_now(), "seconds": round(time.time() - started, 1), "command": header["command"],
                **{k: header[k] for k in ("gpu", "torch", "triton", "transformers", "xformers", "fastft")}}
    shared.write_results(out_dir, stem, header, run_info, rows, KEY, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
