"""The GGUF file llama.cpp reads, for the architectures fastft patches, written with the ``gguf`` package alone.

llama.cpp (and Ollama and LM Studio, which run it) loads a model from one GGUF file: key-value metadata (the
architecture's shape, the tokenizer) followed by the tensors, under llama.cpp's names and layouts. llama.cpp's own
converter, ``convert_hf_to_gguf.py``, writes it from a Hugging Face checkpoint, and ``llama-quantize`` (C++)
quantizes it further. This module writes the same file in Python and NumPy, so an export needs no llama.cpp build.
:func:`fastft.saving.save_gguf` drives it with the merged model, one tensor at a time.

What follows llama.cpp, and why:

* Tensor names come from the ``gguf`` package's name map (``blk.0.attn_q.weight``, ``output.weight``, ...). A
  head tied to the input embedding is not written: llama.cpp reuses ``token_embd.weight``.
* Llama and Mistral q/k weights (and biases) are permuted per head. Hugging Face rotates the pairs ``(i, i + d/2)``
  of each head (``rotate_half``); llama.cpp's ``llama`` architecture rotates adjacent pairs ``(2i, 2i + 1)``, so
  its converter reorders each head's rows so the two agree (:func:`llama_permute`). Qwen2 and Qwen3 run llama.cpp's
  NeoX rotation, which is Hugging Face's: no permutation.
* Llama 3.1's RoPE scaling is a ``rope_freqs.weight`` tensor of per-frequency divisors; linear and YaRN scaling
  are metadata keys.
* Phi-3 (llama.cpp's ``phi3``) keeps its fused ``qkv_proj`` (``attn_qkv``) and ``gate_up_proj`` (``ffn_up``, whose
  ``[gate; up]`` halves llama.cpp's SwiGLU splits as transformers does), rotates the first ``rope.dimension_count``
  dims of each head (partial rotary), and stores LongRoPE's factors as ``rope_factors_long/short.weight`` with the
  attention factor as ``rope.scaling.attn_factor``. llama.cpp picks the long factors when the context it runs with
  (``-c``) exceeds ``rope.scaling.original_context_length``, for every sequence; transformers picks them per forward
  by the sequence's length. llama.cpp also ignores Phi's sliding window (it disabled SWA for ``phi3``).
* Which tensor gets which type: :func:`tensor_type`. The tokenizer: :func:`add_tokenizer`.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from functools import cache
from pathlib import Path

import gguf
import numpy as np
import torch

_Q = gguf.GGMLQuantizationType
_FILE = gguf.LlamaFileType

# quantization name -> (the file type llama.cpp records, the type of the tensors it applies to). The first four are
# what llama.cpp's converter writes, the others what llama-quantize writes; K-quants (q4_k_m, ...) have no NumPy
# quantizer in gguf and mix types per layer: run llama-quantize on an f16 export for those.
_QUANTIZATIONS = {
    "f32": (_FILE.ALL_F32, _Q.F32),
    "f16": (_FILE.MOSTLY_F16, _Q.F16),
    "bf16": (_FILE.MOSTLY_BF16, _Q.BF16),
    "q8_0": (_FILE.MOSTLY_Q8_0, _Q.Q8_0),
    "q5_1": (_FILE.MOSTLY_Q5_1, _Q.Q5_1),
    "q5_0": (_FILE.MOSTLY_Q5_0, _Q.Q5_0),
    "q4_1": (_FILE.MOSTLY_Q4_1, _Q.Q4_1),
    "q4_0": (_FILE.MOSTLY_Q4_0, _Q.Q4_0),
}
_LLAMA_QUANTIZE_TYPES = (_Q.Q5_1, _Q.Q5_0, _Q.Q4_1, _Q.Q4_0)


def _gguf_can_write(qtype) -> bool:
    try:
        gguf.quants.quantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][0]), np.float32), qtype)
    except NotImplementedError:
        return False
    return True


@cache
def quantizations() -> tuple[str, ...]:
    """The quantization names :func:`fastft.saving.save_gguf` accepts: those the installed ``gguf`` can write."""
    return tuple(name for name, (_, qtype) in _QUANTIZATIONS.items() if _gguf_can_write(qtype))


def quantization(name) -> tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]:
    """``(file type, tensor type)`` of a quantization name such as ``"q8_0"`` (any case); a clear error otherwise."""
    key = name.lower() if isinstance(name, str) else name
    if key not in quantizations():
        raise ValueError(f"quantization must be one of {', '.join(quantizations())} (what the installed gguf package "
                         f"can write), got {name!r}; for K-quants such as q4_k_m, export f16 and run llama.cpp's "
                         "llama-quantize on it")
    return _QUANTIZATIONS[key]


def tensor_type(name: str, shape, quant: gguf.GGMLQuantizationType, tied: bool) -> gguf.GGMLQuantizationType:
    """The type llama.cpp stores GGUF tensor ``name`` in, in a file quantized to ``quant``.

    * 1-D tensors (norms, biases, ``rope_freqs``) and norm weights stay F32: llama.cpp computes them in F32.
    * F32, F16, BF16 and Q8_0 (llama.cpp's converter) apply to every other weight, embedding and head included.
    * Q4_0, Q4_1, Q5_0 and Q5_1 (llama-quantize) spare the output head, or the token embedding when the head is tied
      to it: llama-quantize gives it Q6_K, which the ``gguf`` package cannot write, so it gets Q8_0, llama-quantize's
      own fallback for Q6_K.
    * A row length that is not a multiple of the type's block falls back to F16, as in llama.cpp's converter.
    """
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return _Q.F32
    qtype = quant
    if quant in _LLAMA_QUANTIZE_TYPES and (name == "output.weight" or (tied and name == "token_embd.weight")):
        qtype = _Q.Q8_0
    return _Q.F16 if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] else qtype


def llama_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's rows of a q/k weight ``[n_head * d, ...]`` (or bias) from Hugging Face's half-split RoPE
    pairs to llama.cpp's adjacent ones: row ``h*d + j*d/2 + i`` moves to ``h*d + 2i + j`` (llama.cpp's
    ``LlamaModel.permute``; transformers' GGUF reader applies the inverse)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))


# model_type -> (llama.cpp architecture, whether its q/k are permuted). Mistral is llama.cpp's `llama`.
_ARCHITECTURES = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
    "qwen3": (gguf.MODEL_ARCH.QWEN3, False),
    "phi3": (gguf.MODEL_ARCH.PHI3, False),
}


def _architecture(config):
    if config.model_type not in _ARCHITECTURES:
        raise ValueError(f"save_gguf exports {', '.join(_ARCHITECTURES)} models; this one is {config.model_type!r}")
    return _ARCHITECTURES[config.model_type]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


def llama3_rope_divisors(rope: dict, head_dim: int) -> np.ndarray:
    """Llama 3.1's RoPE scaling as llama.cpp stores it (``rope_freqs.weight``): per frequency ``theta^(-2i/d)``,
    the divisor applied to it: 1 for wavelengths below ``original_max_position_embeddings / high_freq_factor``,
    ``factor`` above ``... / low_freq_factor``, and a smooth blend between."""
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    # llama.cpp's converter reads the original context from the config's top level (8192 when absent there); the
    # model's value is the one inside the RoPE parameters
    context = rope["original_max_position_embeddings"]
    wavelength = 2 * np.pi * rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (context / wavelength - low) / (high - low)
    divisor = np.where(wavelength < context / high, 1.0,
                       np.where(wavelength > context / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return divisor.astype(np.float32)


def _add_rope_scaling(writer: gguf.GGUFWriter, rope: dict, permuted: bool) -> None:
    kind = rope["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
    elif kind not in ("default",) and not (kind == "llama3" and permuted):  # llama3: the rope_freqs tensor
        raise ValueError(f"save_gguf cannot express RoPE scaling {kind!r} for this architecture in GGUF; it writes "
                         "default, linear and yarn scaling, and llama3 scaling for Llama models")


def _warn_about_sliding_window(config, arch) -> None:
    window = getattr(config, "sliding_window", None)
    if config.model_type not in ("mistral", "phi3") and not getattr(config, "use_sliding_window", False):
        window = None  # Qwen2/Qwen3 only use it when asked to
    if window is not None and window < config.max_position_embeddings:
        warnings.warn(f"this {config.model_type} model attends within a sliding window of {window} tokens, which "
                      f"llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} architecture does not apply: in llama.cpp its "
                      f"outputs differ from transformers' for sequences longer than {window} tokens", stacklevel=3)


def longrope_attention_factor(config, rope: dict) -> float:
    """The factor LongRoPE scales cos and sin by, as transformers computes it (``_compute_longrope_parameters``):
    ``attention_factor`` when given, else ``sqrt(1 + ln(factor) / ln(original context))`` with ``factor`` (default:
    the context over the original one), 1 when ``factor <= 1``. (llama.cpp's converter computes the default.)"""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or config.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _add_phi3(writer: gguf.GGUFWriter, config, rope: dict) -> None:
    """What llama.cpp's ``Phi3MiniModel`` converter adds: the original context, the rotated dims per head, the
    sliding window (0 for none), LongRoPE's attention factor (its factors are tensors: :class:`GGUFExport`)."""
    original = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings",
                                                                      config.max_position_embeddings)
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_rope_dimension_count(int(_head_dim(config) * rope.get("partial_rotary_factor", 1.0)))
    writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
    if rope["rope_type"] == "longrope":
        writer.add_rope_scaling_attn_factors(longrope_attention_factor(config, rope))
    elif rope["rope_type"] != "default":
        raise ValueError(f"save_gguf cannot express RoPE scaling {rope['rope_type']!r} for a phi3 model in GGUF; it "
                         "writes default and longrope")


def add_model(writer: gguf.GGUFWriter, config, name: str, file_type: gguf.LlamaFileType) -> None:
    """The architecture metadata llama.cpp's converter writes for ``config``."""
    arch, permuted = _architecture(config)
    rope = _rope(config)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    if arch != gguf.MODEL_ARCH.PHI3:  # (llama.cpp's phi3 converter derives the head size)
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope["rope_theta"])
    if arch == gguf.MODEL_ARCH.LLAMA:  # llama.cpp's LlamaModel adds these two
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(_head_dim(config))
    if arch == gguf.MODEL_ARCH.PHI3:
        _add_phi3(writer, config, rope)
    else:
        _add_rope_scaling(writer, rope, permuted)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer

# Byte-level BPE pre-tokenizers llama.cpp knows (`tokenizer.ggml.pre`), by how the tokenizer splits text: whether its
# byte-level step applies GPT-2's regex, and the steps before that (SmolLM splits single digits off first; Llama 3
# and Qwen2 split by their own regex instead of GPT-2's).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL_PRE = {
    (True, ()): "gpt-2",
    (True, (("Digits", True),)): "smollm",
    (False, (("Split", _LLAMA3_SPLIT, "Isolated", False),)): "llama-bpe",
    (False, (("Split", _QWEN2_SPLIT, "Isolated", False),)): "qwen2",
}
_SUPPORTED_TOKENIZERS = ("byte-level BPE splitting text like GPT-2, SmolLM, Llama 3 or Qwen2, or SentencePiece-style "
                         "BPE with byte fallback (Llama 2, Mistral)")


def _unsupported(what: str) -> ValueError:
    return ValueError(f"save_gguf writes tokenizers that llama.cpp runs the same way: {_SUPPORTED_TOKENIZERS}; {what}")


def _steps(part: dict | None) -> list[dict]:
    """The steps of a normalizer or pre-tokenizer (a Sequence's members, else itself)."""
    part = part or {}
    return part.get("normalizers") or part.get("pretokenizers") or ([part] if part else [])


def _split_key(step: dict) -> tuple:
    """What decides how a pre-tokenizer step splits text."""
    if step.get("type") == "Split":
        return "Split", step["pattern"].get("Regex"), step.get("behavior"), step.get("invert")
    if step.get("type") == "Digits":
        return "Digits", step.get("individual_digits")
    return (step.get("type"),)


def _tokenizer_model(spec: dict) -> tuple[str, str | None]:
    """``(tokenizer.ggml.model, tokenizer.ggml.pre)`` of a tokenizer, from its ``tokenizer.json`` form."""
    model = spec["model"]
    if model.get("type") != "BPE":
        raise _unsupported(f"this one is a {model.get('type')} tokenizer")
    if model.get("byte_fallback"):
        # SentencePiece-style: llama.cpp's SPM tokenizer writes spaces as "\u2581" itself
        steps = _steps(spec.get("normalizer")) + _steps(spec.get("pre_tokenizer"))
        if not any(step.get("type") == "Metaspace" or step.get("content") == "\u2581" for step in steps):
            raise _unsupported("this one has byte fallback but does not write spaces as '\u2581'")
        return "llama", None
    if (spec.get("normalizer") or {}).get("type") not in (None, "NFC"):  # NFC: Qwen2's, which llama.cpp omits
        raise _unsupported(f"this one normalizes text first ({spec['normalizer']['type']})")
    *steps, byte_level = _steps(spec.get("pre_tokenizer")) or [{}]
    name = _BYTE_LEVEL_PRE.get((byte_level.get("use_regex"), tuple(_split_key(step) for step in steps)))
    if byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space") or name is None:
        raise _unsupported(f"this one's pre-tokenizer is {json.dumps(spec.get('pre_tokenizer'))}")
    return "gpt2", name


def _adds_space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts "\u2581" before a text (its Metaspace, or an older normalizer)."""
    steps = _steps(spec.get("normalizer")) + _steps(spec.get("pre_tokenizer"))
    return any((step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never")
               or (step.get("type") == "Prepend" and step.get("prepend") == "\u2581") for step in steps)


def _merges(spec: dict) -> list[tuple[str, str]]:
    # tokenizers writes merges as [left, right] pairs, older files as "left right" strings
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in spec["model"].get("merges", [])]


def _special_tokens_added(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer puts its BOS before and its EOS after a text (what ``add_special_tokens`` does)."""
    plain = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    ids = tokenizer("Hello", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(ids) > len(plain) and ids[0] == bos
    rest = ids[1:] if add_bos else ids
    add_eos = eos is not None and len(rest) > len(plain) and rest[-1] == eos
    if (rest[:-1] if add_eos else rest) != plain:
        raise _unsupported(f"this one adds special tokens llama.cpp cannot express: {plain} becomes {ids}")
    return add_bos, add_eos


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, config) -> None:
    """The tokenizer metadata llama.cpp reads, so that it tokenizes text as ``tokenizer`` does.

    * ``tokenizer.ggml.model``: ``gpt2`` (byte-level BPE, with its merges and ``tokenizer.ggml.pre``, the
      pre-tokenizer llama.cpp should split text with, read off the tokenizer's own) or ``llama`` (SentencePiece-style
      BPE; llama.cpp merges by token score, so each token scores minus the rank of the first merge that makes it).
    * One token per embedding row (``vocab_size``), padded with unused ``[PAD<id>]`` entries, with token types:
      special added tokens are control tokens, other added tokens user-defined, ``<0xNN>`` bytes, and ``<unk>``.
    * BOS / EOS / UNK / PAD ids (from the tokenizer, else the model config, as llama.cpp's converter reads them),
      whether BOS and EOS are added (as the tokenizer does), and the chat template.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise _unsupported(f"pass a fast (tokenizers-backed) tokenizer, not a {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model, pre = _tokenizer_model(spec)
    sentencepiece = model == "llama"
    add_bos, add_eos = _special_tokens_added(tokenizer)

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"the tokenizer has token ids up to {max(vocab.values())}, but the model has {vocab_size} "
                         "embedding rows; resize the model's embeddings to the tokenizer "
                         "(model.resize_token_embeddings(len(tokenizer))) before fine-tuning")
    added = tokenizer.added_tokens_decoder
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i] = token
        if sentencepiece and token == tokenizer.unk_token:
            types[i] = gguf.TokenType.UNKNOWN
        elif i in added:
            types[i] = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        elif sentencepiece and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types[i] = gguf.TokenType.BYTE
        else:
            types[i] = gguf.TokenType.NORMAL

    merges = _merges(spec)
    writer.add_tokenizer_model(model)
    if sentencepiece:
        rank: dict[str, int] = {}
        for r, (left, right) in enumerate(merges):
            rank.setdefault(left + right, r)
        writer.add_token_list(tokens)
        writer.add_token_scores([-1.0 - rank[t] if t in rank else 0.0 for t in tokens])
        writer.add_token_types(types)
        writer.add_add_space_prefix(_adds_space_prefix(spec))
    else:
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([f"{left} {right}" for left, right in merges])

    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is None:
            token_id = getattr(config, f"{kind}_token_id", None)  # a list (several EOS) has no GGUF form
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)


# ----------------------------------------------------------------------------------------------------------------
# The file


class GGUFExport:
    """One model's GGUF file: all metadata and the tensor table are built (and so checked) on construction, from the
    names and shapes of the merged tensors alone; :meth:`write` then streams the tensors' values in.

    Args:
        config: the model's transformers config.
        tokenizer: its tokenizer (a fast one).
        quantization: a name from :func:`quantizations`.
        name: ``general.name``.
        tensors: ``(name, shape)`` of every merged tensor, named as in a transformers checkpoint, in the order
            :meth:`write` will get their values.
    """

    def __init__(self, config, tokenizer, quantization_name, name: str, tensors: list[tuple[str, tuple[int, ...]]]):
        file_type, quant = quantization(quantization_name)
        arch, self.permuted = _architecture(config)
        _warn_about_sliding_window(config, arch)
        self.n_head = config.num_attention_heads
        self.n_head_kv = getattr(config, "num_key_value_heads", None) or self.n_head
        names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
        tied = all(hf_name != "lm_head.weight" for hf_name, _ in tensors)

        self.writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
        add_model(self.writer, config, name, file_type)
        vocab_size = next(shape[0] for hf_name, shape in tensors if hf_name == "model.embed_tokens.weight")
        add_tokenizer(self.writer, tokenizer, vocab_size, config)

        rope = _rope(config)
        self.extra = {}  # tensors llama.cpp needs that the checkpoint has no counterpart of
        if rope["rope_type"] == "llama3":
            self.extra["rope_freqs.weight"] = llama3_rope_divisors(rope, _head_dim(config))
        if rope["rope_type"] == "longrope":  # Phi-3: the per-frequency divisors of each regime
            for kind in ("long", "short"):
                self.extra[f"rope_factors_{kind}.weight"] = np.asarray(rope[f"{kind}_factor"], dtype=np.float32)
        for gguf_name, array in self.extra.items():
            self.writer.add_tensor_info(gguf_name, array.shape, array.dtype, array.nbytes, raw_dtype=_Q.F32)

        self.tensors = []  # (transformers name, GGUF name, type), in file order
        for hf_name, shape in tensors:
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ValueError(f"save_gguf has no GGUF name for tensor {hf_name!r} of this {config.model_type} model")
            qtype = tensor_type(gguf_name, shape, quant, tied)
            # (F32 and F16 count as blocks of one value of 4 and 2 bytes)
            nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))
            self.writer.add_tensor_info(gguf_name, shape, np.float32, nbytes, raw_dtype=qtype)
            self.tensors.append((hf_name, gguf_name, qtype))

    def _encode(self, hf_name: str, qtype, value: torch.Tensor) -> np.ndarray:
        value = value.detach().to("cpu", torch.float32)
        if self.permuted and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            value = llama_permute(value, self.n_head)
        elif self.permuted and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            value = llama_permute(value, self.n_head_kv)
        return gguf.quants.quantize(value.numpy(), qtype)

    def write(self, file: Path, merges) -> None:
        """Write the file: header, metadata and tensor table, then the tensors: ``merges`` holds one function per
        entry of ``tensors``, in that order, that computes its fp32 torch value; each is called, converted and
        written before the next (and no reference outlives that, so one tensor is alive at a time)."""
        writer = self.writer
        writer.write_header_to_file(path=Path(file))
        try:
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for array in self.extra.values():
                writer.write_tensor_data(array)
            for (hf_name, _, qtype), merge in zip(self.tensors, merges, strict=True):
                writer.write_tensor_data(self._encode(hf_name, qtype, merge()))
        finally:
            writer.close()
