"""A trained ``lm_head`` / ``embed_tokens`` (peft ``modules_to_save``, the continued-pretraining recipe) through TRL,
the trained model's own forward and ``generate``, and both exporters (fastft/saving.py, fastft/gguf_export.py).

The reference is always the trained model itself, in fp32: a plain transformers reload of ``save_merged`` and the
GGUF read back by transformers' GGUF reader (as tests/test_gguf.py reads it) must compute its logits. Both sides do
the same fp32 products from the same fp32 values (the merge is exact in fp32, an f32 GGUF stores fp32), so they
differ by summation order only (~1e-6 of the largest logit); 1e-4 of it fails on any wrong or missing tensor (an
untrained head or a random embedding is O(1) off).
"""
import logging

import gguf
import pytest
import torch
import transformers
import trl
from kernel_testing import assert_close
from test_trl import arithmetic_chats
from tiny_models import save_tiny_model
from tiny_tokenizer import tiny_bpe_tokenizer

from fastft import FastModel
from fastft.kernels import use_engine
from fastft.saving import iter_merged_tensors, save_gguf, save_merged

# hidden 128 with 2 heads of 64 (transformers' GGUF reader derives Qwen2's head size from them), a vocabulary of 416
# rows for the 400-token BPE tokenizer (see tests/test_gguf.py)
SHAPE = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64, intermediate_size=192,
             vocab_size=416)
IDS = torch.tensor([[5, 17, 203, 44, 380, 9, 120, 66, 3, 250]])


@pytest.fixture(autouse=True)
def _pytorch_engine():
    # training, export and reload are under test, not the kernels (tested against references in their own files)
    with use_engine("torch"):
        yield


def tiny(tmp_path, arch):
    # the directory's name becomes general.name in the GGUF (see tests/test_gguf.py for why not "mistral")
    path = save_tiny_model(arch, tmp_path / f"tiny-{arch}", **SHAPE)
    tokenizer = tiny_bpe_tokenizer()
    tokenizer.save_pretrained(path)
    return path, tokenizer


def head_model(path, modules_to_save, **lora):
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32)  # 4-bit NF4
    return FastModel.get_peft_model(model, r=4, lora_alpha=8, modules_to_save=modules_to_save,
                                    use_gradient_checkpointing=False, **lora)


def fp32_forward(model):
    """The trained model's own forward: without the bf16 autocast accelerate wraps it in for training (it stays
    after ``train()``), so that the reference is the trained weights in fp32."""
    for module in (model, model.get_base_model()):
        original = module.__dict__.pop("_original_forward", None)
        if original is not None:
            module.forward = original
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def assert_same_logits(got, expected, name):
    assert_close(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=0, name=name)


def load_gguf(file):
    return transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                             dtype=torch.float32).eval()


def test_trained_head_and_embeddings_survive_trl_and_both_exports(tmp_path):
    """Continued pretraining under an unchanged TRL script (its defaults: bf16 autocast, gradient checkpointing),
    then the trained model's forward and generate, and its exports, on the untied Llama."""
    path, tokenizer = tiny(tmp_path, "llama")
    model = head_model(path, ["lm_head", "embed_tokens"])
    untrained = {name: param.detach().clone() for name, param in model.named_parameters() if "modules_to_save" in name}
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, max_length=64, save_strategy="no",
                         disable_tqdm=True)
    trl.SFTTrainer(model=model, args=args, train_dataset=arithmetic_chats(12), processing_class=tokenizer).train()
    trained = dict(model.named_parameters())
    for name, before in untrained.items():  # both copies trained, in the model's dtype (fp32), not TRL's bf16
        assert trained[name].dtype == torch.float32, name
        assert (trained[name] - before).abs().max() > 1e-3, f"{name} did not train"

    model = fp32_forward(model).eval()
    ours = logits(model)
    generated = model.generate(input_ids=IDS, max_new_tokens=4, do_sample=False)

    save_merged(model, tmp_path / "merged", tokenizer, dtype=torch.float32)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert sorted(plain.state_dict()) == sorted(name for name, _ in iter_merged_tensors(model))
    assert_same_logits(logits(plain), ours, "plain transformers reload")
    assert torch.equal(plain.generate(input_ids=IDS, max_new_tokens=4, do_sample=False), generated)

    save_gguf(model, tmp_path / "model.gguf", tokenizer, "f32")
    assert_same_logits(logits(load_gguf(tmp_path / "model.gguf")), ours, "GGUF read back")


def _train_copies_by_hand(model, seed=0):
    """Move every trainable weight away from its initial value, as training would (the exports are under test
    here, not TRL: that is the test above)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("modules_to_save, tying, tied", [
    (["lm_head", "embed_tokens"], False, False),  # two independent copies: trained apart
    (["embed_tokens"], False, False),  # the head stays the original embedding, the input embedding trains
    (["lm_head"], False, False),  # the other way round
    (["lm_head", "embed_tokens"], True, True),  # peft's ensure_weight_tying: one trained tensor, still tied
    (["embed_tokens"], True, True),  # peft adds the tied head to the pair itself
])
def test_tied_pair_exports_as_trained(tmp_path, caplog, modules_to_save, tying, tied):
    """Qwen2's tied lm_head / embed_tokens with one or both in modules_to_save: the export is the trained model,
    whatever training did to the pair: still tied (one tensor, tie_word_embeddings kept, no output.weight in the
    GGUF, so llama.cpp reuses token_embd) or trained apart (both written, tie_word_embeddings=False)."""
    path, tokenizer = tiny(tmp_path, "qwen2")
    model = head_model(path, modules_to_save, ensure_weight_tying=tying)
    _train_copies_by_hand(model)
    causal_lm = model.get_base_model()
    assert (causal_lm.lm_head.weight is causal_lm.model.embed_tokens.weight) == tied
    model.eval()
    ours = logits(model)

    with caplog.at_level(logging.WARNING, logger="fastft"):
        save_merged(model, tmp_path / "merged", tokenizer, dtype=torch.float32)
    assert ("the export holds both, untied" in caplog.text) == (not tied)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert plain.config.tie_word_embeddings == tied
    assert_same_logits(logits(plain), ours, "plain transformers reload")

    save_gguf(model, tmp_path / "model.gguf", tokenizer, "f32")
    assert ("output.weight" in [t.name for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors]) == (not tied)
    assert_same_logits(logits(load_gguf(tmp_path / "model.gguf")), ours, "GGUF read back")


def test_trainable_tokens_are_refused_by_the_exporters(tmp_path):
    """peft's trainable_token_indices (what TRL adds for new chat-template tokens) is not merged by fastft: a clear
    error, not a checkpoint with peft's wrapper names in it."""
    path, tokenizer = tiny(tmp_path, "llama")
    model = head_model(path, None, trainable_token_indices={"embed_tokens": [3, 5]})
    with pytest.raises(ValueError, match="trainable_token_indices"):
        save_merged(model, tmp_path / "merged", tokenizer)
    with pytest.raises(ValueError, match="trainable_token_indices"):
        save_gguf(model, tmp_path / "model.gguf", tokenizer)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "model.gguf").exists()
