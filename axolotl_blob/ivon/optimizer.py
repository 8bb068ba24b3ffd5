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

Sharded parameters (FSDP2)
--------------------------
With parameters that are DTensors (``fully_shard``), the state, ĝ and ĥ live on each rank's local shard and every
operation above runs on the elements the rank holds: ``sampled_params`` writes θ = m + σ ⊙ ε into the local shards
(FSDP2's forward all-gathers them, so every rank computes with the same full sample) and puts m back on exit; the
gradient that FSDP2 reduce-scatters into ``p.grad`` is already averaged over the ranks for the elements the rank
owns, and ε is the owner's, so g ⊙ ε / σ is exact elementwise and ``sync`` is not needed (it is ignored for sharded
parameters). Each element must be drawn once per sample, by its owner: ``noise`` chooses how (``shard_noise``
module: rank streams seeded by the draw count, or one full-size stream sliced). State entries are DTensors placed as
their parameters, so ``torch.distributed.checkpoint`` saves them sharded or gathered, and ``set_optimizer_state_dict``
loads either. Each sample's gradient must reach the shards before the next sample is drawn: under gradient
accumulation, keep FSDP2's gradient sync on for every micro-batch (``ivon.trainer.ivon_micro_batch`` does).

State is fp32 whatever the parameter dtype (fp64 for fp64 parameters): ``step``, ``momentum`` (ḡ), ``hess`` (h),
plus, for bf16/fp16 parameters, ``mean``, an fp32 master copy of m (the parameter holds its rounding), so that
updates far below the parameter's resolution are not lost. The sample θ is still rounded to the parameter's
dtype, so σ should stay above its resolution for the Hessian estimate to be meaningful.

Layout: each entry ``state[p][key]`` is a tensor of ``p``'s shape (a 0-dim one for ``step``), as in torch's
optimizers, but the entries of the parameters of a group that share device and dtype are views of one flat buffer
per key (``flat.FlatBucket``). Sampling, folding and the update then run each operation once over the buffer rather
than once per parameter, as the reference's flat vectors do, while ``state_dict()`` stays per parameter. An entry
replaced by a tensor of its own (or loaded) is taken into a new buffer when next used.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import Optimizer, ParamsT, _get_value

from axolotl_blob.ivon.flat import FlatBucket, buckets_of, like_param, local_tensor
from axolotl_blob.ivon.shard_noise import NOISE_LAYOUTS, NoiseLayout, local_part, shard_coordinates, stream_seed

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
        sync: average ĝ and ĥ of unsharded parameters over torch.distributed ranks at ``step()`` (module docstring).
        debias: divide ḡ by 1 − β1^t.
        rescale_lr: use α' = α (h0 + δ) instead of α.
        grad_reduction: ``"mean"`` or ``"sum"`` over the samples folded into one step (module docstring).
        seed: seed of the noise generators; the same on every rank.
        noise: how the ranks draw ε for sharded (DTensor) parameters: ``"shard"``, each rank its own elements from
            its own stream, or ``"global"``, every rank the full ε from one stream, keeping its part (module
            ``shard_noise``). Unsharded parameters always draw the full ε from the optimizer's generator.
        foreach: the update once over each flat state buffer (the default; per parameter, multi-tensor, for a
            step where some parameters have no gradient) or one tensor at a time (``False``: the same numbers, the
            temporaries of one tensor at a time). Sampling and the Hessian estimate run over the flat buffers either
            way.
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
        noise: NoiseLayout = "shard",
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
        if noise not in NOISE_LAYOUTS:
            raise ValueError(f"Invalid noise={noise!r} (must be one of {NOISE_LAYOUTS})")

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
            noise_seed=seed,  # with the draw counts, what a sharded group's noise streams are seeded from
            noise_draws=0,
            eval_noise_draws=0,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if not p.is_floating_point():
                    raise ValueError(f"IVON needs floating-point parameters, got one of dtype {p.dtype}")

        self.mc_samples = mc_samples
        self.sync = sync
        self.grad_reduction: GradReduction = grad_reduction
        self.seed, self.noise = seed, noise
        self.generator = torch.Generator().manual_seed(seed)
        self.eval_generator = torch.Generator().manual_seed(seed + _EVAL_SEED_OFFSET)
        self._pending = False  # a training sample whose gradient has not been read yet
        self._num_samples = 0  # training samples drawn since the last step (folded or pending)
        self._sampling: dict[Tensor, Tensor] | None = None  # inside sampled_params: saved means of fp32/fp64 params
        self._bucket_cache: dict[int, tuple[list[Tensor], list[FlatBucket]]] = {}  # id(group) -> its buckets

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("debias", True)
            group.setdefault("rescale_lr", True)
            group.setdefault("foreach", None)
        self.__dict__.setdefault("_bucket_cache", {})
        self.__dict__.setdefault("noise", "shard")

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
        saved = self._sampling.get(param) if self._sampling is not None else None
        mean = param if saved is None else like_param(param, saved)
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

    def _draw_noise(self, params: list[Tensor], generator: torch.Generator) -> Tensor:
        """ε ~ N(0, I) for the parameters of a group: one fp32 draw over the flattened group (as the reference),
        on the generator's device."""
        return torch.randn(sum(p.numel() for p in params), generator=generator, device=generator.device)

    def _group_noise(self, index: int, group: dict, train: bool, generator: torch.Generator | None) -> Tensor:
        """ε for the elements of the group this rank holds, flattened in group order (``generator``, when given,
        replaces the stream). Sharded groups: the ``noise`` layout (module docstring). The draw counts and the seed
        are group settings (in ``defaults``), so that every kind of checkpoint carries them:
        ``torch.distributed.checkpoint`` loads only the keys a fresh optimizer already has."""
        params = group["params"]
        sharded = [isinstance(p, DTensor) for p in params]
        if any(sharded) and not all(sharded):
            raise ValueError(
                "IVON: a param group mixes sharded (DTensor) and unsharded parameters; under FSDP2 shard every "
                "trained module (fully_shard on the root covers the rest), or give them separate groups"
            )
        count_key = "noise_draws" if train else "eval_noise_draws"
        draws = group.get(count_key, 0)
        group[count_key] = draws + 1
        shared = generator or (self.generator if train else self.eval_generator)
        if not any(sharded):
            return self._draw_noise(params, shared)
        if self.noise == "global":
            return local_part(self._draw_noise(params, shared), params)
        if generator is None:
            seed = stream_seed(group.get("noise_seed", self.seed), train, index, draws, *shard_coordinates(params))
            generator = torch.Generator().manual_seed(seed)
        return torch.randn(sum(local_tensor(p).numel() for p in params), generator=generator, device=generator.device)

    def _buckets(self, group: dict) -> list[FlatBucket]:
        """The group's parameters by (device, dtype, sharded), built once per group (again if its parameter list
        changed: accelerate swaps in FSDP2's sharded parameters after the optimizer is built)."""
        params = group["params"]
        cached = self._bucket_cache.get(id(group))
        if cached is None or len(cached[0]) != len(params) or not all(map(operator.is_, cached[0], params)):
            cached = (list(params), buckets_of(params, scalar_keys=("step",)))
            self._bucket_cache[id(group)] = cached
        return cached[1]

    @torch.no_grad()
    def _perturb(self, train: bool, generator: torch.Generator | None) -> None:
        saved: dict[Tensor, Tensor] = {}
        for index, group in enumerate(self.param_groups):
            epsilon = self._group_noise(index, group, train, generator)
            for bucket in self._buckets(group):
                self._ensure_state(bucket, group)
                eps = bucket.take(epsilon).to(device=bucket.device, dtype=_state_dtype(bucket.params[0]))
                inverse_std = _inverse_std(bucket.buffer(self.state, "hess"), group)
                mean = bucket.buffer(self.state, "mean")
                if mean is None:  # the parameters hold m: keep an exact copy to restore
                    mean = bucket.flatten(bucket.params)
                    saved.update(zip(bucket.params, bucket.views(mean)))
                torch._foreach_copy_(bucket.locals(), bucket.views(mean + eps / inverse_std))  # θ = m + σ ⊙ ε
                if train:  # ĥ = g ⊙ ε / σ needs ε / σ: h does not move before the step that reads it
                    bucket.assign(self.state, "scaled_noise", eps * inverse_std)
        self._sampling = saved

    @torch.no_grad()
    def _restore_means(self) -> None:
        assert self._sampling is not None
        params = [p for group in self.param_groups for p in group["params"]]
        means = [local_tensor(self.state[p]["mean"]) if "mean" in self.state[p] else self._sampling[p] for p in params]
        if params:
            torch._foreach_copy_([local_tensor(p) for p in params], means)
        self._sampling = None

    def _drop_noise(self) -> None:
        for group in self.param_groups:
            for bucket in self._buckets(group):
                bucket.pop(self.state, "scaled_noise")

    def _ensure_state(self, bucket: FlatBucket, group: dict) -> None:
        """The bucket's state, created on first use as views of one flat tensor per key (entries already set, e.g.
        a Hessian written into ``state[p]`` by hand, are kept)."""
        dtype = _state_dtype(bucket.params[0])
        initial = {  # from what the parameter holds on this rank
            "step": lambda local: torch.tensor(0.0, dtype=torch.float32),
            "momentum": lambda local: torch.zeros_like(local, dtype=dtype),
            "hess": lambda local: torch.full_like(local, group["hess_init"], dtype=dtype),
        }
        if dtype != bucket.dtype:
            initial["mean"] = lambda local: local.detach().to(dtype)
        for key, make in initial.items():
            entries = [self.state[p].get(key) for p in bucket.params]
            if all(entry is not None for entry in entries):
                continue
            filled = [entry if entry is not None else make(local) for entry, local in zip(entries, bucket.locals())]
            bucket.assign(self.state, key, bucket.flatten(filled))

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

    def _pending_sample(self, bucket: FlatBucket) -> tuple[Tensor, Tensor, list[bool]] | None:
        """(g, ĥ = g ⊙ ε / σ, which parameters have a gradient) of the bucket's pending sample, flat, g copied into
        the state dtype (zeros where a parameter has no gradient); its ε / σ taken out of the state."""
        noise = bucket.pop(self.state, "scaled_noise")
        grads = bucket.grads(noise.dtype) if noise is not None else None
        if grads is None:
            return None
        grad, present = grads
        return grad, grad * noise, present

    @torch.no_grad()
    def _fold(self, clear_grads: bool, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for bucket in self._buckets(group):
                sample = self._pending_sample(bucket)
                if sample is None:
                    continue
                grad, price, present = sample
                grad_sum = bucket.buffer(self.state, "grad_sum")
                if grad_sum is None:
                    bucket.assign(self.state, "grad_sum", grad)
                    bucket.assign(self.state, "price_sum", price)
                else:
                    grad_sum.add_(grad)
                    bucket.buffer(self.state, "price_sum").add_(price)
                for p, has_grad in zip(bucket.params, present):
                    self.state[p]["num_samples"] = self.state[p].get("num_samples", 0) + has_grad
            if clear_grads:
                for p in group["params"]:
                    if p.grad is not None:
                        if set_to_none:
                            p.grad = None
                        else:
                            p.grad.zero_()
        self._pending = False

    def _estimates(self, bucket: FlatBucket) -> tuple[Tensor, Tensor, list[int]] | None:
        """(ĝ, ĥ, samples per parameter) of this step, flat over the bucket, from the folded samples and a pending
        one; None if no parameter of the bucket had a gradient."""
        counts = [self.state[p].pop("num_samples", 0) for p in bucket.params]
        grad, price = bucket.pop(self.state, "grad_sum"), bucket.pop(self.state, "price_sum")
        sample = self._pending_sample(bucket) if self._pending else None
        if sample is not None:
            counts = [count + has_grad for count, has_grad in zip(counts, sample[2])]
            if grad is None:
                grad, price = sample[0], sample[1]
            else:
                grad.add_(sample[0])
                price.add_(sample[1])
        if grad is None:
            return None
        if self.grad_reduction == "mean":
            if len(set(counts)) == 1:
                if counts[0] > 1:
                    grad.div_(counts[0])
                    price.div_(counts[0])
            else:
                for grad_view, price_view, count in zip(bucket.views(grad), bucket.views(price), counts):
                    if count > 1:
                        grad_view.div_(count)
                        price_view.div_(count)
        return grad, price, counts

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
        if self._num_samples == 0 and not self.state and all(_get_value(g["lr"]) == 0 for g in self.param_groups):
            # torch.distributed.checkpoint's set_optimizer_state_dict creates a fresh optimizer's state this way
            # (zero gradients, lr 0) before loading into it: create the state, move nothing.
            for group in self.param_groups:
                for bucket in self._buckets(group):
                    self._ensure_state(bucket, group)
            return loss
        if self._num_samples == 0:
            raise RuntimeError(
                "IVON.step() without a training sample: compute the loss and backward inside "
                "`with optimizer.sampled_params(train=True):`"
            )

        for group in self.param_groups:
            lr = _get_value(group["lr"])
            settings = dict(
                lr=lr * (group["hess_init"] + group["weight_decay"]) if group["rescale_lr"] else lr,
                beta1=group["beta1"],
                beta2=group["beta2"],
                weight_decay=group["weight_decay"],
                clip_radius=group["clip_radius"],
            )
            for bucket in self._buckets(group):
                estimate = self._estimates(bucket)
                if estimate is not None:
                    self._update(bucket, *estimate, settings, debias=group["debias"], foreach=group["foreach"])

        self._pending = False
        self._num_samples = 0
        return loss

    def _update(
        self,
        bucket: FlatBucket,
        grad: Tensor,
        price: Tensor,
        counts: list[int],
        settings: dict,
        debias: bool,
        foreach: bool | None,
    ) -> None:
        """The update of one bucket: once over its flat state when every parameter moves and all are at the same
        step (the rule in training), else per parameter over the views of those that had a gradient."""
        replicated = not bucket.sharded  # a shard's gradient arrives reduce-scattered: it is already the mean
        if replicated and self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            grad, price = _all_reduce_mean([grad, price])
        steps, momentum, hess = (bucket.buffer(self.state, key) for key in ("step", "momentum", "hess"))
        master = bucket.buffer(self.state, "mean")
        mean = master if master is not None else bucket.flatten(bucket.params)
        if foreach is not False and all(counts) and bool((steps == steps[0]).all()):
            steps.add_(1.0)
            bias = 1.0 - settings["beta1"] ** steps[0].item() if debias else 1.0
            _ivon_kernel([mean], [grad], [price], [momentum], [hess], bias=bias, **settings)
        else:
            moving = [i for i, count in enumerate(counts) if count]
            views = [bucket.views(flat) for flat in (mean, grad, price, momentum, hess)]
            step_views = steps.unbind()
            ivon_update(
                *([tensors[i] for i in moving] for tensors in views),
                [step_views[i] for i in moving],
                debias=debias,
                foreach=foreach is not False,
                **settings,
            )
        torch._foreach_copy_(bucket.locals(), bucket.views(mean))

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


def _inverse_std(hess: Tensor, group: dict) -> Tensor:
    """1/σ = sqrt(ess (h + δ)), a new tensor."""
    return torch.add(hess, group["weight_decay"]).mul_(group["ess"]).sqrt_()


def _all_reduce_mean(tensors: list[Tensor]) -> list[Tensor]:
    world_size = dist.get_world_size()
    for tensor in tensors:  # the step's own flat estimates: reduced in place
        dist.all_reduce(tensor)
        tensor.div_(world_size)
    return tensors


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
    """The IVON update in place, given ĝ (``grads``) and ĥ (``prices``), one tensor per parameter; ``lr`` is α'
    (already rescaled); ``steps`` (0-dim tensors) are incremented. ``foreach``: multi-tensor, else one tensor at a
    time (the same numbers, the temporaries of one tensor alive at a time)."""
    by_bias: dict[float, list[int]] = {}
    for i, step in enumerate(steps):
        step += 1
        by_bias.setdefault(1.0 - beta1 ** _get_value(step) if debias else 1.0, []).append(i)
    settings = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, clip_radius=clip_radius)
    for bias, indices in by_bias.items():
        tensors = [[ts[i] for i in indices] for ts in (means, grads, prices, momenta, hesses)]
        if foreach:
            for same_device_and_dtype, _ in Optimizer._group_tensors_by_device_and_dtype(tensors).values():
                _ivon_kernel(*same_device_and_dtype, bias=bias, **settings)
        else:
            for one in zip(*tensors):
                _ivon_kernel(*([t] for t in one), bias=bias, **settings)


def _ivon_kernel(means, grads, prices, momenta, hesses, *, lr, beta1, beta2, weight_decay, clip_radius, bias):
    """The update of tensors at one step (``bias`` = 1 − β1^t, or 1 without debiasing), multi-tensor, in as few
    passes over the state as the algebra allows (each pass reads and writes every tensor): ḡ by lerp;
    h ← h − (1 − β2)(h − ĥ) + ½(1 − β2)² (h − ĥ)² / (h + δ); and the bias folded into the clip radius and the step
    size, clip(ḡ / (b (h + δ)) + …, ±c) = clip((ḡ + b δ m) / (h + δ), ±c b) / b."""
    torch._foreach_lerp_(momenta, grads, 1.0 - beta1)
    gaps = torch._foreach_sub(hesses, prices)
    squares = torch._foreach_mul(gaps, gaps)
    torch._foreach_div_(squares, torch._foreach_add(hesses, weight_decay) if weight_decay else hesses)
    torch._foreach_add_(hesses, gaps, alpha=-(1.0 - beta2))
    torch._foreach_add_(hesses, squares, alpha=0.5 * (1.0 - beta2) ** 2)
    if weight_decay:
        directions = torch._foreach_add(momenta, means, alpha=bias * weight_decay)
        torch._foreach_div_(directions, torch._foreach_add(hesses, weight_decay))
    else:
        directions = torch._foreach_div(momenta, hesses)
    if math.isfinite(clip_radius):
        torch._foreach_clamp_min_(directions, -clip_radius * bias)
        torch._foreach_clamp_max_(directions, clip_radius * bias)
    torch._foreach_add_(means, directions, alpha=-lr / bias)
