"""Clear errors for datasets that TRL's SFTTrainer / DPOTrainer would reject with a bare stack trace.

TRL 1.16 answers an empty dataset with a bare ``StopIteration`` (``next(iter(train_dataset))``), a dataset
without the columns it expects with ``KeyError: 'text'`` from inside ``datasets.map``, a chat dataset for a
tokenizer without a chat template with an error from deep inside the tokenization map, and an int or None where
it reads text with ``AttributeError: 'NoneType' object has no attribute 'endswith'`` (a None message content
passes, and becomes the text "None"). A sequence longer than the model's ``max_seq_length`` would only fail at
the first training step. fastft therefore wraps the two trainers' ``__init__`` and ``_prepare_dataset`` (once per
process, see :func:`install`) and, for fastft models only, checks the datasets before TRL prepares them and the
sequence lengths of each dataset TRL prepares. Models fastft did not patch go through TRL unchanged.
"""
from __future__ import annotations

import functools
import inspect

from . import reach_ins

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
        check_text_columns(dataset, name, "SFTTrainer", _sft_text_columns(first, text_field))


def _sft_text_columns(first: dict, text_field: str) -> list[str]:
    """The columns SFTTrainer reads as text or messages (trl 1.16, ``SFTTrainer._prepare_dataset``): the text
    field (its EOS is checked with ``str.endswith``) and the prompt and completion, or the messages."""
    from trl.data_utils import is_conversational, is_conversational_from_value

    if is_conversational_from_value(first):
        return ["conversations"]
    conversational = is_conversational(first)
    columns = [text_field] if not conversational and text_field in first else []
    if "prompt" in first:
        return columns + ["prompt", "completion"]
    return columns or (["messages"] if conversational else [])


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
    check_text_columns(dataset, name, "DPOTrainer", ["prompt", "chosen", "rejected"])


def _is_list(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)


def _message_text_field(arrow_type) -> str | None:
    """The text field of chat messages (``content``; ``value`` in from/value conversations) when ``arrow_type`` is a
    list of them, else None."""
    import pyarrow as pa

    if not _is_list(arrow_type) or not pa.types.is_struct(arrow_type.value_type):
        return None
    return next((field for field in ("content", "value") if arrow_type.value_type.get_field_index(field) >= 0), None)


def _is_text(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _wrong_type(arrow_type) -> str | None:
    """What a column of ``arrow_type`` holds when it is neither text nor chat messages with text, else None."""
    import pyarrow as pa

    field = _message_text_field(arrow_type)
    if field is None:
        return None if _is_text(arrow_type) else "only None" if pa.types.is_null(arrow_type) else f"{arrow_type} values"
    content = arrow_type.value_type.field(field).type
    if _is_text(content) or _is_list(content):  # text, or a list of content parts (multimodal messages)
        return None
    return f"messages whose {field!r} is {'always None' if pa.types.is_null(content) else content}"


def _first_row_without_text(column, field: str | None) -> int:
    """The first row of ``column`` (a pyarrow array of text, or of message lists with text in ``field``) that is None
    or holds a message that is None or has None for text (but for a tool call: a message with ``tool_calls``);
    -1 when there is none."""
    import pyarrow.compute as pc

    first = pc.index(pc.is_null(column), True).as_py()
    if field is None or column.null_count == len(column):
        return first
    messages = pc.list_flatten(column)
    no_text = pc.or_(pc.is_null(messages), pc.is_null(pc.struct_field(messages, field)))
    if messages.type.get_field_index("tool_calls") >= 0:
        no_text = pc.and_(no_text, pc.is_null(pc.struct_field(messages, "tool_calls")))
    index = pc.index(no_text, True).as_py()
    if index < 0:
        return first
    row = pc.list_parent_indices(column)[index].as_py()
    return row if first < 0 else min(first, row)


def check_text_columns(dataset, name: str, trainer: str, columns) -> None:
    """Every row of each of ``columns`` that the dataset has must hold text (a ``str``) or chat messages with text,
    else TRL fails deep inside its preparation (``'NoneType' object has no attribute 'endswith'``) or renders a
    None message as the text "None". Reads the column types, then the columns a batch at a time, as pyarrow arrays
    (of a streaming dataset only its first example: the rest cannot be read without consuming it)."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        import pyarrow as pa

        example = next(iter(dataset))
        try:
            dataset = datasets.Dataset.from_list([{c: example[c] for c in columns if c in example}])
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # values of mixed types, which only a streaming dataset holds
            return  # (TRL then reads them as they are)
    columns = [c for c in columns if c in dataset.column_names]
    fields = {}
    for column in columns:
        arrow_type = dataset.features.arrow_schema.field(column).type
        wrong = _wrong_type(arrow_type)
        if wrong is not None:
            raise ValueError(f"fastft: column {column!r} of the {name} dataset holds {wrong} (row 0: "
                             f"{dataset[0][column]!r}); {trainer} needs text (str) there, or chat messages with "
                             "text content. Convert that column to text")
        fields[column] = _message_text_field(arrow_type)
    start = 0
    for batch in dataset.select_columns(columns).with_format("arrow").iter(batch_size=65536) if columns else ():
        for column in columns:
            # one array per batch (the rows of a shuffled dataset come one chunk each)
            row = _first_row_without_text(batch[column].combine_chunks(), fields[column])
            if row >= 0:
                _raise_without_text(dataset, name, trainer, column, fields[column], start + row)
        start += batch.num_rows


def _raise_without_text(dataset, name: str, trainer: str, column: str, field: str | None, row: int):
    value = dataset[row][column]
    if value is None:
        what = f"None in column {column!r}"
    else:
        index, message = next((i, m) for i, m in enumerate(value)
                              if m is None or m.get(field) is None and m.get("tool_calls") is None)
        what = f"a message without text in column {column!r} (message {index}: {message!r})"
    raise ValueError(f"fastft: row {row} of the {name} dataset has {what}; {trainer} needs text (str) there. "
                     "Fill or drop such rows (dataset.filter)")


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


def _guard(init_entry, prepare_entry, check_before) -> None:
    """Wrap ``__init__`` (checks before TRL touches the data; remembers the model's max_seq_length) and
    ``_prepare_dataset`` (length check of each dataset TRL prepares, in ``__init__`` or in ``evaluate``,
    before DPO's precomputed reference pass runs over it)."""
    init, prepare = reach_ins.get(init_entry), reach_ins.get(prepare_entry)
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
    reach_ins.install(init_entry, __init__)
    reach_ins.install(prepare_entry, _prepare_dataset)


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
    _guard(reach_ins.SFT_INIT_DATASETS, reach_ins.SFT_PREPARE_DATASET, _before_sft)
    _guard(reach_ins.DPO_INIT_DATASETS, reach_ins.DPO_PREPARE_DATASET, _before_dpo)
