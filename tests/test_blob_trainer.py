"""The BLoB Trainer mixin's loss: MC-averaged training NLL and the BMA evaluation NLL."""

import math
from types import SimpleNamespace

import pytest
import torch
from axolotl_blob.args import BlobSettings
from axolotl_blob.blob.model import posterior_sampling
from axolotl_blob.blob.trainer import BlobTrainerMixin
from conftest import tiny_blob_model


class RecordingTrainer:
    """The two Trainer methods the mixin builds on: the model's own loss, and add_callback."""

    def __init__(self):
        self.args = SimpleNamespace(prediction_loss_only=True)
        self.calls = 0

    def add_callback(self, callback):
        self.callback = callback

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.calls += 1
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def trainer_with(settings: BlobSettings):
    cls = type("Trainer", (BlobTrainerMixin, RecordingTrainer), {"blob_settings": settings})
    return cls()


@pytest.fixture
def model(tiny_model_dir):
    return tiny_blob_model(tiny_model_dir)


def inputs():
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "labels": labels}


def test_training_loss_is_the_mean_over_train_samples(model):
    trainer = trainer_with(BlobSettings(train_samples=3))
    model.train()
    torch.manual_seed(7)
    loss = trainer.compute_loss(model, inputs())
    torch.manual_seed(7)
    expected = torch.stack([model(**inputs()).loss for _ in range(3)]).mean()
    assert trainer.calls == 3
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("draws", ["whole_weights", "per_token"])
def test_eval_loss_is_the_nll_of_averaged_probabilities(model, draws):
    """… drawn as blob.eval_draws says: one A per layer and forward, or the training noise path's per-token draws."""
    trainer = trainer_with(BlobSettings(eval_samples=4, eval_draws=draws))
    model.eval()
    batch = inputs()
    torch.manual_seed(11)
    loss = trainer.compute_loss(model, batch)
    torch.manual_seed(11)
    with posterior_sampling(model, enabled=True, whole_weights=draws == "whole_weights"), torch.no_grad():
        logits = torch.stack([model(input_ids=batch["input_ids"]).logits[:, :-1].float() for _ in range(4)])
    targets, mask = batch["labels"][:, 1:], batch["labels"][:, 1:] != -100
    probs = torch.softmax(logits, -1).mean(0).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = -(torch.log(probs) * mask).sum() / mask.sum()
    of_mean_logits = torch.log_softmax(logits.mean(0), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx((-(of_mean_logits * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert trainer.calls == 0 and math.isfinite(loss.item())


def test_eval_samples_zero_is_the_posterior_mean_loss(model):
    trainer = trainer_with(BlobSettings(eval_samples=0))
    model.eval()
    assert trainer.compute_loss(model, inputs()).item() == pytest.approx(model(**inputs()).loss.item())
    assert trainer.calls == 1


@pytest.fixture
def hf_trainer(model, tmp_path):
    from transformers import Trainer, TrainingArguments

    from axolotl_blob.blob.trainer import blob_trainer_cls

    def build(**settings):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], weight_decay=0.1)
        return blob_trainer_cls(Trainer, BlobSettings(**settings))(model=model, args=args)

    return build


def test_the_trainer_builds_its_own_optimizer_without_g_and_wraps_it(hf_trainer, model):
    from axolotl_blob.blob.optimizer import BlobOptimizer
    from axolotl_blob.blob.model import posterior_parameters

    trainer = hf_trainer()
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, BlobOptimizer) and isinstance(optimizer.inner, torch.optim.AdamW)
    assert trainer.create_optimizer() is optimizer  # built once
    means, sigmas = posterior_parameters(model)
    inner = {id(p) for group in optimizer.inner.param_groups for p in group["params"]}
    assert all(g.requires_grad and id(g) not in inner for g in sigmas)
    assert all(id(m) in inner for m in means)
    assert {id(p) for p in sigmas} == {id(p) for p in optimizer.param_groups[-1]["params"]}
    decay = {group.get("role"): group["weight_decay"] for group in optimizer.inner.param_groups}
    assert decay == {None: 0.1, "mean": 0.1}  # the Trainer's own grouping, split by role


def test_optimizer_routing_keeps_g_in_the_trainers_optimizer(hf_trainer, model):
    from axolotl_blob.blob.model import posterior_parameters

    optimizer = hf_trainer(sigma_update="optimizer").create_optimizer()
    inner = {id(p) for group in optimizer.inner.param_groups for p in group["params"]}
    assert all(id(g) in inner for g in posterior_parameters(model)[1])


def test_a_nan_in_g_stops_training_naming_the_layer_the_step_and_the_settings(hf_trainer, model):
    from axolotl_blob.blob.model import posterior_parameters
    from axolotl_blob.blob.trainer import NonFinitePosteriorError

    trainer = hf_trainer(kl_lr=0.02)
    optimizer = trainer.create_optimizer()
    state = SimpleNamespace(global_step=6)
    trainer.blob_kl.on_optimizer_step(trainer.args, state, None, model=model, optimizer=optimizer)  # finite: nothing
    with torch.no_grad():
        posterior_parameters(model)[1][3][1, 2] = float("nan")  # layer 1's v_proj
    with pytest.raises(NonFinitePosteriorError) as error:
        trainer.blob_kl.on_optimizer_step(trainer.args, state, None, model=model, optimizer=optimizer)
    message = str(error.value)
    assert "σ factor G (blob_G) of model.layers.1.self_attn.v_proj.blob_G.default" in message
    assert "after optimizer step 7" in message
    assert "blob.kl_lr (now 0.02)" in message and "blob.init_std (now 0.05)" in message and "bf16: true" in message


def test_bma_eval_loss_under_the_choice_likelihood_averages_k_way_probabilities(model):
    from axolotl_blob.multiple_choice import ChoiceLikelihood

    trainer = trainer_with(BlobSettings(eval_samples=3, eval_draws="whole_weights"))
    label_ids = [11, 12, 13]
    trainer.compute_loss_func = ChoiceLikelihood(label_ids)
    ids = torch.randint(20, 100, (2, 6), generator=torch.Generator().manual_seed(5))
    labels = torch.full_like(ids, -100)
    labels[0, 5], labels[1, 4] = 12, 13
    model.eval()
    torch.manual_seed(2)
    loss = trainer.compute_loss(model, {"input_ids": ids, "labels": labels})
    torch.manual_seed(2)
    with posterior_sampling(model, enabled=True, whole_weights=True), torch.no_grad():
        letters = torch.stack([model(input_ids=ids).logits[[0, 1], [4, 3]][:, label_ids].float() for _ in range(3)])
    expected = -torch.log(torch.softmax(letters, -1).mean(0)[[0, 1], [1, 2]]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("clip_sigma_grad", [True, False])
def test_g_gradient_is_clipped_with_the_others_unless_clip_sigma_grad_is_false(model, tmp_path, clip_sigma_grad):
    """false (the reference): max_grad_norm scales every other gradient to the norm of those others, and G's NLL
    gradient is left whole and out of the norm."""
    from transformers import Trainer, TrainingArguments

    from axolotl_blob.blob.model import posterior_parameters
    from axolotl_blob.blob.trainer import blob_trainer_cls

    max_norm = 1e-3  # far below the gradients' norm: whatever is clipped is scaled down
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_grad_norm=max_norm)
    trainer = blob_trainer_cls(Trainer, BlobSettings(clip_sigma_grad=clip_sigma_grad))(model=model, args=args)
    trainer.create_optimizer()
    model.train()
    torch.manual_seed(7)
    model(**inputs()).loss.backward()
    sigma_ids = {id(g) for g in posterior_parameters(model)[1]}
    params = [p for p in model.parameters() if p.grad is not None]
    before = {id(p): p.grad.clone() for p in params}
    others_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if id(p) not in sigma_ids]))
    all_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert len(sigma_ids) == 4 and all(id(p) in before for p in posterior_parameters(model)[1])

    norm = trainer._clip_grad_norm(model)

    expected_norm = all_norm if clip_sigma_grad else others_norm
    assert norm.item() == pytest.approx(expected_norm.item(), rel=1e-5)
    for param in params:
        scale = max_norm / (expected_norm.item() + 1e-6)  # torch's clip_grad_norm_ coefficient
        if id(param) in sigma_ids and not clip_sigma_grad:
            assert torch.equal(param.grad, before[id(param)])
        else:
            torch.testing.assert_close(param.grad, before[id(param)] * scale, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("micro_batch, accumulation, world, expected", [(8, 1, 1, 131), (4, 2, 1, 131), (4, 1, 2, 131), (8, 1, 2, 65)])
def test_rescaled_cycle_reads_examples_batch_and_world_from_the_trainer(micro_batch, accumulation, world, expected):
    from axolotl_blob.blob.trainer import cycle_steps

    args = SimpleNamespace(per_device_train_batch_size=micro_batch, gradient_accumulation_steps=accumulation, world_size=world)
    assert cycle_steps(BlobSettings(kl_cycle_steps="rescaled"), args, SimpleNamespace(dataset=[None] * 400)) == expected
    assert cycle_steps(BlobSettings(kl_cycle_steps=7), args, None) == 7
