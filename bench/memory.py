#!/usr/bin/env python3
"""Accounted GPU memory of QLoRA training, fastft against the Hugging Face baseline, at full model size, on a CPU.

    python bench/memory.py                       # the table: 3 models x lengths x batch x checkpointing, + max context
    python bench/memory.py --quick               # Llama-3.1-8B only, a few settings (a few minutes)
    python bench/memory.py --models ./my-model-dir --seq-lens 4096 --batch-sizes 1 --no-max-context
    python bench/memory.py --gpu-check           # on a GPU: accounting vs torch.cuda.max_memory_allocated
    python bench/memory.py --models llama-3.1-70b --seq-lens 4096 --fsdp-world-size 2   # per GPU, FSDP2 on 2

Every figure written by the first three is **accounted, not measured on a GPU**: one training step (forward,
backward, fused AdamW step) is run on meta tensors along the code path a GPU runs (fastft's Triton wrappers
with their launches stubbed, cuBLAS outputs, what autograd saves, the CUDA backends of SDPA and bitsandbytes'
4-bit matmul) and the bytes of live tensor storages are counted, as ``torch.cuda.max_memory_allocated``
counts them (``fastft/memory``). Validated on CPU against the live bytes of the same step run for real
(``tests/test_memory.py``). Not counted: the CUDA context, cuBLAS/cuDNN workspaces, allocator rounding and
fragmentation (bench/README.md). The max-context table compares the peak with each card less the headroom of
``fastft/memory/headroom.py`` for those (``--raw``: with the whole card), and says which beside the table.

Contenders (``fastft.memory.training_step``): ``hf`` = transformers + peft + bitsandbytes NF4 double-quant,
SDPA, transformers' gradient checkpointing; ``fastft`` = the same model patched by fastft. Both: LoRA on all
seven linear layers, adapters in bf16 and fused AdamW (what TRL's SFTTrainer does to a 4-bit model).
``--loss trl`` (default) is TRL's fused lm-head path, what SFTTrainer runs; ``labels`` is ``model(labels=...)``.

``--fsdp-world-size N``: every figure is one GPU's of an FSDP2 job of N GPUs (the model sharded by torch's
``fully_shard`` as the Trainer's accelerate plugin shards it; batch sizes per GPU; ``fastft/memory/fsdp.py``).

Outputs in ``--out-dir`` (default ``bench/results``): ``memory-<date>.json`` (rows, max_context, versions,
date, command), ``memory-<date>.md`` and ``memory-<date>.png`` (``memory-fsdp<N>-<date>.*`` with FSDP;
``memory-max-context-<date>.*`` with ``--no-rows``: the max-context table alone, no plot).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# bench/ is not a package: its scripts import _shared.py as a sibling module. Run as a script, bench/ is
# sys.path[0] already; loaded by path (the tests) it is added here. Never the repository root (clean_sys_path).
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)
import _shared as shared  # noqa: E402

MODELS = ("llama-3.1-8b", "qwen2-7b", "qwen2.5-1.5b")
SEQ_LENS = (512, 2048, 8192, 32768)
BATCH_SIZES = (1, 4)
CHECKPOINTING = ("off", "on", "offload")
VRAM_GB = (8, 12, 16, 24, 40, 48, 80)
MAX_CONTEXT_RS = (16, 32)
FASTFT_MLP_CHUNK = 8192  # fastft's max context: offloaded checkpoints and the MLP in chunks of this many tokens
# Unsloth's published max context for Llama 3.1 8B QLoRA (r=32, batch 1), for comparison, with Hugging Face + FA2:
# https://docs.unsloth.ai/basics/unsloth-benchmarks (not accounted here; their method is theirs)
PUBLISHED = {("llama-3.1-8b", 24): {"unsloth": 78_475, "hf+fa2": 5_789},
             ("llama-3.1-8b", 80): {"unsloth": 342_733, "hf+fa2": 28_454}}
ROW_KEY = ("contender", "model", "seq_len", "batch_size", "r", "checkpointing", "loss")
COLORS = {"hf": "tab:gray", "fastft": "tab:orange"}


def build_parser() -> argparse.ArgumentParser:
    csv = lambda kind: (lambda text: tuple(kind(x) for x in text.split(",") if x))  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=csv(str), default=MODELS,
                        help=f"known names ({','.join(MODELS)}) or local config directories")
    parser.add_argument("--seq-lens", type=csv(int), default=SEQ_LENS)
    parser.add_argument("--batch-sizes", type=csv(int), default=BATCH_SIZES)
    parser.add_argument("--checkpointing", type=csv(str), default=CHECKPOINTING)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank of the rows (the max-context table: 16 and 32)")
    parser.add_argument("--loss", choices=("trl", "labels"), default="trl")
    parser.add_argument("--contenders", type=csv(str), default=("hf", "fastft"))
    parser.add_argument("--vram", type=csv(float), default=VRAM_GB, help="card sizes (GiB) of the max-context table")
    parser.add_argument("--no-max-context", action="store_true")
    parser.add_argument("--no-rows", action="store_true", help="the max-context table alone (no peak per setting)")
    parser.add_argument("--max-context-rs", type=csv(int), default=MAX_CONTEXT_RS,
                        help="LoRA ranks of the max-context table (default 16,32)")
    parser.add_argument("--raw", action="store_true",
                        help="max context against the whole card, without the headroom (fastft/memory/headroom.py)")
    parser.add_argument("--mlp-chunk-tokens", type=int, default=FASTFT_MLP_CHUNK,
                        help="fastft's MLP chunk in the max-context search (0: none)")
    parser.add_argument("--quick", action="store_true", help="Llama-3.1-8B, 2048/8192 tokens, batch 1, on/offload")
    parser.add_argument("--fsdp-world-size", type=_world_size, default=1, metavar="N",
                        help="figures per GPU of an FSDP2 job of N GPUs (default 1: one GPU, no FSDP)")
    parser.add_argument("--out-dir", default=shared.DEFAULT_RESULTS_DIR)
    parser.add_argument("--gpu-check", action="store_true",
                        help="on a GPU: run small steps for real and compare max_memory_allocated with the accounting")
    return parser


def _world_size(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a number of GPUs (1 or more), got {text!r}")
    return int(text)


def rows_for(args) -> list[dict]:
    from fastft.memory.estimate import estimate_memory

    rows = []
    for model in args.models:
        for checkpointing in args.checkpointing:
            for batch_size in args.batch_sizes:
                for seq_len in args.seq_lens:
                    pair = {}
                    for contender in args.contenders:
                        t0 = time.perf_counter()
                        est = estimate_memory(model, seq_len, batch_size=batch_size, r=args.r, loss=args.loss,
                                              contender=contender, use_gradient_checkpointing=checkpointing,
                                              fsdp_world_size=args.fsdp_world_size)
                        pair[contender] = row = {
                            "contender": contender, "model": model, "seq_len": seq_len, "batch_size": batch_size,
                            "r": args.r, "checkpointing": checkpointing, "loss": args.loss,
                            "fsdp_world_size": args.fsdp_world_size, "resident_gb": round(est.resident_gb, 4),
                            "peak_gb": round(est.peak_gb, 4),
                            "peak_phase": est.peak_phase,
                            "resident": {k: round(v, 4) for k, v in est.resident.items()},
                            "seconds": round(time.perf_counter() - t0, 1)}
                        rows.append(row)
                        print(f"{model} {contender:6s} ckpt={checkpointing:7s} B={batch_size} T={seq_len:6d}: "
                              f"resident {est.resident_gb:6.2f} GiB, peak {est.peak_gb:7.2f} GiB", flush=True)
                    if "hf" in pair and "fastft" in pair:
                        pair["fastft"]["peak_vs_hf"] = round(pair["fastft"]["peak_gb"] / pair["hf"]["peak_gb"], 4)
    return rows


def max_context_for(args) -> list[dict]:
    from fastft.memory.configs import load_config
    from fastft.memory.estimate import max_context
    from fastft.moe import is_moe_config

    found = []
    for model in args.models:
        moe = is_moe_config(load_config(model))  # mlp_chunk_tokens does not apply to mixture-of-experts blocks
        for contender in args.contenders:
            chunk = (args.mlp_chunk_tokens or None) if contender == "fastft" and not moe else None
            for r in args.max_context_rs:
                t0 = time.perf_counter()
                limits = max_context(model, list(args.vram), r=r, batch_size=1, loss=args.loss, contender=contender,
                                     use_gradient_checkpointing="offload", mlp_chunk_tokens=chunk,
                                     fsdp_world_size=args.fsdp_world_size, beyond_trained_context=True,
                                     headroom=not args.raw)
                for vram, tokens in limits.items():
                    found.append({"contender": contender, "model": model, "r": r, "batch_size": 1,
                                  "checkpointing": "offload", "mlp_chunk_tokens": chunk, "loss": args.loss,
                                  "fsdp_world_size": args.fsdp_world_size, "headroom": not args.raw,
                                  "vram_gb": vram, "max_seq_len": tokens,
                                  "search_seconds": round(time.perf_counter() - t0, 1)})
                print(f"{model} {contender:6s} r={r}: " + ", ".join(f"{v:g} GiB -> {t:,}" for v, t in limits.items())
                      + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    return found


def _context_cell(tokens: int) -> str:
    from fastft.memory.estimate import MAX_ACCOUNTED_TOKENS

    return f"≥ {tokens:,}" if tokens >= MAX_ACCOUNTED_TOKENS else f"{tokens:,}"


def _headroom_note(data: dict) -> str:
    """What the max-context table compares the accounted peak with, stated beside it."""
    from fastft.memory import headroom

    if not _with_headroom(data):
        return ("**Raw: the accounted peak against the whole card** (`--raw`; no headroom for the CUDA context or the "
                "allocator's rounding and fragmentation: a real card fits less).")
    usable = ", ".join(f"{v:g} → {headroom.usable_gib(v):.2f}" for v in data["vram_gb"])
    return (f"**With headroom**: the accounted peak fits each card less {headroom.CUDA_CONTEXT_GIB:g} GiB for the CUDA "
            f"context and {headroom.FRAGMENTATION_FRACTION:.0%} of the card for the caching allocator's rounding and "
            f"fragmentation (`fastft/memory/headroom.py`; `--raw` for the whole card). GiB usable per card: {usable}.")


def markdown(data: dict) -> str:
    lines = [f"# Accounted GPU memory of a QLoRA training step ({data['date']})", "",
             "**Accounted, not measured on a GPU** (`fastft/memory`: the step runs on meta tensors along the GPU "
             "code path; live tensor bytes counted as `torch.cuda.max_memory_allocated` counts them; CUDA "
             "context, library workspaces and allocator fragmentation not included). GiB = 2^30 bytes.", "",
             f"Command: `{data['command']}`; torch {data['torch']}, transformers {data['transformers']}, "
             f"peft {data['peft']}, bitsandbytes {data['bitsandbytes']}, trl {data['trl']}, fastft "
             f"{data['fastft'].get('git_commit') or data['fastft'].get('version')}.", ""]
    if data.get("fsdp_world_size", 1) > 1:
        lines += [f"**Per GPU of an FSDP2 job of {data['fsdp_world_size']} GPUs** (its shards of the model, adapters, "
                  "gradients and optimizer state, the layers FSDP gathers, its reduce-scatter buffers; batch per GPU).",
                  ""]
    if data["max_context"]:
        chunks = {m["mlp_chunk_tokens"] for m in data["max_context"] if m["contender"] == "fastft"} - {None}
        lines += [f"## Longest sequence that fits (batch 1, offloaded checkpointing, loss path "
                  f"`{data['max_context'][0]['loss']}`"
                  + (f"; fastft's MLP in chunks of {', '.join(map(str, chunks))} tokens" if chunks else "") + ")",
                  "", _headroom_note(data), "",
                  "A multiple of 128 tokens; beyond a model's trained context (131,072 for Llama-3.1) this is "
                  "memory capacity only.", "",
                  "| model | r | contender | " + " | ".join(f"{v:g} GiB" for v in data["vram_gb"]) + " |",
                  "|---|---|---|" + "---|" * len(data["vram_gb"])]
        keys = sorted({(m["model"], m["r"], m["contender"]) for m in data["max_context"]},
                      key=lambda k: (k[0], k[1], k[2] != "fastft"))
        for model, r, contender in keys:
            cells = {m["vram_gb"]: m["max_seq_len"] for m in data["max_context"]
                     if (m["model"], m["r"], m["contender"]) == (model, r, contender)}
            lines.append(f"| {model} | {r} | {contender} | " + " | ".join(_context_cell(cells.get(v, 0))
                                                                        for v in data["vram_gb"]) + " |")
        if any(_context_cell(m["max_seq_len"]).startswith("≥") for m in data["max_context"]):
            lines += ["", "≥: the search stops at that length; more fits."]
        published = [f"{model} on {vram:g} GB: " + ", ".join(f"{who} {tokens:,}" for who, tokens in figures.items())
                     for (model, vram), figures in PUBLISHED.items() if model in {k[0] for k in keys}]
        if published:
            lines += ["", "Published by Unsloth for r=32 (their method, not accounted here): "
                      + "; ".join(published) + "."]
        lines.append("")
    if not data["rows"]:
        return "\n".join(lines) + "\n"
    lines += ["## Peak per setting", "", "| model | ckpt | batch | tokens | hf peak | fastft peak | fastft / hf | "
              "fastft resident |", "|---|---|---|---|---|---|---|---|"]
    by_key = {tuple(r[k] for k in ROW_KEY): r for r in data["rows"]}
    for row in data["rows"]:
        if row["contender"] != "fastft":
            continue
        hf = by_key.get(("hf", *[row[k] for k in ROW_KEY[1:]]))
        lines.append(f"| {row['model']} | {row['checkpointing']} | {row['batch_size']} | {row['seq_len']:,} | "
                     f"{hf['peak_gb']:.2f} | " if hf else f"| {row['model']} | {row['checkpointing']} | "
                     f"{row['batch_size']} | {row['seq_len']:,} | - | ")
        lines[-1] += (f"{row['peak_gb']:.2f} | {row.get('peak_vs_hf', float('nan')):.2f} | {row['resident_gb']:.2f} |")
    return "\n".join(lines) + "\n"


def _with_headroom(data: dict) -> bool:
    return data.get("headroom", {}).get("applied", False)  # older results files: raw


def card_lines(data: dict) -> list[tuple[float, str]]:
    """The plot's line per card: where an accounted peak must stay below, so the card less the headroom when the
    results apply it (a peak above it does not fit), the whole card for raw results."""
    from fastft.memory import headroom

    if _with_headroom(data):
        usable = [(v, headroom.usable_gib(v)) for v in data["vram_gb"]]
        return [(left, f"{v:g} GiB card: {left:.2f} usable ") for v, left in usable]
    return [(v, f"{v:g} GiB (whole card) ") for v in data["vram_gb"]]


def plot(data: dict, path: str) -> None:
    plt = shared.pyplot("bench/memory.py")
    if plt is None:
        return
    from fastft.memory import headroom

    models = list(dict.fromkeys(r["model"] for r in data["rows"]))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for contender in ("hf", "fastft"):
            for checkpointing, style in (("on", "--"), ("offload", "-")):
                points = sorted((r["seq_len"], r["peak_gb"]) for r in data["rows"]
                                if r["model"] == model and r["contender"] == contender and r["batch_size"] == 1
                                and r["checkpointing"] == checkpointing)
                if points:
                    ax.plot(*zip(*points), style, marker="o", color=COLORS[contender],
                            label=f"{contender}, checkpointing {checkpointing}")
        for height, label in card_lines(data):
            ax.axhline(height, color="tab:blue", alpha=0.25, linewidth=0.8)
            ax.text(1.0, height, label, fontsize=7, ha="right", va="bottom", color="tab:blue",
                    transform=ax.get_yaxis_transform())
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model} (batch 1, r={data['rows'][0]['r']})", fontsize=10)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("accounted peak (GiB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    lines = (f"lines: each card less {headroom.CUDA_CONTEXT_GIB:g} GiB CUDA context and "
             f"{headroom.FRAGMENTATION_FRACTION:.0%} for the allocator" if _with_headroom(data)
             else "lines: whole cards (raw)")
    fig.suptitle(f"Accounted peak memory of a QLoRA step, not measured on a GPU, {data['date']}\n{lines}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gpu_check(args) -> int:
    """On a GPU: a small model's step for real, max_memory_allocated against the accounting of the same step."""
    import torch

    if not torch.cuda.is_available():
        print("bench/memory.py --gpu-check needs a CUDA GPU", file=sys.stderr)
        return 2
    from fastft.memory.accounting import account_step, measure_step_on_gpu
    from fastft.memory.configs import load_config
    from fastft.memory.training_step import StepSetup

    rows = []
    config = load_config("qwen2.5-1.5b")
    for contender in args.contenders:
        for seq_len in (1024, 4096):
            for checkpointing in ("on", "offload"):
                setup = StepSetup(contender=contender, seq_len=seq_len, checkpointing=checkpointing, loss=args.loss)
                props = torch.cuda.get_device_properties(0)
                accounted = account_step(config, setup, sm_count=props.multi_processor_count)
                measured = measure_step_on_gpu(config, setup)
                rows.append({"contender": contender, "model": "qwen2.5-1.5b", "seq_len": seq_len,
                             "checkpointing": checkpointing, "loss": args.loss,
                             "accounted_peak_gb": accounted.peak_gb, "measured_peak_gb": measured.peak_gb,
                             "accounted_resident_gb": accounted.resident_gb,
                             "measured_resident_gb": measured.resident_gb,
                             "ratio": measured.peak_gb / accounted.peak_gb})
                print(rows[-1], flush=True)
    date = shared.utc_date()
    path = os.path.join(args.out_dir, f"memory-gpu-check-{date}-{shared.slug(torch.cuda.get_device_name(0))}.json")
    os.makedirs(args.out_dir, exist_ok=True)
    shared.write_json_atomic(path, {**shared.environment(torch.cuda.get_device_name(0)), "date": date,
                                    "command": shared.command_line(), "rows": rows})
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    shared.clean_sys_path()
    args = build_parser().parse_args(argv)
    if args.gpu_check:
        if args.fsdp_world_size > 1:
            print("bench/memory.py --gpu-check runs one GPU; the FSDP accounting is validated on CPU ranks "
                  "(tests/test_memory_fsdp.py)", file=sys.stderr)
            return 2
        return gpu_check(args)
    if args.quick:
        args.models, args.seq_lens, args.batch_sizes, args.checkpointing = (MODELS[:1], (2048, 8192), (1,),
                                                                            ("on", "offload"))
        args.vram = (24, 80)
    if args.no_rows and args.no_max_context:
        print("bench/memory.py: --no-rows with --no-max-context leaves nothing to do", file=sys.stderr)
        return 2
    from fastft.memory import headroom

    t0 = time.perf_counter()
    env = shared.environment("none (accounted on CPU)")  # the code as it was when the run started
    rows = [] if args.no_rows else rows_for(args)
    limits = [] if args.no_max_context else max_context_for(args)
    date = shared.utc_date()
    data = {**env, "date": date, "command": shared.command_line(),
            "accounted": True, "what": "accounted, not measured on a GPU (fastft/memory)",
            "vram_gb": list(args.vram), "headroom": headroom.as_dict(applied=not args.raw),
            "fsdp_world_size": args.fsdp_world_size, "rows": rows, "max_context": limits,
            "seconds": round(time.perf_counter() - t0, 1)}
    os.makedirs(args.out_dir, exist_ok=True)
    fsdp = f"fsdp{args.fsdp_world_size}-" if args.fsdp_world_size > 1 else ""
    part = "max-context-" if args.no_rows else ""
    base = os.path.join(args.out_dir, f"memory-{part}{fsdp}{date}")
    shared.write_json_atomic(base + ".json", data)
    with open(base + ".md", "w") as f:
        f.write(markdown(data))
    if rows:
        plot(data, base + ".png")
    print(f"wrote {base}.json, .md{', .png' if rows else ''} ({data['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
