"""BLoB's posterior update as an optimizer over role-tagged parameter groups, wrapped around the user's optimizer.

The inner optimizer (whatever ``optimizer:`` chose: AdamW, Adafactor, 8-bit Adam, …) steps the NLL gradient of the
point-estimate parameters. Every parameter group carries at most one role (the ``role`` key):

- ``"mean"`` (M, LoRA's A): the inner optimizer steps its NLL gradient, then the KL pulls it towards the prior:
  M ← M − η_t π_t M/β²  (the KL recomputed at the new M, as the reference does).
- ``"sigma"`` (G, with σ = G²): ``sigma_update="reference"`` (the BLoB reference): G is in no group of the inner
  optimizer; one plain SGD step G ← G − η_t (∇_G NLL + π_t ∂KL/∂G) moves it. ``"optimizer"``: the inner optimizer
  steps ∇_G NLL at its own learning rate, then G ← G − η_t π_t ∂KL/∂G.
- no role (LoRA's B and anything else trainable): the inner optimizer alone.

η_t = ``kl_lr`` · lr_t / lr_0, the LR schedule's factor read off the group itself (the scheduler scales every group,
these included): lr_0 is the group's rate as the optimizer was built (``built_lr``), recorded before any scheduler
touches it — not the scheduler's ``initial_lr``, which OneCycleLR sets to max_lr/25 — and the σ group runs at
``learning_rate`` like the others, since a scheduler may write absolute rates (OneCycleLR, REX's floor). π_t is the
group's ``kl_weight``, written before each step by :func:`set_kl_weight`. The KL is a sum of a term in M and a term
in σ, so each update needs only its own tensor: it runs unchanged on whatever tensor a distributed engine hands the
optimizer (a flat partition of one group under ZeRO, a shard under FSDP2) as long as each group holds one role, which
is why the inner optimizer's groups are split by role. Plain SGD keeps no state: ``state_dict`` is the inner
optimizer's plus the hyperparameters of the σ group (its scheduled ``lr``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch.optim import Optimizer

from axolotl_blob.blob.kl import kl_grad_mean, kl_grad_std

SigmaUpdate = Literal["reference", "optimizer"]
MEAN, SIGMA = "mean", "sigma"


def split_by_role(groups: Sequence[dict], roles: dict[int, str]) -> list[dict]:
    """The same groups, each cut into one group per role (hyperparameters copied); `roles` maps id(param) → role."""
    split = []
    for group in groups:
        by_role: dict[str | None, list[torch.Tensor]] = {}
        for param in group["params"]:
            by_role.setdefault(roles.get(id(param)), []).append(param)
        for role, params in by_role.items():
            split.append({**group, "params": params, **({"role": role} if role else {})})
    return split


def schedule_factor(group: dict) -> float:
    """lr_t / lr_0 of a group (lr_0: its ``built_lr``): 1 before any scheduler has touched it, 0 for a group built
    at lr 0."""
    built = group["built_lr"]
    return group["lr"] / built if built > 0 else 0.0


def set_kl_weight(param_groups: Iterable[dict], weight: float) -> None:
    """Write π_t into every role group (through any wrapper that exposes the groups: accelerate, DeepSpeed)."""
    for group in param_groups:
        if group.get("role"):
            group["kl_weight"] = weight


@torch.no_grad()
def first_non_finite(param_groups: Iterable[dict]) -> tuple[str, torch.Tensor] | None:
    """(role, tensor) of the first posterior tensor holding a NaN or inf, or None: one reduction and one host sync
    over all role groups; the per-tensor search runs only once something is found."""
    tagged = [(group["role"], p) for group in param_groups if group.get("role") for p in group["params"] if p.numel()]
    if not tagged:
        return None
    norms = torch._foreach_norm([p for _, p in tagged], float("inf"))  # inf-norm: NaN and inf propagate
    if bool(torch.stack([n.float() for n in norms]).isfinite().all()):
        return None
    return next((role, p) for (role, p), n in zip(tagged, norms) if not n.isfinite())


class BlobOptimizer(Optimizer):
    """The inner optimizer for the NLL of M, B and the rest, plus BLoB's SGD for the posterior roles.

    Args:
        inner: the optimizer built over every trainable parameter but (with ``sigma_update="reference"``) the σ
            factors G. Its groups are split in place so that each holds one role; build it fresh (no state yet).
        means: the posterior means M (LoRA's A weights).
        sigmas: the σ factors G.
        kl_lr: η_0, the step size of the KL (and reference σ) update before the LR schedule's factor.
        prior_std: β of the N(0, β²) prior.
        sigma_update: ``"reference"`` or ``"optimizer"`` (see the module docstring).
    """

    def __init__(
        self,
        inner: Optimizer,
        means: Iterable[torch.Tensor],
        sigmas: Iterable[torch.Tensor],
        *,
        kl_lr: float,
        prior_std: float,
        sigma_update: SigmaUpdate = "reference",
    ):
        if kl_lr < 0:
            raise ValueError(f"Invalid kl_lr: {kl_lr}")
        if prior_std <= 0:
            raise ValueError(f"Invalid prior_std: {prior_std}")
        if sigma_update not in ("reference", "optimizer"):
            raise ValueError(f"Invalid sigma_update: {sigma_update!r} (expected 'reference' or 'optimizer')")
        if any(inner.state.values()):
            raise ValueError("BlobOptimizer needs a freshly built inner optimizer (its groups are split by role)")
        means, sigmas = [p for p in means if p.requires_grad], [p for p in sigmas if p.requires_grad]
        in_inner = {id(p) for group in inner.param_groups for p in group["params"]}
        if any(id(p) not in in_inner for p in means):
            raise ValueError("every posterior mean must be in the inner optimizer: it steps their NLL gradient")
        sigmas_inside = sum(id(p) in in_inner for p in sigmas)
        if sigma_update == "reference" and sigmas_inside:
            raise ValueError(f"sigma_update='reference': {sigmas_inside} σ factors are in the inner optimizer; build it without them")
        if sigma_update == "optimizer" and sigmas_inside != len(sigmas):
            raise ValueError("sigma_update='optimizer': every σ factor must be in the inner optimizer")

        self.inner = inner
        self.sigma_update = sigma_update
        blob_keys = {"kl_lr": kl_lr, "prior_std": prior_std, "kl_weight": 0.0}
        roles = {**{id(p): MEAN for p in means}, **{id(p): SIGMA for p in sigmas}}
        inner.param_groups[:] = [
            {**group, **blob_keys, "built_lr": group["lr"]} if group.get("role") else group
            for group in split_by_role(inner.param_groups, roles)
        ]
        # lr: the configured learning_rate (the Trainer builds every optimizer with it as the default), scheduled as
        # every other group's; weight_decay: the σ step has none, and Axolotl ≥ 0.20 reads every group's on resume;
        # the inner defaults fill the rest (betas, …), which a scheduler may write into every group (OneCycleLR)
        lr = inner.defaults["lr"]
        own = [{"params": sigmas, "role": SIGMA, "lr": lr, "built_lr": lr, "weight_decay": 0.0, **blob_keys}] if sigma_update == "reference" and sigmas else []
        super().__init__([*inner.param_groups, *own], defaults=inner.defaults)
        self.state = inner.state  # one state for every group: engines read optimizer.state[param] directly
        self._own_groups = own

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.inner.step(closure)
        for group in self.param_groups:
            if group.get("role") is None:
                continue
            rate = group["kl_lr"] * schedule_factor(group)
            with_likelihood = any(group is own for own in self._own_groups)
            for param in group["params"]:
                direction = _direction(group, param, with_likelihood)
                if rate and direction is not None:
                    param.sub_((rate * direction).to(param.dtype))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        for group in self._own_groups:
            for param in group["params"]:
                if param.grad is not None:
                    if set_to_none:
                        param.grad = None
                    else:
                        param.grad.detach_().zero_()

    def state_dict(self) -> dict[str, Any]:
        """Empty entries go first: an engine that reads ``optimizer.state[p]`` for a σ factor the inner optimizer
        does not hold (DeepSpeed ZeRO links every group's state) creates one, which the inner state_dict rejects."""
        for param in [param for param, state in self.inner.state.items() if not state]:
            del self.inner.state[param]
        return {"inner": self.inner.state_dict(), "own_groups": [_hyperparameters(g) for g in self._own_groups]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["own_groups"]
        if len(saved) != len(self._own_groups):
            raise ValueError(f"the saved BLoB optimizer has {len(saved)} σ groups, this one {len(self._own_groups)}")
        if any("built_lr" not in hyperparameters for hyperparameters in saved):
            raise ValueError(
                "this checkpoint's BLoB optimizer predates the σ group's schedule at learning_rate (its lr was kl_lr-"
                "based): it cannot be resumed exactly; start a new run from its adapter (lora_model_dir) instead"
            )
        built = [group.get("built_lr") for group in self.inner.param_groups]
        self.inner.load_state_dict(state_dict["inner"])  # may replace the inner groups and state by new objects
        for group, built_lr in zip(self.inner.param_groups, built):
            if built_lr is not None:
                group["built_lr"] = built_lr  # this run's, recorded before its scheduler touched the group
        for group, hyperparameters in zip(self._own_groups, saved):
            group.update(hyperparameters)
        self.param_groups = [*self.inner.param_groups, *self._own_groups]
        self.state = self.inner.state


def _direction(group: dict, param: torch.Tensor, with_likelihood: bool) -> torch.Tensor | None:
    """The SGD direction of one posterior tensor: π_t·∂KL (plus the accumulated NLL gradient for the σ group the
    wrapper steps alone), in fp32; None when there is nothing to do."""
    weight, prior_std = group["kl_weight"], group["prior_std"]
    if group["role"] == MEAN:
        return weight * kl_grad_mean(param, prior_std) if weight else None
    direction = None
    if weight:
        g = param.float()
        direction = weight * kl_grad_std(g.square(), prior_std) * 2.0 * g  # σ = G² (layer.posterior_std): ∂σ/∂G = 2G
    if with_likelihood and param.grad is not None:
        direction = param.grad.float() if direction is None else direction + param.grad.float()
    return direction


def _hyperparameters(group: dict) -> dict:
    return {key: value for key, value in group.items() if key != "params"}
