"""fastft's GGUF files in the program that reads them: llama.cpp's runtime (``llama_cpp_py_sync``, llama.cpp commit
0ce8cd114, CPU, f32 KV cache; loaded through tests/llama_cpp_runtime.py).

For each architecture a tiny random-weight model is loaded in 4-bit, given a LoRA adapter trained for one step,
exported with its LoRA merged (``save_gguf``, f32), and run in llama.cpp on a chat prompt: llama.cpp's tokenization
of the prompt (special tokens parsed) equals the tokenizer's; its logits at every position of the prompt and of its
greedy continuation (decoded one token at a time, so through its KV cache) equal the merged model's computed in
float64, as do the fastft model's; and fastft's greedy choices along that continuation are llama.cpp's tokens.
"""
import platform
import sys

import numpy as np
import pytest
import torch
import transformers
from kernel_testing import assert_close
from llama_cpp_runtime import ggml_gelu_table, load_llama_cpp
from test_moe import save_tiny_moe
from tiny_models import save_tiny_model
from tiny_tokenizer import CORPUS, tiny_bpe_tokenizer, tiny_gemma_tokenizer, tiny_phi3_tokenizer

from fastft import FastModel
from fastft.kernels import use_engine
from fastft.saving import save_gguf, save_merged

if sys.platform != "linux" or platform.machine() != "x86_64":  # (setup.py installs it there only)
    pytest.skip("llama_cpp_py_sync 0.11739 has wheels for x86-64 Linux only", allow_module_level=True)

# hidden 128, 2 query heads and 1 key-value head of 64, a vocabulary of 416 rows for the tokenizers' 400 tokens
SHAPE = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64, intermediate_size=192,
             vocab_size=416)
# Gemma as llama.cpp fixes it by architecture: query_pre_attn_scalar = head size; Gemma 2 alternates local (window
# 5) and global layers, Gemma 3 has five local layers (window 4, RoPE base 10k) to one global (base 1M, linear
# scaling 2). Windows shorter than the prompt, so they matter.
GEMMA = dict(SHAPE, query_pre_attn_scalar=64)
GEMMA_SHAPES = {
    "gemma2": dict(GEMMA, num_hidden_layers=2, sliding_window=5, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0),
    "gemma3": dict(GEMMA, num_hidden_layers=6, sliding_window=4,
                   layer_types=["sliding_attention"] * 5 + ["full_attention"],
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
}
MOE = ("qwen3_moe", "qwen2_moe", "mixtral")
NEW_TOKENS = 6


@pytest.fixture(autouse=True, scope="module")
def _pytorch_engine():
    # the export and llama.cpp's reading of it are under test, not the kernels: fastft's PyTorch engine
    with use_engine("torch"):
        yield


def tokenizer_for(arch):
    if arch == "phi3":
        return tiny_phi3_tokenizer()
    return tiny_gemma_tokenizer() if arch.startswith("gemma") else tiny_bpe_tokenizer()


def tiny_checkpoint(arch, directory) -> str:
    if arch in MOE:  # experts in every layer, as llama.cpp's qwen3moe / qwen2moe have them
        return save_tiny_moe(arch, directory, vocab_size=416, mlp_only_layers=[])
    return save_tiny_model(arch, directory, **GEMMA_SHAPES.get(arch, SHAPE))


def prompt(tokenizer) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": CORPUS[0]}], tokenize=False,
                                         add_generation_prompt=True)


def lora_trained(path, tokenizer):
    """The 4-bit fastft model of ``path`` with a LoRA adapter (attention, MLP, experts) after one AdamW step (peft
    starts B at zero; one step moves every B by the learning rate)."""
    model, _ = FastModel.from_pretrained(path, max_seq_length=128, dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    ids = tokenizer(CORPUS[1] + CORPUS[2], return_tensors="pt").input_ids[:, :48]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return model.eval()


def decode(llm, tokens, start) -> np.ndarray:
    """llama.cpp's logits ``[len(tokens), vocab]`` for ``tokens`` at positions ``start...`` (one batch, every
    position's logits requested; the bindings' own ``_eval_tokens`` keeps only the last)."""
    lib, ffi = llm._lib, llm._ffi
    batch = lib.llama_batch_init(len(tokens), 0, 1)
    try:
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, start + i, 1, 1
            batch.seq_id[i][0] = 0
        assert lib.llama_decode(llm._ctx, batch) == 0
    finally:
        lib.llama_batch_free(batch)
    return np.stack([np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(llm._ctx, i), 4 * llm.n_vocab),
                                   dtype=np.float32).copy() for i in range(len(tokens))])


def run_in_llama_cpp(file, text):
    """llama.cpp's tokens of ``text``, its greedy continuation, and its logits at every position of both."""
    llm = load_llama_cpp().Llama(str(file), n_ctx=128, n_batch=128, n_threads=1, type_k="f32", type_v="f32")
    try:
        ids = llm.tokenize(text, add_special=True, parse_special=True)
        logits = decode(llm, ids, 0)
        greedy = []
        for step in range(NEW_TOKENS):
            greedy.append(int(logits[-1].argmax()))
            logits = np.concatenate([logits, decode(llm, greedy[-1:], len(ids) + step)])
        return ids, greedy, torch.from_numpy(logits)
    finally:
        llm.close()


class GgmlGelu(torch.nn.Module):
    """GELU as ggml's CPU backend computes it in f32: the input rounded to f16 indexes its table of f16 results
    (:func:`ggml_gelu_table`); the identity from 10 up, 0 from -10 down."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.from_numpy(table.astype(np.float32))

    def forward(self, x):
        looked_up = self.table[x.half().view(torch.int16).long() & 0xFFFF].to(x.dtype)
        return torch.where(x >= 10, x, torch.where(x <= -10, torch.zeros_like(x), looked_up))


def merged_in_transformers(model, directory, dtype):
    """The merged model, the tensors the GGUF file holds (fp32), as a plain transformers model in ``dtype``."""
    if not directory.exists():
        save_merged(model, directory, dtype=torch.float32)
    # eager experts: transformers' grouped matmul takes no float64
    experts = {"experts_implementation": "eager"} if model.config.model_type in MOE else {}
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="eager",
                                                             **experts).eval()


ARCHS = ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", *MOE]


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_runs_the_export_as_fastft_does(arch, tmp_path):
    """Tolerances. llama.cpp computes in fp32 (f32 weights, f32 KV cache): its logits are compared with the float64
    result of the same weights (the merged model in transformers, in float64) and allowed 4x the distance from it of
    another fp32 implementation of that model, transformers' (fp32 rounding, amplified where the model is
    ill-conditioned; measured 4.5e-7 to 7e-7 here, llama.cpp's own 2e-7 to 4e-7; 5.5e-6 and 9.5e-6 on a Qwen3 with
    an ill-conditioned position). llama.cpp's GeGLU (Gemma) looks GELU up in ggml's f16 table, so both references
    compute it that way (:class:`GgmlGelu`): the fp32 one then meets the table's rounding steps as llama.cpp does,
    and Gemma's allowance is 3e-4 (Gemma 2) and 2.4e-3 (Gemma 3); with transformers' exact GELU instead, llama.cpp
    is 6e-4 and 5e-3 off, which fails. fastft's own logits (its unmerged LoRA on the 4-bit weights) are allowed 1e-4
    of the logit scale off the float64 merged model with transformers' GELU (measured up to 3e-5 relative). A
    layout error moves the logits far more (q/k left unpermuted: 7e-2 on Llama, 0.13 on Mixtral; Gemma's norms not
    stored as 1 + w: 1.0 and 1.8); the trained LoRA moves them by > 100x both tolerances (asserted, so a merge that
    dropped it would show)."""
    tokenizer = tokenizer_for(arch)
    # not "tiny-phi3": llama.cpp sets Phi-3's special-token attributes by general.name (the directory's name), and
    # requires then a <|endoftext|> token that the tiny tokenizer lacks ("unordered_map::at" while loading)
    model = lora_trained(tiny_checkpoint(arch, tmp_path / "tiny"), tokenizer)
    save_gguf(model, tmp_path / "model.gguf", tokenizer, "f32")

    text = prompt(tokenizer)
    ids, greedy, got = run_in_llama_cpp(tmp_path / "model.gguf", text)
    assert ids == tokenizer(text).input_ids

    sequence = torch.tensor([ids + greedy])
    with torch.no_grad():
        fastft_logits = model(input_ids=sequence).logits[0].double()
        with model.disable_adapter():
            without_lora = model(input_ids=sequence).logits[0].double()
        float64 = merged_in_transformers(model, tmp_path / "merged", torch.float64)
        fp32 = merged_in_transformers(model, tmp_path / "merged", torch.float32)
        merged = float64(sequence).logits[0]
        if arch.startswith("gemma"):  # both references now compute GELU as llama.cpp does
            for layer in [*float64.model.layers, *fp32.model.layers]:
                layer.mlp.act_fn = GgmlGelu(ggml_gelu_table())
        truth = float64(sequence).logits[0]
        fp32_error = (fp32(sequence).logits[0].double() - truth).abs().max().item()
    tolerance, fastft_tolerance = 4 * fp32_error, 1e-4 * merged.abs().max().item()
    print(f"{arch}: max |llama.cpp - float64| {(got.double() - truth).abs().max().item():.1e}, transformers fp32 "
          f"{fp32_error:.1e}, fastft {(fastft_logits - merged).abs().max().item():.1e}; logit scale "
          f"{merged.abs().max().item():.2f}")
    assert_close(got, truth, atol=tolerance, rtol=0, name=f"{arch} logits in llama.cpp")
    assert_close(fastft_logits, merged, atol=fastft_tolerance, rtol=0, name=f"{arch} fastft logits")
    assert (without_lora - fastft_logits).abs().max() > 100 * max(tolerance, fastft_tolerance)
    # fastft's greedy choice after the prompt and after each token since: its greedy continuation is llama.cpp's
    assert fastft_logits[len(ids) - 1:-1].argmax(-1).tolist() == greedy
