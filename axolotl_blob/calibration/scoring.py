"""Scoring a model into a CalibrationState, in the two modes of the `calibration:` block.

`choices`: multiple-choice prompts; the next-token logits at the last prompt position restricted to the choice
labels (A, B, …), softmaxed over those K, averaged as probabilities over the posterior draws.
`tokens`: every supervised next token of an ordinary eval dataloader, K = the vocabulary.
Examples are sharded over ranks; the summed states are all-reduced and the per-example records all-gathered, so
every rank returns the global metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor

from peft.tuners.tuners_utils import BaseTunerLayer

from axolotl_blob.blob.model import unwrap_model
from axolotl_blob.calibration.metrics import CalibrationState, entropy
from axolotl_blob.multiple_choice import format_prompt, label_token_ids, prompt_token_ids
from axolotl_blob.sampling import PosteriorSampler

AutocastFactory = Callable[[], contextlib.AbstractContextManager]


def _rank_and_world() -> tuple[int, int]:
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
def answer_position_logits(model: nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Inside: the output projection sees only each row's hidden state at `positions` (the logits come out
    (batch, 1, vocabulary)), not every position's: for SmolLM2 a 49 152-wide projection per token saved. A forward
    pre-hook on the model's own output layer, so whatever the model does after it (soft-capping, scaling) still
    applies; a model without one scores every position as before."""
    head = unwrap_model(model).get_output_embeddings()
    if head is None:
        yield
        return
    rows = torch.arange(len(positions), device=positions.device)

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


@torch.no_grad()
def choice_probabilities(
    model: nn.Module,
    tokenizer,
    examples: Sequence[dict],
    sampler: PosteriorSampler,
    n_samples: int,
    batch_size: int = 8,
    autocast: AutocastFactory = contextlib.nullcontext,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """Per batch of multiple-choice `examples` (dicts with question and choices): the positions of its examples in
    `examples` (batches hold prompts of similar length), the (batch, K) posterior-averaged probabilities over the
    choice labels (0 beyond an example's own choices, fp64), and the mean over draws of each draw's entropy
    H(p_n) (None for a single pass)."""
    if not examples:  # a rank with no shard of a tiny dataset
        return
    max_choices = max(len(example["choices"]) for example in examples)
    label_ids = torch.tensor(label_token_ids(tokenizer, max_choices))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _device(model)
    prompts = [prompt_token_ids(tokenizer, format_prompt(e["question"], e["choices"])) for e in examples]
    with eval_forward(model, autocast) as forward:
        for positions in length_sorted_batches([len(p) for p in prompts], batch_size):
            lengths = torch.tensor([len(prompts[i]) for i in positions])
            input_ids = torch.full((len(positions), int(lengths.max())), pad_id, dtype=torch.long)
            for row, i in enumerate(positions):  # right padding keeps every prompt's positions unchanged
                input_ids[row, : len(prompts[i])] = torch.tensor(prompts[i])
            attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
            n_choices = torch.tensor([len(examples[i]["choices"]) for i in positions])
            valid = torch.arange(max_choices)[None, :] < n_choices[:, None]
            last_positions = (lengths - 1).to(device)
            draws = []
            for _ in sampler.draws(n_samples):
                with answer_position_logits(model, last_positions):
                    logits = forward(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
                rows = torch.arange(len(positions), device=logits.device)
                last = logits[:, 0] if logits.shape[1] == 1 else logits[rows, last_positions.to(logits.device)]
                choice_logits = last.float().cpu()[:, label_ids].masked_fill(~valid, float("-inf"))
                draws.append(torch.softmax(choice_logits.double(), dim=-1))
            stacked = torch.stack(draws)
            yield positions, stacked.mean(0), entropy(stacked).mean(0) if len(draws) > 1 else None


def ordered_choice_probabilities(
    model: nn.Module,
    tokenizer,
    examples: Sequence[dict],
    sampler: PosteriorSampler,
    n_samples: int,
    batch_size: int = 8,
    autocast: AutocastFactory = contextlib.nullcontext,
    on_batch: Callable[[int], object] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`choice_probabilities` of all `examples`, in their order: (n, K) probabilities and (n,) mean draw
    entropies (None for a single pass); `on_batch(count)` after each batch (a progress bar)."""
    probs = torch.zeros(len(examples), max((len(e["choices"]) for e in examples), default=0), dtype=torch.float64)
    draw_entropy = None
    for positions, batch_probs, batch_entropy in choice_probabilities(
        model, tokenizer, examples, sampler, n_samples, batch_size, autocast
    ):
        probs[positions] = batch_probs
        if batch_entropy is not None:
            draw_entropy = torch.zeros(len(examples), dtype=torch.float64) if draw_entropy is None else draw_entropy
            draw_entropy[positions] = batch_entropy
        if on_batch is not None:
            on_batch(len(positions))
    return probs, draw_entropy


def score_choices(
    model: nn.Module,
    tokenizer,
    examples: Sequence[dict],
    sampler: PosteriorSampler,
    n_samples: int,
    n_bins: int = 15,
    batch_size: int = 8,
    autocast: AutocastFactory = contextlib.nullcontext,
) -> CalibrationState:
    """Calibration state of multiple-choice `examples` (dicts with question, choices, answer)."""
    rank, world = _rank_and_world()
    state = CalibrationState(n_bins)
    shard = examples[rank::world]
    for positions, probs, draw_entropy in choice_probabilities(
        model, tokenizer, shard, sampler, n_samples, batch_size, autocast
    ):
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
