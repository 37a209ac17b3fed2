"""The date-normalization task of examples/task_data.py: data, split, DPO pairs and the metric."""

import datetime as dt
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load_task_data():
    spec = importlib.util.spec_from_file_location("task_data", os.path.join(EXAMPLES, "task_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T = _load_task_data()


def test_generation_is_deterministic_and_seeded():
    assert T.generate(50, 10, seed=3) == T.generate(50, 10, seed=3)
    assert T.generate(50, 10, seed=3) != T.generate(50, 10, seed=4)


def test_committed_files_match_the_generator():
    # The files under examples/data are what `python examples/task_data.py` writes; a change to the
    # generator without regenerating them fails here (and through the CLI's --check).
    train, eval_ = T.generate()
    assert T.load_split("train") == train
    assert T.load_split("eval") == eval_
    assert len(train) == T.N_TRAIN and len(eval_) == T.N_EVAL
    for split in ("train", "eval"):
        assert os.path.getsize(T.split_path(split)) < 300_000  # commit-sized


def test_split_has_no_shared_date_in_any_spelling():
    train, eval_ = T.generate()
    train_dates = {T.answer(r) for r in train}
    eval_dates = {T.answer(r) for r in eval_}
    assert len(train_dates) == len(train) and len(eval_dates) == len(eval_)
    assert not train_dates & eval_dates
    assert not {T.question(r) for r in train} & {T.question(r) for r in eval_}


# An independent parser for every spelling the generator uses (strptime with English month names).
_FORMATS = ("%B %d, %Y", "%d %B %Y", "%b %d, %Y", "%d %b %Y", "%d.%m.%Y", "the %d of %B, %Y")


def _parse(written):
    written = re.sub(r"^the (\d+)(st|nd|rd|th) of", r"the \1 of", written)
    for fmt in _FORMATS:
        try:
            return fmt, dt.datetime.strptime(written, fmt).date()
        except ValueError:
            pass
    raise AssertionError(f"unparseable date {written!r}")


def test_records_are_trl_chat_records_with_correct_answers():
    train, eval_ = T.generate()
    formats_seen = set()
    for record in train + eval_:
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        q, a = T.question(record), T.answer(record)
        assert q.startswith(T.INSTRUCTION)
        fmt, date = _parse(q[len(T.INSTRUCTION):])
        formats_seen.add(fmt)
        assert a == f"{date.year:04d}-{date.month:02d}-{date.day:02d}"
    assert formats_seen == set(_FORMATS)


def test_prompt_completion_form():
    record = T.generate(1, 0)[0][0]
    pc = T.to_prompt_completion(record)
    assert pc["prompt"] == record["messages"][:1]
    assert pc["completion"] == record["messages"][1:]
    assert T.answer(pc) == T.answer(record) and T.prompt_messages(pc) == T.prompt_messages(record)


def test_preference_pairs_reject_a_plausible_wrong_answer():
    train, _ = T.generate()
    pairs = T.preference_pairs(train, seed=1)
    assert pairs == T.preference_pairs(train, seed=1)
    assert len(pairs) == len(train)
    kinds = set()
    for record, pair in zip(train, pairs):
        assert pair["prompt"] == record["messages"][:1]
        assert pair["chosen"] == [{"role": "assistant", "content": T.answer(record)}]
        rejected = pair["rejected"][0]["content"]
        assert pair["rejected"][0]["role"] == "assistant"
        assert rejected != T.answer(record)
        assert not T.is_correct(rejected, T.answer(record))
        kinds.add("slash" if "/" in rejected else "sentence" if " " in rejected else "iso")
    assert kinds == {"slash", "sentence", "iso"}


def test_metric_scores_right_and_wrong_answers():
    _, eval_ = T.generate()
    refs = [T.answer(r) for r in eval_]
    assert T.exact_match(refs, refs) == 1.0
    assert T.exact_match([f" {r}\n" for r in refs], refs) == 1.0  # surrounding whitespace is not the format
    wrong = [p["rejected"][0]["content"] for p in T.preference_pairs(eval_)]
    assert T.exact_match(wrong, refs) == 0.0
    assert T.exact_match(refs[:50] + wrong[50:], refs) == 0.5
    with pytest.raises(ValueError, match="predictions"):
        T.exact_match(refs[:3], refs)


class _CharTokenizer:
    """Just enough of a Hugging Face tokenizer for `generate_answers`: one id per character.

    It records the padding side it was called with, so the test can check batches are left-padded.
    """

    eos_token, pad_token, pad_token_id = "\x00", None, 0

    def __init__(self):
        self.padding_side = "right"
        self.sides_seen = set()

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize and messages[-1]["role"] == "user"
        return "<user>" + messages[-1]["content"] + "<assistant>"

    def __call__(self, texts, return_tensors, padding, add_special_tokens):
        self.sides_seen.add(self.padding_side)
        width = max(len(t) for t in texts)
        rows = [[0] * (width - len(t)) + [ord(c) for c in t] if self.padding_side == "left"
                else [ord(c) for c in t] + [0] * (width - len(t)) for t in texts]
        ids = torch.tensor(rows)
        return _Batch(input_ids=ids, attention_mask=(ids != 0).long())

    def batch_decode(self, rows, skip_special_tokens):
        return ["".join(chr(i) for i in row.tolist() if i != 0) for row in rows]


class _Batch(dict):
    def to(self, device):
        return self


class _LookupModel(torch.nn.Module):
    """A "model" that answers each prompt from a table (or wrongly), continuing after the last column."""

    def __init__(self, answers):
        super().__init__()
        self.answers = answers
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        assert not do_sample and not self.training
        outs = []
        for row, mask in zip(input_ids, attention_mask):
            # With left padding the prompt ends at the last column; read it back from there.
            prompt = "".join(chr(i) for i in row[mask.bool()].tolist())
            question = prompt.removeprefix("<user>").removesuffix("<assistant>")
            outs.append([ord(c) for c in self.answers[question]][:max_new_tokens])
        width = max(len(o) for o in outs)
        new = torch.tensor([o + [pad_token_id] * (width - len(o)) for o in outs])
        return torch.cat([input_ids, new], dim=1)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_evaluate_plumbing_with_a_fake_model(batch_size):
    _, eval_ = T.generate()
    records = eval_[:20]
    right = {T.question(r): T.answer(r) for r in records}
    tokenizer = _CharTokenizer()
    model = _LookupModel(right).train()
    assert T.evaluate(model, tokenizer, records, batch_size=batch_size) == 1.0
    assert tokenizer.sides_seen == {"left"} and tokenizer.padding_side == "right"  # restored
    assert model.training  # restored

    wrong = {q: a.replace("-", "/") for q, a in right.items()}
    assert T.evaluate(_LookupModel(wrong), tokenizer, records, batch_size=batch_size) == 0.0
    half = {q: (right if i % 2 else wrong)[q] for i, q in enumerate(right)}
    assert T.evaluate(_LookupModel(half), tokenizer, records, batch_size=batch_size) == 0.5


def test_cli_help_and_check(tmp_path):
    script = os.path.join(EXAMPLES, "task_data.py")
    # the options are checked by test_examples.py's --help test; here the example record it shows
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True)
    assert "Example record:" in out.stdout and "Rewrite the date in ISO format (YYYY-MM-DD)" in out.stdout
    assert subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True).returncode == 0

    out = subprocess.run([sys.executable, script, "--data-dir", str(tmp_path), "--n-train", "30", "--n-eval", "5"],
                         capture_output=True, text=True, check=True)
    assert "train.jsonl" in out.stdout
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == T.generate(30, 5)[0]
    check = [sys.executable, script, "--data-dir", str(tmp_path), "--n-train", "30", "--n-eval", "5", "--check"]
    assert subprocess.run(check, capture_output=True).returncode == 0
    (tmp_path / "eval.jsonl").write_text("")
    assert subprocess.run(check, capture_output=True).returncode == 1
