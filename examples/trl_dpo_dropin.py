"""A standard TRL DPO script, as TRL's documentation writes it, with only the model loading lines changed
(and TRL's telemetry turned off: the script makes no network calls).

Preference-tunes the bundled SmolLM2-135M-Instruct on pairs built from the date task.

    python examples/trl_dpo_dropin.py [--max-steps N]
"""
import argparse
import os

# fastft: no network calls (TRL's trainers otherwise report usage to the Hugging Face hub from a thread).
# (Set before transformers / TRL are imported: huggingface_hub reads it at import.)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from datasets import Dataset
from task_data import load_split, preference_pairs
from trl import DPOConfig, DPOTrainer

from fastft import FastModel  # fastft: changed
from fastft.bundled import bundled_model_path

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--max-steps", type=int, default=20)
parser.add_argument("--output-dir", default="outputs/trl_dpo_dropin")
args = parser.parse_args()

train_dataset = Dataset.from_list(preference_pairs(load_split("train")))

# --- fastft: the only changed lines (TRL's docs: model = AutoModelForCausalLM.from_pretrained(...) + peft_config)
model, tokenizer = FastModel.from_pretrained(bundled_model_path(), max_seq_length=512)
model = FastModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=torch.cuda.is_available())
# --- end of fastft changes

training_args = DPOConfig(
    output_dir=args.output_dir,
    max_steps=args.max_steps,
    per_device_train_batch_size=8,
    learning_rate=5e-4,
    logging_steps=5,
    max_length=512,
    report_to=[],
    use_cpu=not torch.cuda.is_available(),
)
trainer = DPOTrainer(model=model, args=training_args, train_dataset=train_dataset, processing_class=tokenizer)
trainer.train()
trainer.save_model(args.output_dir)
