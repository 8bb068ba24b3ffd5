"""Bad input is rejected at config validation (before any weights load) with an error naming the key.

Each row here is a row of the README's table of bad inputs.
"""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import base_config

BAD_INPUTS = [
    ("unknown key", {"blob": {"kl_lrr": 0.01}}, "unknown key 'blob.kl_lrr'. Did you mean 'blob.kl_lr'?"),
    ("prior std zero", {"blob": {"prior_std": 0}}, r"blob.prior_std\n  Input should be greater than 0"),
    ("negative init std", {"blob": {"init_std": -0.05}}, r"blob.init_std\n  Input should be greater than 0"),
    ("negative eval samples", {"blob": {"eval_samples": -1}}, r"blob.eval_samples\n  Input should be greater than or equal to 0"),
    ("zero train samples", {"blob": {"train_samples": 0}}, r"blob.train_samples\n  Input should be greater than or equal to 1"),
    ("unknown KL weighting", {"blob": {"kl_weighting": "cyclic"}}, r"blob.kl_weighting\n  Input should be 'reweight' or 'uniform'"),
    ("blob block without blob adapter", {"adapter": "lora"}, "a 'blob:' block is set but adapter is 'lora'"),
    ("blob with RL", {"rl": "dpo"}, "adapter: blob cannot be combined with 'rl'"),
    ("blob with DoRA", {"peft_use_dora": True}, "adapter: blob cannot be combined with 'peft_use_dora'"),
    ("blob with fused LoRA kernels", {"lora_qkv_kernel": True}, "adapter: blob cannot be combined with 'lora_qkv_kernel'"),
    ("blob with best-model reload", {"load_best_model_at_end": True}, "adapter: blob cannot be combined with 'load_best_model_at_end'"),
    ("unknown evaluation draws", {"blob": {"eval_draws": "flipout"}}, r"blob.eval_draws\n  Input should be 'per_token' or 'whole_weights'"),
    ("unclipped G under optimizer routing", {"blob": {"clip_sigma_grad": False, "sigma_update": "optimizer"}},
     "blob.clip_sigma_grad: false needs blob.sigma_update: reference"),
]


def validate(tmp_path, config: dict):
    from axolotl.cli.config import load_cfg

    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return load_cfg(str(path))


@pytest.mark.parametrize("case, overrides, message", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_rejected_with_a_message_naming_the_key(
    case, overrides, message, tiny_model_dir, completion_data, tmp_path
):
    config = {**base_config(tiny_model_dir, completion_data, tmp_path / "out"), **overrides}
    with pytest.raises(Exception, match=message):
        validate(tmp_path, config)


def test_lora_model_dir_without_posterior_is_rejected(tiny_model_dir, completion_data, tmp_path):
    plain_adapter = tmp_path / "plain-lora"
    plain_adapter.mkdir()
    (plain_adapter / "adapter_config.json").write_text("{}")
    config = base_config(tiny_model_dir, completion_data, tmp_path / "out", lora_model_dir=str(plain_adapter))
    with pytest.raises(Exception, match=r"has no BLoB posterior \(blob_posterior.safetensors, blob_config.json missing\)"):
        validate(tmp_path, config)
    config["lora_model_dir"] = str(tmp_path / "nowhere")
    with pytest.raises(Exception, match="is not a local directory"):
        validate(tmp_path, config)
    config["lora_model_dir"] = str(plain_adapter)
    config["blob"] = {"init_missing_posterior": True}
    assert validate(tmp_path, config).blob["init_missing_posterior"] is True


def test_valid_config_fills_blob_defaults(tiny_model_dir, completion_data, tmp_path):
    config = base_config(tiny_model_dir, completion_data, tmp_path / "out")
    del config["blob"]
    cfg = validate(tmp_path, config)
    assert cfg.adapter == "blob" and cfg.blob is None  # defaults come from BlobSettings at load time


GOOD_ROW = {"question": "Which word is a color?", "choices": ["cat", "red"], "answer": 1}
CALIBRATION_FILE_ERRORS = [
    ("missing field", [GOOD_ROW, {"question": "q", "choices": ["a", "b"]}], r"bad\.jsonl:2: missing field 'answer'"),
    ("answer out of range", [GOOD_ROW, GOOD_ROW, {**GOOD_ROW, "answer": 2}], r"bad\.jsonl:3: field 'answer' is 2, out of range for 2 choices"),
    ("empty eval set", [], r"bad\.jsonl: no examples"),
    ("not a multiple-choice dataset", [{"text": "red cat dog red."}], r"bad\.jsonl:1: missing field 'question'"),
]


@pytest.mark.parametrize("case, rows, message", CALIBRATION_FILE_ERRORS, ids=[row[0] for row in CALIBRATION_FILE_ERRORS])
def test_bad_calibration_files_are_rejected_naming_file_and_line(case, rows, message, tiny_model_dir, completion_data, tmp_path):
    from conftest import write_jsonl

    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    config = base_config(tiny_model_dir, completion_data, tmp_path / "out", calibration={"datasets": [{"path": str(bad)}]})
    with pytest.raises(Exception, match=message):
        validate(tmp_path, config)


CALIBRATION_BLOCK_ERRORS = [
    ("unknown key", {"datasets": [], "n_bin": 10}, "unknown key 'calibration.n_bin'. Did you mean 'calibration.n_bins'?"),
    ("choices without datasets", {"mode": "choices"}, "calibration.mode 'choices' needs calibration.datasets"),
    ("missing file", {"datasets": [{"path": "nowhere.jsonl"}]}, "calibration.datasets: file 'nowhere.jsonl' does not exist"),
    ("negative samples", {"mode": "tokens", "samples": -1}, r"calibration.samples\n  Input should be greater than or equal to 0"),
]


@pytest.mark.parametrize("case, block, message", CALIBRATION_BLOCK_ERRORS, ids=[row[0] for row in CALIBRATION_BLOCK_ERRORS])
def test_bad_calibration_block_is_rejected(case, block, message, tiny_model_dir, completion_data, tmp_path):
    config = base_config(tiny_model_dir, completion_data, tmp_path / "out", calibration=block)
    with pytest.raises(Exception, match=message):
        validate(tmp_path, config)


def test_token_calibration_needs_an_eval_split(tiny_model_dir, completion_data, tmp_path):
    config = base_config(tiny_model_dir, completion_data, tmp_path / "out", val_set_size=0.0, calibration={"mode": "tokens"})
    with pytest.raises(Exception, match="calibration.mode 'tokens' needs an eval split: set val_set_size or test_datasets"):
        validate(tmp_path, config)


def ivon_base(tiny_model_dir, completion_data, tmp_path, **overrides) -> dict:
    config = base_config(
        tiny_model_dir, completion_data, tmp_path / "out", adapter="lora", optimizer="ivon", lora_qkv_kernel=False,
        lora_o_kernel=False, lora_mlp_kernel=False, bf16=True,
    )  # fmt: skip
    del config["blob"]
    config.update(overrides)
    return config


def test_ivon_bad_inputs(tiny_model_dir, completion_data, tmp_path):
    deepspeed_json = tmp_path / "ds.json"
    deepspeed_json.write_text('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}')
    cases = [
        ({"ivon": {"hess_int": 0.1}}, "unknown key 'ivon.hess_int'. Did you mean 'ivon.hess_init'?"),
        ({"ivon": {"ess": 0}}, r"ivon.ess\n  Input should be greater than 0"),
        ({"ivon": {"beta2": 1.0}}, r"ivon.beta2\n  Input should be less than 1"),
        ({"ivon": {"mc_samples": 0}}, r"ivon.mc_samples\n  Input should be greater than or equal to 1"),
        ({"optimizer": "adamw_torch", "ivon": {}}, "an 'ivon:' block is set but optimizer is 'adamw_torch'"),
        ({"adapter": "blob"}, "optimizer: ivon cannot be combined with adapter: blob"),
        ({"deepspeed": str(deepspeed_json)}, "DeepSpeed would silently replace IVON"),
        ({"fp16": True}, "optimizer: ivon cannot be combined with 'fp16': the loss scaler"),
        ({"bf16": "auto"}, "optimizer: ivon with bf16 unset \\('auto'\\) on a machine without bf16 GPU support: Axolotl would switch on fp16"),
        ({"rl": "dpo"}, "optimizer: ivon cannot be combined with 'rl'"),
    ]
    for overrides, message in cases:
        with pytest.raises(Exception, match=message):
            validate(tmp_path, ivon_base(tiny_model_dir, completion_data, tmp_path, **overrides))


def test_valid_ivon_config(tiny_model_dir, completion_data, tmp_path):
    cfg = validate(tmp_path, ivon_base(tiny_model_dir, completion_data, tmp_path, ivon={"ess": 1e6}))
    assert cfg.optimizer == "ivon" and cfg.ivon["ess"] == 1e6


def rank_base(tiny_model_dir, completion_data, tmp_path, **overrides) -> dict:
    config = base_config(
        tiny_model_dir, completion_data, tmp_path / "out", adapter="adalora",
        rank_scheduler={"importance": "sensitivity", "target_r": 2, "t_init": 4, "t_final": 6},
    )  # fmt: skip
    del config["blob"]
    config.update(overrides)
    return config


RANK_BAD_INPUTS = [
    ("unknown key", {"rank_scheduler": {"importance": "snr", "target": 2}}, "unknown key 'rank_scheduler.target'. Did you mean 'rank_scheduler.target_r'?"),
    ("unknown importance", {"rank_scheduler": {"importance": "magnitude", "target_r": 2}}, r"rank_scheduler.importance\n  Input should be 'snr', 'snr_abs' or 'sensitivity'"),
    ("target above init", {"rank_scheduler": {"importance": "sensitivity", "target_r": 6}}, r"rank_scheduler.target_r \(6\) is larger than the starting rank 4 \(lora_r\)"),
    ("init_r disagrees with lora_r", {"rank_scheduler": {"importance": "sensitivity", "target_r": 2, "init_r": 8}}, r"rank_scheduler.init_r \(8\) and lora_r \(4\) disagree"),
    ("snr without a posterior", {"rank_scheduler": {"importance": "snr", "target_r": 2}}, "rank_scheduler.importance 'snr' reads a posterior, and optimizer 'adamw_torch' has none"),
    ("no room to prune", {"rank_scheduler": {"importance": "sensitivity", "target_r": 2, "t_init": 12, "t_final": 8}}, r"t_init \+ rank_scheduler.t_final = 12 \+ 8 = 20 must be smaller than the run's 20 optimizer steps"),
    ("adalora without scheduler", {"rank_scheduler": None}, "adapter: adalora needs a 'rank_scheduler:' block"),
    ("scheduler with plain lora", {"adapter": "lora"}, "'rank_scheduler:' works with adapter: adalora or adapter: blob, not 'lora'"),
    ("adalora with DoRA", {"peft_use_dora": True}, "adapter: adalora cannot be combined with 'peft_use_dora'"),
    ("best-model reload", {"load_best_model_at_end": True}, "rank_scheduler cannot be combined with 'load_best_model_at_end'"),
    ("blob without lora_r", {"adapter": "blob", "lora_r": None, "rank_scheduler": {"importance": "snr", "target_r": 2, "init_r": 4}}, "adapter: blob with a rank_scheduler needs lora_r"),
    ("blob with alpha pattern", {"adapter": "blob", "lora_alpha_pattern": {"q_proj": 16}, "rank_scheduler": {"importance": "snr", "target_r": 2}}, "rank_scheduler cannot be combined with 'lora_alpha_pattern'"),
    ("adalora with LoftQ", {"peft": {"loftq_config": {"loftq_bits": 4}}}, "adapter: adalora cannot be combined with 'peft.loftq_config'"),
    ("regulariser with blob", {"adapter": "blob", "rank_scheduler": {"importance": "snr", "target_r": 2, "orth_reg_weight": 0.1}}, "adapter: blob has none"),
]


@pytest.mark.parametrize("case, overrides, message", RANK_BAD_INPUTS, ids=[row[0] for row in RANK_BAD_INPUTS])
def test_rank_scheduler_bad_inputs(case, overrides, message, tiny_model_dir, completion_data, tmp_path):
    config = rank_base(tiny_model_dir, completion_data, tmp_path, **overrides)
    with pytest.raises(Exception, match=message):
        validate(tmp_path, config)


def test_valid_rank_scheduler_configs(tiny_model_dir, completion_data, tmp_path):
    cfg = validate(tmp_path, rank_base(tiny_model_dir, completion_data, tmp_path))
    assert cfg.rank_scheduler["beta1"] == 0.85 and cfg.rank_scheduler["orth_reg_weight"] == 0.1
    blob = {"adapter": "blob", "rank_scheduler": {"importance": "snr", "target_r": 2}}  # BLoB is its own posterior
    assert validate(tmp_path, rank_base(tiny_model_dir, completion_data, tmp_path, **blob)).rank_scheduler["importance"] == "snr"
    ivon = {"optimizer": "ivon", "bf16": True, "rank_scheduler": {"importance": "snr_abs", "target_r": 2}}
    assert validate(tmp_path, rank_base(tiny_model_dir, completion_data, tmp_path, **ivon)).optimizer == "ivon"


ZERO2 = {"zero_optimization": {"stage": 2}}
FSDP2 = {"fsdp_version": 2, "fsdp_config": {"state_dict_type": "FULL_STATE_DICT"}}
BLOB_RANK = {"adapter": "blob", "rank_scheduler": {"importance": "snr", "target_r": 2}}
ENGINE_BAD_INPUTS = [  # (case, base config, overrides, message naming the key and the fix); a dict under
    # 'deepspeed' is written to ds.json and the config points at that file, as a user's does
    ("blob with DeepSpeed optimizer section", "blob", {"deepspeed": {**ZERO2, "optimizer": {"type": "AdamW"}}},
     r"adapter: blob with DeepSpeed config '.*ds\.json', which has an 'optimizer' section: DeepSpeed would replace "
     r"the optimizer that takes BLoB's KL and σ steps; remove the section"),
    ("blob with DeepSpeed scheduler section", "blob", {"deepspeed": {**ZERO2, "scheduler": {"type": "WarmupLR"}}},
     r"adapter: blob with DeepSpeed config '.*ds\.json', which has a 'scheduler' section: .*remove the section and "
     r"set lr_scheduler / warmup_steps instead"),
    ("blob with optimizer offload", "blob",
     {"deepspeed": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}},
     r"offload_optimizer \(device 'cpu'\) makes DeepSpeed refuse any optimizer but its own CPU Adam, .*add "
     r"'\"zero_force_ds_cpu_optimizer\": false' to the JSON \(top level\), or remove offload_optimizer"),
    ("blob with ZeRO-3 not gathering on save", "blob", {"deepspeed": {"zero_optimization": {"stage": 3}}},
     r"\(ZeRO-3\): set 'stage3_gather_16bit_weights_on_model_save: true' in zero_optimization; the adapter and the "
     r"posterior of every checkpoint are written from that gathered state dict"),
    ("blob unclipped G with DeepSpeed", "blob", {"deepspeed": ZERO2, "blob": {"clip_sigma_grad": False}},
     r"blob.clip_sigma_grad: false with DeepSpeed: its engine clips every parameter it steps \(gradient_clipping "
     r"from max_grad_norm\), G included; remove clip_sigma_grad, or train without DeepSpeed"),
    ("blob with FSDP1", "blob", {"fsdp_version": 1, "fsdp_config": {"state_dict_type": "FULL_STATE_DICT"}},
     r"adapter: blob with FSDP1: .*; set 'fsdp_version: 2'"),
    ("blob with sharded FSDP2 checkpoints", "blob",
     {"fsdp_version": 2, "fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"}},
     r"adapter: blob with FSDP2 needs 'fsdp_config.state_dict_type: FULL_STATE_DICT' \(now 'SHARDED_STATE_DICT'\)"),
    ("blob with FSDP2 and no state dict type", "blob", {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}},
     r"adapter: blob with FSDP2 needs 'fsdp_config.state_dict_type: FULL_STATE_DICT' \(now None\)"),
    ("ivon with DeepSpeed", "ivon", {"deepspeed": ZERO2},
     r"optimizer: ivon cannot be combined with 'deepspeed': ZeRO hands IVON the rank's flat fp32 partition, which the "
     r"forward never reads \(measured on 2 ranks, .*\).*; not built, use DDP or FSDP2 \(fsdp_version: 2\)"),
    ("ivon with FSDP1", "ivon", {"fsdp_version": 1, "fsdp_config": {"state_dict_type": "FULL_STATE_DICT"}},
     r"optimizer: ivon with FSDP1: FSDP1 hands the optimizer flattened parameters .*; set 'fsdp_version: 2'"),
    ("ivon with sharded FSDP2 checkpoints", "ivon",
     {"fsdp_version": 2, "fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"}},
     r"optimizer: ivon with FSDP2 needs 'fsdp_config.state_dict_type: FULL_STATE_DICT' \(now 'SHARDED_STATE_DICT'\): "
     r"IVON's posterior .* is read back from each checkpoint's gathered optimizer.bin"),
    ("adalora with DeepSpeed", "adalora", {"deepspeed": ZERO2},
     r"adapter: adalora cannot be combined with 'deepspeed': pruning edits weights in place, .*; use DDP"),
    ("adalora with FSDP2", "adalora", FSDP2,
     r"adapter: adalora cannot be combined with 'fsdp_config': AdaLoRA's orthogonality regulariser ‖QQᵀ − I‖ needs every "
     r"module's whole Q .*: measured on 2 ranks \(bench/sharded_engines_probe.py fsdp2-rank\), Q is all-gathered "
     r"twice in forward and once in backward .*; not built, use DDP"),
    ("blob rank scheduling with DeepSpeed", "adalora", {**BLOB_RANK, "deepspeed": ZERO2},
     r"rank_scheduler cannot be combined with 'deepspeed': pruning reads and masks whole factors .*; use DDP"),
    ("blob rank scheduling with FSDP2", "adalora", {**BLOB_RANK, **FSDP2},
     r"rank_scheduler cannot be combined with 'fsdp_config': its scores and masks would work on FSDP2's DTensor shards "
     r"\(measured on 2 ranks, bench/sharded_engines_probe.py fsdp2-rank: .*\), but the scheduler's state, saved "
     r"pattern and final rank cut are written for whole factors; not built, use DDP"),
]  # fmt: skip


def engine_config(base: str, overrides: dict, tiny_model_dir, completion_data, tmp_path) -> dict:
    """`base` ('blob', 'ivon' on adapter: lora, 'adalora') with `overrides`; a DeepSpeed dict goes to ds.json."""
    overrides = dict(overrides)
    if isinstance(overrides.get("deepspeed"), dict):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(overrides["deepspeed"]))
        overrides["deepspeed"] = str(path)
    if base == "ivon":
        return ivon_base(tiny_model_dir, completion_data, tmp_path, **overrides)
    if base == "adalora":
        return rank_base(tiny_model_dir, completion_data, tmp_path, **overrides)
    return {**base_config(tiny_model_dir, completion_data, tmp_path / "out"), **overrides}


@pytest.mark.parametrize("case, base, overrides, message", ENGINE_BAD_INPUTS, ids=[row[0] for row in ENGINE_BAD_INPUTS])
def test_engine_bad_inputs(case, base, overrides, message, tiny_model_dir, completion_data, tmp_path):
    config = engine_config(base, overrides, tiny_model_dir, completion_data, tmp_path)
    with pytest.raises(Exception, match=message):
        validate(tmp_path, config)


@pytest.mark.parametrize("fsdp_config", [
    {"state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True},
    {"fsdp_state_dict_type": "FULL_STATE_DICT"},  # the deprecated prefixed spelling, which Axolotl renames later
], ids=["state_dict_type", "fsdp_-prefixed"])  # fmt: skip
def test_blob_on_fsdp2_passes_axolotl_validation(fsdp_config, tiny_model_dir, completion_data, tmp_path):
    config = base_config(tiny_model_dir, completion_data, tmp_path / "out", fsdp_version=2, fsdp_config=fsdp_config)
    cfg = validate(tmp_path, config)
    assert cfg.adapter == "blob" and cfg.fsdp_version == 2
    assert cfg.fsdp_config.state_dict_type == "FULL_STATE_DICT" and cfg.fsdp_config.fsdp_version == 2


def test_ivon_on_fsdp2_passes_axolotl_validation(tiny_model_dir, completion_data, tmp_path):
    cfg = validate(tmp_path, ivon_base(tiny_model_dir, completion_data, tmp_path, **FSDP2))
    assert cfg.optimizer == "ivon" and cfg.fsdp_version == 2 and cfg.fsdp_config.state_dict_type == "FULL_STATE_DICT"


def test_an_fsdp_config_without_a_version_is_read_as_axolotl_reads_it(tiny_model_dir, completion_data, tmp_path):
    """Axolotl 0.19 takes it for FSDP1 (refused, naming the fix); 0.21, which removed FSDP1, for FSDP2 (accepted)."""
    from axolotl_blob.compat import axolotl_version

    config = base_config(tiny_model_dir, completion_data, tmp_path / "out", fsdp_config={"state_dict_type": "FULL_STATE_DICT"})
    if axolotl_version() >= (0, 21):
        assert validate(tmp_path, config).adapter == "blob"
    else:
        with pytest.raises(Exception, match=r"adapter: blob with FSDP1: .*; set 'fsdp_version: 2'"):
            validate(tmp_path, config)
