"""``fastft.estimate_memory``: will a QLoRA fine-tune fit this GPU, and how long a context fits?

The figures are **accounted**, not measured: one training step of the model is run on meta tensors
along the code path a GPU runs (see ``fastft.memory.simulated_gpu``), and the bytes of live tensors are
counted as ``torch.cuda.max_memory_allocated`` counts them. With ``fsdp_world_size=N`` the figures are one rank's
of an FSDP2 job of ``N`` GPUs, the model sharded by torch's own ``fully_shard`` as the Trainer's accelerate
plugin shards it (see ``fastft.memory.fsdp``). Not counted: the CUDA context, cuBLAS / cuDNN workspaces, and
the caching allocator's rounding and fragmentation. Wherever a peak is compared with a card (``fits``,
:func:`max_context`), the card is first reduced by the headroom of ``fastft.memory.headroom`` for those
(``headroom=False``: the whole card, the raw comparison).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .. import reach_ins
from ..architectures import spec_for
from . import headroom as card_headroom
from .accounting import GIB, StepMemory, account_step
from .configs import load_config
from .training_step import StepSetup

# The rows of the resident breakdown, in print order, with what they hold.
RESIDENT_ROWS = {
    "weights_4bit": "4-bit weights and their quantization state",
    "weights_16bit": "16-bit embedding, lm_head, norms, biases, buffers",
    "lora_weights": "LoRA weights",
    "lora_grads": "LoRA gradients",
    "optimizer_state": "optimizer state (AdamW)",
    "workspaces": "persistent workspaces (dequantization buffer)",
}


@dataclasses.dataclass
class MemoryEstimate:
    """Accounted GPU memory of one training step (GiB). ``peak_gb`` is what ``max_memory_allocated`` would
    report; ``resident_gb`` what stays allocated between steps (with the gradients)."""

    model: str
    contender: str
    seq_len: int
    batch_size: int
    r: int
    checkpointing: object
    loss: str
    resident: dict[str, float]
    peak_gb: float
    peak_phase: str
    fsdp_world_size: int = 1  # > 1: the figures are one rank's of an FSDP2 job of this many GPUs

    @property
    def resident_gb(self) -> float:
        return sum(self.resident.values())

    @property
    def step_gb(self) -> float:
        """The step's working memory: peak minus resident."""
        return self.peak_gb - self.resident_gb

    def fits(self, vram_gb: float, headroom: bool = True) -> bool:
        """Whether the accounted peak fits a card of ``vram_gb`` GiB less the headroom
        (``fastft.memory.headroom``), or the whole card with ``headroom=False``."""
        return self.peak_gb <= (card_headroom.usable_gib(vram_gb) if headroom else vram_gb)

    def breakdown(self) -> str:
        lines = [f"  {RESIDENT_ROWS[name]:52s} {gb:8.2f} GiB" for name, gb in self.resident.items()]
        lines.append(f"  {'resident (between steps)':52s} {self.resident_gb:8.2f} GiB")
        held = "activations, FSDP's gathered layers, temporaries" if self.fsdp_world_size > 1 else \
            "activations and temporaries"
        step_row = f"{held} at the peak ({self.peak_phase})"
        lines.append(f"  {step_row:52s} {self.step_gb:8.2f} GiB")
        lines.append(f"  {'peak (max_memory_allocated, accounted)':52s} {self.peak_gb:8.2f} GiB")
        return "\n".join(lines)

    @classmethod
    def from_step(cls, model_name: str, step: StepMemory) -> MemoryEstimate:
        s = step.setup
        return cls(model=model_name, contender=s.contender, seq_len=s.seq_len, batch_size=s.batch_size, r=s.r,
                   checkpointing=s.checkpointing, loss=s.loss, fsdp_world_size=s.fsdp_world_size,
                   resident={name: step.resident.get(name, 0) / GIB for name in RESIDENT_ROWS},
                   peak_gb=step.peak_bytes / GIB, peak_phase=step.peak_phase)


def _checkpointing(value):
    if isinstance(value, bool):  # before int: True == 1
        return "on" if value else "off"
    if isinstance(value, int) and value >= 0:
        return value  # the first `value` layers
    if value in ("on", "off", "offload"):
        return value
    raise ValueError(f"use_gradient_checkpointing must be True, False, 'offload' or a number of layers, got {value!r}")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _dtype(value) -> torch.dtype:
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    dtype = names.get(value, value) if isinstance(value, str) else value
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be bfloat16 or float16 (the compute dtype of a QLoRA step), got {value!r}")
    return dtype


# What one accounting simulates at most, in tokens per step (per rank): its time and the host memory of the batch's
# token ids (real CPU tensors: their values steer the step) grow with the tokens, about 80 MB and, on a busy 2-core
# machine, over a minute per million tokens. Shared by estimate_memory and max_context.
MAX_ACCOUNTED_TOKENS = 1 << 21


def _check_accounted_tokens(seq_len: int, batch_size: int) -> None:
    if seq_len * batch_size > MAX_ACCOUNTED_TOKENS:
        raise ValueError(
            f"fastft's memory accounting simulates at most {MAX_ACCOUNTED_TOKENS:,} tokens per step "
            f"(fastft.memory.estimate.MAX_ACCOUNTED_TOKENS); max_seq_length x batch_size is {seq_len:,} x "
            f"{batch_size} = {seq_len * batch_size:,}. Ask for fewer tokens: beyond that bound a step takes minutes "
            "and gigabytes of host memory to simulate")


def step_setup(max_seq_length, batch_size=1, r=16, lora_alpha=16, target_modules=None,
               use_gradient_checkpointing=True, loss="trl", contender="fastft", dtype=torch.bfloat16,
               mlp_chunk_tokens=None, fsdp_world_size=1, target_parameters=None) -> StepSetup:
    """The :class:`StepSetup` for :func:`estimate_memory`'s arguments, checked."""
    _check_accounted_tokens(_positive_int("max_seq_length", max_seq_length), _positive_int("batch_size", batch_size))
    return StepSetup(contender=contender, seq_len=_positive_int("max_seq_length", max_seq_length),
                     batch_size=_positive_int("batch_size", batch_size), r=_positive_int("r", r),
                     lora_alpha=lora_alpha, target_modules=None if target_modules is None else tuple(target_modules),
                     target_parameters=None if target_parameters is None else tuple(target_parameters),
                     checkpointing=_checkpointing(use_gradient_checkpointing), loss=loss, dtype=_dtype(dtype),
                     mlp_chunk_tokens=mlp_chunk_tokens,
                     fsdp_world_size=_positive_int("fsdp_world_size", fsdp_world_size))


def _config_for(model, seq_len: int):
    """The model's config, with a position range covering ``seq_len`` (memory does not depend on it)."""
    config = load_config(model.config if hasattr(model, "config") and not isinstance(model, str) else model)
    if getattr(config, "max_position_embeddings", 0) < seq_len:
        config = type(config).from_dict({**config.to_dict(), "max_position_embeddings": seq_len})
    return config


def _model_name(model) -> str:
    if isinstance(model, str):
        return model
    config = getattr(model, "config", model)
    return reach_ins.read(reach_ins.CONFIG_NAME_OR_PATH, config) or getattr(config, "model_type", "model")


def estimate_memory(model, max_seq_length: int, batch_size: int = 1, r: int = 16, lora_alpha: int = 16,
                    target_modules=None, use_gradient_checkpointing=True, loss: str = "trl",
                    contender: str = "fastft", dtype=torch.bfloat16, mlp_chunk_tokens: int | None = None,
                    fsdp_world_size: int = 1, target_parameters=None) -> MemoryEstimate:
    """Accounted GPU memory of one QLoRA training step (see the module doc for what is counted).

    Args:
        model: a transformers config or model, a name fastft knows (``"llama-3.1-8b"``, ``"qwen2-7b"``,
            ``"qwen2.5-1.5b"``, ``"phi-4"``, ...), a local directory with a ``config.json``, or a hub id in the
            offline cache.
        max_seq_length: tokens per sequence; ``batch_size`` sequences per step.
        r, lora_alpha, target_modules: the LoRA adapters (default: every linear layer of the decoder: Llama's
            seven, Phi-3's four fused ones; of a mixture-of-experts model, attention's four).
        target_parameters: peft's ``target_parameters`` (default: a mixture-of-experts model's expert tensors,
            ``experts.gate_up_proj`` and ``experts.down_proj``, as ``FastModel.get_peft_model`` defaults; else none).
            Mixture-of-experts models are accounted with every token routed to the same k experts (the largest
            per-expert token groups any routing gives: the figures bound every routing) and with the router's
            load-balancing loss (TRL's default for them); ``contender="hf"`` keeps the experts 16-bit, as
            bitsandbytes' ``load_in_4bit`` does (it quantizes ``nn.Linear`` layers only).
        use_gradient_checkpointing: True, False, "offload" or a number of layers, as
            ``FastModel.get_peft_model`` takes it.
        loss: "trl" (TRL's SFTTrainer / DPOTrainer fused lm-head path) or "labels" (``model(labels=...)``).
        contender: "fastft", or "hf" (transformers + peft + bitsandbytes, for comparison).
        dtype: compute dtype, bfloat16 or float16.
        mlp_chunk_tokens: fastft's MLP in chunks of this many tokens (see ``FastModel.get_peft_model``).
        fsdp_world_size: 1 (one GPU), or the number of GPUs of an FSDP2 job (the Trainer with ``fsdp=True``,
            ``fsdp_config={"version": 2}``): the figures are then one rank's, with ``batch_size`` sequences per
            rank. Runs a fake process group in this process: refused where ``torch.distributed`` is initialised.

    Returns:
        A :class:`MemoryEstimate`: resident breakdown, peak, ``fits(vram_gb)``.
    """
    setup = step_setup(max_seq_length, batch_size, r, lora_alpha, target_modules, use_gradient_checkpointing, loss,
                       contender, dtype, mlp_chunk_tokens, fsdp_world_size, target_parameters)
    config = _config_for(model, setup.seq_len)
    if setup.contender == "fastft":
        spec_for(config)  # an architecture fastft does not patch: its clear error, before the step is built
    return MemoryEstimate.from_step(_model_name(model), account_step(config, setup))


def _positive_gib(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"vram_gb must be a positive number of GiB (or a list of them), got {value!r}")
    return value


def trained_context(model) -> int | None:
    """The positions ``model`` (as :func:`estimate_memory` takes it) was trained on: its config's
    ``max_position_embeddings`` (None when it has none)."""
    config = load_config(model.config if hasattr(model, "config") and not isinstance(model, str) else model)
    return getattr(config, "max_position_embeddings", None)


def max_context(model, vram_gb, granularity: int = 128, upper: int | None = None,
                beyond_trained_context: bool = False, headroom: bool = True, **setup_kwargs):
    """The longest ``max_seq_length`` (a multiple of ``granularity``) whose accounted peak fits a card of ``vram_gb``
    GiB less the headroom (``fastft.memory.headroom``: the CUDA context and the caching allocator's rounding and
    fragmentation; ``headroom=False``: the whole card, the raw figure); 0 when not even ``granularity`` tokens fit.
    ``setup_kwargs``: as :func:`estimate_memory`. Given a list of sizes, returns ``{vram_gb: tokens}``, the
    searches sharing their evaluations.

    The search stops at ``upper`` (default: as far as the accounting goes, ``MAX_ACCOUNTED_TOKENS`` tokens per step
    over ``batch_size``) and, unless ``beyond_trained_context``, at the model's trained context
    (``max_position_embeddings``, see :func:`trained_context`): positions past it are memory capacity only, the
    model was not trained on them. ``beyond_trained_context=True`` gives the raw capacity."""
    setup_kwargs.pop("max_seq_length", None)
    sizes = [_positive_gib(v) for v in vram_gb] if isinstance(vram_gb, (list, tuple)) else [_positive_gib(vram_gb)]
    if not sizes:
        raise ValueError("vram_gb must be a positive number of GiB or a non-empty list of them, got []")
    granularity = _positive_int("granularity", granularity)
    bound = MAX_ACCOUNTED_TOKENS // _positive_int("batch_size", setup_kwargs.get("batch_size", 1))
    if upper is None:
        upper = bound
    elif _positive_int("upper", upper) > bound:
        _check_accounted_tokens(upper, setup_kwargs.get("batch_size", 1))
    trained = None if beyond_trained_context else trained_context(model)
    if trained is not None:
        upper = min(upper, trained)
    if upper < granularity:
        raise ValueError(f"the search for the longest context stops at {upper:,} tokens (upper, or the model's trained "
                         f"context), below granularity={granularity}; pass a smaller granularity")
    known: dict[int, float] = {}

    def peak(tokens: int) -> float:
        return estimate_memory(model, tokens, **setup_kwargs).peak_gb * GIB

    def budget(card_gb: float) -> float:
        return (card_headroom.usable_gib(card_gb) if headroom else card_gb) * GIB

    if isinstance(vram_gb, (list, tuple)):
        return {v: largest_fitting(peak, budget(v), granularity, upper, known) for v in sorted(sizes)}
    return largest_fitting(peak, budget(sizes[0]), granularity, upper, known)


def largest_fitting(peak, budget: float, granularity: int, upper: int, known: dict | None = None) -> int:
    """The largest multiple ``T`` of ``granularity`` in ``[granularity, upper]`` with ``peak(T) <= budget``
    (``peak`` non-decreasing), or 0. ``known``: ``{T: peak(T)}`` already evaluated (updated), so that
    searches for several budgets share their evaluations.

    The peak grows almost linearly with the length: extrapolate from the points known, then pin the limit
    with secant steps inside the bracket, each followed by its neighbour on the other side of the limit (a
    linear stretch is settled in two evaluations; elsewhere the bracket still shrinks every round)."""
    known = {} if known is None else known

    def f(tokens: int) -> float:
        if tokens not in known:
            known[tokens] = peak(tokens)
        return known[tokens]

    top = upper - upper % granularity
    if f(granularity) > budget:
        return 0
    lo = max(t for t, p in known.items() if p <= budget)
    above = [t for t, p in known.items() if p > budget]
    hi = min(above) if above else None
    while hi is None:
        if lo == top:
            return lo
        if len(known) < 2:
            probe = 8 * granularity
        else:  # the slope of the two longest lengths known, aimed just past the limit
            a, b = sorted(known)[-2:]
            slope = (known[b] - known[a]) / (b - a)
            probe = lo + (budget - f(lo)) / slope * 1.02 if slope > 0 else 2 * lo
        probe = min(top, max(int(probe) // granularity * granularity, lo + granularity))
        if f(probe) <= budget:
            lo = probe
        else:
            hi = probe
    while hi - lo > granularity:
        frac = (budget - f(lo)) / (f(hi) - f(lo))
        guess = lo + int((hi - lo) * frac) // granularity * granularity
        guess = min(max(guess, lo + granularity), hi - granularity)
        neighbour = guess + granularity if f(guess) <= budget else guess - granularity
        lo, hi = (guess, hi) if f(guess) <= budget else (lo, guess)
        if lo < neighbour < hi:
            lo, hi = (neighbour, hi) if f(neighbour) <= budget else (lo, neighbour)
    return lo
