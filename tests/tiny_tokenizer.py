"""A character-level tokenizer with a chat template, small enough for the tiny test models (vocab < 211)."""
import json
import string

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
# `{% generation %}` marks what assistant_only_loss trains on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}</s>"
    "{% else %}<|assistant|>{% generation %}{{ message['content'] }}</s>{% endgeneration %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    chars = sorted(set(string.printable) - set("\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=SPECIALS[4:])
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


# A few sentences to train the BPE tokenizers below on: digits, contractions, newlines and non-ASCII text, where
# the ways of splitting text that llama.cpp knows differ.
CORPUS = [
    "On 2024-05-17 at 10:30 we'll meet the 12 new members; they've said it's fine.\n\n",
    "The capital of France is Paris. Café déjà vu, naïve résumé!\n",
    "def add(a, b):\n    return a + b  # 1234567890\n",
    "  multiple   spaces\tand\ttabs, 3.14159 and 1,000,000 dollars. I'd say you're right.\n",
    "Ünïcödé and 漢字 and emoji 🙂 are bytes too: 2025/01/31 23:59:59.\n",
]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_bpe_tokenizer(vocab_size: int = 400, split: str = "qwen2"):
    """A byte-level BPE tokenizer as Qwen2 builds one (NFC, ChatML special tokens and template), trained on CORPUS: 3
    special tokens, the 256 byte symbols, then merges up to ``vocab_size``. ``split``: how it splits text before the
    merges: ``"qwen2"`` or ``"llama3"`` (by that model's regex), ``"gpt2"`` (GPT-2's), ``"smollm"`` (digits singly,
    then GPT-2's)."""
    from tokenizers import trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in ("gpt2", "smollm"))
    if split == "llama3":  # transformers' GGUF mapping (5.18 and later) holds Llama 3's regex
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        first = [pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS["llama3"]), behavior="isolated")]
    else:  # Qwen2's regex from its own tokenizer module (the GGUF mapping's "qwen2" entry is the same)
        first = {"gpt2": [], "smollm": [pre_tokenizers.Digits(individual_digits=True)],
                 "qwen2": [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")]}[split]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(first + [byte_level])
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    fast = Qwen2Tokenizer(vocab=tok.get_vocab(), merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          unk_token=None, additional_special_tokens=["<|im_start|>"])
    fast.backend_tokenizer.pre_tokenizer = tok.pre_tokenizer
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_sentencepiece_tokenizer(vocab_size: int = 400):
    """A SentencePiece-style BPE tokenizer as Llama 2 and Mistral have one (``<unk> <s> </s>``, the 256 ``<0xNN>``
    byte-fallback tokens, pieces with "\u2581" for spaces), trained on CORPUS. Its merges are derived from the pieces'
    scores (earlier pieces score higher), as transformers converts a SentencePiece model."""
    from tokenizers import trainers
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    trainer = Tokenizer(models.BPE())
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trainer.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=vocab_size - 259, show_progress=False))
    pieces = sorted(trainer.get_vocab(), key=trainer.get_vocab().get)
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
                                                + pieces)}
    merges = generate_merges(vocab, {token: -float(i) for token, i in vocab.items()})
    fast = LlamaTokenizer(vocab=vocab, merges=merges)
    fast.chat_template = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
                          "message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
                          "{% endfor %}")
    return fast


def tiny_phi3_tokenizer(vocab_size: int = 400):
    """:func:`tiny_sentencepiece_tokenizer` shaped as Phi-3's ``tokenizer.json``: spaces become "\u2581" and one is
    prepended by its normalizer (no pre-tokenizer), so a text that starts with spaces keeps one more "\u2581"
    than with Llama 2's Metaspace; transformers' GGUF reader rebuilds a ``phi3`` file's tokenizer that way."""
    fast = tiny_sentencepiece_tokenizer(vocab_size)
    fast.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(prepend="\u2581"), normalizers.Replace(pattern=" ", content="\u2581")])
    fast.backend_tokenizer.pre_tokenizer = None
    return fast


GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + ('model' if message['role'] == "
                  "'assistant' else message['role']) + '\\n' + message['content'] + '<end_of_turn>\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")


def tiny_gemma_tokenizer(vocab_size: int = 400):
    """A Gemma-style tokenizer (transformers' ``GemmaTokenizer``: SentencePiece BPE with byte fallback, no space
    prefix, ``<pad> <eos> <bos> <unk>`` first, turn markers, Gemma's chat template), trained on CORPUS. Pieces come in
    training order, the order Gemma's vocabulary has and transformers' GGUF reader rebuilds its merges from."""
    from tokenizers import trainers
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    trainer = Tokenizer(models.BPE())
    trainer.normalizer = normalizers.Replace(" ", "\u2581")
    trainer.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=vocab_size - len(specials) - 256,
                                                                show_progress=False))
    pieces = sorted(trainer.get_vocab(), key=trainer.get_vocab().get)
    vocab = {token: i for i, token in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    merges = generate_merges(vocab, {token: -float(i) for token, i in vocab.items()})
    fast = GemmaTokenizer(vocab=vocab, merges=merges, additional_special_tokens=specials[5:], add_bos_token=True)
    fast.chat_template = GEMMA_TEMPLATE
    return fast
