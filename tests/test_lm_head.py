"""BLoB on lm_head, where the embeddings are tied: untied at load, trained, saved, merged without touching the
input embeddings."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from axolotl_blob.blob.model import untie_output_embeddings
from conftest import color_questions, multiple_choice_config, run_axolotl, run_module, write_jsonl


@pytest.fixture(scope="module")
def tied_model_dir(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("tied-llama")
    shutil.copytree(tiny_model_dir, directory, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(directory)
    return directory


def test_untie_gives_lm_head_its_own_frozen_copy(tied_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tied_model_dir)
    embeddings = model.model.embed_tokens.weight
    assert untie_output_embeddings(model) == embeddings.numel()
    assert model.lm_head.weight is not embeddings and torch.equal(model.lm_head.weight, embeddings)
    assert not model.lm_head.weight.requires_grad and model.config.tie_word_embeddings is False
    assert untie_output_embeddings(model) == 0


@pytest.mark.slow
def test_blob_on_a_tied_lm_head_trains_and_merges_without_touching_the_embeddings(tied_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train = write_jsonl(tmp_path / "questions.jsonl", color_questions(48, seed=3))
    config = multiple_choice_config(
        tied_model_dir, train, tmp_path / "out", lora_target_modules=["q_proj", "v_proj", "lm_head"], max_steps=3,
        save_steps=3, eval_steps=0, learning_rate=0.01, bf16=False, fp16=False,
    )  # fmt: skip
    run_axolotl(config, tmp_path)
    assert "lm_head shared its weight with the input embeddings" in (tmp_path / "axolotl.log").read_text()
    out = tmp_path / "out"
    posterior = load_file(out / "blob_posterior.safetensors")
    assert "lm_head.blob_G" in posterior
    adapter = load_file(out / "adapter_model.safetensors")
    assert any("lm_head.lora_B" in key and value.abs().max() > 0 for key, value in adapter.items())

    # the legacy merge loads the model through the plugin (untied); Axolotl's default shard-wise merger finds no
    # lm_head tensor in a tied checkpoint and drops the head's LoRA (README)
    merge = [str(tmp_path / "config.yml"), f"--lora_model_dir={out}", "--merge_method=legacy"]
    run_module("axolotl.cli.merge_lora", merge, tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tied_model_dir)
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    mean = PeftModel.from_pretrained(base, out).eval()  # unmerged on the tied base: the posterior mean
    ids = torch.tensor([[1, 5, 9, 12, 20, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, mean(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert json.loads((out / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
