"""Clear errors for datasets that TRL's SFTTrainer / DPOTrainer would reject with a bare stack trace.

TRL 1.16 answers an empty dataset with a bare ``StopIteration`` (``next(iter(train_dataset))``), a dataset
without the columns it expects with ``KeyError: 'text'`` from inside ``datasets.map``, and a chat dataset
for a tokenizer without a chat template with an error from deep inside the tokenization map. A sequence
longer than the model's ``max_seq_length`` would only fail at the first training step. fastft therefore
wraps the two trainers' ``__init__`` and ``_prepare_dataset`` (once per process, see :func:`install`) and,
for fastft models only, checks the datasets before TRL prepares them and the sequence lengths of each
dataset TRL prepares. Models fastft did not patch go through TRL unchanged.
"""
from __future__ import annotations

import functools
import inspect

_GUARD = "_fastft_dataset_guard"


def _fastft_model(model):
    """The patched ``*ForCausalLM`` inside ``model`` (a PeftModel or the model itself), or None."""
    if isinstance(model, str) or model is None:
        return None
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm if getattr(causal_lm, "_fastft_patched", False) else None


def _named_datasets(train_dataset, eval_dataset) -> dict:
    named = {"train": train_dataset}
    if isinstance(eval_dataset, dict):
        named.update({f"eval[{key!r}]": data for key, data in eval_dataset.items()})
    elif eval_dataset is not None:
        named["eval"] = eval_dataset
    return {name: data for name, data in named.items() if data is not None}


def _first_example(dataset, name: str, trainer: str) -> dict:
    try:
        return next(iter(dataset))
    except StopIteration:
        raise ValueError(f"fastft: the {name} dataset passed to {trainer} is empty; it needs at least one example") \
            from None


def _check_chat_template(tokenizer, name: str, trainer: str) -> None:
    if tokenizer is not None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"fastft: the {name} dataset passed to {trainer} is conversational (lists of role/content messages), "
            "but the tokenizer has no chat template. Set `tokenizer.chat_template` to a Jinja template, or "
            "give the data as plain text instead."
        )


def check_sft_dataset(dataset, name: str, tokenizer, text_field: str = "text", formatting_func=None,
                      skip_prepare: bool = False) -> None:
    """Raise ValueError unless SFTTrainer can prepare ``dataset`` (empty, wrong columns, no chat template)."""
    from trl.data_utils import is_conversational, is_conversational_from_value

    first = _first_example(dataset, name, "SFTTrainer")
    if skip_prepare or "input_ids" in first:
        return  # pre-tokenized: TRL reads input_ids as they are
    if formatting_func is None:
        if "prompt" in first and "completion" not in first:
            raise ValueError(f"fastft: the {name} dataset has a 'prompt' column but no 'completion' column; "
                             "SFTTrainer's prompt-completion format needs both")
        if not {"prompt", "messages", "conversations", text_field} & first.keys():
            raise ValueError(
                f"fastft: SFTTrainer cannot read the {name} dataset: its columns are {sorted(first)}. It needs one of "
                f"'{text_field}' (plain text, SFTConfig.dataset_text_field), 'messages' (chat), 'prompt' + "
                "'completion', 'input_ids' (pre-tokenized), or a `formatting_func` that builds the text."
            )
        if is_conversational(first) or is_conversational_from_value(first):
            _check_chat_template(tokenizer, name, "SFTTrainer")


def check_dpo_dataset(dataset, name: str, tokenizer) -> None:
    """Raise ValueError unless DPOTrainer can prepare ``dataset``."""
    from trl.data_utils import is_conversational

    first = _first_example(dataset, name, "DPOTrainer")
    if not {"chosen", "rejected"} <= first.keys():
        raise ValueError(
            f"fastft: DPOTrainer cannot read the {name} dataset: its columns are {sorted(first)}. It needs "
            "'chosen' and 'rejected' (plus 'prompt', or chat conversations whose shared first turns are the prompt)."
        )
    if is_conversational(first):
        _check_chat_template(tokenizer, name, "DPOTrainer")


def _sequence_lengths(dataset, max_length: int | None):
    """Lengths of the sequences the model will see from a prepared map-style dataset, one pyarrow array per
    batch of rows (nothing for a streaming dataset, which cannot be read without consuming it; fastft's
    forward check still applies there). Reads only the token-id columns, a batch at a time."""
    import datasets
    import pyarrow.compute as pc

    if not isinstance(dataset, datasets.Dataset):
        return
    columns = set(dataset.column_names) & {"seq_lengths", "input_ids", "prompt_ids", "chosen_ids", "rejected_ids"}
    if not columns:
        return
    for batch in dataset.select_columns(sorted(columns)).with_format("arrow").iter(batch_size=65536):
        if "seq_lengths" in columns:  # packed rows: each packed sequence restarts its positions
            yield pc.list_flatten(batch["seq_lengths"])
        elif "input_ids" in columns:  # SFT: one sequence per row, already truncated to max_length
            yield pc.list_value_length(batch["input_ids"])
        elif {"prompt_ids", "chosen_ids", "rejected_ids"} <= columns:  # DPO: prompt + the longer completion
            lengths = pc.add(pc.list_value_length(batch["prompt_ids"]),
                             pc.max_element_wise(pc.list_value_length(batch["chosen_ids"]),
                                                 pc.list_value_length(batch["rejected_ids"])))
            # DPO's collator truncates prompt + completion to max_length
            yield lengths if max_length is None else pc.min_element_wise(lengths, max_length)


def check_sequence_lengths(dataset, name: str, args, max_seq_length: int) -> None:
    """Every sequence of a prepared dataset must fit the model's ``max_seq_length``."""
    import pyarrow.compute as pc

    total = too_long = longest = 0
    for lengths in _sequence_lengths(dataset, args.max_length):
        total += len(lengths)
        too_long += pc.sum(pc.greater(lengths, max_seq_length)).as_py() or 0
        longest = max(longest, pc.max(lengths).as_py() or 0)
    if too_long:
        config = type(args).__name__
        raise ValueError(
            f"fastft: {too_long} of {total} sequences of the {name} dataset are longer than "
            f"max_seq_length={max_seq_length} given to FastModel.from_pretrained (longest: {longest} tokens, "
            f"after {config}(max_length={args.max_length})). Set {config}(max_length={max_seq_length}) to truncate "
            f"them, or load the model with max_seq_length >= {longest}."
        )


def _guard(trainer_class, check_before) -> None:
    """Wrap ``__init__`` (checks before TRL touches the data; remembers the model's max_seq_length) and
    ``_prepare_dataset`` (length check of each dataset TRL prepares, in ``__init__`` or in ``evaluate``,
    before DPO's precomputed reference pass runs over it)."""
    init, prepare = trainer_class.__init__, trainer_class._prepare_dataset
    if getattr(init, _GUARD, False):
        return
    init_signature, prepare_signature = inspect.signature(init), inspect.signature(prepare)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        call = init_signature.bind(self, *args, **kwargs).arguments
        model = _fastft_model(call.get("model"))
        if model is not None:
            check_before(call, model.max_seq_length)
            self._fastft_max_seq_length = model.max_seq_length
        init(self, *args, **kwargs)

    @functools.wraps(prepare)
    def _prepare_dataset(self, *args, **kwargs):
        prepared = prepare(self, *args, **kwargs)
        max_seq_length = getattr(self, "_fastft_max_seq_length", None)
        if max_seq_length is not None:
            call = prepare_signature.bind(self, *args, **kwargs).arguments
            check_sequence_lengths(prepared, call["dataset_name"], call["args"], max_seq_length)
        return prepared

    setattr(__init__, _GUARD, True)
    trainer_class.__init__, trainer_class._prepare_dataset = __init__, _prepare_dataset


def _before_sft(call, max_seq_length: int) -> None:
    args = call.get("args")
    text_field = getattr(args, "dataset_text_field", "text")  # TRL's default when args is None
    skip_prepare = bool((getattr(args, "dataset_kwargs", None) or {}).get("skip_prepare_dataset"))
    for name, dataset in _named_datasets(call.get("train_dataset"), call.get("eval_dataset")).items():
        check_sft_dataset(dataset, name, call.get("processing_class"), text_field, call.get("formatting_func"),
                          skip_prepare)
        if skip_prepare:  # TRL uses these rows as they are
            check_sequence_lengths(dataset, name, args, max_seq_length)


def _before_dpo(call, max_seq_length: int) -> None:
    for name, dataset in _named_datasets(call.get("train_dataset"), call.get("eval_dataset")).items():
        check_dpo_dataset(dataset, name, call.get("processing_class"))


def install() -> None:
    """Wrap ``__init__`` and ``_prepare_dataset`` of ``trl.SFTTrainer`` and ``trl.DPOTrainer`` (idempotent)."""
    import trl

    _guard(trl.SFTTrainer, _before_sft)
    _guard(trl.DPOTrainer, _before_dpo)
