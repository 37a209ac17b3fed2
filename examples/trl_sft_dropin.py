"""A standard TRL SFT script, as TRL's documentation writes it, with only the model loading lines changed
(and TRL's telemetry turned off: the script makes no network calls).

Fine-tunes the bundled SmolLM2-135M-Instruct on the chat records of examples/data/train.jsonl.

    python examples/trl_sft_dropin.py [--max-steps N]
"""
import argparse
import os

# fastft: no network calls (TRL's trainers otherwise report usage to the Hugging Face hub from a thread, and
# load_dataset counts a download on S3). Set before datasets / TRL are imported: they read these at import.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")

import torch
from datasets import load_dataset
from trl import SFTConfig, SFTTrainer

from fastft import FastModel  # fastft: changed
from fastft.bundled import bundled_model_path

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--max-steps", type=int, default=30)
parser.add_argument("--output-dir", default="outputs/trl_sft_dropin")
args = parser.parse_args()

data_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "train.jsonl")
dataset = load_dataset("json", data_files=data_file, split="train")

# --- fastft: the only changed lines (TRL's docs: model = AutoModelForCausalLM.from_pretrained(...) + peft_config)
model, tokenizer = FastModel.from_pretrained(bundled_model_path(), max_seq_length=512)
model = FastModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=torch.cuda.is_available())
# --- end of fastft changes

training_args = SFTConfig(
    output_dir=args.output_dir,
    max_steps=args.max_steps,
    per_device_train_batch_size=8,
    learning_rate=2e-4,
    logging_steps=5,
    max_length=512,
    report_to=[],
    use_cpu=not torch.cuda.is_available(),
)
trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
trainer.train()
trainer.save_model(args.output_dir)
