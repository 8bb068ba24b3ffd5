"""The post-hoc commands read a run's config without Axolotl: the dtype, autocast and tokenizer are the ones Axolotl
gives the same config, and `--help` gives every option's default."""

from __future__ import annotations

import pytest
import yaml
from conftest import base_config

from axolotl_blob import bayesianize, evaluate, predict
from axolotl_blob.cli import HelpFormatter
from axolotl_blob.multiple_choice import format_prompt, label_token_ids, prompt_token_ids
from axolotl_blob.run_config import load_tokenizer, model_dtype, read_config, trains_in_bf16

PRECISIONS = [{}, {"bf16": True}, {"bf16": False}, {"bf16": "auto"}, {"bf16": "auto", "fp16": False}, {"fp16": True}]


def write_config(tmp_path, config: dict):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("precision", PRECISIONS, ids=[str(p) for p in PRECISIONS])
def test_dtype_and_autocast_are_axolotls(precision, tiny_model_dir, completion_data, tmp_path):
    from axolotl.cli.config import load_cfg

    config = {**base_config(tiny_model_dir, completion_data, tmp_path / "out"), "bf16": None, **precision}
    path = write_config(tmp_path, {key: value for key, value in config.items() if value is not None})
    axolotl_cfg = load_cfg(str(path))
    cfg = read_config(path)
    assert model_dtype(cfg) == axolotl_cfg.torch_dtype
    assert trains_in_bf16(cfg) == (axolotl_cfg.bf16 is True)


def test_tokenizer_is_the_one_saved_beside_the_adapter_else_the_base_models(tiny_model_dir, completion_data, tmp_path):
    from axolotl.cli.config import load_cfg
    from axolotl.loaders import load_tokenizer as axolotl_tokenizer

    path = write_config(tmp_path, base_config(tiny_model_dir, completion_data, tmp_path / "out"))
    cfg = read_config(path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    tokenizer = load_tokenizer(cfg, adapter)  # nothing saved there: the base model's
    reference = axolotl_tokenizer(load_cfg(str(path)))
    prompt = format_prompt("Which word is a color?", ["cat", "red", "sun", "two"])
    assert label_token_ids(tokenizer, 4) == label_token_ids(reference, 4)
    assert prompt_token_ids(tokenizer, prompt) == prompt_token_ids(reference, prompt)

    reference.add_tokens(["<added-in-training>"])
    reference.save_pretrained(adapter)
    assert "<added-in-training>" in load_tokenizer(cfg, adapter).get_vocab()


def test_a_config_without_base_model_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"config.yml: no 'base_model'"):
        read_config(write_config(tmp_path, {"adapter": "blob"}))
    with pytest.raises(ValueError, match="no such config file"):
        read_config(tmp_path / "nowhere.yml")


@pytest.mark.parametrize("command", [predict, evaluate, bayesianize], ids=lambda m: m.__name__)
def test_help_gives_every_options_default(command):
    parser = command.build_parser()
    formatter = HelpFormatter(parser.prog)
    options = [action for action in parser._actions if action.option_strings and action.dest != "help"]
    assert options
    for action in options:
        text = formatter._get_help_string(action) % {"default": action.default}
        assert action.required or "(default: " in text, action.option_strings
        assert "default: None" not in text, action.option_strings


def test_nested_blocks_read_as_attributes(tmp_path):
    config = {"base_model": "m", "blob": {"eval_samples": 3}, "datasets": [{"path": "a"}]}
    cfg = read_config(write_config(tmp_path, config))
    assert cfg.blob.eval_samples == 3 and cfg.datasets[0].path == "a" and cfg.calibration is None
