"""IVON optimizer: hand-computed update, the reference package, conjugate Bayesian linear regression, checkpoints,
dtypes, the foreach path, and the sampling protocol (when a sample's gradient is read)."""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from axolotl_blob.ivon import IVON


def fixed_noise(*values):
    """A `_draw_noise` replacement returning the given ε (one tensor per parameter) flattened, call after call."""
    draws = iter(values)

    def draw(params, generator):
        return torch.cat([torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in next(draws)])

    return draw


def global_rng_noise(params, generator):
    """ε as the reference draws it: one torch.randn over the flattened group, from torch's global RNG."""
    return torch.randn(sum(p.numel() for p in params))


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(n)]


def train_step(model, optimizer, x, y, samples: int = 1):
    """The reference loop: each sample inside its own context, zero_grad inside, one step."""
    for _ in range(samples):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]


# ------------------------------------------------------------------------------------------------- 1. formulas


def test_one_update_matches_hand_computed_numbers():
    """m = [1, −2], loss ½ Σ a θ² with a = [1, 2], ε = [2, −2], λ = 4, h0 = 0.75, δ = 0.25, β1 = β2 = ½, α = ½.

    σ = 1/sqrt(4 (0.75 + 0.25)) = ½;  θ = m + σε = [2, −3];  g = aθ = [2, −6];  ĥ = gε/σ = [8, 24].
    ḡ = ½ g = [1, −3];  h = ½·0.75 + ½ĥ + ⅛ (0.75 − ĥ)² / 1 = [10.9453125, 79.9453125].
    direction = (ḡ/(1 − ½) + δm) / (h + δ) = [2.25 / 11.1953125, −6.5 / 80.1953125], the first clipped to 0.1;
    α' = α (h0 + δ) = ½, so m = [1 − 0.05, −2 + ½ · 6.5 / 80.1953125].
    """
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    a = torch.tensor([1.0, 2.0])
    opt = IVON([w], lr=0.5, ess=4.0, hess_init=0.75, beta1=0.5, beta2=0.5, weight_decay=0.25, clip_radius=0.1)
    opt._draw_noise = fixed_noise([[2.0, -2.0]])
    with opt.sampled_params(train=True):
        assert w.tolist() == [2.0, -3.0]
        (0.5 * a * w * w).sum().backward()
    assert w.tolist() == [1.0, -2.0]  # the mean is back before the step
    opt.step()

    state = opt.state[w]
    assert state["step"].item() == 1
    assert state["momentum"].tolist() == [1.0, -3.0]
    assert state["hess"].tolist() == [10.9453125, 79.9453125]
    assert w.tolist() == pytest.approx([0.95, -2.0 + 0.5 * 6.5 / 80.1953125], rel=1e-6)
    expected_std = [1 / math.sqrt(4 * (10.9453125 + 0.25)), 1 / math.sqrt(4 * (79.9453125 + 0.25))]
    assert opt.posterior_std(w).tolist() == pytest.approx(expected_std, rel=1e-6)
    assert opt.posterior_mean(w).tolist() == w.tolist()
    assert w.grad.tolist() == [2.0, -6.0]  # step() reads p.grad and leaves it to the training loop


# ------------------------------------------------------------------------------------------------- 2. reference


@pytest.mark.parametrize("samples", [1, 3])
def test_matches_the_reference_package_given_the_same_noise(samples):
    """ivon-opt draws ε with torch.randn over each flattened group; ours draws from `_draw_noise`, replaced here by
    the same draw from torch's global RNG. The same loop (ivon-opt's README loop) drives both."""
    reference = pytest.importorskip("ivon")
    kwargs = dict(lr=0.05, ess=50.0, hess_init=0.5, beta2=0.99, weight_decay=1e-2, clip_radius=0.3, mc_samples=samples)
    data = batches(6)
    runs = {}
    for name, cls in (("reference", reference.IVON), ("ours", IVON)):
        model = tiny_mlp()
        opt = cls(model.parameters(), **kwargs)
        if cls is IVON:
            opt._draw_noise = global_rng_noise
        torch.manual_seed(123)
        for x, y in data:
            train_step(model, opt, x, y, samples)
        runs[name] = (model, opt)

    (ref_model, ref_opt), (model, opt) = runs["reference"], runs["ours"]
    for ref_p, p in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-6)
    params = list(model.parameters())
    hess = torch.cat([opt.state[p]["hess"].flatten() for p in params])
    momentum = torch.cat([opt.state[p]["momentum"].flatten() for p in params])
    torch.testing.assert_close(hess, ref_opt.param_groups[0]["hess"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(momentum, ref_opt.param_groups[0]["momentum"], rtol=1e-5, atol=1e-7)


def docstring_ivon(params, grad_fn, noise_draws, *, lr, ess, hess_init, beta1, beta2, weight_decay, clip_radius):
    """The module docstring's update written out per tensor, operation by operation, as IVON computed it before
    the multi-tensor rewrite (ε fixed, one MC sample per step, rescale_lr)."""
    means = [p.detach().clone() for p in params]
    momenta = [torch.zeros_like(m) for m in means]
    hesses = [torch.full_like(m, hess_init) for m in means]
    for t, draw in enumerate(noise_draws, start=1):
        sigmas = [1 / torch.sqrt(ess * (h + weight_decay)) for h in hesses]
        eps = [torch.as_tensor(e, dtype=torch.float32).reshape(m.shape) for e, m in zip(draw, means)]
        grads = grad_fn([m + s * e for m, s, e in zip(means, sigmas, eps)])
        for i, (g, e, s) in enumerate(zip(grads, eps, sigmas)):
            price = g * e / s
            momenta[i] = beta1 * momenta[i] + (1 - beta1) * g
            h = hesses[i]
            hesses[i] = beta2 * h + (1 - beta2) * price + 0.5 * (1 - beta2) ** 2 * (h - price) ** 2 / (h + weight_decay)
            direction = (momenta[i] / (1 - beta1**t) + weight_decay * means[i]) / (hesses[i] + weight_decay)
            means[i] = means[i] - lr * (hess_init + weight_decay) * direction.clamp(-clip_radius, clip_radius)
    return means, momenta, hesses


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("foreach", [True, False])
def test_multi_tensor_update_equals_the_formulas_step_by_step(weight_decay, foreach):
    """Eight steps of a least-squares loss on two tensors with a fixed noise sequence: parameters, ḡ and h equal
    the per-tensor formulas to fp32 rounding; clipping is active in the first steps."""
    generator = torch.Generator().manual_seed(3)
    targets = [torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)]
    draws = [[torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)] for _ in range(8)]
    kwargs = dict(lr=0.2, ess=30.0, hess_init=0.4, beta1=0.9, beta2=0.95, weight_decay=weight_decay, clip_radius=0.5)

    def grad_fn(thetas):
        return [2 * (theta - target) for theta, target in zip(thetas, targets)]

    params = [nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.ones(5))]
    expected = docstring_ivon(params, grad_fn, draws, **kwargs)
    opt = IVON(params, foreach=foreach, **kwargs)
    opt._draw_noise = fixed_noise(*draws)
    for _ in draws:
        with opt.sampled_params(train=True):
            for p, g in zip(params, grad_fn([p.detach() for p in params])):
                p.grad = g
        opt.step()
    for p, mean, momentum, hess in zip(params, *expected):
        torch.testing.assert_close(p.detach(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["momentum"], momentum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["hess"], hess, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- 3. conjugate BLR


def linear_regression_problem() -> dict:
    """y = Xw + e with correlated features, its conjugate posterior and the IVON settings and schedule that find its
    mean-field fit (the test below; tests/test_ivon_fsdp2.py runs the same on a sharded weight)."""
    g = torch.Generator().manual_seed(0)
    n, d, s, alpha0, rho = 200, 3, 0.5, 20.0, 0.6
    corr = torch.full((d, d), rho, dtype=torch.float64) + (1 - rho) * torch.eye(d, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(corr).T
    y = x @ torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64) + s * torch.randn(n, generator=g, dtype=torch.float64)
    precision = x.T @ x / s**2 + alpha0 * torch.eye(d, dtype=torch.float64)
    steps, averaged = 10_000, 5_000
    return {
        "n": n, "d": d, "s": s, "x": x, "y": y, "steps": steps, "averaged": averaged,
        "exact_mean": torch.linalg.solve(precision, x.T @ y / s**2),
        "mean_field_std": precision.diagonal().rsqrt(),
        "marginal_std": torch.linalg.inv(precision).diagonal().sqrt(),
        "settings": dict(lr=0.1, ess=n, hess_init=1.0, beta2=0.999, weight_decay=alpha0 / n, rescale_lr=False),
        "schedule": lambda t: 1.0 if t < steps - averaged else 0.1,
    }  # fmt: skip


def test_bayesian_linear_regression_recovers_the_mean_field_posterior():
    """y = Xw + e, e ~ N(0, s²), prior w ~ N(0, α0⁻¹ I): the posterior is N(μ, Λ⁻¹) with
    Λ = XᵀX/s² + α0 I and μ = Λ⁻¹ Xᵀy / s².

    IVON with ess λ minimises E_q[ℓ̄(θ)] + (δ/2) E_q‖θ‖² − H(q)/λ, i.e. it fits q to exp(−λ ℓ̄(θ) − λδ‖θ‖²/2).
    With λ = N, ℓ̄ = mean_i (y_i − x_iᵀθ)² / (2s²) (the per-example negative log-likelihood) and δ = α0 / N,
    that target is exactly the posterior above. Its best *diagonal* Gaussian (and IVON's fixed point, where
    h = E[ĥ] = diag ∇²ℓ̄ = diag(XᵀX)/(N s²)) has mean μ and std 1/sqrt(Λ_ii), the mean-field std, not the
    marginal std sqrt((Λ⁻¹)_ii): a diagonal q matches the precision's diagonal. The features are correlated
    (ρ = 0.6) so the two differ by ≈ 30 %, and the test checks IVON lands on the mean-field one.

    Tolerances: ĝ and ĥ come from one sample per step, so m and h fluctuate around the fixed point (h is an EMA
    of ĥ over ≈ 1/(1 − β2) = 1000 steps, ≈ 5 % relative noise). The test averages the last 5000 of 10000 steps
    (Polyak averaging, after the LR drops tenfold): over 12 seeds the worst errors were 0.035 σ for the mean
    and 2.2 % for the std, so the bounds are 0.1 σ and 5 %, well inside the 30 % gap between the two stds.
    """
    problem = linear_regression_problem()
    x, y, s, d = problem["x"], problem["y"], problem["s"], problem["d"]
    exact_mean, mean_field_std, marginal_std = problem["exact_mean"], problem["mean_field_std"], problem["marginal_std"]
    assert ((marginal_std / mean_field_std) > 1.25).all()

    w = nn.Parameter(torch.zeros(d, dtype=torch.float64))
    steps, averaged = problem["steps"], problem["averaged"]
    opt = IVON([w], **problem["settings"])
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, problem["schedule"])
    mean_sum, std_sum = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    for t in range(steps):
        with opt.sampled_params(train=True):
            ((y - x @ w).square().mean() / (2 * s**2)).backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
        if t >= steps - averaged:
            mean_sum += opt.posterior_mean(w)
            std_sum += opt.posterior_std(w)
    mean, std = mean_sum / averaged, std_sum / averaged

    assert ((mean - exact_mean).abs() / mean_field_std).max() < 0.1
    assert ((std / mean_field_std - 1).abs()).max() < 0.05
    assert ((std - mean_field_std).abs() < (std - marginal_std).abs()).all()


# ------------------------------------------------------------------------------------------------- 3b. flat buffers

BEFORE_FLAT_BUFFERS = Path(__file__).parent / "data" / "ivon_before_flat_buffers.json"


def two_group_run(optimizer_class: type = IVON) -> dict[str, list[float]]:
    """Six steps over two parameter groups that hold every case of the state layout: fp32 tensors that always
    have a gradient, a bf16 one (fp32 master copy), an fp64 one, one that never has a gradient and one that has
    it in one micro-batch of two. Steps alternate gradient accumulation (``accumulate()``) and two MC samples
    (``zero_grad()`` inside the context), with an evaluation draw after each; ε comes from the optimizer's own
    generator. Returns every parameter and state tensor, by name."""
    model = mixed_model()
    model.offset = nn.Parameter(torch.randn(3, dtype=torch.float64))
    model.sometimes = nn.Parameter(torch.randn(3))
    groups = [
        {"params": [model.weight, model.bias, model.scale], "weight_decay": 1e-2},
        {"params": [model.offset, model.unused, model.sometimes], "lr": 0.02},
    ]
    opt = optimizer_class(groups, lr=0.05, ess=100.0, beta2=0.99, clip_radius=0.5, seed=7)
    data = batches(12, seed=8)
    for step in range(6):
        for i, (x, y) in enumerate(data[2 * step : 2 * step + 2]):
            with opt.sampled_params(train=True):
                if step % 2:
                    opt.zero_grad()
                logits = model(x) * model.scale.float() + model.offset.float()
                nn.functional.cross_entropy(logits + model.sometimes if i == 0 else logits, y).backward()
            if i == 0 and step % 2 == 0:
                opt.accumulate()
        opt.step()
        opt.zero_grad()
        with opt.sampled_params(train=False):
            pass
    tensors = {}
    for name, p in model.named_parameters():
        tensors[name] = p.detach().double().flatten().tolist()
        for key, value in sorted(opt.state[p].items()):
            tensors[f"{name}.{key}"] = value.double().flatten().tolist()
    return tensors


def test_flat_buffers_equal_the_ivon_before_them():
    """The IVON of commit c3445ca (multi-tensor over per-parameter state, before flat buffers) recorded
    ``two_group_run`` in tests/data/ivon_before_flat_buffers.json; today's equals it to fp32 rounding."""
    expected = json.loads(BEFORE_FLAT_BUFFERS.read_text())
    actual = two_group_run()
    assert sorted(actual) == sorted(expected)
    for name, values in expected.items():
        torch.testing.assert_close(torch.tensor(actual[name]), torch.tensor(values), rtol=1e-6, atol=1e-7, msg=name)


def test_state_entries_are_views_of_one_flat_buffer_per_key_and_dtype():
    """Per parameter, as torch's optimizers: each entry has its parameter's shape; behind them, the parameters of a
    group that share a dtype share one contiguous buffer per key (what lets a step run each operation once)."""
    model = mixed_model()
    opt = IVON(model.parameters(), lr=0.05, ess=100.0)
    accumulation_step(model, opt, batches(2))
    fp32 = [model.weight, model.bias, model.unused]
    for key in ("momentum", "hess"):
        entries = [opt.state[p][key] for p in fp32]
        assert [e.shape for e in entries] == [p.shape for p in fp32]
        base = entries[0]._base
        assert base is not None and base.numel() == sum(p.numel() for p in fp32)
        assert all(e._base is base for e in entries)
        assert [e.storage_offset() for e in entries] == [0, 12, 15]
        assert opt.state[model.scale][key]._base is not base  # bf16: a bucket of its own
    steps = [opt.state[p]["step"] for p in fp32]
    assert all(s.dim() == 0 and s._base is steps[0]._base for s in steps)


def test_a_flat_buffer_is_rebuilt_from_entries_of_their_own_missing_ones_as_zeros():
    """After load_state_dict the entries are tensors of their own; the buffer is their concatenation, in group order,
    and they become its views. An entry present for some parameters only (another layout) counts as zeros."""
    from collections import defaultdict

    from axolotl_blob.ivon.flat import buckets_of

    params = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(1))]
    (bucket,) = buckets_of(params, scalar_keys=("step",))
    state = defaultdict(dict)
    state[params[0]]["grad_sum"] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    state[params[2]]["grad_sum"] = torch.tensor([5.0])
    buffer = bucket.buffer(state, "grad_sum")
    assert buffer.tolist() == [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 5.0]
    assert [state[p]["grad_sum"].shape for p in params] == [p.shape for p in params]
    assert all(state[p]["grad_sum"]._base is buffer for p in params)
    assert bucket.buffer(state, "grad_sum") is buffer  # still its views: not rebuilt
    assert bucket.buffer(state, "momentum") is None


def test_a_state_entry_replaced_by_hand_is_what_the_next_step_uses():
    """Replacing ``optimizer.state[p]["hess"]`` with a new tensor (not a view of the flat buffer) must act as
    the same change made in place: the buffer is rebuilt from the entries before it is used."""
    data = batches(3, seed=9)
    runs = []
    for replace in (True, False):
        model = tiny_mlp()
        opt = IVON(model.parameters(), lr=0.1, ess=20.0, beta2=0.9)
        train_step(model, opt, *data[0])
        first = next(model.parameters())
        if replace:
            opt.state[first]["hess"] = opt.state[first]["hess"] * 3.0
        else:
            opt.state[first]["hess"].mul_(3.0)
        for x, y in data[1:]:
            train_step(model, opt, x, y)
        runs.append((model, opt))
    (model_a, opt_a), (model_b, opt_b) = runs
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt_a.state[p]["hess"], opt_b.state[q]["hess"])
    untouched = tiny_mlp()
    untouched_opt = IVON(untouched.parameters(), lr=0.1, ess=20.0, beta2=0.9)
    for x, y in data:
        train_step(untouched, untouched_opt, x, y)
    assert not torch.equal(next(untouched.parameters()), next(model_a.parameters()))  # the change mattered


# ------------------------------------------------------------------------------------------------- 4. checkpoints


def mixed_model(seed: int = 0) -> nn.Module:
    """fp32 Linear, a bf16 vector, and a parameter the loss never uses (its grad stays None)."""
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    model.scale = nn.Parameter(torch.randn(3).to(torch.bfloat16))
    model.unused = nn.Parameter(torch.randn(2))
    return model


def mixed_loss(model, x, y):
    return nn.functional.cross_entropy(model(x) * model.scale.float(), y)


def accumulation_step(model, opt, micro_batches):
    """Gradient accumulation: every micro-batch its own sample, loss / k, one step ('sum' reduction)."""
    for i, (x, y) in enumerate(micro_batches):
        with opt.sampled_params(train=True):
            (mixed_loss(model, x, y) / len(micro_batches)).backward()
        if i < len(micro_batches) - 1:
            opt.accumulate()
    assert opt.num_mc_samples == len(micro_batches)
    opt.step()
    model.zero_grad()


def test_state_dict_round_trip_resumes_bit_identically():
    data = batches(12, seed=3)
    kwargs = dict(lr=0.05, ess=100.0, beta2=0.99, clip_radius=0.5, grad_reduction="sum")

    def run(model, opt, chunk):
        for k in range(0, len(chunk), 2):
            accumulation_step(model, opt, chunk[k : k + 2])
            with opt.sampled_params(train=False):  # an evaluation draw between steps
                pass

    straight = mixed_model()
    straight_opt = IVON(straight.parameters(), **kwargs)
    run(straight, straight_opt, data)

    first = mixed_model()
    first_opt = IVON(first.parameters(), **kwargs)
    run(first, first_opt, data[:6])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = mixed_model(seed=99)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = IVON(resumed.parameters(), **kwargs, seed=5)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    assert resumed_opt.state[resumed.scale]["hess"].dtype == torch.float32  # not cast to the bf16 param's dtype
    assert resumed_opt.state[resumed.scale]["mean"].dtype == torch.float32
    run(resumed, resumed_opt, data[6:])

    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for t, u in zip(optimizer_tensors(straight_opt), optimizer_tensors(resumed_opt)):
        assert torch.equal(t, u)
    assert torch.equal(straight_opt.generator.get_state(), resumed_opt.generator.get_state())
    assert torch.equal(straight_opt.eval_generator.get_state(), resumed_opt.eval_generator.get_state())


# ------------------------------------------------------------------------------------------------- 5. dtypes, foreach


def test_mixed_dtypes_params_without_grad_and_foreach_agree():
    data = batches(8, seed=4)
    runs = []
    for foreach in (True, False):
        model = mixed_model()
        opt = IVON(model.parameters(), lr=0.05, ess=100.0, beta2=0.99, clip_radius=0.5, foreach=foreach)
        unused_before = model.unused.detach().clone()
        for k in range(0, len(data), 2):
            accumulation_step(model, opt, data[k : k + 2])
        assert torch.equal(model.unused, unused_before)
        assert opt.state[model.unused]["step"].item() == 0
        assert not opt.state[model.unused]["momentum"].any()
        assert opt.state[model.scale]["step"].item() == 4
        assert model.scale.dtype == torch.bfloat16
        for key in ("momentum", "hess", "mean"):
            assert opt.state[model.scale][key].dtype == torch.float32
        assert torch.equal(model.scale, opt.state[model.scale]["mean"].to(torch.bfloat16))
        runs.append((model, opt))

    (model_a, opt_a), (model_b, opt_b) = runs
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    for t, u in zip(optimizer_tensors(opt_a), optimizer_tensors(opt_b)):
        assert torch.equal(t, u)


def test_bf16_master_copy_keeps_updates_below_bf16_resolution():
    w = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = IVON([w], lr=1e-4, ess=1e8, weight_decay=0.0)
    for _ in range(20):
        with opt.sampled_params(train=True):
            w.float().sum().backward()
        opt.step()
        opt.zero_grad()
    assert (opt.posterior_mean(w) < 1.0 - 1e-3).all()  # twenty steps of ≈1e-4, each lost if done in bf16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(ess=0.0), "ess=0.0"),
        (dict(hess_init=0.0), "hess_init=0.0"),
        (dict(beta1=1.0), "beta1=1.0"),
        (dict(beta2=-0.1), "beta2=-0.1"),
        (dict(weight_decay=-1e-3), "weight_decay=-0.001"),
        (dict(mc_samples=0), "mc_samples=0"),
        (dict(clip_radius=0.0), "clip_radius=0.0"),
        (dict(hess_approx="gradsq"), "hess_approx='gradsq'"),
        (dict(grad_reduction="max"), "grad_reduction='max'"),
    ],
)
def test_invalid_hyperparameters_are_named(kwargs, message):
    arguments = dict(lr=0.1, ess=10.0) | kwargs
    with pytest.raises(ValueError, match=message):
        IVON([nn.Parameter(torch.zeros(2))], **arguments)


# ------------------------------------------------------------------------------------------------- 6. sampling


def test_evaluation_draw_restores_the_mean_and_leaves_training_noise_alone():
    model = mixed_model()
    opt = IVON(model.parameters(), lr=0.1, ess=4.0, hess_init=0.5)
    twin = copy.deepcopy(model)
    twin_opt = IVON(twin.parameters(), lr=0.1, ess=4.0, hess_init=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    std = 1 / math.sqrt(4.0 * (0.5 + 1e-4))

    with opt.sampled_params(train=False):
        for p, mean in zip(model.parameters(), before):
            assert not torch.equal(p, mean)
            assert torch.equal(opt.posterior_mean(p).to(p.dtype), mean)
        drawn = torch.cat([(p.float() - m.float()).flatten() / std for p, m in zip(model.parameters(), before)])
    assert drawn.abs().max() < 5 and 0.5 < drawn.std() < 1.5
    for p, mean in zip(model.parameters(), before):
        assert torch.equal(p, mean)
    assert opt.num_mc_samples == 0
    with pytest.raises(RuntimeError, match="without a training sample"):
        opt.step()

    x, y = batches(1)[0]
    for m, o in ((model, opt), (twin, twin_opt)):  # the evaluation draw did not shift the training noise
        with o.sampled_params(train=True):
            mixed_loss(m, x, y).backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("fold", ["accumulate", "zero_grad", "next_context"])
def test_every_way_of_folding_a_sample_gives_the_same_step(fold):
    """A pending sample's gradient is read by accumulate(), by zero_grad(), or by entering the next context."""
    data = batches(2, seed=5)
    results = []
    for how in ("accumulate", fold):
        model = tiny_mlp()
        opt = IVON(model.parameters(), lr=0.1, ess=20.0, beta2=0.9)
        for i, (x, y) in enumerate(data):
            if i == 1 and how == "zero_grad":
                opt.zero_grad()
            with opt.sampled_params(train=True):
                nn.functional.cross_entropy(model(x), y).backward()
            if i == 0 and how == "accumulate":
                opt.accumulate()
        assert opt.num_mc_samples == 2
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results):
        assert torch.equal(p, q)


def test_step_reads_the_gradient_as_clipped_after_backward():
    """What the loop does to p.grad between backward and step (clipping) is what the update sees."""
    x, y = batches(1)[0]
    results = []
    for clip_after_backward in (True, False):
        model = tiny_mlp()
        opt = IVON(model.parameters(), lr=0.1, ess=20.0, beta2=0.9)
        with opt.sampled_params(train=True):
            loss = nn.functional.cross_entropy(model(x), y)
            (loss if clip_after_backward else loss * 0.5).backward()
        if clip_after_backward:
            for p in model.parameters():
                p.grad.mul_(0.5)
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results):
        assert torch.equal(p, q)


def test_sum_reduction_of_scaled_micro_batches_equals_mean_of_full_losses():
    data = batches(3, seed=6)
    results = []
    for reduction in ("sum", "mean"):
        model = tiny_mlp()
        opt = IVON(model.parameters(), lr=0.1, ess=20.0, beta2=0.9, grad_reduction=reduction)
        for x, y in data:
            with opt.sampled_params(train=True):
                loss = nn.functional.cross_entropy(model(x), y)
                (loss / len(data) if reduction == "sum" else loss).backward()
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_sync_averages_estimates_over_ranks(monkeypatch):
    """sync=True all-reduces ĝ and ĥ and leaves p.grad untouched. Faked: the other rank holds −(ours), so the
    averages are exactly 0 and the momentum must stay 0; without sync it must not."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: tensor.zero_())
    x, y = batches(1)[0]
    for sync in (True, False):
        model = tiny_mlp()
        opt = IVON(model.parameters(), lr=0.1, ess=20.0, beta2=0.9, sync=sync)
        with opt.sampled_params(train=True):
            nn.functional.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        momenta = [opt.state[p]["momentum"] for p in model.parameters()]
        assert all(torch.count_nonzero(m) == 0 for m in momenta) == sync


def test_misuse_raises():
    w = nn.Parameter(torch.zeros(3))
    opt = IVON([w], lr=0.1, ess=10.0)
    with pytest.raises(RuntimeError, match="no pending training sample"):
        opt.accumulate()
    with opt.sampled_params(train=True):
        with pytest.raises(RuntimeError, match="cannot be nested"):
            with opt.sampled_params():
                pass
        with pytest.raises(RuntimeError, match="inside sampled_params"):
            opt.step()
    with pytest.raises(KeyError):
        opt.posterior_std(nn.Parameter(torch.zeros(3)))
