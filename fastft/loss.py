"""The causal-LM forward of a patched model: fused linear cross-entropy when training with labels.

With ``labels`` and autograd on, the loss is ``fused_linear_cross_entropy(hidden, lm_head.weight, labels)``:
the ``[tokens, vocab]`` logits are never materialised, so ``logits`` is None in the output (as in
Unsloth and Liger-Kernel). Without labels, or under ``torch.no_grad()`` (evaluation, generation), the
logits are computed (``logits_to_keep`` honoured) and the loss, if asked for, comes from the
``cross_entropy`` kernel on them.

The loss follows transformers' ``ForCausalLMLoss``: labels are shifted by one (or ``shift_labels`` taken
as given), ``-100`` is ignored, and with ``num_items_in_batch`` (sent by the Trainer under gradient
accumulation) the summed loss is divided by it, so accumulated micro-batches give the gradient of one
big batch.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from .kernels.cross_entropy import cross_entropy
from .kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from .moe import is_moe_config, moe_causal_lm_output, router_logits_requested
from .quant import is_dtensor, unsharded_class

IGNORE_INDEX = -100


def _lm_head_is_plain(lm_head) -> bool:
    # A LoRA-wrapped or quantized head (user's choice) is left to transformers' own forward; one FSDP2 sharded
    # is still a plain head.
    return unsharded_class(lm_head) is torch.nn.Linear and lm_head.bias is None


def _lm_head_weight(lm_head) -> torch.Tensor:
    """The head's whole weight. The fused loss does not call the head's forward, so FSDP2's hook that gathers
    the weight does not run for it: a head sharded on its own (not grouped with the final norm, as accelerate
    groups it) is still a DTensor shard here and is gathered the way TRL's fused head gathers it."""
    weight = lm_head.weight
    return weight.full_tensor() if is_dtensor(weight) else weight


def causal_lm_loss(hidden, lm_head_weight, labels=None, shift_labels=None, num_items_in_batch=None, logits=None):
    """Mean (or sum / num_items_in_batch) next-token cross-entropy. From ``logits`` when given, else
    fused with the lm-head matmul from ``hidden``."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    if logits is not None:
        loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels, reduction=reduction)
    else:
        loss = fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, shift_labels,
                                          reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def make_causal_lm_forward(model):
    """A forward for ``model`` (a ``*ForCausalLM`` instance) with the original's signature, which
    ``generate`` and the Trainer inspect."""
    original = type(model).forward
    is_moe = is_moe_config(model.config)  # MoE: transformers' MoE output, with the router's auxiliary loss

    @functools.wraps(original)
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if not _lm_head_is_plain(self.lm_head):
            return original(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                            use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        router_logits = is_moe and router_logits_requested(self.config, kwargs)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             **kwargs)
        hidden = outputs.last_hidden_state
        has_labels = labels is not None or shift_labels is not None

        logits = loss = None
        if has_labels and torch.is_grad_enabled():
            loss = causal_lm_loss(hidden, _lm_head_weight(self.lm_head), labels, shift_labels, num_items_in_batch)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep, :])
            if has_labels:
                loss = causal_lm_loss(hidden, None, labels, shift_labels, num_items_in_batch, logits=logits)
        if is_moe:
            return moe_causal_lm_output(self, outputs, loss, logits, attention_mask, router_logits)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    return forward
