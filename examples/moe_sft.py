"""Mixture-of-experts QLoRA with fastft: 4-bit experts, LoRA on attention and on every expert, TRL's SFTTrainer.

Meant for Qwen3-MoE (Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B), Qwen2-MoE (Qwen/Qwen1.5-MoE-A2.7B,
Qwen/Qwen2-57B-A14B) and Mixtral (mistralai/Mixtral-8x7B-Instruct-v0.1), e.g. on a GPU:

    python examples/moe_sft.py --model Qwen/Qwen3-30B-A3B --max-steps 100

Qwen3-30B-A3B's weights come to about 17 GB with NF4 experts (computed from its config: 30.5B parameters at 4.13
bits, embeddings and lm_head in bf16), where transformers + bitsandbytes keep the experts in 16 bits (about 60 GB).
Without --model the script builds a tiny random-weight model of --arch with the bundled SmolLM2 tokenizer and trains
it for a few steps on the CPU: it shows the pieces run (loading with 4-bit experts, LoRA on the experts, TRL), not
that anything is learned. It trains on the chat records of examples/data/train.jsonl and saves the adapter.
"""
import argparse
import os
import tempfile

# No network calls: TRL's trainers otherwise report usage to the Hugging Face hub from a background thread (and
# load_dataset counts a download). Set before datasets / TRL are imported: they read these at import.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")

import torch
import transformers
from datasets import load_dataset
from trl import SFTConfig, SFTTrainer

from fastft import FastModel
from fastft.bundled import bundled_model_path

TINY = {  # 2 layers, 4 experts, top-2: random weights, dimensions fastft's kernels serve
    "qwen3_moe": lambda vocab: transformers.Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True),
    "qwen2_moe": lambda vocab: transformers.Qwen2MoeConfig(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128),
    "mixtral": lambda vocab: transformers.MixtralConfig(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=64, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help="a Qwen3-MoE / Qwen2-MoE / Mixtral directory or hub id (default: a tiny "
                                    "random-weight model)")
parser.add_argument("--arch", choices=sorted(TINY), default="qwen3_moe",
                    help="architecture of the tiny random-weight model (default: %(default)s)")
parser.add_argument("--max-steps", type=int, default=5, help="optimizer steps (default: %(default)s)")
parser.add_argument("--output-dir", default="outputs/moe_sft", help="where the adapter is saved")
args = parser.parse_args()

model_path = args.model
if model_path is None:  # a tiny random-weight model, saved as a checkpoint so loading runs as for a real one
    tokenizer = transformers.AutoTokenizer.from_pretrained(bundled_model_path())
    torch.manual_seed(0)
    tiny = transformers.AutoModelForCausalLM.from_config(TINY[args.arch](len(tokenizer)), dtype=torch.bfloat16)
    model_path = tempfile.mkdtemp(prefix=f"tiny-{args.arch}-")
    tiny.save_pretrained(model_path)
    tokenizer.save_pretrained(model_path)

data_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "train.jsonl")
dataset = load_dataset("json", data_files=data_file, split="train")

on_gpu = torch.cuda.is_available()
# experts in NF4 as they load; LoRA on attention and on every expert (a log line says so), routers frozen
model, tokenizer = FastModel.from_pretrained(model_path, max_seq_length=512)
model = FastModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=on_gpu)
model.print_trainable_parameters()

training_args = SFTConfig(
    output_dir=args.output_dir,
    max_steps=args.max_steps,
    per_device_train_batch_size=4,
    learning_rate=2e-4,
    logging_steps=1,
    max_length=512,
    report_to=[],
    use_cpu=not on_gpu,
    bf16=on_gpu,
)
trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
trainer.train()  # the loss includes the router's load-balancing loss (router_aux_loss_coef of the config)
trainer.save_model(args.output_dir)
