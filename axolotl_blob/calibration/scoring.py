"""Scoring a model into a CalibrationState, in the two modes of the `calibration:` block.

`choices`: multiple-choice questions, each draw's K choice scores softmaxed and the probabilities averaged over the
posterior draws; the scores are the answer letters' logits at the last prompt position (letter format) or each choice
text's mean token log-probability after the question (cloze format, :mod:`axolotl_blob.cloze`).
`tokens`: every supervised next token of an ordinary eval dataloader, K = the vocabulary.
Examples are sharded over ranks; the summed states are all-reduced and the per-example records all-gathered, so
every rank returns the global metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor

from peft.tuners.tuners_utils import BaseTunerLayer

from axolotl_blob.blob.model import unwrap_model
from axolotl_blob.calibration.metrics import CalibrationState, entropy
from axolotl_blob.cloze import cloze_token_ids
from axolotl_blob.multiple_choice import AnswerFormat, format_prompt, label_token_ids, prompt_token_ids
from axolotl_blob.sampling import PosteriorSampler

AutocastFactory = Callable[[], contextlib.AbstractContextManager]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one: how examples are sharded for scoring."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    """NCCL moves only CUDA tensors; gloo (CPU) takes CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every process's rows (different counts allowed), concatenated in rank order, on every process."""
    device, world = _collective_device(), dist.get_world_size()
    count = torch.tensor([len(rows)], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = rows.new_zeros((longest, *rows.shape[1:])).to(device)
    padded[: len(rows)] = rows.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts)]).cpu()


def synchronize_state(state: CalibrationState) -> CalibrationState:
    """The global state on every process: sums all-reduced, records gathered and put in index order (which
    length-sorted batches also need on one process)."""
    records = state.records
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flat = state.as_tensor().to(_collective_device())
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        state.load_tensor(flat)
        records = gather_rows(state.records)
    state.records = records[torch.argsort(records[:, 0], stable=True)]
    return state


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def selected_position_logits(model: nn.Module, rows: torch.Tensor, positions: torch.Tensor) -> Iterator[None]:
    """Inside: the output projection sees only the hidden states at (`rows`, `positions`), so the logits come out
    (len(rows), 1, vocabulary), not one row per position of the batch: for SmolLM2 a 49 152-wide projection per
    unscored token saved. A forward pre-hook on the model's own output layer, so whatever the model does after it
    (soft-capping, scaling) still applies; a model without one scores every position as before."""
    head = unwrap_model(model).get_output_embeddings()
    if head is None:
        yield
        return

    def select(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0]
        return (hidden[rows.to(hidden.device), positions.to(hidden.device)].unsqueeze(1), *args[1:]), kwargs

    handle = head.register_forward_pre_hook(select, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _autocast_dtype(autocast: AutocastFactory, device: torch.device) -> torch.dtype | None:
    """The dtype `autocast` runs matmuls in on `device`, None if it does not autocast there."""
    with autocast():
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _fixed_linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name → tensor of each fp32 weight and bias of a Linear layer that stays as it is while scoring: frozen (a
    posterior sampler moves only trainable tensors) and not an adapter factor (BLoB draws from those). None of a
    sharded model (FSDP, DeepSpeed ZeRO-3): its engine swaps the parameters in and out itself."""
    if any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()) or any(
        isinstance(param, DTensor) or hasattr(param, "ds_id") for param in model.parameters()
    ):
        return {}
    adapter_factors = {
        id(param)
        for module in model.modules()
        if isinstance(module, BaseTunerLayer)
        for layer_name in module.adapter_layer_names
        for param in getattr(module, layer_name).parameters()
    }
    fixed = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            for name, param in module.named_parameters(recurse=False):
                if param.dtype == torch.float32 and not param.requires_grad and id(param) not in adapter_factors:
                    fixed[f"{module_name}.{name}" if module_name else name] = param
    return fixed


@contextlib.contextmanager
def eval_forward(model: nn.Module, autocast: AutocastFactory) -> Iterator[Callable[..., object]]:
    """Inside: the model in eval mode (its mode restored on exit) and a function calling it under `autocast`, with
    the fixed Linear weights cast once up front.

    Autocast casts an fp32 weight afresh at every call (it caches casts of trainable leaves only), so an fp32 model
    under bf16 autocast re-casts nearly all its weights per forward (a quarter of a CPU scoring pass of SmolLM2). The
    copies give the matmuls the very operands autocast would have cast, so the numbers are unchanged; they are
    swapped in per call by ``torch.func.functional_call`` for that Linear layer only (a tied embedding keeps its
    fp32 weight), and dropped on exit. Models already in bf16 (the usual GPU run) have nothing to cast."""
    dtype = _autocast_dtype(autocast, _device(model))
    fixed = _fixed_linear_weights(model) if dtype is not None else {}
    copies = {name: param.detach().to(dtype) for name, param in fixed.items()}

    def forward(**inputs):
        with autocast():
            if not copies:
                return model(**inputs)
            return torch.func.functional_call(model, copies, args=(), kwargs=inputs, tie_weights=False, strict=False)

    was_training = model.training
    model.eval()
    try:
        yield forward
    finally:
        copies.clear()
        model.train(was_training)


def length_sorted_batches(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Positions grouped into batches of `size` by prompt length (stable), so a batch pads to little more than
    its own prompts' length."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start : start + size] for start in range(0, len(order), size)]


def _padded(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, lengths) of right-padded `sequences`: padding keeps every row's positions."""
    lengths = torch.tensor([len(sequence) for sequence in sequences])
    input_ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
    return input_ids, (torch.arange(input_ids.shape[1]) < lengths[:, None]).long(), lengths


class LetterScorer:
    """The letter format: one prompt per question, the K answer letters' logits at its last position."""

    def __init__(self, tokenizer, examples: Sequence[dict]):
        self.label_ids = torch.tensor(label_token_ids(tokenizer, max(len(e["choices"]) for e in examples)))
        self.prompts = [prompt_token_ids(tokenizer, format_prompt(e["question"], e["choices"])) for e in examples]
        self.lengths = [len(prompt) for prompt in self.prompts]

    def batch(self, positions: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        input_ids, attention_mask, lengths = _padded([self.prompts[i] for i in positions], pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "rows": torch.arange(len(positions)), "positions": lengths - 1}

    def scores(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], max_choices: int) -> torch.Tensor:
        return logits[:, 0].float().cpu()[:, self.label_ids[:max_choices]]


class ClozeScorer:
    """The cloze format: K sequences ``[bos] prompt choice_k`` per question, each choice's mean token log-probability
    (:mod:`axolotl_blob.cloze`); the head sees only the positions that predict a choice token."""

    def __init__(self, tokenizer, examples: Sequence[dict]):
        encoded = [cloze_token_ids(tokenizer, e["question"], e["choices"]) for e in examples]
        self.sequences = [[prompt + choice for choice in choices] for prompt, choices in encoded]
        self.prompt_lengths = [len(prompt) for prompt, _ in encoded]
        self.lengths = [max(len(sequence) for sequence in sequences) for sequences in self.sequences]

    def batch(self, positions: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        sequences = [sequence for i in positions for sequence in self.sequences[i]]
        starts = [self.prompt_lengths[i] for i in positions for _ in self.sequences[i]]
        input_ids, attention_mask, lengths = _padded(sequences, pad_id)
        rows = torch.cat([torch.full((int(end) - start,), row) for row, (start, end) in enumerate(zip(starts, lengths))])
        predicting = torch.cat([torch.arange(start - 1, int(end) - 1) for start, end in zip(starts, lengths)])
        questions = torch.tensor([q for q, i in enumerate(positions) for _ in self.sequences[i]])
        choices = torch.tensor([k for i in positions for k in range(len(self.sequences[i]))])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "rows": rows, "positions": predicting,
                "questions": questions, "choices": choices}  # fmt: skip

    def scores(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], max_choices: int) -> torch.Tensor:
        rows, positions = batch["rows"], batch["positions"]
        targets = batch["input_ids"][rows, positions + 1].to(logits.device)
        picked = logits[:, 0].float()
        token_log_probs = (picked.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(picked, dim=-1)).cpu().double()
        n_sequences = len(batch["questions"])
        totals = torch.zeros(n_sequences, dtype=torch.float64).index_add_(0, rows, token_log_probs)
        means = totals / torch.bincount(rows, minlength=n_sequences)
        scores = torch.full((int(batch["questions"].max()) + 1, max_choices), float("-inf"), dtype=torch.float64)
        scores[batch["questions"], batch["choices"]] = means
        return scores


def choice_scorer(answer_format: AnswerFormat, tokenizer, examples: Sequence[dict]) -> LetterScorer | ClozeScorer:
    return (ClozeScorer if answer_format == "cloze" else LetterScorer)(tokenizer, examples)


@dataclass(frozen=True)
class ChoiceScoring:
    """How one evaluation scores multiple-choice questions: the model and tokenizer, the posterior `sampler` and its
    `n_samples` draws, the batch size, the autocast and the answer format. Built once per evaluation and shared by
    the calibration block, temperature fitting, TFB's anchors and `predict`, so they all score alike."""

    model: nn.Module
    tokenizer: Any
    sampler: PosteriorSampler
    n_samples: int
    batch_size: int = 8
    autocast: AutocastFactory = contextlib.nullcontext
    answer_format: AnswerFormat = "letters"

    @torch.no_grad()
    def draw_log_probs(self, examples: Sequence[dict]) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Per batch of `examples` (dicts with question and choices): the positions of its examples in `examples`
        (batches hold prompts of similar length) and each draw's log-softmax over each question's choices,
        (draws, batch, K) in fp64, −inf beyond a question's own choices. In the cloze format the K sequences of a
        question go through one forward, so they share its posterior draw."""
        if not examples:  # a rank with no shard of a tiny dataset
            return
        model = self.model
        max_choices = max(len(example["choices"]) for example in examples)
        scorer = choice_scorer(self.answer_format, self.tokenizer, examples)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        device = _device(model)
        with eval_forward(model, self.autocast) as forward:
            for positions in length_sorted_batches(scorer.lengths, self.batch_size):
                batch = scorer.batch(positions, pad_id)
                n_choices = torch.tensor([len(examples[i]["choices"]) for i in positions])
                valid = torch.arange(max_choices)[None, :] < n_choices[:, None]
                rows, predicting = batch["rows"].to(device), batch["positions"].to(device)
                draws = []
                for _ in self.sampler.draws(self.n_samples):
                    with selected_position_logits(model, rows, predicting):
                        logits = forward(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
                    if logits.shape[1] != 1:  # a model without an output layer to hook: every position came out
                        logits = logits[rows.to(logits.device), predicting.to(logits.device)].unsqueeze(1)
                    scores = scorer.scores(logits, batch, max_choices).double().masked_fill(~valid, float("-inf"))
                    draws.append(torch.log_softmax(scores, dim=-1))
                yield positions, torch.stack(draws)

    def probabilities(
        self, examples: Sequence[dict], temperature: float = 1.0
    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
        """Per batch of :meth:`draw_log_probs`: the positions, the (batch, K) posterior-averaged probabilities
        (1/N) Σ_n softmax(s_n / T) over the choices (0 beyond an example's own, fp64) — `temperature` divides each
        draw's scores before the average — and the mean over draws of each draw's entropy H(p_n) (None for one pass)."""
        for positions, log_probs in self.draw_log_probs(examples):
            draws = torch.softmax(log_probs / temperature, dim=-1)
            yield positions, draws.mean(0), entropy(draws).mean(0) if len(draws) > 1 else None

    def ordered_draw_log_probs(self, examples: Sequence[dict]) -> torch.Tensor:
        """:meth:`draw_log_probs` of all `examples` in their order: (draws, n, K) (what a temperature is fitted on)."""
        out = None
        for positions, log_probs in self.draw_log_probs(examples):
            if out is None:
                k = max(len(e["choices"]) for e in examples)
                out = torch.full((len(log_probs), len(examples), k), float("-inf"), dtype=torch.float64)
            out[:, positions] = log_probs
        return out

    def ordered_probabilities(
        self, examples: Sequence[dict], temperature: float = 1.0, on_batch: Callable[[int], object] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`probabilities` of all `examples`, in their order: (n, K) probabilities and (n,) mean draw entropies
        (None for a single pass); `on_batch(count)` after each batch (a progress bar)."""
        probs = torch.zeros(len(examples), max((len(e["choices"]) for e in examples), default=0), dtype=torch.float64)
        draw_entropy = None
        for positions, batch_probs, batch_entropy in self.probabilities(examples, temperature):
            probs[positions] = batch_probs
            if batch_entropy is not None:
                draw_entropy = torch.zeros(len(examples), dtype=torch.float64) if draw_entropy is None else draw_entropy
                draw_entropy[positions] = batch_entropy
            if on_batch is not None:
                on_batch(len(positions))
        return probs, draw_entropy

    def calibration_state(self, examples: Sequence[dict], n_bins: int = 15, temperature: float = 1.0) -> CalibrationState:
        """Calibration state of multiple-choice `examples` (dicts with question, choices, answer), each rank scoring
        its shard; the same global state on every rank."""
        rank, world = rank_and_world()
        state = CalibrationState(n_bins)
        shard = examples[rank::world]
        for positions, probs, draw_entropy in self.probabilities(shard, temperature):
            indices = rank + world * torch.tensor(positions)  # position in `examples`
            state.update(probs, torch.tensor([shard[i]["answer"] for i in positions]), draw_entropy, indices)
        return synchronize_state(state)


@torch.no_grad()
def score_tokens(
    model: nn.Module,
    batches: Iterable[dict],
    sampler: PosteriorSampler,
    n_samples: int,
    n_bins: int = 15,
    autocast: AutocastFactory = contextlib.nullcontext,
) -> CalibrationState:
    """Calibration state of every supervised next token (labels != −100) in `batches` of a causal LM."""
    device = _device(model)
    state = CalibrationState(n_bins)
    with eval_forward(model, autocast) as forward:
        for batch in batches:
            labels = batch["labels"][:, 1:].to(device)
            mask = labels != -100
            if not mask.any():
                continue
            inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
            prob_sum, draw_entropy_sum, count = None, None, 0
            for _ in sampler.draws(n_samples):
                logits = forward(**inputs).logits[:, :-1]
                probs = torch.softmax(logits[mask].float(), dim=-1)  # fp32: (tokens × vocabulary) per draw
                prob_sum = probs if prob_sum is None else prob_sum + probs
                draw_entropy_sum = entropy(probs) if draw_entropy_sum is None else draw_entropy_sum + entropy(probs)
                count += 1
            state.update(prob_sum / count, labels[mask], draw_entropy_sum / count if count > 1 else None)
    return synchronize_state(state)
