"""fastft: fast, lean QLoRA fine-tuning of Llama and Qwen2 models on one GPU."""
__version__ = "0.1.0"
