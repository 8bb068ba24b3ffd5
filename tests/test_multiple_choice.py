"""The multiple-choice prompt strategy: prompt format, answer-label tokens, JSONL validation, tokenization, and
one end-to-end BLoB run through `axolotl.cli.train` (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from axolotl_blob.multiple_choice import (
    format_prompt,
    label_token_ids,
    load,
    prompt_token_ids,
    read_examples,
)
from conftest import color_questions, multiple_choice_config, run_axolotl, write_jsonl

SMOLLM2_DIR = Path(__file__).resolve().parents[1] / "assets" / "smollm2-135m-instruct"


class Cfg(dict):
    """The two keys `load` reads, as attributes like Axolotl's DictDefault."""

    __getattr__ = dict.get


def strategy(tokenizer, train_on_inputs=False):
    return load(tokenizer, Cfg(train_on_inputs=train_on_inputs, sequence_len=64))


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if not (SMOLLM2_DIR / "tokenizer.json").is_file():
        pytest.skip(f"{SMOLLM2_DIR} missing (python -m axolotl_blob.assets --out assets)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM2_DIR)


def byte_level_tokenizer():
    """A byte-level BPE that never saw " A": there " A" is two tokens ['Ġ', 'A'] but "A" is one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["Answer:B\nred cat dog"] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def example(answer=1, **fields):
    return {"id": "q1", "question": "Which word is a color?", "choices": ["cat", "red", "dog"], "answer": answer, **fields}


# --------------------------------------------------------------------------- prompt and labels


def test_format_prompt_is_question_then_lettered_choices_then_answer_cue():
    assert format_prompt("Which word is a color?", ["cat", "red", "dog"]) == (
        "Which word is a color?\nA. cat\nB. red\nC. dog\nAnswer:"
    )
    with pytest.raises(ValueError, match="at most 26"):
        format_prompt("q", ["x"] * 27)


def test_label_tokens_of_the_tiny_tokenizer_are_the_spaced_letters(tiny_tokenizer):
    ids = label_token_ids(tiny_tokenizer, 4)
    assert ids == tiny_tokenizer.convert_tokens_to_ids(["▁A", "▁B", "▁C", "▁D"])
    # Per-label resolution: a label's id does not depend on how many choices there are.
    assert label_token_ids(tiny_tokenizer, 2) == ids[:2]


def test_label_tokens_of_smollm2_are_the_spaced_letters(smollm2_tokenizer):
    ids = label_token_ids(smollm2_tokenizer, 4)
    assert ids == smollm2_tokenizer.convert_tokens_to_ids(["ĠA", "ĠB", "ĠC", "ĠD"])
    prompt = format_prompt("Is this headline sarcastic?\nHeadline: x", ["no", "yes"])
    assert smollm2_tokenizer(prompt + " B", add_special_tokens=False)["input_ids"][-1] == ids[1]


def test_label_falls_back_to_the_unspaced_letter_when_the_spaced_one_is_two_tokens():
    tokenizer = byte_level_tokenizer()
    assert len(tokenizer(" A", add_special_tokens=False)["input_ids"]) == 2
    assert label_token_ids(tokenizer, 2) == tokenizer.convert_tokens_to_ids(["A", "B"])


def test_a_label_that_is_not_a_single_token_is_a_clear_error(tiny_tokenizer):
    # The tiny vocabulary knows A..H only: " I" is ['▁', '<unk>'] and "I" is '<unk>'.
    with pytest.raises(ValueError, match=r"answer label 'I' is not a single token") as info:
        label_token_ids(tiny_tokenizer, 9)
    message = str(info.value)
    assert type(tiny_tokenizer).__name__ in message
    assert str(tiny_tokenizer.name_or_path) in message
    assert "2 tokens" in message and "unknown token" in message


# --------------------------------------------------------------------------- read_examples


def test_read_examples_returns_the_objects_and_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", [example(0), "", example(2, choices=["a", "b", "c"])])
    assert read_examples(path) == [example(0), example(2, choices=["a", "b", "c"])]


@pytest.mark.parametrize(
    "bad, line, pattern",
    [
        ({"question": "q", "choices": ["a", "b"]}, 2, r"missing field 'answer'"),
        ({"choices": ["a", "b"], "answer": 0}, 2, r"missing field 'question'"),
        (example(3), 2, r"field 'answer' is 3, out of range for 3 choices \(0\.\.2\)"),
        (example(-1), 2, r"field 'answer' is -1, out of range"),
        (example("1"), 2, r"field 'answer' must be an integer"),
        (example(0, choices=["only"]), 2, r"field 'choices' must be a list of at least 2 strings"),
        (example(0, choices=["a", 2]), 2, r"field 'choices' item 1 must be a string"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 0', 2, r"bad JSON"),
        ("[1, 2]", 2, r"expected a JSON object"),
    ],
)
def test_read_examples_errors_name_file_line_and_field(tmp_path, bad, line, pattern):
    path = write_jsonl(tmp_path / "bad.jsonl", [example(0), bad, example(1)])
    with pytest.raises(ValueError, match=pattern) as info:
        read_examples(path)
    assert str(info.value).startswith(f"{path}:{line}: ")


def test_read_examples_of_an_empty_file_says_no_examples(tmp_path):
    for content in ("", "\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
        with pytest.raises(ValueError, match="no examples") as info:
            read_examples(path)
        assert str(path) in str(info.value)


# --------------------------------------------------------------------------- tokenize_prompt


def check_tokenized(tokenizer, row, tokenized, bos: bool):
    ids, labels = tokenized["input_ids"], tokenized["labels"]
    prompt_ids = prompt_token_ids(tokenizer, format_prompt(row["question"], row["choices"]))
    assert (prompt_ids[:1] == [tokenizer.bos_token_id]) is bos
    assert ids == [*prompt_ids, label_token_ids(tokenizer, len(row["choices"]))[row["answer"]], tokenizer.eos_token_id]
    assert tokenized["attention_mask"] == [1] * len(ids)
    supervised = [(i, label) for i, label in enumerate(labels) if label != -100]
    assert supervised == [(len(prompt_ids), label_token_ids(tokenizer, len(row["choices"]))[row["answer"]])]


@pytest.mark.parametrize("answer", [0, 1, 2])
def test_tokenize_prompt_masks_the_prompt_and_supervises_one_label_token(tiny_tokenizer, answer):
    row = example(answer)
    check_tokenized(tiny_tokenizer, row, strategy(tiny_tokenizer).tokenize_prompt(row), bos=False)


def test_tokenize_prompt_keeps_the_bos_the_tokenizer_adds_but_no_trailing_special(tiny_model_dir):
    from tokenizers import processors
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tokenizer.bos_token_id), ("</s>", tokenizer.eos_token_id)]
    )
    row = example(2)
    check_tokenized(tokenizer, row, strategy(tokenizer).tokenize_prompt(row), bos=True)


def test_tokenize_prompt_with_smollm2_reads_back_as_the_prompt_and_answer(smollm2_tokenizer):
    row = {"question": "Is this headline sarcastic?\nHeadline: area man wins", "choices": ["no", "yes"], "answer": 1}
    tokenized = strategy(smollm2_tokenizer).tokenize_prompt(row)
    check_tokenized(smollm2_tokenizer, row, tokenized, bos=False)
    assert smollm2_tokenizer.decode(tokenized["input_ids"]) == format_prompt(row["question"], row["choices"]) + " B<|im_end|>"


def test_train_on_inputs_supervises_the_prompt_too(tiny_tokenizer):
    tokenized = strategy(tiny_tokenizer, train_on_inputs=True).tokenize_prompt(example(1))
    assert tokenized["labels"] == [*tokenized["input_ids"][:-1], -100]


@pytest.mark.parametrize(
    "row, pattern",
    [
        (example(None), r"row \(id='q1'\): missing field 'answer'"),
        (example(5), r"field 'answer' is 5, out of range"),
        ({"question": None, "choices": ["a", "b"], "answer": 0}, r"^multiple-choice row: missing field 'question'"),
        (example(1.0), r"field 'answer' must be an integer.*floats"),
    ],
)
def test_tokenize_prompt_rejects_bad_rows_naming_the_field(tiny_tokenizer, row, pattern):
    with pytest.raises(ValueError, match=pattern):
        strategy(tiny_tokenizer).tokenize_prompt(row)


def test_axolotl_loads_the_strategy_by_its_dotted_type(tiny_tokenizer):
    from axolotl.prompt_strategies import load as load_strategy
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault({"sequence_len": 64, "train_on_inputs": False})
    loaded = load_strategy("axolotl_blob.multiple_choice", tiny_tokenizer, cfg, DictDefault({"type": "x"}))
    row = example(0)
    check_tokenized(tiny_tokenizer, row, loaded.tokenize_prompt(row), bos=False)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_blob_trains_on_a_multiple_choice_file_end_to_end(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", color_questions(80, seed=0))
    val = write_jsonl(tmp_path / "val.jsonl", color_questions(16, seed=1))
    assert len(read_examples(train)) == 80
    out = tmp_path / "out"
    config = multiple_choice_config(
        tiny_model_dir,
        train,
        out,
        test_datasets=[{"path": str(val), "type": "axolotl_blob.multiple_choice", "split": "train"}],
        max_steps=10,
        eval_steps=10,
        save_steps=10,
        excess_length_strategy="raise",
    )
    run_axolotl(config, tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "blob_posterior.safetensors"} <= {p.name for p in out.iterdir()}
    history = json.loads((out / "checkpoint-10" / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 10 and all(math.isfinite(loss) for loss in losses)
    assert [entry["step"] for entry in history if "eval_loss" in entry][-1] == 10
