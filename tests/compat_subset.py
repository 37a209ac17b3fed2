"""The compat subset: what CI also runs on the oldest supported versions (`.ci/run`: `.venv-oldest`, the pins of
requirements-oldest.txt, `pytest --compat tests`). One case per point where fastft meets another library, no more:
the whole compat part of CI (installing that environment and running these) has about 10 minutes (README:
Supported versions), and each case of the main suite runs there anyway on the newest versions.

A case is a test id as pytest prints it, relative to the repository; an id without ``[...]`` takes every
parametrization. ``ON_TORCH_ENGINE`` cases run on fastft's PyTorch ops (``use_engine("torch")``): the patching of
transformers, peft and bitsandbytes they check is the same, in seconds instead of the minutes the Triton interpreter
takes; ``AS_WRITTEN`` cases run as in the main suite (on the interpreted Triton kernels where they use them).
"""

ON_TORCH_ENGINE = {
    # transformers' module layout and attention / mask interfaces, peft's LoRA layers and bitsandbytes' NF4 loading,
    # per architecture (llama31: Llama 3.1's RoPE scaling; phi3_longrope: Phi-3's fused layers, LongRoPE)
    *(f"tests/test_model_parity.py::test_logits_loss_and_lora_grads_match_hf[{arch}-4bit]"
      for arch in ("qwen2", "llama31", "mistral", "qwen3", "phi3_longrope")),
    "tests/test_model_parity.py::test_logits_loss_and_lora_grads_match_hf[qwen2-16bit]",  # loading without bnb
    # the packed-sequence arguments transformers passes (position_ids restarts; a collator's cu_seq_lens)
    "tests/test_model_parity.py::test_packed_sequences_match_hf[llama-position_ids]",
    "tests/test_model_parity.py::test_packed_sequences_match_hf[qwen3-cu_seq_lens]",
    "tests/test_model_parity.py::test_qwen2_sliding_window_matches_hf",  # transformers' per-layer window config
    "tests/test_model_parity.py::test_disable_adapter_and_ref_adapter[mistral]",  # peft's adapter switching
    # transformers' checkpointing entry points (renamed in 5.23), offloading, and LoRA dropout's RNG replay
    "tests/test_model_parity.py::test_gradient_checkpointing_gives_same_grads[offload-0.0]",
    "tests/test_model_parity.py::test_gradient_checkpointing_gives_same_grads[True-0.1]",
    "tests/test_memory_plan.py::test_a_number_of_layers_checkpoints_the_first_ones_and_survives_reenabling",
    # mixture of experts: peft's target_parameters on the experts, transformers' MoE outputs (router logits)
    "tests/test_moe.py::test_logits_loss_with_aux_loss_and_lora_grads_match_hf[qwen3_moe]",
    "tests/test_fast_model.py::test_generate_matches_hf_greedy",  # transformers' generate and KV cache
    "tests/test_fast_model.py::test_adapter_round_trip_through_plain_peft",  # peft's adapter files
}

AS_WRITTEN = {
    # one model step on the interpreted Triton kernels (Triton 3.6's interpreter), against transformers + peft
    "tests/test_model_parity.py::test_logits_loss_and_lora_grads_match_hf[llama-4bit]",
    # TRL: the SFTTrainer (packing) and DPOTrainer (TRL wrapping the model in peft, reference with the adapter off)
    # drop-ins on the PyTorch engine, as test_trl.py runs them (on the interpreted kernels, SFT and DPO take 15 of
    # the subset's 30 minutes measured on a loaded machine: the model step above covers the kernels); TRL's chunked
    # log-prob reference; the dataset checks
    "tests/test_trl.py::test_sft_dataset_kinds_match_baseline[llama-packing]",
    "tests/test_trl.py::test_dpo_precomputed_reference_and_disabled_adapter",
    "tests/test_linear_log_probs.py::test_matches_trl_chunked_logprob_fp32",
    "tests/test_trl_bad_input.py::test_sft_dataset_without_expected_columns",
    "tests/test_trl_bad_input.py::test_dpo_bad_datasets",
    # the kernels' references: transformers' modules, peft's 4-bit LoRA layer, bitsandbytes' NF4 internals
    "tests/test_rms_norm.py::test_matches_llama_rmsnorm_module[x_dtype0-w_dtype0-triton]",
    "tests/test_rope.py::test_reference_equals_transformers_apply_rotary_pos_emb",
    "tests/test_lora_layers.py::test_lora_linear_nf4_matches_peft[dtype0]",
    "tests/test_nf4.py::test_bitsandbytes_cpu_reference_rule",
    "tests/test_nf4.py::test_dequantize_4bit_of_linear4bit_layer",
    "tests/test_nf4.py::test_cpu_packed_layout_after_eval_forward",
    # saving: plain transformers reads the export; GGUF through gguf's writer and quantizers, read back by
    # transformers' GGUF reader (Qwen3: gguf's lower bound; transformers before 5.18 reads Llama's and Mistral's
    # tokenizers back differently, so those round trips are not here)
    "tests/test_saving.py::test_sharded_export_loads_in_plain_transformers_and_matches",
    "tests/test_gguf.py::test_round_trip_matches_the_merged_model[qwen3]",
    "tests/test_gguf.py::test_quantization_types[qwen2-q4_0]",
    # transformers' checkpoint conversion registry, which quantizes the MoE experts while they load
    "tests/test_moe.py::test_loading_quantizes_each_expert_as_it_is_assembled",
    # the memory accounting: a training step on the simulated GPU (its patches of torch, Triton and bitsandbytes)
    # equals the bytes measured live; the tracker of storages FSDP resizes; the FSDP accounting (needs torch 2.13)
    # refusing torch 2.10 with a clear error
    "tests/test_memory.py::test_accounted_step_equals_live_bytes_measured_on_cpu[fastft-plain-off]",
    "tests/test_memory_fsdp.py::test_tracker_counts_storages_resized_in_place",
    "tests/test_memory_fsdp.py::test_accounting_on_a_torch_without_meta_collectives_is_a_clear_error",
    # the supported ranges, and the installed versions inside them
    "tests/test_versions.py",
    # every registered reach-in into another library (fastft/reach_ins.py) present with its parameters; the refusal
    # of a changed one as the oldest libraries name it (transformers 5.17's checkpointing entry point is the
    # fallback name; torch 2.10's op schemas); the scan for bypasses (seconds, all of them)
    "tests/test_reach_ins.py",
}

CASES = ON_TORCH_ENGINE | AS_WRITTEN
