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


def test_eval_loss_is_the_nll_of_averaged_probabilities(model):
    trainer = trainer_with(BlobSettings(eval_samples=4))
    model.eval()
    batch = inputs()
    torch.manual_seed(11)
    loss = trainer.compute_loss(model, batch)
    torch.manual_seed(11)
    with posterior_sampling(model, enabled=True), torch.no_grad():
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
