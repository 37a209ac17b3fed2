"""One process of the distributed tests (tests/test_distributed.py): a short TRL SFT or DPO run of a tiny fastft model.

Started by torchrun (2 ranks, gloo, CPU) or as a plain process (the one-process reference). Each process writes
``<result-dir>/rank<R>.pt``: the logged losses and DPO rewards, the final LoRA weights (gathered where FSDP shards
them), how each parameter was sharded, the files this rank wrote under the output directory, and how often fastft's
fused LoRA and log-prob kernels ran.

Test-only settings, so that the comparison with one process can be tight:
* the LoRA weights stay fp32 (TRL rounds them to bf16 for 4-bit models; rounding every update to bf16 turns the
  1e-7 differences of a different summation order into 1e-2 differences of the weights);
* plain SGD by default (Adam divides each update by the gradient's running RMS, so an element with a near-zero
  gradient moves by +-lr on a rounding difference);
* ``--fsdp``: accelerate enables its FSDP plugin only for GPU backends and silently runs DDP on CPU; one shim here
  lets it choose FSDP for gloo ranks. Everything after that decision (accelerate's ``fsdp2_prepare_model``, FSDP2's
  ``fully_shard``, the Trainer's FSDP paths) is the unchanged library code.
"""
from __future__ import annotations

import argparse
import os
import sys


def record_writes(log: list[str], under: str) -> None:
    """Append to ``log`` every file this process opens for writing below ``under``: Python's ``open`` (JSON, README),
    ``torch.save`` and safetensors (written in C++ / Rust, so wrapped). Must run before peft and transformers are
    imported (peft binds ``safetensors.torch.save_file`` at import)."""
    import safetensors.torch
    import torch

    under = os.path.realpath(under)

    def note(path):
        if isinstance(path, (str, os.PathLike)) and os.path.realpath(path).startswith(under + os.sep):
            log.append(os.path.relpath(os.path.realpath(path), under))

    def audit(event, args):
        if event == "open" and (any(c in (args[1] or "") for c in "wax+") or args[2] & (os.O_WRONLY | os.O_RDWR)):
            note(args[0])

    def wrap(module, name):
        real = getattr(module, name)

        def wrapper(obj, path, *args, **kwargs):
            note(path)
            return real(obj, path, *args, **kwargs)

        setattr(module, name, wrapper)

    sys.addaudithook(audit)
    wrap(torch, "save")
    wrap(safetensors.torch, "save_file")


def allow_fsdp_on_cpu() -> None:
    """accelerate's ``AcceleratorState`` drops the FSDP plugin for a CPU (MULTI_CPU) run; keep it (see the module doc).
    Every ``AcceleratorState()`` re-reads the distributed type from ``PartialState``, so each one is corrected."""
    import accelerate.state
    from accelerate.utils import DistributedType

    init = accelerate.state.AcceleratorState.__init__

    def init_keeping_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    accelerate.state.AcceleratorState.__init__ = init_keeping_fsdp


def count_calls(module, name: str, counts: dict) -> None:
    real = getattr(module, name)

    def counted(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return real(*args, **kwargs)

    setattr(module, name, counted)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--trainer", choices=["sft", "dpo"], required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--result-dir", required=True)
    p.add_argument("--batch-size", type=int, default=1, help="per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--save-steps", type=int, default=0, help="0: no checkpoints")
    p.add_argument("--resume-from", default=None)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-bias", action="store_true", help="peft's lora_bias (a layer the fused path cannot serve)")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--adamw", action="store_true", help="AdamW (lr 1e-3), an optimizer with state, not SGD (lr 1)")
    args = p.parse_args()

    writes: list[str] = []
    record_writes(writes, args.output_dir)

    import torch
    import trl
    from test_trl import arithmetic_chats, preference_pairs
    from tiny_tokenizer import tiny_tokenizer

    import fastft.patch
    import fastft.trl_compat
    from fastft import FastModel
    from fastft.quant import is_dtensor

    if args.fsdp:
        allow_fsdp_on_cpu()
    calls: dict[str, int] = {}
    for name in ("lora_qkv", "lora_mlp", "lora_linear"):
        count_calls(fastft.patch, name, calls)
    count_calls(fastft.trl_compat, "linear_log_probs", calls)

    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    model, _ = FastModel.from_pretrained(args.model, max_seq_length=64, dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=args.lora_dropout,
                                     use_gradient_checkpointing=args.gradient_checkpointing,
                                     **(dict(lora_bias=True) if args.lora_bias else {}))
    common = dict(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, optim="adamw_torch" if args.adamw else "sgd",
        learning_rate=1e-3 if args.adamw else 1.0, lr_scheduler_type="constant",
        logging_steps=1, report_to=[], use_cpu=True, bf16=False, seed=0, max_length=64, disable_tqdm=True,
        dataloader_num_workers=0, gradient_checkpointing=args.gradient_checkpointing,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
        **(dict(fsdp=True, fsdp_config={"version": 2}) if args.fsdp else {}),
    )
    if args.trainer == "sft":
        trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**common), train_dataset=arithmetic_chats(64),
                                 processing_class=tiny_tokenizer())
    else:
        trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(beta=0.1, **common),
                                 train_dataset=preference_pairs(64), processing_class=tiny_tokenizer())
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # see the module doc
    lora_init = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and ".default." in n}
    trainer.train(resume_from_checkpoint=args.resume_from)
    trainer.save_model(args.output_dir)

    params = list(model.named_parameters())  # the same order on every rank: full_tensor() is a collective
    lora = {n: (p.full_tensor() if is_dtensor(p) else p).detach().clone() for n, p in params if n in lora_init}
    history = trainer.state.log_history
    result = dict(
        losses=[e["loss"] for e in history if "loss" in e],
        rewards=[e["rewards/chosen"] for e in history if "rewards/chosen" in e],
        lora=lora, lora_init=lora_init,
        sharding={n: (p.numel(), p.to_local().numel() if is_dtensor(p) else p.numel()) for n, p in params},
        writes=writes, calls=calls, fallbacks=sorted(fastft.patch._warned),
        world_size=trainer.accelerator.num_processes, fsdp=trainer.is_fsdp_enabled,
    )
    os.makedirs(args.result_dir, exist_ok=True)
    torch.save(result, os.path.join(args.result_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
