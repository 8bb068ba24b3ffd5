"""Every GPU example config (example_configs/gpu/*.yml) passes `axolotl.cli.config.load_cfg` as shipped, offline.

load_cfg reads the base model's config.json from the Hub: here it comes from a Hugging Face cache built in tmp_path
holding Llama 3.1 8B's config.json, so the files validate unmodified. Nothing else is patched for the CPU: Axolotl's
validation checks neither flash-attn (`flash_attention: true` becomes `attn_implementation: flash_attention_2`, read
at model load), nor bitsandbytes for `load_in_4bit`, nor the fused optimizer; a missing bf16/tf32 GPU is a warning.
One runtime step is skipped, named where it is. The ZeRO-2 recipe needs DeepSpeed installed (the py311 CI leg).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
GPU_EXAMPLES = sorted((ROOT / "example_configs" / "gpu").glob("*.yml"))
BASE_MODEL = "NousResearch/Meta-Llama-3.1-8B"
LLAMA_31_8B = {  # the base model's config.json as the Hub serves it
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}


def engine(path: Path) -> str:
    raw = yaml.safe_load(path.read_text())
    return "deepspeed" if raw.get("deepspeed") else "fsdp" if raw.get("fsdp_config") else "ddp"


def method(path: Path) -> str:
    raw = yaml.safe_load(path.read_text())
    return "ivon" if raw.get("optimizer") == "ivon" else raw["adapter"]


def test_the_recipes_ship():
    assert sorted((method(path), engine(path)) for path in GPU_EXAMPLES) == [
        ("blob", "ddp"), ("blob", "deepspeed"), ("blob", "fsdp"), ("ivon", "fsdp"),
    ]  # fmt: skip


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> Path:
    """A Hugging Face cache holding only the base model's config.json (models--org--name/snapshots/<commit>/ and
    refs/main), used in place of the real cache: huggingface_hub reads its cache path once, at import."""
    import huggingface_hub.constants

    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / f"models--{BASE_MODEL.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps(LLAMA_31_8B))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    return hf_home


@pytest.mark.parametrize("path", GPU_EXAMPLES, ids=[path.stem for path in GPU_EXAMPLES])
def test_gpu_example_config_validates_as_shipped(path, fake_hub, monkeypatch):
    from axolotl.cli.config import load_cfg

    from axolotl_blob.args import check_blob_engine, check_ivon_fsdp

    raw = yaml.safe_load(path.read_text())
    kind = engine(path)
    if kind == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            pytest.skip("DeepSpeed not installed (load_cfg imports it for a deepspeed: config): py311 CI leg only")
        # In a single process load_cfg also starts a one-rank DeepSpeed process group (it needs MASTER_ADDR, which
        # no launcher set here); `axolotl preprocess` skips exactly that step with this variable, and so does this test.
        monkeypatch.setenv("AXOLOTL_IS_PREPROCESS", "1")
    monkeypatch.chdir(ROOT)  # the configs' relative paths (the DeepSpeed JSON) are read from the repository root

    cfg = load_cfg(str(path))

    assert cfg.base_model == BASE_MODEL and cfg.model_config_type == "llama" and cfg.is_llama_derived_model
    assert "axolotl_blob.BlobPlugin" in cfg.plugins
    if method(path) == "ivon":
        assert cfg.adapter == "qlora" and cfg.optimizer == "ivon" and cfg.ivon["clip_radius"] == 0.001
        check_ivon_fsdp(raw)  # what the plugin's validator ran inside load_cfg, on the same file
    else:
        assert cfg.adapter == "blob" and cfg.blob["kl_lr"] == 0.002
        check_blob_engine(raw)
    assert cfg.load_in_4bit is True and cfg.attn_implementation == "flash_attention_2"
    assert cfg.bf16 is True and not cfg.fp16 and os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if kind == "deepspeed":
        zero = cfg.deepspeed["zero_optimization"]  # Axolotl read the shipped JSON
        assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu"
        assert cfg.deepspeed["zero_force_ds_cpu_optimizer"] is False
        assert not {"optimizer", "scheduler"} & cfg.deepspeed.keys()
        assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "true" and os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
        assert cfg.fsdp_config is None
    elif kind == "fsdp":
        assert cfg.fsdp_version == 2 and cfg.fsdp_config.state_dict_type == "FULL_STATE_DICT"
        assert cfg.fsdp_config.transformer_layer_cls_to_wrap == "LlamaDecoderLayer"
        assert not cfg.fsdp_config.cpu_ram_efficient_loading  # Axolotl refuses it with load_in_4bit under FSDP2
        assert os.environ["ACCELERATE_USE_FSDP"] == "true" and os.environ["FSDP_VERSION"] == "2"
        assert os.environ["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
        assert not cfg.deepspeed
    else:
        assert not cfg.deepspeed and cfg.fsdp_config is None


def test_the_engine_check_reads_what_the_recipes_ship(monkeypatch):
    """check_blob_engine and check_ivon_fsdp accept the shipped recipes because of the keys they set: without each,
    they refuse them."""
    from axolotl_blob.args import check_blob_engine, check_ivon_fsdp

    monkeypatch.chdir(ROOT)
    by_engine = {engine(path): yaml.safe_load(path.read_text()) for path in GPU_EXAMPLES if method(path) == "blob"}
    zero2 = by_engine["deepspeed"]
    deepspeed_json = json.loads(Path(zero2["deepspeed"]).read_text())
    del deepspeed_json["zero_force_ds_cpu_optimizer"]
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer"):
        check_blob_engine({**zero2, "deepspeed": deepspeed_json})
    fsdp2 = copy.deepcopy(by_engine["fsdp"])
    fsdp2["fsdp_config"]["state_dict_type"] = "SHARDED_STATE_DICT"
    with pytest.raises(ValueError, match="FULL_STATE_DICT"):
        check_blob_engine(fsdp2)
    ivon = next(yaml.safe_load(path.read_text()) for path in GPU_EXAMPLES if method(path) == "ivon")
    ivon["fsdp_config"]["state_dict_type"] = "SHARDED_STATE_DICT"
    with pytest.raises(ValueError, match="optimizer: ivon with FSDP2 needs .*FULL_STATE_DICT"):
        check_ivon_fsdp(ivon)
