"""One QLoRA training step of a contender, built and run the same way on meta tensors (accounted) and on
the CPU (measured, to validate the accounting).

A contender's model is built from a config the way its users build it:

* ``hf``: transformers with bitsandbytes NF4 4-bit weights (double quantization, ``lm_head`` and
  embeddings in 16-bit), SDPA attention, peft LoRA, transformers' gradient checkpointing (non-reentrant)
  and ``enable_input_require_grads``;
* ``fastft``: the same 4-bit model patched by :func:`fastft.patch_model` and wrapped by
  :meth:`fastft.FastModel.get_peft_model`.

Both then get what TRL's ``SFTTrainer`` does to a 4-bit model: the trainable LoRA weights cast to bf16
(``sft_trainer.py``: "the PEFT adapter weights are converted to bf16") when the compute dtype is 16-bit, which
fastft undoes for its models (``fastft/master_weights.py``: bf16 adapters in a bf16 model, fp32 master weights in
an fp16 one), and the Trainer's default optimizer, fused AdamW (``adamw_torch_fused``, no weight decay).

A step is ``loss = model(**batch).loss``, ``loss.backward()``, ``optimizer.step()``,
``optimizer.zero_grad(set_to_none=True)``. ``loss="labels"`` is the model's own forward with ``labels``
(transformers' full-logit cross-entropy for ``hf``; fastft's fused lm-head loss); ``loss="trl"`` is TRL's
fused lm-head path (``model(..., fused_lm_head=True)``) that ``SFTTrainer`` runs, served by TRL's chunked
log-prob kernel for ``hf`` and by fastft's ``linear_log_probs`` for ``fastft``.

Batches (``batch=``): ``plain`` (``[B, T]``, no padding), ``padded`` (rows of decreasing length,
right-padded, ``-100`` labels on the pads) and ``packed`` (one row of several sequences with restarting
``position_ids``, no attention mask: TRL's padding-free batches).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc

import torch
from torch import nn

from .. import reach_ins

CONTENDERS = ("hf", "fastft")
CHECKPOINTING = ("off", "on", "offload")
BATCHES = ("plain", "padded", "packed")
LOSSES = ("labels", "trl")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# What SFTTrainer asks its fused lm head for (trl 1.16, sft_trainer.py).
SFT_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """One accounted (or measured) training step."""

    contender: str = "fastft"
    seq_len: int = 2048
    batch_size: int = 1
    r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0  # peft's lora_dropout p of every adapter (fastft draws its mask inside the kernels)
    target_modules: tuple[str, ...] | None = None  # None: every linear layer of the decoder (lora_targets)
    # peft's target_parameters; None: an MoE model's expert tensors (as FastModel.get_peft_model defaults), else none
    target_parameters: tuple[str, ...] | None = None
    checkpointing: str = "on"  # "off", "on", "offload", or an int: the first that many layers checkpointed
    mlp_chunk_tokens: int | None = None  # fastft: the MLP in token chunks (lora_mlp's chunk_tokens)
    batch: str = "plain"
    loss: str = "labels"
    dtype: torch.dtype = torch.bfloat16
    load_in_4bit: bool = True
    fsdp_world_size: int = 1  # > 1: one rank of an FSDP2 job of this many ranks (see fastft.memory.fsdp)

    def __post_init__(self):
        if self.contender not in CONTENDERS:
            raise ValueError(f"contender must be one of {CONTENDERS}, got {self.contender!r}")
        if self.batch not in BATCHES:
            raise ValueError(f"batch must be one of {BATCHES}, got {self.batch!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not (self.checkpointing in CHECKPOINTING or isinstance(self.checkpointing, int)):
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING} or a layer count, "
                             f"got {self.checkpointing!r}")
        if self.mlp_chunk_tokens is not None and self.contender != "fastft":
            raise ValueError("mlp_chunk_tokens is a fastft setting; the hf contender has no chunked MLP")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be a probability in [0, 1), got {self.lora_dropout!r}")
        for name in ("seq_len", "batch_size", "r", "fsdp_world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Building a contender


def _quantize_linear_layers(model: nn.Module, dtype: torch.dtype, device: torch.device,
                            storage: torch.dtype = torch.uint8) -> None:
    """Replace every ``nn.Linear`` but ``lm_head`` by bitsandbytes' ``Linear4bit`` (NF4, double quantization,
    blocksize 64, the packed codes stored as ``storage``), quantized from the layer's weight: what
    transformers' bitsandbytes quantizer does while loading a checkpoint with ``BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=...)``.
    """
    import bitsandbytes as bnb
    import transformers

    quantize = reach_ins.get(reach_ins.PARAMS4BIT_QUANTIZE)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or name == "lm_head":
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                      quant_storage=storage, device=device)
            weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                       compress_statistics=True, quant_storage=storage, module=layer)
            layer.weight = quantize(weight, device)
            if child.bias is not None:
                layer.bias = child.bias
            setattr(parent, name, layer)
            del child, weight
    model.is_loaded_in_4bit = True
    model.config.quantization_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=storage)


def build_model(config, setup: StepSetup, device: torch.device):
    """The contender's model for ``setup`` on ``device`` (meta: accounted; cpu: measured)."""
    import transformers

    from ..architectures import spec_for
    from ..moe import is_moe_config, refuse_moe

    moe = is_moe_config(config)
    if setup.fsdp_world_size > 1:
        refuse_moe(config, "fastft's FSDP memory accounting")
    config = copy.deepcopy(config)  # quantization records itself in the config
    if moe:  # the router's load-balancing loss, as TRL's SFTTrainer enables it (a non-zero router_aux_loss_coef)
        config.output_router_logits = getattr(config, "router_aux_loss_coef", 0.0) != 0
    with torch.device(device):  # SDPA, or eager where the model's class refuses SDPA (Gemma 2)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=setup.dtype,
                                                              attn_implementation=spec_for(config).load_attention)
    model.config.use_cache = False
    if setup.load_in_4bit:
        # FSDP shards floating-point parameters only: the codes stored in the compute dtype, as FastModel stores them
        storage = setup.dtype if setup.fsdp_world_size > 1 else torch.uint8
        _quantize_linear_layers(model, setup.dtype, device, storage)
        if moe and setup.contender == "fastft":  # bitsandbytes leaves the 3-D experts 16-bit; FastModel does not
            _quantize_experts(model)
    for param in model.parameters():
        param.requires_grad_(False)
    if moe:
        route_to_the_first_experts(model)
    if setup.contender == "fastft":
        model = _fastft(model, setup)
    else:
        model = _hf(model, setup)
    if setup.loss == "trl":  # as SFTTrainer does: on the PEFT model's base, after fastft patched its forward
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model.get_base_model(), outputs=SFT_FUSED_OUTPUTS)
    if setup.dtype != torch.float32 and setup.contender != "fastft":  # TRL's cast (see the module doc)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(setup.dtype)
    return model


def _quantize_experts(model: nn.Module) -> None:
    """Every expert tensor in NF4 (``fastft.moe.quantize_experts``), what ``FastModel.from_pretrained(...,
    load_in_4bit=True)`` holds after quantizing the experts while loading."""
    from ..moe import EXPERT_PARAMETERS, sparse_blocks

    for block in sparse_blocks(model):
        for name in EXPERT_PARAMETERS:
            nf4 = _nf4_experts(getattr(block.experts, name).detach())
            setattr(block.experts, name, nn.Parameter(nf4, requires_grad=False))


def _nf4_experts(weights: torch.Tensor):
    """``fastft.moe.quantize_experts(weights)``; of meta experts (no values to quantize), bitsandbytes' layout of the
    first one stacked for all: the same tensors, without thousands of simulated quantizations (Qwen3-30B-A3B has
    12,288 expert matrices). The CPU validation quantizes every expert and finds the same bytes."""
    from ..kernels.moe_experts import NF4Experts
    from ..moe import NF4ExpertsTensor, quantize_experts

    if weights.device.type != "meta":
        return quantize_experts(weights)
    first = quantize_experts(weights[:1]).nf4
    E = weights.shape[0]
    stacked = {name: torch.empty((E, *getattr(first, name).shape[1:]), dtype=getattr(first, name).dtype,
                                 device=weights.device) for name in ("packed", "absmax", "nested_absmax", "offset")}
    return NF4ExpertsTensor(NF4Experts(**stacked, code=first.code, nested_code=first.nested_code,
                                       blocksize=first.blocksize, nested_blocksize=first.nested_blocksize,
                                       shape=first.shape, dtype=first.dtype))


def route_to_the_first_experts(model: nn.Module) -> None:
    """Every router of ``model`` sends every token to experts ``0 .. k-1`` (its logits and weights are computed as
    usual; only the chosen indices are overwritten, below autograd's view).

    The step's memory depends on the routing through the per-expert token groups (fastft's expert op, transformers'
    eager experts); random weights route by chance, and the accounting cannot know a trained router's choices.
    All tokens on the same k experts gives the largest groups any routing can give (each token picks k distinct
    experts), so the figures bound every routing; the CPU validation routes the same way."""
    from ..moe import sparse_blocks

    for block in sparse_blocks(model):
        block.gate.register_forward_hook(_choose_the_first_experts)


def _choose_the_first_experts(router, args, output):
    top_k_index = output[2]
    with torch.no_grad():  # .data: top-k keeps its indices for its backward; their version must not change
        top_k_index.data.copy_(torch.arange(top_k_index.shape[-1], dtype=top_k_index.dtype,
                                            device=top_k_index.device))


def lora_targets(setup: StepSetup, config) -> list[str]:
    """The adapted layers: ``setup.target_modules``, or every linear layer of the decoder under the architecture's
    names (Phi-3's fused ``qkv_proj`` and ``gate_up_proj``; Llama's seven elsewhere); of an MoE model, its attention
    (``get_peft_model``'s default, with the experts as :func:`lora_target_parameters`)."""
    from ..architectures import SPECS
    from ..moe import ATTENTION_TARGETS

    if setup.target_modules is not None:
        return list(setup.target_modules)
    spec = SPECS.get(config.model_type)
    if spec is not None and spec.moe is not None:
        return list(ATTENTION_TARGETS)
    return list(spec.linear_layers if spec is not None else ALL_LINEAR)


def lora_target_parameters(setup: StepSetup, config) -> list[str]:
    """peft's ``target_parameters``: ``setup.target_parameters``, or an MoE model's expert tensors (``get_peft_model``'s
    default: peft's ``ParamWrapper``, a rank-r adapter per expert), or none."""
    from ..moe import EXPERT_TARGET_PARAMETERS, is_moe_config

    if setup.target_parameters is not None:
        return list(setup.target_parameters)
    return list(EXPERT_TARGET_PARAMETERS) if is_moe_config(config) else []


def _lora_config(setup: StepSetup, config):
    import peft

    parameters = lora_target_parameters(setup, config)
    return peft.LoraConfig(r=setup.r, lora_alpha=setup.lora_alpha, lora_dropout=setup.lora_dropout, bias="none",
                           target_modules=lora_targets(setup, config), task_type="CAUSAL_LM",
                           **({"target_parameters": parameters} if parameters else {}))


def _hf(model, setup: StepSetup):
    import peft

    from ..checkpointing import transformers_method

    model = peft.get_peft_model(model, _lora_config(setup, model.config))
    mode = setup.checkpointing
    if mode != "off":
        layers = model.get_base_model().model.layers
        transformers_method(model, "enable")({"use_reentrant": False}, offload=mode == "offload")
        if isinstance(mode, int):  # the first `mode` layers checkpointed, the rest keep their activations
            for index, layer in enumerate(layers):
                layer.gradient_checkpointing = index < mode
        model.enable_input_require_grads()
    return model


def _fastft(model, setup: StepSetup):
    from ..model import FastModel, patch_model

    patch_model(model, max_seq_length=setup.seq_len)
    mode = {"off": False, "on": True}.get(setup.checkpointing, setup.checkpointing)
    parameters = lora_target_parameters(setup, model.config)
    return FastModel.get_peft_model(model, r=setup.r, lora_alpha=setup.lora_alpha, lora_dropout=setup.lora_dropout,
                                    target_modules=lora_targets(setup, model.config), use_gradient_checkpointing=mode,
                                    mlp_chunk_tokens=setup.mlp_chunk_tokens,
                                    **({"target_parameters": parameters} if parameters else {}))


def make_optimizer(model):
    """The Trainer's default optimizer (``adamw_torch_fused``) over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)


# ---------------------------------------------------------------------------------------------
# Batches and the step


def make_batch(setup: StepSetup, vocab_size: int, device: torch.device, seq_len: int | None = None) -> dict:
    """Token ids of ``setup.batch`` kind, created on the CPU and moved to ``device`` (small: their values
    are known to the simulated GPU)."""
    T, B = seq_len or setup.seq_len, setup.batch_size
    gen = torch.Generator().manual_seed(T * 1009 + B)
    if setup.batch == "packed":  # one row: sequences of T/2, T/3 and the rest, as TRL's padding-free collator
        ids = torch.randint(0, vocab_size, (1, B * T), generator=gen)
        lengths = [max(1, B * T // 2), max(1, B * T // 3)]
        lengths.append(B * T - sum(lengths))
        position_ids = torch.cat([torch.arange(n) for n in lengths if n > 0]).unsqueeze(0)
        batch = {"input_ids": ids, "position_ids": position_ids, "labels": ids.clone()}
    else:
        ids = torch.randint(0, vocab_size, (B, T), generator=gen)
        mask = torch.ones(B, T, dtype=torch.long)
        if setup.batch == "padded":  # row i is shorter by i * T / (2 B) tokens, right-padded
            for row in range(1, B):
                mask[row, T - row * T // (2 * B):] = 0
        labels = ids.masked_fill(mask == 0, -100)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if setup.loss == "trl":
        batch["fused_lm_head"] = True
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step(model, optimizer, batch: dict, tracker=None, on_grads=None) -> None:
    """Forward, backward, optimizer step, ``zero_grad(set_to_none=True)``; ``tracker.phase`` is set to
    "forward" / "backward" / "optimizer" on the way; ``on_grads()`` is called after the optimizer step,
    while the gradients still exist."""

    def phase(name):
        if tracker is not None:
            tracker.phase = name

    phase("forward")
    loss = model(**batch).loss
    phase("backward")
    loss.backward()
    del loss
    phase("optimizer")
    optimizer.step()
    if on_grads is not None:
        on_grads()
    optimizer.zero_grad(set_to_none=True)
    phase("")


# ---------------------------------------------------------------------------------------------
# What is resident


def _local(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``t``: its shard when FSDP2 made it a DTensor."""
    return getattr(t, reach_ins.DTENSOR_LOCAL.attribute, t)


def resident_tensors(model, optimizer) -> dict[str, list[torch.Tensor]]:
    """The model's and optimizer's persistent tensors by category (the breakdown's rows); of an FSDP-sharded
    model, this rank's shards."""
    import bitsandbytes as bnb

    from ..kernels.lora_projection import dequant_workspaces
    from ..moe import NF4ExpertsTensor

    groups: dict[str, list[torch.Tensor]] = {name: [] for name in (
        "weights_4bit", "weights_16bit", "lora_weights", "lora_grads", "optimizer_state", "workspaces")}
    four_bit = set()
    for param in model.parameters():  # fastft's NF4 experts: their codes and quantization state
        if isinstance(param, NF4ExpertsTensor):
            four_bit.add(id(param))
            groups["weights_4bit"].append(param)
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):  # bitsandbytes' layer (peft's wrapper has the same name)
            continue
        # the quant state: on the Params4bit, and on the module where FSDP replaced the Params4bit by its shard
        qs = getattr(module.weight, "quant_state", None)
        qs = module.quant_state if qs is None else qs
        four_bit.add(id(module.weight))
        groups["weights_4bit"] += [_local(module.weight), qs.absmax, qs.code]
        if qs.nested:
            groups["weights_4bit"] += [qs.offset, qs.state2.absmax, qs.state2.code]
    for param in model.parameters():
        if id(param) in four_bit:
            continue
        if param.requires_grad:
            groups["lora_weights"].append(_local(param))
            if param.grad is not None:
                groups["lora_grads"].append(_local(param.grad))
        else:
            groups["weights_16bit"].append(_local(param))
    groups["weights_16bit"] += list(model.buffers())
    for state in optimizer.state.values():
        groups["optimizer_state"] += [_local(t) for t in state.values() if isinstance(t, torch.Tensor)]
    groups["workspaces"] += dequant_workspaces()
    return groups


@contextlib.contextmanager
def fresh_workspaces():
    """fastft's dequantization workspace is a module-level cache: start and end each step empty."""
    from ..kernels.lora_projection import release_dequant_workspace

    release_dequant_workspace()
    try:
        yield
    finally:
        release_dequant_workspace()
        gc.collect()
