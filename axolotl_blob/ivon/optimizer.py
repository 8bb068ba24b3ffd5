"""IVON (Shen et al., ICML 2024, arXiv 2402.17641): a diagonal Gaussian posterior N(m, σ²) learnt by the optimizer.

σ = 1 / sqrt(λ (h + δ)), with λ the effective sample size (``ess``) and δ the weight decay. One step:

    each MC sample k:  θ_k = m + σ ⊙ ε_k,  g_k = ∇ℓ(θ_k)
    ĝ = mean_k g_k,    ĥ = mean_k g_k ⊙ ε_k / σ                            (the "price" Hessian estimator)
    ḡ ← β1 ḡ + (1 − β1) ĝ
    h ← β2 h + (1 − β2) ĥ + ½ (1 − β2)² (h − ĥ)² / (h + δ)                (the last term keeps h > 0)
    m ← m − α' clip((ḡ / (1 − β1^t) + δ m) / (h + δ), ±clip_radius),  α' = α (h0 + δ) if rescale_lr else α

Usage (the reference ``ivon-opt`` loop runs unchanged)::

    optimizer = IVON(model.parameters(), lr=0.1, ess=len(train_set))
    for x, y in loader:
        for _ in range(train_samples):
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
        optimizer.step()

How a sample's gradient is consumed
-----------------------------------
``sampled_params(train=True)`` draws ε, puts θ = m + σ ⊙ ε into the parameters, and on exit puts the mean m back.
It does NOT read the gradients: the sample stays *pending*, its ε / σ kept in ``state[p]["scaled_noise"]``. The forward AND
the backward must run inside the context (a backward after exit usually fails, autograd seeing a saved parameter
modified in place; where no parameter was saved, it silently gives the gradient at the mean). The pending
sample's gradient is the ``p.grad`` found at the first of:

* ``step()``: reads ``p.grad`` as it is *then*, so whatever the training loop did between backward and step
  (gradient clipping, DDP averaging, summing over micro-batches that shared this sample) is what the update uses.
  ``step()`` leaves ``p.grad`` alone (torch convention: the loop zeroes gradients after the step);
* ``accumulate()``: folds the gradients in as one MC sample and clears them, so the next sample's backward
  starts from zero. Use it between samples (``mc_samples`` > 1, or one sample per gradient-accumulation
  micro-batch);
* entering the next ``sampled_params(train=True)``, or ``zero_grad()``: the same as ``accumulate()``, done
  implicitly so that the reference loop above (zero_grad inside or before the context) works as written.

Folded samples are kept as fp32 sums of g and of g ⊙ ε / σ with a per-parameter count. ``grad_reduction``
says how ``step()`` turns them into ĝ and ĥ: ``"mean"`` (default, as the reference) divides by the number of
samples, each gradient being one of the full loss; ``"sum"`` adds them, for loops where each sample's loss is
already scaled by its share of the batch (gradient accumulation: the Hugging Face Trainer divides each of k
micro-batch losses by k, or by the token count of the whole accumulated batch).

Parameters whose gradient is None are skipped when folding and when stepping (their state does not move).

Whatever the loop does to ``p.grad`` after a sample is folded does not reach that sample: with several samples per
step, gradient clipping or AMP unscaling (fp16 ``GradScaler``) done just before ``step()`` acts on the last sample
only. Clip or unscale each sample's gradient before it is folded if that matters.

Noise and distributed training
------------------------------
ε comes from the optimizer's own ``torch.Generator`` (CPU, seeded by ``seed``), one draw per parameter in
param-group order. Every data-parallel rank therefore draws the same ε; once DDP has averaged the gradients of
a sample, every rank holds the same ĝ, ĥ and so the same m and h. This holds when each sample's gradient is
averaged across ranks before it is folded. If samples are folded from rank-local gradients (gradient
accumulation under ``no_sync``), pass ``sync=True``: ``step()`` then averages ĝ and ĥ over the ranks.
``sampled_params(train=False)`` (evaluation, BMA) draws from a second generator, so evaluating on some ranks only
cannot desynchronise the training noise. Both generator states are in ``state_dict()``, so a resumed run draws
the same noise as an uninterrupted one.

State is fp32 whatever the parameter dtype (fp64 for fp64 parameters): ``step``, ``momentum`` (ḡ), ``hess`` (h),
plus, for bf16/fp16 parameters, ``mean``, an fp32 master copy of m (the parameter holds its rounding), so that
updates far below the parameter's resolution are not lost. The sample θ is still rounded to the parameter's
dtype, so σ should stay above its resolution for the Hessian estimate to be meaningful.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _get_value

GradReduction = Literal["mean", "sum"]

DEFAULT_SEED = 0
_EVAL_SEED_OFFSET = 0x1F0E  # the evaluation generator is seeded with seed + this


def _state_dtype(param: Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


class IVON(Optimizer):
    """Improved Variational Online Newton; see the module docstring for the algorithm and the sampling protocol.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: learning rate α (the param group's current value is used, so LR schedulers work).
        ess: effective sample size λ (≈ training-set size; the posterior temperature is 1/λ per example).
        hess_init: initial h0 of the diagonal Hessian estimate.
        beta1: momentum of ḡ.  beta2: decay of h.
        weight_decay: δ, the prior precision divided by λ.
        mc_samples: samples per ``step(closure)`` (the closure is called this many times).
        hess_approx: only ``"price"`` (accepted for signature compatibility with ``ivon-opt``).
        clip_radius: elementwise clip of the preconditioned update.
        sync: average ĝ and ĥ over torch.distributed ranks at ``step()`` (see the module docstring).
        debias: divide ḡ by 1 − β1^t.
        rescale_lr: use α' = α (h0 + δ) instead of α.
        grad_reduction: ``"mean"`` or ``"sum"`` over the samples folded into one step (module docstring).
        seed: seed of the noise generators; the same on every rank.
        foreach: the update multi-tensor (``torch._foreach_*``, the default: fewer passes, one dispatch per op)
            or one tensor at a time (``False``: the same numbers, the temporaries of one tensor at a time). Sampling
            and the Hessian estimate are multi-tensor either way.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        ess: float,
        hess_init: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        weight_decay: float = 1e-4,
        mc_samples: int = 1,
        hess_approx: str = "price",
        clip_radius: float = float("inf"),
        sync: bool = False,
        debias: bool = True,
        rescale_lr: bool = True,
        *,
        grad_reduction: GradReduction = "mean",
        seed: int = DEFAULT_SEED,
        foreach: bool | None = None,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: lr={lr} (must be >= 0)")
        if not 0.0 < ess:
            raise ValueError(f"Invalid effective sample size: ess={ess} (must be > 0)")
        if not 0.0 < hess_init:
            raise ValueError(f"Invalid Hessian initialisation: hess_init={hess_init} (must be > 0)")
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta1={beta1} (must be in [0, 1))")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta2={beta2} (must be in [0, 1))")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay={weight_decay} (must be >= 0)")
        if not (isinstance(mc_samples, int) and mc_samples >= 1):
            raise ValueError(f"Invalid number of MC samples: mc_samples={mc_samples} (must be an integer >= 1)")
        if not 0.0 < clip_radius:
            raise ValueError(f"Invalid clip_radius={clip_radius} (must be > 0)")
        if hess_approx != "price":
            raise ValueError(f"Invalid hess_approx={hess_approx!r}: only 'price' is implemented")
        if grad_reduction not in ("mean", "sum"):
            raise ValueError(f"Invalid grad_reduction={grad_reduction!r} (must be 'mean' or 'sum')")

        defaults = dict(
            lr=lr,
            ess=ess,
            hess_init=hess_init,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            mc_samples=mc_samples,
            clip_radius=clip_radius,
            debias=debias,
            rescale_lr=rescale_lr,
            foreach=foreach,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if not p.is_floating_point():
                    raise ValueError(f"IVON needs floating-point parameters, got one of dtype {p.dtype}")

        self.mc_samples = mc_samples
        self.sync = sync
        self.grad_reduction: GradReduction = grad_reduction
        self.generator = torch.Generator().manual_seed(seed)
        self.eval_generator = torch.Generator().manual_seed(seed + _EVAL_SEED_OFFSET)
        self._pending = False  # a training sample whose gradient has not been read yet
        self._num_samples = 0  # training samples drawn since the last step (folded or pending)
        self._sampling: dict[Tensor, Tensor] | None = None  # inside sampled_params: saved means of fp32/fp64 params

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("debias", True)
            group.setdefault("rescale_lr", True)
            group.setdefault("foreach", None)

    # ---------------------------------------------------------------- posterior

    @property
    def num_mc_samples(self) -> int:
        """Training samples drawn since the last ``step()``, folded ones plus a pending one."""
        return self._num_samples

    def posterior_mean(self, param: Tensor) -> Tensor:
        """m for ``param`` (matched by identity), a fresh fp32 tensor (fp64 for fp64 params)."""
        self._group_of(param)
        state = self.state.get(param, {})
        if "mean" in state:
            return state["mean"].clone()
        mean = self._sampling.get(param, param) if self._sampling is not None else param
        return mean.detach().to(_state_dtype(param), copy=True)

    def posterior_std(self, param: Tensor) -> Tensor:
        """σ = 1 / sqrt(ess (h + δ)) for ``param`` (matched by identity), in the state dtype."""
        group = self._group_of(param)
        state = self.state.get(param, {})
        if "hess" in state:
            hess = state["hess"]
        else:
            hess = torch.full_like(param, group["hess_init"], dtype=_state_dtype(param))
        return (hess + group["weight_decay"]).mul_(group["ess"]).rsqrt_()

    @torch.no_grad()
    def set_posterior_mean(self, param: Tensor, mean: Tensor) -> None:
        """Overwrite m for ``param`` (matched by identity): the parameter and its fp32 copy, if it has one.

        For edits between steps, such as AdaLoRA's pruning, which must survive the next update.
        """
        if self._sampling is not None:
            raise RuntimeError("IVON.set_posterior_mean() cannot be called inside sampled_params()")
        self._group_of(param)
        state = self.state.get(param, {})
        if "mean" in state:
            state["mean"].copy_(mean)
        param.copy_(mean)

    def posterior(self) -> dict[Tensor, tuple[Tensor, Tensor]]:
        """{param: (mean, std)} for every parameter, keyed by the parameter object."""
        return {p: (self.posterior_mean(p), self.posterior_std(p)) for g in self.param_groups for p in g["params"]}

    def _group_of(self, param: Tensor) -> dict:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise KeyError("this tensor is not a parameter of the optimizer")

    # ---------------------------------------------------------------- sampling

    @contextmanager
    def sampled_params(self, train: bool = False, generator: torch.Generator | None = None) -> Iterator[None]:
        """Put θ = m + σ ⊙ ε into the parameters for the body of the ``with``, then restore m exactly.

        ``train=True``: a pending sample first is folded in (as ``accumulate()``); ε is drawn from
        ``self.generator`` and kept until the sample's gradient is read (module docstring). Run forward and
        backward inside. ``train=False``: a draw for evaluation, from ``self.eval_generator``; nothing is kept.
        ``generator`` overrides the generator. If the body raises, the mean is restored and the sample dropped.
        """
        if self._sampling is not None:
            raise RuntimeError("IVON.sampled_params() contexts cannot be nested")
        if train and self._pending:
            self._fold(clear_grads=True)
        if generator is None:
            generator = self.generator if train else self.eval_generator
        self._perturb(train, generator)
        try:
            yield
        except BaseException:
            if train:
                self._drop_noise()
            raise
        else:
            if train:
                self._pending = True
                self._num_samples += 1
        finally:
            self._restore_means()

    def _draw_noise(self, params: list[Tensor], generator: torch.Generator) -> list[Tensor]:
        """ε ~ N(0, I) for the parameters of a group: one fp32 draw over the flattened group (as the reference),
        on the generator's device, split into one view per parameter in order."""
        flat = torch.randn(sum(p.numel() for p in params), generator=generator, device=generator.device)
        return [chunk.view(p.shape) for chunk, p in zip(flat.split([p.numel() for p in params]), params)]

    @torch.no_grad()
    def _perturb(self, train: bool, generator: torch.Generator) -> None:
        saved: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            params = group["params"]
            states = [self._state(p, group) for p in params]
            draws = self._draw_noise(params, generator)
            epsilons = [eps.to(device=p.device, dtype=state["hess"].dtype) for p, eps, state in zip(params, draws, states, strict=True)]
            inverse_std = _inverse_std([state["hess"] for state in states], group)
            noises = torch._foreach_div(epsilons, inverse_std)  # σ ⊙ ε
            mastered = [i for i, state in enumerate(states) if "mean" in state]
            plain = [i for i, state in enumerate(states) if "mean" not in state]
            if mastered:
                sampled = torch._foreach_add([states[i]["mean"] for i in mastered], [noises[i] for i in mastered])
                torch._foreach_copy_([params[i] for i in mastered], sampled)
            if plain:
                plain_params = [params[i] for i in plain]
                saved.update(zip(plain_params, torch._foreach_mul(plain_params, 1.0)))  # exact copies of m
                torch._foreach_add_(plain_params, [noises[i] for i in plain])
            if train:  # ĥ = g ⊙ ε / σ needs ε / σ: h does not move before the step that reads it
                for state, scaled in zip(states, torch._foreach_mul(epsilons, inverse_std)):
                    state["scaled_noise"] = scaled
        self._sampling = saved

    @torch.no_grad()
    def _restore_means(self) -> None:
        assert self._sampling is not None
        params = [p for group in self.param_groups for p in group["params"]]
        means = [self.state[p]["mean"] if "mean" in self.state[p] else self._sampling[p] for p in params]
        if params:
            torch._foreach_copy_(params, means)
        self._sampling = None

    def _drop_noise(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].pop("scaled_noise", None)

    def _state(self, p: Tensor, group: dict) -> dict:
        """The parameter's state, created on first use."""
        state = self.state[p]
        if len(state) == 0:
            dtype = _state_dtype(p)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["momentum"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["hess"] = torch.full_like(p, group["hess_init"], dtype=dtype, memory_format=torch.preserve_format)
            if dtype != p.dtype:
                state["mean"] = p.detach().to(dtype, copy=True)
        return state

    # ---------------------------------------------------------------- gradients

    @torch.no_grad()
    def accumulate(self, set_to_none: bool = True) -> None:
        """Fold the current gradients in as the pending sample's, then clear them (set to None, or zero).

        Call after each sample's backward when several samples make one step, e.g. after every
        gradient-accumulation micro-batch but the last (the last may also be left to ``step()``).
        """
        if self._sampling is not None:
            raise RuntimeError("IVON.accumulate() must be called after the sampled_params() context has exited")
        if not self._pending:
            raise RuntimeError(
                "IVON.accumulate(): no pending training sample; run the backward inside sampled_params(train=True)"
            )
        self._fold(clear_grads=True, set_to_none=set_to_none)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Fold a pending sample's gradients in first (see the module docstring), then zero the gradients."""
        if self._pending:
            self._fold(clear_grads=False)
        super().zero_grad(set_to_none=set_to_none)

    def _pending_samples(self, group: dict, copy: bool) -> tuple[list[Tensor], list[dict], list[Tensor], list[Tensor]]:
        """(params, states, g, ĥ = g ⊙ ε / σ) of the group's parameters whose pending sample has a gradient, the
        ε / σ taken out of the state; g in the state dtype (a copy with `copy`, else possibly p.grad itself)."""
        params, states, grads, noises = [], [], [], []
        for p in group["params"]:
            state = self.state[p]
            noise = state.pop("scaled_noise", None)
            if noise is not None and p.grad is not None:
                params.append(p)
                states.append(state)
                grads.append(p.grad.to(noise.dtype, copy=copy))
                noises.append(noise)
        return params, states, grads, torch._foreach_mul(grads, noises) if params else []

    @torch.no_grad()
    def _fold(self, clear_grads: bool, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for state, grad, price in zip(*self._pending_samples(group, copy=True)[1:]):
                if "grad_sum" in state:
                    state["grad_sum"].add_(grad)
                    state["price_sum"].add_(price)
                    state["num_samples"] += 1
                else:
                    state["grad_sum"], state["price_sum"], state["num_samples"] = grad, price, 1
            if clear_grads:
                for p in group["params"]:
                    if p.grad is not None:
                        if set_to_none:
                            p.grad = None
                        else:
                            p.grad.zero_()
        self._pending = False

    def _estimates(self, group: dict) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(param, ĝ, ĥ) for this step from the folded samples and a pending one, for each parameter of the group
        that has a gradient, in group order."""
        pending: dict[Tensor, tuple[Tensor, Tensor]] = {}
        if self._pending:
            params, _, grads, prices = self._pending_samples(group, copy=False)  # g read only: may alias p.grad
            pending = dict(zip(params, zip(grads, prices)))
        estimates = []
        for p in group["params"]:
            state = self.state[p]
            if "grad_sum" not in state:
                if p in pending:
                    estimates.append((p, *pending[p]))
                continue
            grad_sum, price_sum, count = state.pop("grad_sum"), state.pop("price_sum"), state.pop("num_samples")
            if p in pending:
                grad_sum.add_(pending[p][0])
                price_sum.add_(pending[p][1])
                count += 1
            if self.grad_reduction == "mean" and count > 1:
                grad_sum.div_(count)
                price_sum.div_(count)
            estimates.append((p, grad_sum, price_sum))
        return estimates

    # ---------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One IVON update from the samples drawn since the last step (module docstring).

        With a closure, the closure is called ``mc_samples`` times and must itself run forward and backward
        inside ``sampled_params(train=True)``; the mean of its losses is returned.
        """
        if self._sampling is not None:
            raise RuntimeError("IVON.step() cannot be called inside sampled_params()")
        loss = None
        if closure is not None:
            losses = []
            for _ in range(self.mc_samples):
                with torch.enable_grad():
                    losses.append(closure())
            loss = sum(losses) / len(losses)
        if self._num_samples == 0:
            raise RuntimeError(
                "IVON.step() without a training sample: compute the loss and backward inside "
                "`with optimizer.sampled_params(train=True):`"
            )

        for group in self.param_groups:
            params, means, grads, prices, momenta, hesses, steps = [], [], [], [], [], [], []
            for p, grad, price in self._estimates(group):
                state = self.state[p]
                params.append(p)
                means.append(state.get("mean", p))
                grads.append(grad)
                prices.append(price)
                momenta.append(state["momentum"])
                hesses.append(state["hess"])
                steps.append(state["step"])
            if not params:
                continue
            if self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                grads, prices = _all_reduce_mean(grads), _all_reduce_mean(prices)
            foreach = group["foreach"] is not False  # measured faster on CPU too (README, Benchmarks)
            lr = _get_value(group["lr"])
            ivon_update(
                means,
                grads,
                prices,
                momenta,
                hesses,
                steps,
                lr=lr * (group["hess_init"] + group["weight_decay"]) if group["rescale_lr"] else lr,
                beta1=group["beta1"],
                beta2=group["beta2"],
                weight_decay=group["weight_decay"],
                clip_radius=group["clip_radius"],
                debias=group["debias"],
                foreach=foreach,
            )
            for p, mean in zip(params, means):
                if mean is not p:
                    p.copy_(mean)

        self._pending = False
        self._num_samples = 0
        return loss

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """torch's state dict plus the two generator states and the sampling bookkeeping."""
        if self._sampling is not None:
            raise RuntimeError("IVON.state_dict() inside sampled_params(): the parameters hold a sample, not the mean")
        state_dict = super().state_dict()
        state_dict["ivon"] = {
            "generator": self.generator.get_state(),
            "eval_generator": self.eval_generator.get_state(),
            "pending": self._pending,
            "num_samples": self._num_samples,
        }
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loading, then the state dtypes restored (torch casts them to the parameter's) and the RNG."""
        super().load_state_dict(state_dict)
        saved_ids = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value) and key != "step" and self.state[p][key].dtype != value.dtype:
                    self.state[p][key] = value.to(device=p.device, copy=True)
        extra = state_dict.get("ivon")
        if extra is not None:
            self.generator.set_state(extra["generator"].cpu())
            self.eval_generator.set_state(extra["eval_generator"].cpu())
            self._pending = bool(extra["pending"])
            self._num_samples = int(extra["num_samples"])


def _inverse_std(hesses: list[Tensor], group: dict) -> list[Tensor]:
    """1/σ = sqrt(ess (h + δ)) per tensor, multi-tensor."""
    inverse = torch._foreach_add(hesses, group["weight_decay"]) if group["weight_decay"] else torch._foreach_mul(hesses, 1.0)
    torch._foreach_mul_(inverse, group["ess"])
    torch._foreach_sqrt_(inverse)
    return inverse


def _all_reduce_mean(tensors: list[Tensor]) -> list[Tensor]:
    world_size = dist.get_world_size()
    out = []
    for tensor in tensors:
        tensor = tensor.clone()  # the single-sample estimate may alias p.grad
        dist.all_reduce(tensor)
        out.append(tensor.div_(world_size))
    return out


def ivon_update(
    means: list[Tensor],
    grads: list[Tensor],
    prices: list[Tensor],
    momenta: list[Tensor],
    hesses: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    clip_radius: float,
    debias: bool,
    foreach: bool,
) -> None:
    """The IVON update in place, given ĝ (``grads``) and ĥ (``prices``); ``lr`` is α' (already rescaled)."""
    update = _multi_tensor_ivon if foreach else _single_tensor_ivon
    update(
        means,
        grads,
        prices,
        momenta,
        hesses,
        steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        clip_radius=clip_radius,
        debias=debias,
    )


def _single_tensor_ivon(
    means, grads, prices, momenta, hesses, steps, *, lr, beta1, beta2, weight_decay, clip_radius, debias
):
    """One tensor at a time: the multi-tensor update on single-tensor lists (the same numbers bit for bit, with the
    temporaries of one tensor alive at a time rather than of all)."""
    for tensors in zip(means, grads, prices, momenta, hesses, steps, strict=True):
        _multi_tensor_ivon(
            *([t] for t in tensors), lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
            clip_radius=clip_radius, debias=debias,
        )  # fmt: skip


def _multi_tensor_ivon(
    means, grads, prices, momenta, hesses, steps, *, lr, beta1, beta2, weight_decay, clip_radius, debias
):
    """In as few passes over the state as the algebra allows (each pass reads and writes every tensor):
    ḡ by lerp; h ← h − (1 − β2)(h − ĥ) + ½(1 − β2)² (h − ĥ)² / (h + δ); and the bias 1 − β1^t folded into the
    clip radius and the step size, clip(ḡ / (b (h + δ)) + …, ±c) = clip((ḡ + b δ m) / (h + δ), ±c b) / b."""
    keep_positive = 0.5 * (1.0 - beta2) ** 2
    grouped = Optimizer._group_tensors_by_device_and_dtype([means, grads, prices, momenta, hesses, steps])
    for (means_, grads_, prices_, momenta_, hesses_, steps_), _ in grouped.values():
        for step in steps_:  # CPU scalars
            step += 1
        torch._foreach_lerp_(momenta_, grads_, 1.0 - beta1)
        gaps = torch._foreach_sub(hesses_, prices_)
        squares = torch._foreach_mul(gaps, gaps)
        torch._foreach_div_(squares, torch._foreach_add(hesses_, weight_decay) if weight_decay else hesses_)
        torch._foreach_add_(hesses_, gaps, alpha=-(1.0 - beta2))
        torch._foreach_add_(hesses_, squares, alpha=keep_positive)
        by_bias: dict[float, list[int]] = {}
        for i, step in enumerate(steps_):
            by_bias.setdefault(1.0 - beta1 ** _get_value(step) if debias else 1.0, []).append(i)
        for bias, indices in by_bias.items():
            momenta_b, means_b, hesses_b = ([ts[i] for i in indices] for ts in (momenta_, means_, hesses_))
            if weight_decay:
                directions = torch._foreach_add(momenta_b, means_b, alpha=bias * weight_decay)
                torch._foreach_div_(directions, torch._foreach_add(hesses_b, weight_decay))
            else:
                directions = torch._foreach_div(momenta_b, hesses_b)
            if math.isfinite(clip_radius):
                torch._foreach_clamp_min_(directions, -clip_radius * bias)
                torch._foreach_clamp_max_(directions, clip_radius * bias)
            torch._foreach_add_(means_b, directions, alpha=-lr / bias)
