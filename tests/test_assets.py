"""Fast tests of the pure data-preparation parts of axolotl_blob.assets (no network, no model)."""

import json

import pytest

from axolotl_blob.assets import dedupe, parse_sample, split_samples, to_record, write_jsonl

# Same shape as a line of evals/registry/data/sarcasm/samples.jsonl in evals==3.0.1.post1.
EVALS_LINE = (
    '{"input": [{"role": "system", "content": "Respond with only a 1 or 0 to signify if the '
    "user's message includes sarcasm, or not\"}, {\"role\": \"user\", \"content\": "
    '"thirtysomething scientists unveil doomsday clock of hair loss"}], "ideal": "1"}'
)


def synthetic(n_pos: int, n_neg: int) -> list[tuple[str, int]]:
    return [(f"pos {i}", 1) for i in range(n_pos)] + [(f"neg {i}", 0) for i in range(n_neg)]


def test_parse_sample_reads_user_message_and_label() -> None:
    assert parse_sample(EVALS_LINE + "\r") == ("thirtysomething scientists unveil doomsday clock of hair loss", 1)


def test_parse_sample_rejects_non_binary_label() -> None:
    with pytest.raises(ValueError):
        parse_sample(EVALS_LINE.replace('"ideal": "1"', '"ideal": "2"'))


def test_dedupe_keeps_first_occurrence_order() -> None:
    assert dedupe([("a", 1), ("b", 0), ("a", 1)]) == [("a", 1), ("b", 0)]


def test_dedupe_rejects_conflicting_labels() -> None:
    with pytest.raises(ValueError):
        dedupe([("a", 1), ("a", 0)])


def test_split_is_disjoint_stratified_and_deterministic() -> None:
    samples = synthetic(450, 550)
    train, val = split_samples(samples, 100, 60, seed=3)
    assert len(train) == 100 and len(val) == 60
    assert not {h for h, _ in train} & {h for h, _ in val}
    assert sum(label for _, label in train) == 45
    assert sum(label for _, label in val) == 27
    assert (train, val) == split_samples(samples, 100, 60, seed=3)
    assert (train, val) != split_samples(samples, 100, 60, seed=4)


def test_split_rejects_too_many() -> None:
    with pytest.raises(ValueError):
        split_samples(synthetic(5, 5), 8, 3, seed=0)


def test_record_format() -> None:
    record = to_record("area man wins", 1)
    assert record["question"] == "Is this headline sarcastic?\nHeadline: area man wins"
    assert record["choices"] == ["no", "yes"]
    assert record["choices"][record["answer"]] == "yes"
    assert record["id"] == to_record("area man wins", 0)["id"]


def test_written_files_are_byte_identical_for_same_seed(tmp_path) -> None:
    samples = synthetic(30, 40)
    paths = []
    for name in ("a.jsonl", "b.jsonl"):
        train, _ = split_samples(samples, 20, 10, seed=0)
        write_jsonl(tmp_path / name, train)
        paths.append(tmp_path / name)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    lines = paths[0].read_text(encoding="utf-8").splitlines()
    assert len(lines) == 20
    assert set(json.loads(lines[0])) == {"id", "question", "choices", "answer"}
