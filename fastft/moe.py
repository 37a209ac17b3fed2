"""Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE, Mixtral): 4-bit experts, their loading, the patched MoE block,
LoRA on the experts, and the router's load-balancing loss.

transformers 5 keeps a layer's experts as two 3-D parameters, ``experts.gate_up_proj`` ``[E, 2I, H]`` and
``experts.down_proj`` ``[E, H, I]``; its bitsandbytes quantizer replaces ``nn.Linear`` only, so they would stay
16-bit (~95% of Qwen3-30B-A3B's weights). Here:

* **4-bit experts**: :class:`NF4ExpertsTensor` holds one such parameter as E NF4 weights in bitsandbytes' format
  (blocks of 64, double quantization), each expert quantized on its own exactly as a ``Linear4bit`` weight of that
  shape would be (``kernels/moe_experts.NF4Experts``). It is a tensor subclass with the 16-bit parameter's shape
  and dtype: peft wraps it like the 16-bit one (``LoraConfig(target_parameters=...)``, its short names, adapters
  added later, e.g. TRL's DPO ``ref``), and any reader outside fastft's forward (transformers' own experts
  forward, ``unpatch_model``) computes with its dequantized values; writing into it is an error.
* **Loading**: :func:`experts_quantized_while_loading` swaps, for the duration of ``from_pretrained``, the
  expert entries of transformers' checkpoint conversion mapping (``MergeModulelist`` + ``Concatenate`` of the
  per-expert checkpoint tensors) for one that runs the same operations one expert at a time and quantizes each
  expert as it is assembled. The 16-bit ``[E, 2I, H]`` tensor is never formed: the GPU holds the 4-bit model
  plus, while a parameter loads, its per-expert 16-bit checkpoint tensors. Host memory: about one shard beyond
  the model (when it loads onto the CPU), plus the pages of the shards, which transformers keeps memory-mapped
  until loading ends (reclaimable file pages in the RSS); ``tests/test_moe.py`` measures both.
* **The MoE block** (:func:`moe_block_forward`, bound on each sparse block instance by ``patch.py``): the router
  module itself routes (so transformers records its logits for the auxiliary loss), ``kernels/moe_experts.py``
  applies the experts with their LoRA, the shared expert (Qwen2-MoE) is fastft's fused MLP.
* **LoRA on experts**: peft's ``ParamWrapper`` (``target_parameters``) keeps, per expert ``e``,
  ``A_e = lora_A.weight.view(E, r, in)[e]`` and ``B_e = lora_B.weight.view(out, r, E)[:, :, e]`` and computes
  ``W_e + s * B_e @ A_e``; :func:`expert_lora` hands the same factors to the op, which applies them as two small
  matmuls. ``FastModel.get_peft_model`` targets attention and the experts by default (:func:`lora_targets`);
  the routers stay frozen.
* **Auxiliary loss**: :func:`moe_causal_lm_output` adds ``router_aux_loss_coef * load_balancing_loss`` to the
  loss of the patched causal-LM forward exactly as transformers' ``*MoeForCausalLM.forward`` does (its own
  ``load_balancing_loss_func``); TRL's fused lm-head path adds its own from the recorded router logits.

* **Merged export** (``fastft.saving``): :func:`merged_experts_plan` dequantizes each expert and adds its LoRA in
  fp32, as llama.cpp's stacked tensors; :func:`checkpoint_expert_tensors` writes them per expert, as transformers'
  checkpoints have them.

Not yet here (later steps): FSDP of 4-bit experts (and its memory accounting). The expert op's engines (a Triton
grouped GEMM on GPU and under the interpreter, a PyTorch loop otherwise) are in ``kernels/moe_experts.py``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import sys

import torch
import torch.nn.functional as F
import transformers
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from . import reach_ins
from .architectures import SPECS, MoESpec, UnsupportedModelError
from .kernels._common import disabled_scope
from .kernels.moe_experts import ExpertLora, NF4Experts, moe_experts
from .kernels.nf4 import dequantize_nf4
from .quant import UnsupportedLoraLayer

logger = logging.getLogger("fastft")

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
# peft's target_parameters for every expert tensor (matched as name suffixes)
EXPERT_TARGET_PARAMETERS = tuple(f"experts.{name}" for name in EXPERT_PARAMETERS)
# the module targets of get_peft_model's default for an MoE model (with the experts as target_parameters)
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
NF4_BLOCKSIZE = 64  # bitsandbytes' Linear4bit default, what fastft's quantization config uses for the other layers

aten = torch.ops.aten
tree_map_only = reach_ins.get(reach_ins.TREE_MAP_ONLY)
_warned: set[str] = set()


# ---------------------------------------------------------------------------------------------
# 4-bit experts


class NF4ExpertsTensor(torch.Tensor):
    """A frozen ``[E, out, in]`` expert parameter stored as E NF4 weights (:class:`NF4Experts` in ``.nf4``).

    It reports the 16-bit tensor's shape, dtype and device. Reading it in any other way than through ``.nf4``
    (an op transformers or peft apply to it) computes on its dequantized values; moving it (``.to(device)``)
    moves the codes; a dtype change changes the dtype it dequantizes to; in-place writes are refused (merging a
    LoRA into 4-bit experts is not supported).
    """

    nf4: NF4Experts
    __torch_function__ = reach_ins.get(reach_ins.DISABLED_TORCH_FUNCTION)  # dispatch-level subclass only

    @staticmethod
    def __new__(cls, nf4: NF4Experts):
        return torch.Tensor._make_wrapper_subclass(cls, (nf4.num_experts, *nf4.shape), dtype=nf4.dtype,
                                                   device=nf4.device, requires_grad=False)

    def __init__(self, nf4: NF4Experts):
        self.nf4 = nf4

    # the inner tensors, by name, for torch's subclass utilities (and fastft.memory's accounting)
    _INNER = ("packed", "absmax", "code", "nested_absmax", "nested_code", "offset")

    def __getattr__(self, name):
        if name in NF4ExpertsTensor._INNER:
            return getattr(self.nf4, name)
        raise AttributeError(name)

    def __tensor_flatten__(self):
        inner = [name for name in self._INNER if getattr(self.nf4, name) is not None]
        return inner, (self.nf4.blocksize, self.nf4.shape, self.nf4.dtype, self.nf4.nested_blocksize)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        blocksize, shape, dtype, nested_blocksize = meta
        return NF4ExpertsTensor(NF4Experts(blocksize=blocksize, shape=shape, dtype=dtype,
                                           nested_blocksize=nested_blocksize, **inner))

    def __repr__(self):
        return (f"NF4ExpertsTensor({self.nf4.num_experts} experts of {self.nf4.shape}, NF4 blocksize "
                f"{self.nf4.blocksize}, dequantizes to {self.dtype}, device={self.device})")

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[E, out, in]`` values as a new dense tensor (``dtype`` default: this tensor's dtype)."""
        out = torch.empty(self.shape, dtype=dtype or self.dtype, device=self.device)
        for e in range(self.nf4.num_experts):
            dequantize_nf4(self.nf4.expert(e), out=out[e])
        return out

    def _with(self, dtype=None, **tensors) -> NF4ExpertsTensor:
        nf4 = self.nf4
        fields = {name: getattr(nf4, name) for name in self._INNER}
        fields.update(tensors)
        return NF4ExpertsTensor(NF4Experts(blocksize=nf4.blocksize, shape=nf4.shape, dtype=dtype or nf4.dtype,
                                           nested_blocksize=nf4.nested_blocksize, **fields))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.detach.default or func is aten.alias.default:
            return args[0]._with()
        if func is aten._to_copy.default:
            src, device = args[0], kwargs.get("device")
            moved = {} if device is None else {name: getattr(src.nf4, name).to(device) for name in cls._INNER
                                               if getattr(src.nf4, name) is not None}
            return src._with(dtype=kwargs.get("dtype"), **moved)
        if func is aten.clone.default:
            src = args[0]
            return src._with(**{name: getattr(src.nf4, name).clone() for name in cls._INNER
                                if getattr(src.nf4, name) is not None})
        if func is aten.select.int and args[1] == 0:  # one expert: dequantize only that one
            src, e = args[0], args[2] % args[0].shape[0]
            return dequantize_nf4(src.nf4.expert(e), dtype=src.dtype)
        if func._schema.is_mutable:
            raise RuntimeError(
                f"fastft: {func} would write into 4-bit NF4 experts, which are frozen and read-only (merging a LoRA "
                "into 4-bit experts is not supported; train LoRA on them and save the adapter)")
        args, kwargs = tree_map_only(NF4ExpertsTensor, lambda t: t.dequantized(), (args, kwargs))
        return func(*args, **kwargs)


class _ExpertsQuantizer:
    """Quantizes experts one at a time into stacked NF4 tensors (bitsandbytes' ``quantize_4bit``, the
    quantization a ``Linear4bit`` weight of the expert's shape gets: NF4, blocks of 64, double quantization)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.fields = None

    def add(self, e: int, weight: torch.Tensor) -> None:
        import bitsandbytes.functional as bnb_functional

        packed, state = bnb_functional.quantize_4bit(weight.contiguous(), blocksize=NF4_BLOCKSIZE,
                                                     compress_statistics=True, quant_type="nf4",
                                                     quant_storage=torch.uint8)
        parts = dict(packed=packed.reshape(-1), absmax=state.absmax, nested_absmax=state.state2.absmax,
                     offset=state.offset.reshape(1))
        if self.fields is None:
            self.fields = {name: torch.empty((self.num_experts, *t.shape), dtype=t.dtype, device=t.device)
                           for name, t in parts.items()}
            self.fields["offset"] = self.fields["offset"].reshape(-1)
            self.fields.update(code=state.code, nested_code=state.state2.code)
            self.meta = dict(blocksize=state.blocksize, nested_blocksize=state.state2.blocksize,
                             shape=tuple(weight.shape), dtype=weight.dtype)
        elif tuple(weight.shape) != self.meta["shape"]:
            raise ValueError(f"expert {e} has shape {tuple(weight.shape)}, expert 0 {self.meta['shape']}")
        for name, t in parts.items():
            self.fields[name][e].copy_(t.reshape(self.fields[name][e].shape))

    def result(self) -> NF4ExpertsTensor:
        return NF4ExpertsTensor(NF4Experts(**self.fields, **self.meta))


def check_reach_ins() -> None:
    """Verify what 4-bit experts need of torch and transformers (:mod:`fastft.reach_ins`)."""
    for entry in (reach_ins.MAKE_WRAPPER_SUBCLASS, reach_ins.OP_SCHEMA_MOE, reach_ins.ATEN_TO_COPY_MOE,
                  reach_ins.HF_INITIALIZED, reach_ins.WEIGHT_CONVERTER_OPERATIONS):
        reach_ins.check(entry)


def quantize_experts(weights: torch.Tensor) -> NF4ExpertsTensor:
    """``[E, out, in]`` float experts -> :class:`NF4ExpertsTensor`, one expert at a time, on their device."""
    check_reach_ins()
    quantizer = _ExpertsQuantizer(weights.shape[0])
    for e in range(weights.shape[0]):
        quantizer.add(e, weights[e])
    return quantizer.result()


def _frozen_parameter(tensor: torch.Tensor) -> torch.nn.Parameter:
    param = torch.nn.Parameter(tensor, requires_grad=False)
    param._is_hf_initialized = True  # transformers must not re-initialise it
    return param


@functools.cache
def _quantize_experts_op():
    """The conversion op class (transformers' loading internals are imported only when an MoE model loads)."""
    from transformers.core_model_loading import ConversionOps

    class QuantizeExpertsNF4(ConversionOps):
        """A transformers weight-conversion op: the checkpoint conversion of an expert parameter (e.g. ``[gate_proj,
        up_proj]`` of each expert -> ``gate_up_proj``), run one expert at a time, each expert quantized (NF4) as
        soon as it is assembled and its 16-bit checkpoint tensors dropped."""

        def __init__(self, operations: list):
            self.operations = operations

        @torch.no_grad()
        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            lists = {pattern: tensors if isinstance(tensors, list) else [tensors]
                     for pattern, tensors in input_dict.items()}
            num_experts = len(next(iter(lists.values())))
            quantizer, target = _ExpertsQuantizer(num_experts), None
            for e in range(num_experts):
                one = {pattern: [tensors[e]] for pattern, tensors in lists.items()}
                for tensors in lists.values():
                    tensors[e] = None  # this expert's 16-bit checkpoint tensors die with `one`
                for op in self.operations:
                    one = op.convert(one, source_patterns=source_patterns, target_patterns=target_patterns, **kwargs)
                (target, value), = one.items()
                value = value[0] if isinstance(value, list) else value
                quantizer.add(e, value.reshape(value.shape[-2:]))
            input_dict.clear()
            return {target: _frozen_parameter(quantizer.result())}

    return QuantizeExpertsNF4


def _quantizing(transform):
    """``transform`` itself, or for a conversion producing an expert tensor, a copy quantizing per expert."""
    from transformers.core_model_loading import WeightConverter

    targets = getattr(transform, "target_patterns", [])
    if not isinstance(transform, WeightConverter) or not any(
            t.endswith(EXPERT_TARGET_PARAMETERS) for t in targets):
        return transform
    quantizing = copy.deepcopy(transform)
    quantizing.operations = [_quantize_experts_op()(quantizing.operations)]
    return quantizing


@contextlib.contextmanager
def experts_quantized_while_loading(model_type: str):
    """Inside the block, ``from_pretrained`` of a ``model_type`` checkpoint quantizes its experts while loading
    (see the module doc). transformers' public registry of checkpoint conversions (``transformers.conversion_mapping``,
    checked with transformers 5.23) is changed for the block only, process-wide, and restored afterwards."""
    check_reach_ins()
    register = reach_ins.get(reach_ins.CONVERSION_MAPPING_REGISTER)
    user_registered = reach_ins.get(reach_ins.CONVERSION_MAPPING_USER)
    original = reach_ins.get(reach_ins.CONVERSION_MAPPING_GET)(model_type)
    quantizing = [_quantizing(t) for t in original or []]
    if not any(q is not t for q, t in zip(quantizing, original or [])):
        raise UnsupportedModelError(
            f"transformers {transformers.__version__} has no checkpoint conversion of {model_type} experts into "
            f"{'/'.join(EXPERT_TARGET_PARAMETERS)}: fastft cannot quantize them while loading")
    was_registered = model_type in user_registered
    register(model_type, quantizing, overwrite=True)
    try:
        yield
    finally:
        register(model_type, original, overwrite=True)
        if not was_registered:
            user_registered.discard(model_type)


def sparse_blocks(model) -> list:
    """The sparse MoE blocks of a ``*ForCausalLM`` (its backbone, or a PeftModel of it), in layer order."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    layers = getattr(getattr(model, "model", model), "layers", [])
    return [layer.mlp for layer in layers if is_sparse_block(layer.mlp)]


def is_sparse_block(mlp) -> bool:
    return hasattr(mlp, "experts") and hasattr(mlp, "gate")


def finish_loading(model, load_in_4bit: bool) -> None:
    """After ``from_pretrained``: every expert tensor of a 4-bit model must be NF4. A checkpoint whose experts
    did not pass through the conversion above (already fused 3-D tensors) loaded them in 16 bits: quantize them
    now (correct, but that load held them in 16 bits), and say so."""
    if not load_in_4bit:
        return
    late = []
    for block in sparse_blocks(model):
        for name in EXPERT_PARAMETERS:
            param = getattr(block.experts, name)
            if not isinstance(param, NF4ExpertsTensor):
                setattr(block.experts, name, _frozen_parameter(quantize_experts(param.detach())))
                late.append(name)
    if late:
        logger.warning(f"fastft: {len(late)} expert tensors were loaded in 16 bits (a checkpoint with fused expert "
                       "tensors) and quantized to NF4 after loading; peak memory while loading was that of 16-bit "
                       "experts")


# ---------------------------------------------------------------------------------------------
# The MoE block


def check_block(block, spec: MoESpec) -> None:
    """Refuse a sparse block whose layout fastft's MoE forward does not compute, naming what differs."""
    experts, router = block.experts, block.gate
    problems = []
    shapes = {name: tuple(getattr(experts, name).shape) if hasattr(experts, name) else None
              for name in EXPERT_PARAMETERS}
    gate_up, down = shapes["gate_up_proj"], shapes["down_proj"]
    if gate_up is None or down is None or len(gate_up) != 3 or len(down) != 3:
        problems.append(f"experts as 3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I] (found {shapes})")
    elif gate_up[1] % 2 or down != (gate_up[0], gate_up[2], gate_up[1] // 2):
        problems.append(f"gate_up_proj [E, 2I, H] and down_proj [E, H, I] (found {gate_up} and {down})")
    for flag, wanted in (("is_transposed", False), ("has_bias", False), ("has_gate", True), ("is_concatenated", True)):
        if getattr(experts, flag, wanted) != wanted:
            problems.append(f"experts with {flag}={wanted}")
    if not isinstance(getattr(experts, "act_fn", None), torch.nn.SiLU) and type(
            getattr(experts, "act_fn", None)).__name__ != "SiLUActivation":
        problems.append(f"SiLU experts (found act_fn={getattr(experts, 'act_fn', None)!r})")
    if not hasattr(router, "top_k") or not isinstance(getattr(router, "weight", None), torch.Tensor):
        problems.append("a top-k router (gate.top_k, gate.weight)")
    if spec.shared_expert and not (hasattr(block, "shared_expert") and hasattr(block, "shared_expert_gate")):
        problems.append("a shared expert (shared_expert, shared_expert_gate)")
    if not spec.shared_expert and hasattr(block, "shared_expert"):
        problems.append("no shared expert")
    if problems:
        raise UnsupportedModelError(f"fastft's MoE block serves {type(block).__name__} only with "
                                    + "; ".join(problems))


def moe_block_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """A sparse MoE block (``self``): route, experts (``kernels/moe_experts.py``), shared expert; transformers' math
    (see ``transformers/models/{qwen3_moe,qwen2_moe,mixtral}``)."""
    spec: MoESpec = self._fastft_moe
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    if spec.router_jitter and self.training and self.jitter_noise > 0:
        x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
    _, top_k_weights, top_k_index = self.gate(x)  # the module: transformers records its logits
    with disabled_scope(self._fastft_disabled):  # the model's disabled names ("nf4": the experts' dequantization)
        out = experts_forward(self.experts, x, top_k_index, top_k_weights)
    if spec.shared_expert:
        out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
    return out.reshape(shape)


def experts_forward(experts, x, top_k_index, top_k_weights):
    """The (possibly peft-wrapped) experts module on routed tokens, through fastft's op; what the op cannot serve
    exactly runs the module's own forward (16-bit experts) or is an error (4-bit experts)."""
    try:
        base, loras = expert_lora(experts)
        gate_up, down = (_frozen_experts(base, name) for name in EXPERT_PARAMETERS)
    except UnsupportedLoraLayer as reason:
        if any(isinstance(getattr(_innermost(experts), name), NF4ExpertsTensor) for name in EXPERT_PARAMETERS):
            raise ValueError(f"fastft: {reason}; fastft's expert op cannot serve this and peft's own forward cannot "
                             "run on 4-bit experts") from None
        if str(reason) not in _warned:
            _warned.add(str(reason))
            logger.warning(f"fastft: {reason}; these experts run their own (transformers / peft) forward")
        return experts(x, top_k_index, top_k_weights)
    return moe_experts(x, top_k_index, top_k_weights, gate_up, down,
                       loras.get("gate_up_proj"), loras.get("down_proj"))


def _innermost(module):
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def _frozen_experts(base, name: str):
    param = getattr(base, name)
    if isinstance(param, NF4ExpertsTensor):
        return param.nf4
    if param.requires_grad:
        raise UnsupportedLoraLayer(f"experts.{name} requires grad; fastft's expert op trains LoRA on frozen experts")
    return param.detach()


def _param_wrapper():
    peft = sys.modules.get("peft")
    if peft is None:
        return None
    from peft.tuners.lora import ParamWrapper

    return ParamWrapper


def expert_lora(experts) -> tuple[torch.nn.Module, dict[str, ExpertLora | None]]:
    """``(experts module, {parameter name: ExpertLora of its active adapter, or None})`` of an experts module,
    bare or wrapped by peft's ``ParamWrapper`` (one per targeted parameter, nested), read now: adapters disabled
    or merged give None. Raises :class:`UnsupportedLoraLayer` for what the op cannot reproduce exactly."""
    ParamWrapper, loras, module = _param_wrapper(), {}, experts
    while ParamWrapper is not None and isinstance(module, ParamWrapper):
        loras[module.parameter_name] = _wrapper_lora(module)
        module = module.base_layer
    if hasattr(module, "base_layer"):
        raise UnsupportedLoraLayer(f"the experts are wrapped by {type(module).__name__}, not peft's LoRA ParamWrapper")
    return module, loras


def _wrapper_lora(wrapper) -> ExpertLora | None:
    if wrapper.disable_adapters and wrapper.merged:
        raise UnsupportedLoraLayer("expert adapters are disabled on merged experts (peft unmerges them first)")
    loras = active_expert_loras(wrapper)
    if len(loras) > 1:
        raise UnsupportedLoraLayer(f"{len(loras)} active adapters on the experts ({', '.join(loras)}); "
                                   "fastft's expert op serves one")
    return next(iter(loras.values()), None)


def active_expert_loras(wrapper) -> dict[str, ExpertLora]:
    """``{adapter: ExpertLora}`` of the active adapters of a peft ``ParamWrapper``, read now (none when the adapters
    are disabled or merged: the base tensor holds what applies). Raises :class:`UnsupportedLoraLayer` for factors
    not in peft's layout."""
    if wrapper.disable_adapters or wrapper.merged:
        return {}
    loras = {}
    for name in wrapper.active_adapters:
        if name not in wrapper.lora_A:
            continue
        A, B = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight
        E, r = wrapper.num_experts, wrapper.r[name]
        _, out_features, in_features = getattr(wrapper.get_base_layer(), wrapper.parameter_name).shape
        if tuple(A.shape) != (E * r, in_features) or tuple(B.shape) != (out_features, r * E) or (
                wrapper.lora_B[name].bias is not None):
            raise UnsupportedLoraLayer(f"expert LoRA of {wrapper.parameter_name} with A {tuple(A.shape)}, "
                                       f"B {tuple(B.shape)}: not peft's layout for [E, out, in] experts")
        # peft's layout: rows of A expert-major, columns of B rank-major (see the module doc)
        loras[name] = ExpertLora(A.view(E, r, in_features), B.view(out_features, r, E).permute(2, 0, 1),
                                 float(wrapper.scaling[name]))
    return loras


# ---------------------------------------------------------------------------------------------
# Merged export


def merged_experts_plan(experts, prefix: str, device: torch.device):
    """``(name, shape, merge)`` of a (possibly peft-wrapped) experts module at ``prefix`` (``...mlp.experts``), for
    ``fastft.saving``: its experts with their LoRA merged, stacked as llama.cpp's converter names them
    (``{prefix}.gate_proj.weight`` / ``up_proj`` ``[E, I, H]``, ``down_proj`` ``[E, H, I]``: ``gate_up_proj``'s
    halves). ``merge()`` computes the fp32 value then; :func:`checkpoint_expert_tensors` splits it per expert."""
    ParamWrapper, loras, base = _param_wrapper(), {}, experts
    while ParamWrapper is not None and isinstance(base, ParamWrapper):
        loras.setdefault(base.parameter_name, []).append(base)
        base = base.base_layer
    if hasattr(base, "base_layer"):
        raise ValueError(f"fastft merges LoRA into experts wrapped by peft's ParamWrapper (target_parameters); "
                         f"{prefix} is wrapped by {type(base).__name__}")
    E, two_inter, hidden = base.gate_up_proj.shape
    inter = two_inter // 2
    for name, parameter, rows in (("gate_proj", "gate_up_proj", slice(0, inter)),
                                  ("up_proj", "gate_up_proj", slice(inter, two_inter)),
                                  ("down_proj", "down_proj", slice(None))):
        shape = (E, inter, hidden) if parameter == "gate_up_proj" else (E, hidden, inter)
        yield (f"{prefix}.{name}.weight", shape,
               functools.partial(_merged_experts, base, parameter, loras.get(parameter, []), rows, device))


def _merged_experts(base, parameter: str, wrappers: list, rows: slice, device: torch.device) -> torch.Tensor:
    """fp32 ``[E, rows, in]``: each expert ``W[e]`` (NF4 dequantized) plus, for every active adapter, peft's
    ``scaling * B[e] @ A[e]`` (``ParamWrapper.get_delta_weight``: ``einsum("o r e, e r i -> e o i")``)."""
    weights = getattr(base, parameter)
    loras = [lora for wrapper in wrappers for lora in active_expert_loras(wrapper).values()]
    merged = []
    for e in range(weights.shape[0]):
        if isinstance(weights, NF4ExpertsTensor):  # on the codes' device, straight into fp32
            w = dequantize_nf4(weights.nf4.expert(e), dtype=torch.float32)[rows].to(device)
        else:
            w = weights[e, rows].detach().to(device=device, dtype=torch.float32, copy=True)
        for lora in loras:
            w.addmm_(lora.B[e, rows].detach().to(device, torch.float32), lora.A[e].detach().to(device, torch.float32),
                     alpha=lora.scaling)
        merged.append(w)
    return torch.stack(merged)


def checkpoint_expert_tensors(spec: MoESpec, name: str, value: torch.Tensor):
    """``(name, tensor)`` in the architecture's checkpoint layout for a tensor of the merge plan: a stacked expert
    tensor of :func:`merged_experts_plan` becomes one tensor per expert (``model.layers.0.mlp.experts.3.gate_proj
    .weight``; Mixtral ``...block_sparse_moe.experts.3.w1.weight``), what transformers' ``save_pretrained`` writes
    and its conversion mapping reads; the block's other tensors get the block's checkpoint name."""
    parts = name.split(".")
    if len(parts) < 4 or parts[:2] != ["model", "layers"] or parts[3] != "mlp":
        yield name, value
        return
    parts[3] = spec.checkpoint_block
    if parts[4:5] != ["experts"] or value.dim() != 3:
        yield ".".join(parts), value
        return
    projection = spec.checkpoint_projections[("gate_proj", "up_proj", "down_proj").index(parts[5])]
    for e in range(value.shape[0]):
        yield ".".join([*parts[:5], str(e), projection, "weight"]), value[e].clone()  # no shared storage


# ---------------------------------------------------------------------------------------------
# Training: LoRA targets, options, the load-balancing loss


def is_moe_config(config) -> bool:
    spec = SPECS.get(getattr(config, "model_type", None))
    return spec is not None and spec.moe is not None


def refuse_moe(config, what: str) -> None:
    """A clear error where a part of fastft does not serve mixture-of-experts models yet."""
    if is_moe_config(config):
        raise UnsupportedModelError(f"{what} does not support mixture-of-experts models ({config.model_type}) yet; "
                                    "it is a later step of fastft's MoE support")


def lora_targets(model, target_modules, lora_dropout, lora_kwargs: dict):
    """``(target_modules, lora_kwargs)`` for ``FastModel.get_peft_model`` on an MoE model; other models: unchanged.

    By default: LoRA on attention (``q/k/v/o_proj``) and on the routed experts (``target_parameters``), said in a
    log line. peft 0.21 rewrites ``gate_proj`` / ``up_proj`` / ``down_proj`` (``w1/w2/w3`` for Mixtral) in
    ``target_modules`` of these models into the expert parameters (``gate_up_proj`` at twice the rank, as transformers
    4 had separate gate and up experts), dropping them as module targets: dense MLP layers and Qwen2-MoE's shared
    expert get no LoRA either way, so the default does not name them. Whatever peft builds, fastft computes."""
    if not sparse_blocks(model):
        return target_modules, lora_kwargs
    if target_modules is None:  # the default
        target_modules = list(ATTENTION_TARGETS)
        if "target_parameters" not in lora_kwargs:
            lora_kwargs = {**lora_kwargs, "target_parameters": list(EXPERT_TARGET_PARAMETERS)}
        logger.warning(f"fastft: LoRA on attention ({', '.join(target_modules)}) and on every routed expert "
                       f"(target_parameters={list(lora_kwargs['target_parameters'])}); the routers, dense MLP layers "
                       "and shared experts stay frozen")
    if lora_kwargs.get("target_parameters") and lora_dropout:
        raise ValueError(f"lora_dropout={lora_dropout}: peft's LoRA on expert tensors (target_parameters) has no "
                         "dropout; pass lora_dropout=0, or target_parameters=[] to leave the experts without LoRA")
    return target_modules, lora_kwargs


def check_training_options(model, mlp_chunk_tokens) -> None:
    """Options of ``get_peft_model`` that do not serve MoE models yet: a clear error instead of a wrong plan."""
    if not sparse_blocks(model):
        return
    if mlp_chunk_tokens is not None:
        raise ValueError("mlp_chunk_tokens does not apply to mixture-of-experts blocks yet; leave it None")


def router_logits_requested(config, kwargs: dict) -> bool:
    """Whether this forward returns router logits (the ``output_router_logits`` argument, else the config's), and
    pass that on to the backbone (as transformers' MoE forwards do)."""
    requested = kwargs.get("output_router_logits")
    if requested is None:
        requested = getattr(config, "output_router_logits", False)
    kwargs["output_router_logits"] = requested
    return bool(requested)


def moe_causal_lm_output(model, outputs, loss, logits, attention_mask, router_logits: bool):
    """transformers' ``MoeCausalLMOutputWithPast``: with router logits, ``aux_loss`` is the model's own
    ``load_balancing_loss_func`` and ``router_aux_loss_coef * aux_loss`` is added to the loss."""
    aux_loss = None
    if router_logits:
        load_balancing_loss = sys.modules[type(model).__module__].load_balancing_loss_func
        aux_loss = load_balancing_loss(outputs.router_logits, model.num_experts, model.num_experts_per_tok,
                                       attention_mask)
        if loss is not None:
            loss = loss + model.router_aux_loss_coef * aux_loss.to(loss.device)
    return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits,
                                     past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions, router_logits=outputs.router_logits)
