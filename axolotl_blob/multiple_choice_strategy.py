"""The Axolotl prompt strategies for multiple-choice data, ``type: axolotl_blob.multiple_choice`` (answer letters) and
``type: axolotl_blob.cloze`` (choice texts); their modules' ``load`` is what Axolotl calls. The one part of
multiple-choice training that needs Axolotl."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from axolotl.prompt_tokenizers import PromptTokenizingStrategy
from axolotl.prompters import Prompter

from axolotl_blob.cloze import cloze_token_ids, question_row
from axolotl_blob.multiple_choice import (
    IGNORE_INDEX,
    adds_bos,
    format_prompt,
    label_token_ids,
    prompt_token_ids,
    validate_example,
)


class MultipleChoicePrompter(Prompter):
    """Builds the plain-text prompt; kept for Axolotl's prompter convention."""

    def build_prompt(self, question: str, choices: list[str]) -> Iterator[str]:
        yield format_prompt(question, choices)


class MultipleChoicePromptTokenizingStrategy(PromptTokenizingStrategy):
    """``input_ids = [bos] + prompt + [answer label] + [eos]``, supervising only the answer label token.

    eos is appended (when the tokenizer has one) but not supervised: the loss is then exactly the answer's NLL,
    comparable between runs and equal to what the calibration evaluator measures; the model is used for scoring,
    not for open-ended generation. With ``train_on_inputs: true`` the prompt tokens are supervised as well.

    Sequences are not truncated (cutting would drop the answer): Axolotl drops those longer than
    ``sequence_len`` by default (``excess_length_strategy: drop``); use ``raise`` to be told instead, never
    ``truncate``.
    """

    def __init__(self, prompter: Prompter, tokenizer: Any, train_on_inputs: bool = False, sequence_len: int = 2048):
        super().__init__(prompter, tokenizer, train_on_inputs, sequence_len)
        self.add_bos = adds_bos(tokenizer)
        self._label_ids: list[int] = []

    def label_ids(self, n_choices: int) -> list[int]:
        # Per-label resolution does not depend on n_choices, so one growing list serves every example.
        if len(self._label_ids) < n_choices:
            self._label_ids = label_token_ids(self.tokenizer, n_choices)
        return self._label_ids[:n_choices]

    def tokenize_prompt(self, prompt: Mapping[str, Any]) -> dict[str, list[int]]:
        where = f"multiple-choice row (id={prompt['id']!r})" if prompt.get("id") is not None else "multiple-choice row"
        validate_example(prompt, where)
        text = next(iter(self.prompter.build_prompt(prompt["question"], list(prompt["choices"]))))
        prompt_ids = prompt_token_ids(self.tokenizer, text, add_bos=self.add_bos)
        answer_id = self.label_ids(len(prompt["choices"]))[prompt["answer"]]
        input_ids = [*prompt_ids, answer_id]
        labels = [*(prompt_ids if self.train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)), answer_id]
        if self.tokenizer.eos_token_id is not None:
            input_ids.append(self.tokenizer.eos_token_id)
            labels.append(IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


class ClozePromptTokenizingStrategy(PromptTokenizingStrategy):
    """One question as one row: ``[bos] prompt``, then every choice's continuation, the answer's first, each with
    position ids restarting after the prompt (the layout of :mod:`axolotl_blob.cloze`, which the plugin's collator
    expands into K sequences). No eos: a continuation is scored, never generated. ``train_on_inputs`` is refused at
    config validation (the K-way loss supervises the choices only)."""

    def __init__(self, prompter: Prompter, tokenizer: Any, train_on_inputs: bool = False, sequence_len: int = 2048):
        super().__init__(prompter, tokenizer, train_on_inputs, sequence_len)
        self.add_bos = adds_bos(tokenizer)

    def tokenize_prompt(self, prompt: Mapping[str, Any]) -> dict[str, list[int]]:
        where = f"cloze row (id={prompt['id']!r})" if prompt.get("id") is not None else "cloze row"
        validate_example(prompt, where)
        try:
            prompt_ids, continuations = cloze_token_ids(self.tokenizer, prompt["question"], list(prompt["choices"]), self.add_bos)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        return question_row(prompt_ids, continuations, prompt["answer"])
