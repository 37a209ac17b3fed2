"""Bad datasets handed to an unchanged TRL script with a fastft model get fastft's clear ValueError at trainer
construction, before TRL's bare ``StopIteration`` / ``KeyError: 'text'`` or a failure at the first step."""
import datasets
import pytest
import torch
import trl
from tiny_models import load_baseline, save_tiny_model
from tiny_tokenizer import tiny_tokenizer

import fastft.trl_dataset_checks
from fastft import FastModel
from fastft.kernels import use_engine

MAX_SEQ_LENGTH = 32


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def load(path):
    model, _ = FastModel.from_pretrained(path, max_seq_length=MAX_SEQ_LENGTH, dtype=torch.float32)
    return FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)


@pytest.fixture(scope="module")
def model(model_path):
    return load(model_path)


def rows(*examples):
    return datasets.Dataset.from_list(list(examples))


def chat(user, assistant):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def sft(model, tmp_path, train, tokenizer=None, eval_dataset=None, formatting_func=None, **config):
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, **config)
    return trl.SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=eval_dataset,
                          processing_class=tokenizer or tiny_tokenizer(), formatting_func=formatting_func)


def dpo(model, tmp_path, train, tokenizer=None, **config):
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, **config)
    return trl.DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer or tiny_tokenizer())


def empty_iterable():
    return datasets.IterableDataset.from_generator(lambda: iter(()))


@pytest.mark.parametrize("empty", [lambda: rows(), empty_iterable], ids=["Dataset", "IterableDataset"])
def test_sft_empty_dataset(model, tmp_path, empty):
    with pytest.raises(ValueError, match="train dataset passed to SFTTrainer is empty"):
        sft(model, tmp_path, empty())


@pytest.mark.parametrize("data, message", [
    (rows({"question": "1+1=", "answer": "2"}), r"columns are \['answer', 'question'\]. It needs one of 'text'"),
    (rows({"prompt": "1+1="}), "'prompt' column but no 'completion' column"),
], ids=["unknown-columns", "prompt-without-completion"])
def test_sft_dataset_without_expected_columns(model, tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        sft(model, tmp_path, data)


def test_sft_honours_dataset_text_field_and_formatting_func(model, tmp_path):
    """The column checks follow TRL's options instead of insisting on 'text'."""
    data = rows({"body": "1+1=2"}, {"body": "2+2=4"})
    with pytest.raises(ValueError, match="It needs one of 'text'"):
        sft(model, tmp_path, data)
    sft(model, tmp_path, data, dataset_text_field="body")
    sft(model, tmp_path, rows({"q": "1+1=", "a": "2"}), formatting_func=lambda row: row["q"] + row["a"])


@pytest.mark.parametrize("data", [
    rows({"messages": chat("1+1=", "2")}),
    rows({"prompt": chat("1+1=", "2")[:1], "completion": chat("1+1=", "2")[1:]}),
], ids=["messages", "conversational-prompt-completion"])
def test_sft_chat_dataset_without_chat_template(model, tmp_path, data):
    with pytest.raises(ValueError, match="conversational .* the tokenizer has no chat template"):
        sft(model, tmp_path, data, tokenizer=tiny_tokenizer(chat_template=False))


def test_sft_sequences_longer_than_max_seq_length(model, tmp_path):
    long, short = {"text": "x" * 50}, {"text": "1+1=2"}  # 51 tokens with EOS; 6
    with pytest.raises(ValueError, match=r"1 of 2 sequences of the train dataset are longer than max_seq_length=32"
                                         r" .*longest: 51 tokens.*SFTConfig\(max_length=32\)"):
        sft(model, tmp_path, rows(long, short), max_length=None)
    with pytest.raises(ValueError, match=r"of the held-out dataset are longer"):
        sft(model, tmp_path, rows(short), eval_dataset={"held-out": rows(long)}, max_length=None)
    trainer = sft(model, tmp_path, rows(short), max_length=None)
    with pytest.raises(ValueError, match=r"of the eval dataset are longer"):  # prepared by evaluate()
        trainer.evaluate(eval_dataset=rows(long))
    # packed: each packed sequence counts, not the pack; TRL's max_length bounds both
    with pytest.raises(ValueError, match="longest: 51 tokens"):
        sft(model, tmp_path, rows(long, short, short), packing=True, max_length=64)
    sft(model, tmp_path, rows(short, short, short, short, short, short), packing=True, max_length=64)
    # TRL's default max_length (1024) is above max_seq_length, which is fine while the data fits
    sft(model, tmp_path, rows(short))
    # and truncating to max_seq_length trains
    with use_engine("torch"):
        sft(model, tmp_path, rows(long, short), max_length=MAX_SEQ_LENGTH).train()


def test_sft_pretokenized_rows_are_checked_for_length(model, tmp_path):
    data = rows({"input_ids": list(range(7, 47))})
    with pytest.raises(ValueError, match="longest: 40 tokens"):
        sft(model, tmp_path, data, dataset_kwargs={"skip_prepare_dataset": True})


def test_dpo_bad_datasets(model_path, tmp_path):
    """A fresh model for each trainer that gets past TRL's setup (DPOTrainer adds a `ref` adapter to it)."""
    model = load(model_path)
    with pytest.raises(ValueError, match="train dataset passed to DPOTrainer is empty"):
        dpo(model, tmp_path, rows())
    with pytest.raises(ValueError, match=r"columns are \['chosen', 'prompt'\]. It needs 'chosen' and 'rejected'"):
        dpo(model, tmp_path, rows({"prompt": "1+1=", "chosen": "2"}))
    pair = {"prompt": chat("1+1=", "")[:1], "chosen": chat("", "2")[1:], "rejected": chat("", "3")[1:]}
    with pytest.raises(ValueError, match="DPOTrainer is conversational .* no chat template"):
        dpo(model, tmp_path, rows(pair), tokenizer=tiny_tokenizer(chat_template=False))
    long = {"prompt": "x" * 30, "chosen": "yes" * 5, "rejected": "no"}  # 30 + 16 (EOS) tokens
    with pytest.raises(ValueError, match=r"longest: 46 tokens.*DPOConfig\(max_length=32\)"):
        dpo(model, tmp_path, rows(long), max_length=None)
    # before the reference pass over the data that precompute_ref_log_probs runs inside DPOTrainer.__init__
    with pytest.raises(ValueError, match=r"longest: 46 tokens"):
        dpo(load(model_path), tmp_path, rows(long), max_length=None, precompute_ref_log_probs=True)
    dpo(load(model_path), tmp_path, rows(long), max_length=MAX_SEQ_LENGTH)  # DPO's collator truncates to max_length


def test_models_fastft_did_not_patch_skip_the_checks(tmp_path, monkeypatch):
    """A plain transformers + peft model goes through TRL exactly as before: none of fastft's checks run."""
    def fail(*args, **kwargs):
        raise AssertionError("fastft checked a dataset of a model it did not patch")

    monkeypatch.setattr(fastft.trl_dataset_checks, "check_sft_dataset", fail)
    monkeypatch.setattr(fastft.trl_dataset_checks, "check_sequence_lengths", fail)
    baseline = load_baseline(save_tiny_model("llama", tmp_path / "model"))
    sft(baseline, tmp_path / "out", rows({"text": "x" * 50}), max_length=None)
