"""The cloze answer format: each choice's *text* scored by its likelihood after the question (torch only; the Axolotl
prompt strategy is :mod:`axolotl_blob.multiple_choice_strategy`, reached through :func:`load`).

Same data as the letter format (:mod:`axolotl_blob.multiple_choice`), used in a config as
``datasets: [{path: train.jsonl, type: axolotl_blob.cloze}]``. A question's prompt is ``"<question>\\nAnswer:"``; choice
k is the continuation ``" <choice text>"``, and its score is the **mean log-probability of its tokens** (normalised by
the token count, so long answers are not penalised for their length)::

    s_k = (1/L_k) Σ_t log p(c_k,t | prompt, c_k,<t),        p(k | question) = softmax_k(s_k)

Training minimises the K-way cross-entropy −log softmax(s)[answer] (the analogue of the letter format's
``likelihood: choices``), and every scorer (the calibration block, ``evaluate``, ``predict``, TFB's search, temperature
fitting) reads the same softmax. How small models are scored on ARC, OpenBookQA and SciQ (OLMo's ``rc`` tasks).

Layout of one tokenized question (one Axolotl row)::

    input_ids    [bos] prompt | answer choice | other choices in their order …
    labels       -100 …       | its tokens    | their tokens …
    position_ids 0 … P-1      | P … P+L-1     | P … (each choice restarts at P: they all follow the prompt)

The correct choice comes first, so the K-way loss needs no answer index. :func:`expand_questions` turns a padded batch
of such rows into K ordinary sequences per question, ``[bos] prompt choice_k``, that any attention kernel runs; the K
rows of a question go through the same forward, so they share BLoB's draw of the factor noise.
"""

from __future__ import annotations

from typing import Any

import torch

from axolotl_blob.multiple_choice import ANSWER_CUE, IGNORE_INDEX, ChoiceLoss, prompt_token_ids, text_token_ids

CLOZE_TYPE = "axolotl_blob.cloze"  # the `type:` of a dataset entry in this format


def cloze_prompt(question: str) -> str:
    """The question, then ``Answer:`` on its own line (no trailing space: each choice brings its own)."""
    return f"{question}\n{ANSWER_CUE}"


def cloze_token_ids(tokenizer: Any, question: str, choices: list[str] | tuple[str, ...], add_bos: bool | None = None) -> tuple[list[int], list[list[int]]]:
    """(the prompt's tokens, with bos as :func:`prompt_token_ids` adds it; each choice's continuation tokens).

    A continuation's tokens are those the tokenizer gives ``prompt + " " + choice`` beyond the prompt's own, so they are
    exactly what follows the prompt in a real text. Raises ValueError naming the choice if its text merges into the
    prompt's last token or is empty.
    """
    prompt = cloze_prompt(question)
    base = text_token_ids(tokenizer, prompt)
    continuations = []
    for i, choice in enumerate(choices):
        full = text_token_ids(tokenizer, f"{prompt} {choice}")
        if not choice.strip() or len(full) == len(base):
            raise ValueError(f"choice {i} ({choice!r}) is empty; give every choice a text to score")
        if full[: len(base)] != base:
            raise ValueError(f"choice {i} ({choice!r}) changes the tokens of the prompt's end {ANSWER_CUE!r}; the cloze format cannot score it")
        continuations.append(full[len(base):])
    return prompt_token_ids(tokenizer, prompt, add_bos), continuations


def question_row(prompt_ids: list[int], continuations: list[list[int]], answer: int) -> dict[str, list[int]]:
    """One tokenized question in the row layout above (the answer's continuation first)."""
    order = [answer, *(k for k in range(len(continuations)) if k != answer)]
    start = len(prompt_ids)
    input_ids, labels, positions = list(prompt_ids), [IGNORE_INDEX] * start, list(range(start))
    for k in order:
        input_ids += continuations[k]
        labels += continuations[k]
        positions += range(start, start + len(continuations[k]))
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "attention_mask": [1] * len(input_ids)}


def split_row(input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the prompt's tokens, each continuation's tokens) of one row of the layout, its first `length` entries real."""
    supervised = (labels[:length] != IGNORE_INDEX).nonzero()
    if len(supervised) == 0:
        raise ValueError("a cloze row has no choice tokens: train on 'type: axolotl_blob.cloze' data as tokenized by its strategy")
    start = int(supervised[0])
    starts = [i for i in range(start, length) if int(position_ids[i]) == start]
    ends = [*starts[1:], length]
    return input_ids[:start], [input_ids[s:e] for s, e in zip(starts, ends)]


def sequences_batch(sequences: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (the continuation's tokens, -100 elsewhere) of
    (prompt, continuation) pairs."""
    longest = max(len(prompt) + len(choice) for prompt, choice in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, choice) in enumerate(sequences):
        end = len(prompt) + len(choice)
        input_ids[row, :end] = torch.cat([prompt, choice])
        labels[row, len(prompt) : end] = choice
        attention_mask[row, :end] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def expand_questions(batch: dict[str, torch.Tensor], n_choices: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A collated batch of question rows → ``n_choices`` sequences per question (question-major, the answer's first).

    Raises ValueError when a row holds another number of choices (the K-way loss needs one K)."""
    sequences = []
    lengths = batch["attention_mask"].sum(-1) if "attention_mask" in batch else [batch["input_ids"].shape[1]] * len(batch["input_ids"])
    for row in range(len(batch["input_ids"])):
        prompt, continuations = split_row(batch["input_ids"][row], batch["labels"][row], batch["position_ids"][row], int(lengths[row]))
        if len(continuations) != n_choices:
            raise ValueError(f"a cloze question has {len(continuations)} choices, the training data {n_choices}; give every question the same number of choices")
        sequences += [(prompt, choice) for choice in continuations]
    return sequences_batch(sequences, pad_id)


class ClozeCollator:
    """Wraps Axolotl's collator: pads question rows as it does, then expands them (:func:`expand_questions`)."""

    def __init__(self, collator: Any, n_choices: int, pad_id: int):
        self.collator, self.n_choices, self.pad_id = collator, n_choices, pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return expand_questions(self.collator(features), self.n_choices, self.pad_id)

    def __getattr__(self, name: str) -> Any:  # the Trainer reads e.g. `.tokenizer` of its collator
        if name == "collator":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.collator, name)


def mean_token_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(rows,) mean log-probability of each row's supervised tokens (causal: the logits at t predict labels[t + 1]),
    fp32; the log-softmax is taken at the supervised positions only."""
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    picked = logits[:, :-1][supervised].float()
    token_log_probs = picked.gather(-1, targets[supervised][:, None]).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    rows = supervised.nonzero()[:, 0]
    total = torch.zeros(len(labels), dtype=token_log_probs.dtype, device=token_log_probs.device).index_add_(0, rows, token_log_probs)
    return total / supervised.sum(-1).clamp(min=1)


class ClozeLikelihood(ChoiceLoss):
    """The Trainer's ``compute_loss_func`` for cloze data: the K-way cross-entropy over the choices' mean token
    log-likelihoods, on batches from :class:`ClozeCollator` (K rows per question, the answer's first)."""

    def __init__(self, n_choices: int):
        self.n_choices = n_choices

    def choice_log_probs(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = mean_token_log_likelihood(logits, labels).view(-1, self.n_choices)
        return torch.log_softmax(scores, dim=-1), torch.zeros(len(scores), dtype=torch.long, device=scores.device)


def load(tokenizer: Any, cfg: Any, ds_cfg: Any = None) -> Any:
    """Entry point Axolotl calls for ``type: axolotl_blob.cloze``."""
    from axolotl_blob.multiple_choice_strategy import ClozePromptTokenizingStrategy, MultipleChoicePrompter

    return ClozePromptTokenizingStrategy(MultipleChoicePrompter(), tokenizer, bool(cfg.train_on_inputs), cfg.sequence_len)


class QuestionCountMixin:
    """Mixed in front of the Trainer for cloze data: ``num_items_in_batch`` counts questions, not choice tokens, so
    :class:`ClozeLikelihood` divides its sum by the questions of the accumulated batch (across ranks), as the letter
    format's one supervised token per question does. The parent does the counting and the gathering, handed one
    supervised label per question."""

    n_choices: int

    def _get_num_items_in_batch(self, batch_samples: list, device: Any):
        one_per_question = []
        for batch in batch_samples:
            labels = torch.full((len(batch["labels"]) // self.n_choices, 2), IGNORE_INDEX, dtype=torch.long)
            labels[:, 1] = 0
            one_per_question.append({"labels": labels})
        return super()._get_num_items_in_batch(one_per_question, device)


def question_count_trainer_cls(base: type, n_choices: int) -> type:
    """A subclass of the Trainer class `base` whose loss normaliser counts questions of `n_choices` rows each."""
    return type(f"Cloze{base.__name__}", (QuestionCountMixin, base), {"n_choices": n_choices})
