"""``fastft-memory``: will a QLoRA fine-tune of a model fit a GPU? Reads only the model's config.

    fastft-memory llama-3.1-8b --seq-len 8192 --vram 24
    fastft-memory ./my-model-dir --seq-len 4096 --batch-size 2 --r 32 --checkpointing offload --vram 16
    fastft-memory llama-3.1-70b --seq-len 4096 --fsdp-world-size 2 --vram 24   # per GPU of 2, FSDP2

A step fits a card when its accounted peak fits the card less the headroom of ``fastft/memory/headroom.py`` (the
CUDA context and the caching allocator's rounding and fragmentation); ``--raw`` compares with the whole card.

Exit status: 0 fits (or no --vram given), 1 does not fit, 2 bad input (unknown model or architecture, bad numbers,
more than ``MAX_ACCOUNTED_TOKENS`` tokens per step).
"""
from __future__ import annotations

import argparse
import sys

from . import headroom
from .configs import KNOWN_MODELS
from .estimate import MAX_ACCOUNTED_TOKENS, estimate_memory, max_context, trained_context


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastft-memory",
        description="Accounted GPU memory of one QLoRA training step with fastft (or the Hugging Face baseline): "
                    "the peak that torch.cuda.max_memory_allocated would report, computed on the CPU from the "
                    "model's config. Compared with a card less the headroom for what it does not count (the CUDA "
                    "context, the caching allocator's rounding and fragmentation: fastft/memory/headroom.py).")
    parser.add_argument("model", help=f"a known name ({', '.join(KNOWN_MODELS)}), a local directory with a "
                                      "config.json, or a hub id already in the offline cache")
    parser.add_argument("--seq-len", type=_positive_int, default=2048,
                        help="tokens per sequence (default 2048; the accounting simulates at most "
                             f"{MAX_ACCOUNTED_TOKENS:,} tokens per step, seq-len x batch-size)")
    parser.add_argument("--batch-size", type=_positive_int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--r", type=_positive_int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--lora-alpha", type=_positive_int, default=16)
    parser.add_argument("--checkpointing", choices=("on", "off", "offload"), default="on",
                        help="gradient checkpointing (default on; offload keeps checkpoints in host memory)")
    parser.add_argument("--loss", choices=("trl", "labels"), default="trl",
                        help="trl: TRL's SFT/DPO fused lm-head path (default); labels: model(labels=...)")
    parser.add_argument("--contender", choices=("fastft", "hf"), default="fastft",
                        help="hf: transformers + peft + bitsandbytes, for comparison")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--fsdp-world-size", type=_positive_int, default=1, metavar="N",
                        help="GPUs of an FSDP2 job (Trainer fsdp=True, version 2): the figures are per GPU, the "
                             "model sharded over N; --batch-size is per GPU (default 1: no FSDP)")
    parser.add_argument("--vram", type=_positive_float, metavar="GIB",
                        help="GPU memory in GiB: say whether the step fits, and find the longest sequence that fits")
    parser.add_argument("--raw", action="store_true",
                        help=f"compare with the whole card, without the headroom ({headroom.CUDA_CONTEXT_GIB:g} GiB "
                             f"CUDA context + {headroom.FRAGMENTATION_FRACTION:.0%} of the card)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = dict(batch_size=args.batch_size, r=args.r, lora_alpha=args.lora_alpha,
                    use_gradient_checkpointing={"on": True, "off": False}.get(args.checkpointing, args.checkpointing),
                    loss=args.loss, contender=args.contender, dtype=args.dtype,
                    fsdp_world_size=args.fsdp_world_size)
    try:  # bad input (unknown model or architecture, more tokens than the accounting simulates): one line
        estimate = estimate_memory(args.model, args.seq_len, **settings)
        trained = trained_context(args.model)
    except ValueError as exc:
        print(f"fastft-memory: {exc}", file=sys.stderr)
        return 2
    print(f"{args.model}: QLoRA (4-bit NF4) r={args.r}, batch {args.batch_size} x {args.seq_len:,} tokens, "
          f"checkpointing {args.checkpointing}, loss path {args.loss}, {args.dtype}, {args.contender}")
    if args.fsdp_world_size > 1:
        print(f"FSDP2 over {args.fsdp_world_size} GPUs: every figure is one GPU's "
              "(its shards, the layers FSDP gathers)")
    print("accounted on the CPU along the GPU code path (not measured on a GPU)")
    if trained is not None and args.seq_len > trained:
        print(f"note: {args.seq_len:,} tokens is beyond the model's trained context of {trained:,} positions "
              "(max_position_embeddings): memory capacity only, quality degrades past it")
    print(estimate.breakdown())
    if args.vram is None:
        return 0
    usable = args.vram if args.raw else headroom.usable_gib(args.vram)
    if args.raw:
        print(f"\nraw: the accounted peak against the whole {args.vram:g} GiB (no headroom for the CUDA context or "
              "the allocator's fragmentation: a real card fits less)")
    else:
        print(f"\n{args.vram:g} GiB card, {usable:.2f} GiB usable after the {headroom.describe()}; --raw for the "
              "whole card")
    if estimate.resident_gb > usable:
        print(f"does NOT fit {args.vram:g} GiB: the model, adapters and optimizer state alone need "
              f"{estimate.resident_gb:.2f} GiB (breakdown above), before any activation")
        return 1
    fits = estimate.fits(args.vram, headroom=not args.raw)
    verdict = "fits" if fits else "does NOT fit"
    margin = ('%.2f GiB to spare' % (usable - estimate.peak_gb) if fits
              else '%.2f GiB over' % (estimate.peak_gb - usable))
    print(f"{verdict} {args.vram:g} GiB: peak {estimate.peak_gb:.2f} GiB ({margin} of the {usable:.2f} GiB usable)")
    # the raw capacity, then what the model can use of it
    longest = max_context(args.model, args.vram, beyond_trained_context=True, headroom=not args.raw, **settings)
    what = f"longest sequence that fits {args.vram:g} GiB ({usable:.2f} GiB usable) at batch {args.batch_size}:"
    if (longest + 128) * args.batch_size > MAX_ACCOUNTED_TOKENS:  # the search stopped at the accounting's bound
        print(f"{what} at least {longest:,} tokens (the most fastft's accounting simulates: "
              f"{MAX_ACCOUNTED_TOKENS:,} tokens per step)")
    else:
        print(f"{what} {longest:,} tokens of memory (a multiple of 128)")
    if trained is not None and longest > trained:
        print(f"beyond the model's trained context: it has {trained:,} positions (max_position_embeddings), so the "
              f"longest sequence it was trained for is {trained:,} tokens; past that is memory capacity only")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
