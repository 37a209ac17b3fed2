"""Preference tuning (DPO) of the bundled SmolLM2-135M-Instruct with fastft, on pairs built from the date task.

Each pair holds the correct ISO date (chosen) and a plausible wrong answer (rejected: wrong format, swapped
day and month, ...). The script scores held-out exact match before and after, like examples/sft.py. TRL's
DPOTrainer adds a `ref` adapter to the PeftModel and takes the reference log-probs through it; fastft's
fused LoRA path reads that active adapter at call time.

    python examples/dpo.py              # defaults finish in a few minutes on a 2-core CPU
"""
from __future__ import annotations

import argparse
import os
import time

# No network calls: TRL's trainers otherwise report usage to the Hugging Face hub from a background thread.
# (Set before transformers / TRL are imported: huggingface_hub reads it at import.)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import datasets
import torch
import trl
from task_data import evaluate, load_split, preference_pairs

from fastft import FastModel
from fastft.bundled import bundled_model_path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate (default: %(default)s)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (default: %(default)s)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    p.add_argument("--eval-records", type=int, default=100,
                   help="held-out records scored before/after (default: %(default)s)")
    p.add_argument("--output-dir", default="outputs/dpo", help="where the adapter is saved (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def say(message: str) -> None:
    """print, once per job (rank 0 of a torchrun / accelerate launch job)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    on_gpu = torch.cuda.is_available()
    # Under torchrun / accelerate launch every GPU runs this script: all ranks train and evaluate (an FSDP-sharded
    # model needs every rank in each forward), rank 0 prints, and trainer.save_model writes from rank 0.

    model, tokenizer = FastModel.from_pretrained(bundled_model_path(), max_seq_length=256, load_in_4bit=True)
    eval_records = load_split("eval")[: args.eval_records]
    before = evaluate(model, tokenizer, eval_records)
    say(f"held-out exact match before DPO: {before:.1%} ({len(eval_records)} records)")

    model = FastModel.get_peft_model(model, r=args.rank, lora_alpha=args.rank, use_gradient_checkpointing=on_gpu,
                                     random_state=args.seed)
    pairs = datasets.Dataset.from_list(preference_pairs(load_split("train"), seed=args.seed))
    config = trl.DPOConfig(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, beta=args.beta, logging_steps=10, save_strategy="no", report_to=[],
        seed=args.seed, max_length=256, bf16=on_gpu and torch.cuda.is_bf16_supported(),
        fp16=on_gpu and not torch.cuda.is_bf16_supported(), use_cpu=not on_gpu,
    )
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer)
    start = time.time()
    trainer.train()
    say(f"trained {args.steps} DPO steps in {time.time() - start:.0f} s")

    after = evaluate(model, tokenizer, eval_records)
    say(f"held-out exact match after DPO:  {after:.1%} (before: {before:.1%})")
    trainer.save_model(args.output_dir)
    return before, after


if __name__ == "__main__":
    main()
