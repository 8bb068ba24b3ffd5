"""The offline OOD set: ABA true/false statements from the evals wheel as yes/no questions (no network)."""

import json
import zipfile

import pytest

from axolotl_blob.assets import CHOICES, OOD_MEMBER, parse_true_false, prepare_ood
from axolotl_blob.multiple_choice import read_examples


def aba_line(statement: str, ideal: str) -> str:
    return json.dumps({"input": [{"role": "system", "content": "You are LawStudentGPT."}, {"role": "user", "content": statement}], "ideal": ideal})


def test_parse_true_false_maps_true_to_yes():
    assert parse_true_false(aba_line("Lawyers must be competent.", "True")) == ("Lawyers must be competent.", 1)
    assert CHOICES[parse_true_false(aba_line("x", "False"))[1]] == "no"
    with pytest.raises(ValueError, match="unexpected label 'Maybe'"):
        parse_true_false(aba_line("x", "Maybe"))


def test_prepare_ood_writes_a_valid_deduplicated_yes_no_file(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    lines = [aba_line("A.", "True"), aba_line("B.", "False"), aba_line("A.", "True")]
    with zipfile.ZipFile(cache / "evals-3.0.1.post1-py3-none-any.whl", "w") as wheel:
        wheel.writestr(OOD_MEMBER, "\r\n".join(lines) + "\r\n")
    path = prepare_ood(tmp_path / "assets", cache_dir=cache)
    examples = read_examples(path)
    assert [(e["question"], e["answer"]) for e in examples] == [("Is this statement true?\nStatement: A.", 1), ("Is this statement true?\nStatement: B.", 0)]
    assert all(e["choices"] == ["no", "yes"] and e["id"].startswith("aba-") for e in examples)
