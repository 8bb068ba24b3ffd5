"""Multiple-choice questions: the prompt, the data, the answer-letter likelihood (torch only; the Axolotl prompt
strategy that trains on them is :mod:`axolotl_blob.multiple_choice_strategy`, reached through :func:`load`).

Data format, one JSON object per line::

    {"id": "q1", "question": "Which word is a color?", "choices": ["cat", "red"], "answer": 1}

Use it in a config as ``datasets: [{path: train.jsonl, type: axolotl_blob.multiple_choice}]`` (and, for
``test_datasets``, add ``split: train``: a local JSON file only has a ``train`` split).

Each example becomes a plain-text prompt (no chat template, so an evaluator needs nothing but the tokenizer)::

    Which word is a color?
    A. cat
    B. red
    Answer:

followed by ONE answer-letter token. Only that token is supervised, so the training / eval loss is exactly the
negative log-likelihood of the correct letter, and the evaluator scores an example by reading the logits of the
label tokens (``label_token_ids``) at the last prompt position (``prompt_token_ids``): the same token ids the
model was trained on.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

IGNORE_INDEX = -100  # the label the Hugging Face loss skips (Axolotl's IGNORE_INDEX)
LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWER_CUE = "Answer:"
MULTIPLE_CHOICE_TYPE = "axolotl_blob.multiple_choice"  # the `type:` of a dataset entry that uses this strategy
FIELDS = ("question", "choices", "answer")
AnswerFormat = Literal["letters", "cloze"]  # how a question is put to the model: this module's, or axolotl_blob.cloze


# --------------------------------------------------------------------------- prompt


def format_prompt(question: str, choices: list[str] | tuple[str, ...]) -> str:
    """The question, one ``A. text`` line per choice, then ``Answer:`` (no trailing space)."""
    if len(choices) > len(LABELS):
        raise ValueError(f"{len(choices)} choices, at most {len(LABELS)} are supported (labels {LABELS[0]}-{LABELS[-1]})")
    lines = [question, *(f"{LABELS[i]}. {choice}" for i, choice in enumerate(choices)), ANSWER_CUE]
    return "\n".join(lines)


def _tokenizer_name(tokenizer: Any) -> str:
    name = getattr(tokenizer, "name_or_path", "") or ""
    return f"{type(tokenizer).__name__}({name!r})" if name else type(tokenizer).__name__


def text_token_ids(tokenizer: Any, text: str) -> list[int]:
    """The text's tokens, no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def label_token_ids(tokenizer: Any, n_choices: int, context: str = ANSWER_CUE) -> list[int]:
    """Token id of each answer letter ``LABELS[:n_choices]`` as it follows ``Answer:``.

    For each label, `` A`` (leading space) is tried first, then ``A``. A form is accepted when it adds exactly
    one token to the encoding of ``context``, that token is neither unknown nor special, and the encoding of
    ``context`` is left unchanged (the label did not merge into the cue).

    Why the difference of two encodings rather than encoding `` A`` alone: SentencePiece / Metaspace
    tokenizers prepend ``▁`` at the start of a text, so `` A`` on its own may come out as ``['▁', '▁A']`` or
    ``['▁▁A']`` although after ``Answer:`` it is the single token ``▁A``; byte-level BPEs can likewise merge
    differently at a text's start. Encoding ``context + " A"`` reproduces exactly what the tokenizer produces
    after ``Answer:`` in a real prompt. The decision is made per label, so a label's id never depends on
    ``n_choices``. Raises ValueError naming the label and the tokenizer if a label is not a single token.
    """
    if not 1 <= n_choices <= len(LABELS):
        raise ValueError(f"n_choices must be in 1..{len(LABELS)}, got {n_choices}")
    base = text_token_ids(tokenizer, context)
    unk = getattr(tokenizer, "unk_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    ids: list[int] = []
    for label in LABELS[:n_choices]:
        tried = []
        for form in (" " + label, label):
            full = text_token_ids(tokenizer, context + form)
            extra = full[len(base):]
            tokens = tokenizer.convert_ids_to_tokens(extra)
            if full[: len(base)] != base:
                tried.append(f"{form!r} changes the tokens of {context!r}")
            elif len(extra) != 1:
                tried.append(f"{form!r} -> {len(extra)} tokens {tokens}")
            elif extra[0] == unk or extra[0] in special:
                tried.append(f"{form!r} -> {'unknown' if extra[0] == unk else 'special'} token {tokens}")
            else:
                ids.append(extra[0])
                break
        else:
            raise ValueError(
                f"answer label {label!r} is not a single token after {context!r} for tokenizer "
                f"{_tokenizer_name(tokenizer)}: {'; '.join(tried)}"
            )
    if len(set(ids)) != len(ids):
        raise ValueError(f"answer labels {LABELS[:n_choices]!r} share token ids {ids} in {_tokenizer_name(tokenizer)}")
    return ids


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its bos token in front of a text when special tokens are added."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    return tokenizer("x")["input_ids"][:1] == [bos] and text_token_ids(tokenizer, "x")[:1] != [bos]


def prompt_token_ids(tokenizer: Any, prompt: str, add_bos: bool | None = None) -> list[int]:
    """The prompt's tokens, with bos in front if the tokenizer adds one (``add_bos=None`` detects it).

    Special tokens other than bos (e.g. an eos some tokenizers append) are never added: the answer token must
    follow ``Answer:`` directly.
    """
    ids = text_token_ids(tokenizer, prompt)
    if add_bos is None:
        add_bos = adds_bos(tokenizer)
    return [tokenizer.bos_token_id, *ids] if add_bos else ids


# --------------------------------------------------------------------------- data


def validate_example(example: Any, where: str, require_answer: bool = True) -> None:
    """Check one example; raise ValueError starting with ``where`` (e.g. ``file:line``) and naming the field.

    ``None`` counts as missing: Hugging Face ``datasets`` fills fields a row lacks with ``None``. Questions to
    predict (``require_answer=False``) may omit ``answer``; one that is given is still checked.
    """
    if not isinstance(example, Mapping):
        raise ValueError(f"{where}: expected a JSON object with fields {', '.join(FIELDS)}, got {type(example).__name__}")
    for field in FIELDS:
        if example.get(field) is None and (require_answer or field != "answer"):
            raise ValueError(f"{where}: missing field '{field}'")
    question, choices, answer = (example.get(field) for field in FIELDS)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: field 'question' must be a non-empty string, got {question!r}")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2:
        raise ValueError(f"{where}: field 'choices' must be a list of at least 2 strings, got {choices!r}")
    if len(choices) > len(LABELS):
        raise ValueError(f"{where}: field 'choices' has {len(choices)} items, at most {len(LABELS)} are supported")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise ValueError(f"{where}: field 'choices' item {i} must be a string, got {choice!r}")
    if answer is None:
        return
    if isinstance(answer, bool) or not isinstance(answer, int):
        hint = " (a float in any row makes `datasets` load the whole column as floats)" if isinstance(answer, float) else ""
        raise ValueError(f"{where}: field 'answer' must be an integer index into 'choices', got {answer!r}{hint}")
    if not 0 <= answer < len(choices):
        raise ValueError(f"{where}: field 'answer' is {answer}, out of range for {len(choices)} choices (0..{len(choices) - 1})")


def read_examples(path: str | Path, require_answer: bool = True) -> list[dict]:
    """Read and validate a multiple-choice JSONL file; errors name the file, the 1-based line and the field.

    Blank lines are skipped; a file without any example is an error.
    """
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                example = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: bad JSON ({exc.msg}, column {exc.colno})") from None
            validate_example(example, where, require_answer)
            examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return examples


def choice_count(paths: list[str | Path]) -> int:
    """K, the number of choices every question of these files has; a file whose questions differ is an error
    naming the first line that differs (the K-way training losses softmax over one set of K choices)."""
    counts: dict[int, str] = {}
    for path in paths:
        with Path(path).open(encoding="utf-8") as f:
            lines = [(lineno, line) for lineno, line in enumerate(f, start=1) if line.strip()]
        for (lineno, _), example in zip(lines, read_examples(path)):
            counts.setdefault(len(example["choices"]), f"{path}:{lineno}")
    if len(counts) > 1:
        found = ", ".join(f"{k} at {where}" for k, where in sorted(counts.items()))
        raise ValueError(
            f"the K-way training loss softmaxes over one set of K choices (multiple_choice.likelihood 'choices', or "
            f"type: axolotl_blob.cloze), but the training questions have different numbers of choices ({found}); give "
            "every question the same number of choices, or train letter-format data with 'likelihood: vocabulary'"
        )
    return next(iter(counts))


# --------------------------------------------------------------------------- label-token likelihood


def choice_log_probs(logits: torch.Tensor, labels: torch.Tensor, label_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-softmax over the K answer-letter logits at every supervised position, (n, K) in fp32; the answer's
    index among them, (n,)). Causal: the logits at position t predict labels[t + 1]."""
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    label_ids = label_ids.to(logits.device)
    picked = logits[:, :-1][..., label_ids][supervised].float()
    answers = targets[supervised]
    index = (answers[:, None] == label_ids[None, :]).float().argmax(-1)
    if not bool((label_ids[index] == answers).all()):
        raise ValueError(
            "multiple_choice.likelihood 'choices': a supervised token is not an answer letter; train on "
            "'type: axolotl_blob.multiple_choice' data with train_on_inputs false"
        )
    return torch.log_softmax(picked, dim=-1), index


class ChoiceLoss(ABC):
    """A K-way cross-entropy as the Trainer's ``compute_loss_func``: −log p(answer) over a question's K choices, from
    :meth:`choice_log_probs` (the answer format's own scores). The BMA eval loss averages the same K-way
    probabilities over posterior draws.

    Summed and divided by ``num_items_in_batch`` (the questions of the whole accumulated batch, across ranks), as the
    Trainer expects of a ``compute_loss_func``; a plain mean where it passes none (evaluation).
    """

    @abstractmethod
    def choice_log_probs(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((questions, K) log-softmax over each question's choices, fp32; (questions,) the answer's index)."""

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        log_probs, index = self.choice_log_probs(outputs.logits, labels)
        nll = -log_probs.gather(-1, index[:, None]).sum()
        return nll / (num_items_in_batch if num_items_in_batch is not None else max(index.numel(), 1))


class ChoiceLikelihood(ChoiceLoss):
    """``multiple_choice.likelihood: choices`` on letter-format data: the cross-entropy over the K answer letters
    only, −log softmax(logits[answer position, label_token_ids])[answer] (the BLoB reference's likelihood; the
    calibration block's ``choices`` mode scores the same restriction). One supervised token per question, so the
    Trainer's count of supervised tokens is the count of questions."""

    def __init__(self, label_ids: list[int]):
        self.label_ids = torch.tensor(label_ids)

    def choice_log_probs(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return choice_log_probs(logits, labels, self.label_ids)


# --------------------------------------------------------------------------- Axolotl strategy


def load(tokenizer: Any, cfg: Any, ds_cfg: Any = None) -> Any:
    """Entry point Axolotl calls for ``type: axolotl_blob.multiple_choice``."""
    from axolotl_blob.multiple_choice_strategy import MultipleChoicePrompter, MultipleChoicePromptTokenizingStrategy

    return MultipleChoicePromptTokenizingStrategy(
        MultipleChoicePrompter(),
        tokenizer,
        bool(cfg.train_on_inputs),
        cfg.sequence_len,
    )
