"""The plugin's YAML blocks as strict pydantic models.

Axolotl drops unknown top-level keys silently, so every block here rejects unknown keys itself and names the
closest valid one. Cross-key checks run at config validation, before any weights load.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from axolotl_blob.blob.layer import DEFAULT_EVAL_DRAWS
from axolotl_blob.blob.model import missing_posterior_files
from axolotl_blob.cloze import CLOZE_TYPE
from axolotl_blob.compat import axolotl_version
from axolotl_blob.multiple_choice import MULTIPLE_CHOICE_TYPE, choice_count, read_examples
from axolotl_blob.rank.budget import check_steps


class StrictBlock(BaseModel):
    """A YAML block that rejects unknown keys, naming `block.key`, the closest valid key and the allowed ones."""

    model_config = ConfigDict(extra="forbid")
    block: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        allowed = list(cls.model_fields)
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" Did you mean '{cls.block}.{close[0]}'?" if close else ""
                raise ValueError(f"unknown key '{cls.block}.{key}'.{hint} Allowed keys: {', '.join(allowed)}")
        return data


class BlobSettings(StrictBlock):
    """The `blob:` block: BLoB's prior, posterior initialisation, KL schedule and sample counts."""

    block = "blob"

    prior_std: float = Field(0.2, gt=0, description="β, std of the N(0, β²) prior on A")
    init_std: float = Field(0.05, gt=0, description="ε: G starts uniform in [ε/√2, ε], σ = G²")
    kl_weighting: Literal["reweight", "uniform"] = Field(
        "reweight", description="reweight: π_t = 2^j/(2^(K+1)−1) within cycles of K steps; uniform: π_t = 1/K"
    )
    kl_lr: float = Field(
        0.002, ge=0, description="η_0 of BLoB's SGD step on π_t·KL (and on G's NLL gradient under sigma_update: reference); follows the LR schedule"
    )
    sigma_update: Literal["reference", "optimizer"] = Field(
        "reference",
        description="reference: G is not in the Trainer's optimizer, one SGD step of kl_lr moves it on its NLL gradient + π_t·∂KL/∂G; "
        "optimizer: G is in the Trainer's optimizer at learning_rate, the KL step apart",
    )
    kl_cycle_steps: PositiveInt | Literal["rescaled"] | None = Field(
        None,
        description="cycle length K in optimizer steps; 'rescaled': the reference's K = int(100·N^(π/8) / world_size / "
        "(micro_batch_size × gradient_accumulation_steps)); default: optimizer steps per epoch",
    )
    noise: Literal["flipout", "rank_signs"] = Field(
        "rank_signs",  # within seed noise of flipout in the paper-protocol study (docs/studies.md), at LoRA's cost
        description="how a layer samples A: rank_signs: output signs per token, the same per-token N(M, σ²) and "
        "uncorrelated tokens, at LoRA's cost; flipout (the reference): input and output sign flips per token",
    )
    train_samples: int = Field(1, ge=1, description="posterior samples per training forward (NLL averaged)")
    eval_samples: int = Field(10, ge=0, description="posterior samples averaged at evaluation; 0 = posterior mean")
    eval_draws: Literal["per_token", "whole_weights"] = Field(
        DEFAULT_EVAL_DRAWS,
        description="how evaluation samples q(A) (calibration, evaluate, predict, the BMA eval loss, TFB's search; saved "
        "with the posterior): per_token: the training noise path's per-token draws (Flipout under noise: flipout, the "
        "reference's evaluation); whole_weights: one A per layer and forward, shared by every token",
    )
    clip_sigma_grad: bool = Field(
        True,
        description="false (the reference): max_grad_norm clips every other parameter, and G's NLL gradient is neither "
        "clipped nor counted in the global norm (needs sigma_update: reference, and no DeepSpeed)",
    )
    init_missing_posterior: bool = Field(
        False,
        description="with lora_model_dir holding a plain LoRA adapter: start σ fresh instead of failing",
    )


class IvonSettings(StrictBlock):
    """The `ivon:` block. `learning_rate`, `adam_beta1`, `weight_decay`, `max_grad_norm` and the LR schedule are
    Axolotl's own keys and keep their meaning."""

    block = "ivon"

    ess: float | None = Field(None, gt=0, description="effective sample size λ; default: the number of training examples")
    hess_init: float = Field(
        1.0, gt=0, description="h0, the initial Hessian estimate; σ starts at 1/sqrt(ess·(h0 + weight_decay))"
    )
    beta2: float = Field(0.99999, ge=0, lt=1, description="Hessian EMA rate")
    mc_samples: int = Field(1, ge=1, description="weight samples per micro-batch (each its own forward/backward)")
    clip_radius: float = Field(1.0e-3, gt=0, description="elementwise clip of the preconditioned update")
    rescale_lr: bool = Field(False, description="scale the learning rate by (h0 + δ)")
    eval_samples: int = Field(10, ge=0, description="posterior samples averaged at calibration; 0 = posterior mean")
    seed: int = Field(0, description="seed of the optimizer's own noise generator (the same on every rank)")


class MultipleChoiceSettings(StrictBlock):
    """The `multiple_choice:` block: how `type: axolotl_blob.multiple_choice` data is trained, for every adapter."""

    block = "multiple_choice"

    likelihood: Literal["vocabulary", "choices"] = Field(
        "vocabulary",
        description="vocabulary: the answer letter's NLL over the whole vocabulary; choices: the cross-entropy over "
        "the K answer letters only (the BLoB reference's likelihood, what calibration mode 'choices' scores)",
    )


def _dataset_entries(data: dict) -> Iterator[tuple[str, int, Any, Any]]:
    """(key, index, type, path) of every entry of `datasets` and `test_datasets` (dicts or Axolotl's models)."""
    for key in ("datasets", "test_datasets"):
        for i, entry in enumerate(data.get(key) or []):
            kind, path = (entry.get(k) if isinstance(entry, dict) else getattr(entry, k, None) for k in ("type", "path"))
            yield key, i, kind, path


def reject_keys(data: dict, feature: str, rows: tuple[tuple[str, str], ...]) -> None:
    """Raise for the first (key, reason) row whose key is set: the feature cannot be combined with it."""
    for key, why in rows:
        if data.get(key):
            raise ValueError(f"{feature} cannot be combined with '{key}': {why}")


def _fp16_by_default(data: dict) -> bool:
    """Whether Axolotl will turn fp16 on by itself: bf16 left at 'auto' where no GPU supports bf16 (CPUs too)."""
    from transformers.utils import is_torch_bf16_gpu_available

    unset = data.get("bf16", "auto") == "auto" and data.get("fp16") is None and not data.get("float16")
    return unset and not data.get("use_ray") and not is_torch_bf16_gpu_available()


def _deepspeed_config(value: Any) -> dict:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and Path(value).is_file():
        return json.loads(Path(value).read_text())
    return {}


def _fsdp_version(data: dict) -> int | None:
    """FSDP's version as Axolotl resolves it (top-level `fsdp_version`, else `fsdp_config.fsdp_version`, else
    Axolotl's default: 1 on 0.19, 2 from 0.21, which removed FSDP1), or None without FSDP."""
    fsdp_config = data.get("fsdp_config") or {}
    if not (data.get("fsdp") or fsdp_config):
        return None
    version = data.get("fsdp_version") or (fsdp_config.get("fsdp_version") if isinstance(fsdp_config, dict) else None)
    return int(version or (2 if axolotl_version() >= (0, 21) else 1))


IVON_UNDER_ZERO = (
    "ZeRO hands IVON the rank's flat fp32 partition, which the forward never reads (measured on 2 ranks, "
    "bench/sharded_engines_probe.py zero2-ivon: a sample written there changes the forward by 0 until DeepSpeed's "
    "update_lp_params copies and all-gathers every partition, and bringing the mean back takes a second all-gather), "
    "and it sums the micro-batches' gradients into that partition, so that only one sample per optimizer step, shared "
    "by its micro-batches, could be exact (ZeRO-3 steps flat fp32 partitions too); not built, use DDP or FSDP2 "
    "(fsdp_version: 2)"
)


def require_full_state_dict(data: dict, feature: str, why: str) -> None:
    """FSDP2 checkpoints must be gathered where a feature reads its posterior back from them."""
    fsdp_config = data.get("fsdp_config") or {}
    state_dict_type = fsdp_config.get("state_dict_type") or fsdp_config.get("fsdp_state_dict_type")
    if state_dict_type != "FULL_STATE_DICT":
        raise ValueError(
            f"{feature} with FSDP2 needs 'fsdp_config.state_dict_type: FULL_STATE_DICT' (now {state_dict_type!r}): {why}"
        )


def check_ivon_fsdp(data: dict) -> None:
    """`optimizer: ivon` under FSDP: FSDP2 only (IVON's state, sample and update live on the DTensor shards), with
    gathered checkpoints, where the posterior is read back from."""
    version = _fsdp_version(data)
    if version == 1:
        raise ValueError(
            "optimizer: ivon with FSDP1: FSDP1 hands the optimizer flattened parameters whose shards split tensors "
            "at arbitrary offsets, and IVON draws and updates its state on DTensor shards; set 'fsdp_version: 2'"
        )
    if version == 2:
        require_full_state_dict(
            data, "optimizer: ivon", "IVON's posterior (σ from the Hessian in the optimizer state) is read back from "
            "each checkpoint's gathered optimizer.bin, and a sharded checkpoint has none"
        )


RANK_SCHEDULING_UNDER_FSDP = (
    "its scores and masks would work on FSDP2's DTensor shards (measured on 2 ranks, bench/sharded_engines_probe.py "
    "fsdp2-rank: scores need one length-r reduction per module, masks none), but the scheduler's state, saved "
    "pattern and final rank cut are written for whole factors; not built, use DDP"
)
ADALORA_UNDER_FSDP = (
    "AdaLoRA's orthogonality regulariser ‖QQᵀ − I‖ needs every module's whole Q (r × d_in), which FSDP2 shards by "
    "rank rows: measured on 2 ranks (bench/sharded_engines_probe.py fsdp2-rank), Q is all-gathered twice in forward "
    "and once in backward per module and micro-batch (the importance scores need only a length-r reduction); not "
    "built, use DDP"
)


def check_blob_engine(data: dict) -> None:
    """`adapter: blob` under DeepSpeed or FSDP: what must hold for BLoB's optimizer and its saved posterior."""
    where = f"DeepSpeed config {data['deepspeed']!r}" if isinstance(data.get("deepspeed"), str) else "the DeepSpeed config"
    deepspeed = _deepspeed_config(data.get("deepspeed"))
    zero = deepspeed.get("zero_optimization") or {}
    if "optimizer" in deepspeed:
        raise ValueError(
            f"adapter: blob with {where}, which has an 'optimizer' section: DeepSpeed would replace the optimizer "
            "that takes BLoB's KL and σ steps; remove the section (the Trainer then builds `optimizer:` and "
            "DeepSpeed runs it)"
        )
    if "scheduler" in deepspeed:
        raise ValueError(
            f"adapter: blob with {where}, which has a 'scheduler' section: BLoB's KL step follows the Trainer's LR "
            "schedule; remove the section and set lr_scheduler / warmup_steps instead"
        )
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload != "none" and deepspeed.get("zero_force_ds_cpu_optimizer", True) is not False:
        raise ValueError(
            f"adapter: blob with {where}: offload_optimizer (device {offload!r}) makes DeepSpeed refuse any "
            "optimizer but its own CPU Adam, and BLoB wraps the Trainer's; add '\"zero_force_ds_cpu_optimizer\": "
            "false' to the JSON (top level), or remove offload_optimizer"
        )
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        raise ValueError(
            f"adapter: blob with {where} (ZeRO-3): set 'stage3_gather_16bit_weights_on_model_save: true' in "
            "zero_optimization; the adapter and the posterior of every checkpoint are written from that gathered "
            "state dict, without it from empty shards"
        )
    version = _fsdp_version(data)
    if version == 1:
        raise ValueError(
            "adapter: blob with FSDP1: it shards flattened parameters that the logged KL and the saved posterior "
            "cannot gather; set 'fsdp_version: 2' (FSDP2's DTensor shards are gathered)"
        )
    if version == 2:
        require_full_state_dict(
            data, "adapter: blob", "every checkpoint's adapter and posterior are written from the gathered state "
            "dict, and a sharded one writes neither"
        )


def check_unclipped_sigma(data: dict, settings: dict) -> None:
    """`blob.clip_sigma_grad: false` leaves G out of the Trainer's clipping; what must hold for that."""
    if settings.get("sigma_update") == "optimizer":
        raise ValueError(
            "blob.clip_sigma_grad: false needs blob.sigma_update: reference (G outside the Trainer's optimizer, as in "
            "the reference); under 'optimizer' G's clipped gradient feeds AdamW: remove one of the two"
        )
    if data.get("deepspeed"):
        raise ValueError(
            "blob.clip_sigma_grad: false with DeepSpeed: its engine clips every parameter it steps (gradient_clipping "
            "from max_grad_norm), G included; remove clip_sigma_grad, or train without DeepSpeed (DDP, FSDP2)"
        )


class CalibrationDataset(StrictBlock):
    """One multiple-choice JSONL file to evaluate."""

    block = "calibration.datasets[]"

    path: str
    name: str | None = Field(None, description="names the metrics when there are several datasets; default: file stem")
    ood: bool = Field(
        False, description="out-of-distribution: also report the AUROC of telling it apart from the other datasets"
    )

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


class CalibrationSettings(StrictBlock):
    """The `calibration:` block: what to evaluate, how, and when (every Axolotl evaluation, and at the end)."""

    block = "calibration"

    datasets: list[CalibrationDataset] = Field(default_factory=list, description="multiple-choice JSONL files (mode choices)")
    mode: Literal["choices", "tokens"] = Field(
        "choices", description="choices: label-token probabilities of multiple-choice prompts; tokens: every supervised token of the eval split"
    )
    n_bins: int = Field(15, ge=1, description="equal-width confidence bins for ECE / MCE")
    samples: int | None = Field(None, ge=0, description="posterior samples averaged; 0 = posterior mean; default: the adapter's own")
    batch_size: int = Field(8, ge=1, description="prompts per forward pass")
    plots: bool = Field(True, description="write a reliability-diagram PNG per dataset and evaluation")
    at_end: bool = Field(True, description="also evaluate once when training ends")
    fit_temperature: str | None = Field(
        None,
        description="multiple-choice JSONL of held-out examples: at every evaluation a temperature T is fitted on it "
        "(each posterior draw's choice logits / T, the same draws as the evaluation), the datasets are scored with "
        "it, and the last T is saved as output_dir/temperature.json; default: no temperature",
    )

    @model_validator(mode="after")
    def _datasets_fit_the_mode(self) -> "CalibrationSettings":
        if self.mode == "choices":
            if not self.datasets:
                raise ValueError("calibration.mode 'choices' needs calibration.datasets (multiple-choice JSONL files)")
            for dataset in self.datasets:
                if not Path(dataset.path).is_file():
                    raise ValueError(f"calibration.datasets: file '{dataset.path}' does not exist")
                read_examples(dataset.path)  # every line checked now, before any weights load
            labels = [dataset.label for dataset in self.datasets]
            if len(set(labels)) != len(labels):
                raise ValueError(f"calibration.datasets: names {labels} repeat; give each a distinct 'name'")
            self._check_ood_label_sets()
            self._check_held_out_file()
        elif self.datasets:
            raise ValueError("calibration.mode 'tokens' scores Axolotl's own eval split; remove calibration.datasets")
        elif self.fit_temperature:
            raise ValueError("calibration.fit_temperature scores multiple-choice questions: set calibration.mode: choices")
        return self

    def _check_held_out_file(self) -> None:
        """T must be fitted on examples the reports are not computed on."""
        if not self.fit_temperature:
            return
        if not Path(self.fit_temperature).is_file():
            raise ValueError(f"calibration.fit_temperature: file '{self.fit_temperature}' does not exist")
        read_examples(self.fit_temperature)  # every line checked now, before any weights load
        scored = [d.path for d in self.datasets if Path(d.path).resolve() == Path(self.fit_temperature).resolve()]
        if scored:
            raise ValueError(
                f"calibration.fit_temperature: '{self.fit_temperature}' is also in calibration.datasets; fit T on "
                "held-out examples the reports are not computed on (e.g. a slice of the training file)"
            )

    def _check_ood_label_sets(self) -> None:
        """OOD questions must be scored over the same answer labels as the in-distribution ones, or max
        probabilities over different numbers of choices would be compared."""
        ood = [d for d in self.datasets if d.ood]
        if not ood:
            return
        in_distribution = [d for d in self.datasets if not d.ood]
        if not in_distribution:
            raise ValueError("calibration.datasets: every dataset is 'ood: true'; keep at least one in-distribution one")
        counts = {len(e["choices"]) for d in in_distribution for e in read_examples(d.path)}
        for dataset in ood:
            extra = sorted({len(e["choices"]) for e in read_examples(dataset.path)} - counts)
            if extra:
                raise ValueError(
                    f"calibration.datasets: OOD file '{dataset.path}' has questions with {extra} choices, the "
                    f"in-distribution datasets only {sorted(counts)}: an OOD set must use the same answer labels"
                )


class RankSchedulerSettings(StrictBlock):
    """The `rank_scheduler:` block: AdaLoRA's adaptive rank allocation, with sensitivity or posterior-SNR scores."""

    block = "rank_scheduler"

    importance: Literal["snr", "snr_abs", "sensitivity"] = Field(
        description="snr: |μ|/σ of the posterior; snr_abs: folded-normal SNR of |θ|; sensitivity: AdaLoRA's smoothed |w·∇w|"
    )
    target_r: int = Field(ge=1, description="average rank per adapted module at the end")
    init_r: int | None = Field(None, ge=1, description="rank per module at the start; default: lora_r")
    t_init: int = Field(0, ge=0, description="optimizer steps at full rank before pruning starts")
    t_final: int = Field(0, ge=0, description="optimizer steps at the end that train the final ranks")
    delta_t: int = Field(1, ge=1, description="optimizer steps between two allocations")
    beta1: float = Field(0.85, gt=0, lt=1, description="sensitivity smoothing (importance: sensitivity)")
    beta2: float = Field(0.85, gt=0, lt=1, description="sensitivity-uncertainty smoothing (importance: sensitivity)")
    orth_reg_weight: float = Field(0.1, ge=0, description="weight of AdaLoRA's orthogonality regulariser (adapter: adalora)")
    plots: bool = Field(True, description="write a PNG of the final rank per layer and module")


class BlobPluginArgs(BaseModel):
    """Top-level keys the plugin adds to Axolotl's config."""

    blob: BlobSettings | None = None
    ivon: IvonSettings | None = None
    calibration: CalibrationSettings | None = None
    rank_scheduler: RankSchedulerSettings | None = None
    multiple_choice: MultipleChoiceSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_multiple_choice_combinations(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        block = data.get("multiple_choice") if isinstance(data.get("multiple_choice"), dict) else {}
        MultipleChoiceSettings._known_keys(block)
        cloze = any(kind == CLOZE_TYPE for _, _, kind, _ in _dataset_entries(data))
        if cloze and block.get("likelihood", "choices") != "choices":
            raise ValueError(
                f"type: {CLOZE_TYPE} data trains on the K-way cross-entropy over its choices; remove "
                f"multiple_choice.likelihood {block.get('likelihood')!r} (or set it to 'choices')"
            )
        if not cloze and block.get("likelihood") != "choices":
            return data
        feature = f"type: {CLOZE_TYPE}" if cloze else "multiple_choice.likelihood 'choices'"
        wanted = CLOZE_TYPE if cloze else MULTIPLE_CHOICE_TYPE
        paths = []
        for key, i, kind, path in _dataset_entries(data):
            if kind != wanted:
                raise ValueError(f"{feature} trains on one multiple-choice format: {key}[{i}] has type {kind!r}; use 'type: {wanted}'")
            if not Path(str(path)).is_file():
                raise ValueError(f"{feature}: {key}[{i}].path {path!r} is not a local JSONL file (its number of choices is read from it)")
            paths.append(path)
        if not paths:
            raise ValueError(f"{feature} needs 'datasets' of type {wanted}")
        choice_count(paths)
        reject_keys(data, feature, (
            ("train_on_inputs", "only the answer may be supervised; remove 'train_on_inputs'"),
            ("rl", "it is a supervised multiple-choice loss; remove 'rl'"),
            *((("sample_packing", "a packed row would hold several questions, which the K-way loss cannot tell apart; remove 'sample_packing'"),) if cloze else ()),
        ))  # fmt: skip
        return data

    @model_validator(mode="before")
    @classmethod
    def _check_ivon_combinations(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        optimizer = data.get("optimizer")
        if data.get("ivon") is not None and optimizer != "ivon":
            raise ValueError(f"an 'ivon:' block is set but optimizer is {optimizer!r}; set 'optimizer: ivon' or remove 'ivon:'")
        if optimizer != "ivon":
            return data
        if data.get("adapter") == "blob":
            raise ValueError(
                "optimizer: ivon cannot be combined with adapter: blob: BLoB already learns a posterior over A by "
                "backprop, IVON would put a second one over the same weights; use adapter: lora with IVON"
            )
        if _fp16_by_default(data):
            raise ValueError(
                "optimizer: ivon with bf16 unset ('auto') on a machine without bf16 GPU support: Axolotl would switch "
                "on fp16, whose loss scaler would unscale only the last MC sample's gradient; set 'bf16: true' "
                "(bf16 autocast, also on CPU) or 'bf16: false' (fp32)"
            )
        if "optimizer" in _deepspeed_config(data.get("deepspeed")):
            raise ValueError(
                "optimizer: ivon with a DeepSpeed config that has its own 'optimizer' section: DeepSpeed would "
                "silently replace IVON; remove the 'optimizer' section from the DeepSpeed JSON"
            )
        check_ivon_fsdp(data)
        reject_keys(data, "optimizer: ivon", (
            ("deepspeed", IVON_UNDER_ZERO),
            ("fp16", "the loss scaler would unscale only the last MC sample's gradient; use bf16 or fp32"),
            ("load_best_model_at_end", "the best checkpoint's weights would meet the last step's Hessian; remove it"),
            ("rl", "IVON's Trainer integration is for supervised (SFT / pretraining) training; remove 'rl'"),
            ("reward_model", "IVON's Trainer integration is for causal-LM training; remove 'reward_model'"),
            ("process_reward_model", "IVON's Trainer integration is for causal-LM training; remove it"),
        ))  # fmt: skip
        return data

    @model_validator(mode="before")
    @classmethod
    def _check_calibration_combinations(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("calibration"), dict):
            if data["calibration"].get("mode") == "tokens" and not (data.get("val_set_size") or data.get("test_datasets")):
                raise ValueError("calibration.mode 'tokens' needs an eval split: set val_set_size or test_datasets")
        return data

    @model_validator(mode="before")
    @classmethod
    def _check_blob_combinations(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        adapter = data.get("adapter")
        if data.get("blob") is not None and adapter != "blob":
            raise ValueError(f"a 'blob:' block is set but adapter is {adapter!r}; set 'adapter: blob' or remove 'blob:'")
        if adapter != "blob":
            return data
        reject_keys(data, "adapter: blob", (
            ("rl", "BLoB trains supervised (SFT / pretraining) objectives; remove 'rl'"),
            ("peft_use_dora", "BLoB's posterior is over LoRA's A factor and has no DoRA form; remove 'peft_use_dora'"),
            ("reward_model", "BLoB trains causal-LM objectives; remove 'reward_model'"),
            ("process_reward_model", "BLoB trains causal-LM objectives; remove 'process_reward_model'"),
            ("load_best_model_at_end", "the best checkpoint's mean would meet the last step's σ; remove it"),
            ("lora_target_parameters", "BLoB wraps linear modules; use lora_target_modules instead"),
            *(
                (kernel, "Axolotl's fused LoRA kernels bypass the BLoB layer's forward; remove it")
                for kernel in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
            ),
        ))  # fmt: skip
        check_blob_engine(data)
        settings = data.get("blob") or {}
        if isinstance(settings, dict) and settings.get("clip_sigma_grad") is False:
            check_unclipped_sigma(data, settings)
        model_dir = data.get("lora_model_dir")
        if model_dir and not (isinstance(settings, dict) and settings.get("init_missing_posterior")):
            if not Path(model_dir).is_dir():
                raise ValueError(f"lora_model_dir '{model_dir}' is not a local directory")
            missing = missing_posterior_files(model_dir)
            if missing:
                raise ValueError(
                    f"lora_model_dir '{model_dir}' has no BLoB posterior ({', '.join(missing)} missing). "
                    "Point it at a directory saved by an 'adapter: blob' run, or set "
                    "'blob.init_missing_posterior: true' to start σ fresh from a plain LoRA adapter."
                )
        return data

    @model_validator(mode="before")
    @classmethod
    def _check_rank_scheduler_combinations(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        adapter, block = data.get("adapter"), data.get("rank_scheduler")
        if adapter == "adalora" and block is None:
            raise ValueError("adapter: adalora needs a 'rank_scheduler:' block (at least 'importance' and 'target_r')")
        if block is None:
            return data
        if adapter not in ("adalora", "blob"):
            raise ValueError(f"'rank_scheduler:' works with adapter: adalora or adapter: blob, not {adapter!r}")
        if not isinstance(block, dict):
            return data
        RankSchedulerSettings._known_keys(block)  # a misspelt key first: the checks below read the block's keys
        lora_r, init_r = data.get("lora_r"), block.get("init_r")
        if init_r is not None and lora_r is not None and init_r != lora_r:
            raise ValueError(
                f"rank_scheduler.init_r ({init_r}) and lora_r ({lora_r}) disagree: both set the starting rank; "
                "remove one of them"
            )
        start = init_r if init_r is not None else lora_r
        if adapter == "blob" and lora_r is None:
            raise ValueError("adapter: blob with a rank_scheduler needs lora_r: the LoRA rank every module starts with")
        if start is None:
            raise ValueError("set rank_scheduler.init_r or lora_r: the rank every module starts with")
        target = block.get("target_r")
        if isinstance(target, int) and isinstance(start, int) and target > start:
            raise ValueError(
                f"rank_scheduler.target_r ({target}) is larger than the starting rank {start} "
                f"({'rank_scheduler.init_r' if init_r is not None else 'lora_r'}); rank scheduling only removes ranks"
            )
        importance = block.get("importance")
        if importance in ("snr", "snr_abs") and adapter != "blob" and data.get("optimizer") != "ivon":
            raise ValueError(
                f"rank_scheduler.importance {importance!r} reads a posterior, and optimizer {data.get('optimizer')!r} "
                "has none: use 'optimizer: ivon' (or 'adapter: blob'), or 'importance: sensitivity'"
            )
        if adapter == "blob" and "orth_reg_weight" in block:
            raise ValueError("rank_scheduler.orth_reg_weight regularises AdaLoRA's P and Q; adapter: blob has none: remove it")
        max_steps, t_init, t_final = data.get("max_steps"), block.get("t_init", 0), block.get("t_final", 0)
        if isinstance(max_steps, int) and max_steps > 0 and isinstance(t_init, int) and isinstance(t_final, int):
            check_steps(t_init, t_final, max_steps)  # without max_steps: checked once the Trainer knows its count
        reject_keys(data, "rank_scheduler", (
            ("load_best_model_at_end", "the best checkpoint's ranks are not the final pattern that is saved; remove it"),
        ))  # fmt: skip
        if adapter == "adalora":
            if (data.get("peft") or {}).get("loftq_config"):
                raise ValueError("adapter: adalora cannot be combined with 'peft.loftq_config': PEFT's AdaLoRA has no LoftQ")
            reject_keys(data, "adapter: adalora", (
                ("rl", "rank scheduling is wired into supervised (SFT / pretraining) training; remove 'rl'"),
                ("peft_use_dora", "AdaLoRA has no DoRA form (PEFT); remove 'peft_use_dora'"),
                ("peft_use_rslora", "AdaLoRA scales by lora_alpha / init_r; remove 'peft_use_rslora'"),
                ("lora_target_parameters", "AdaLoRA wraps linear modules; use lora_target_modules instead"),
                ("lora_rank_pattern", "AdaLoRA's ranks come from rank_scheduler; remove 'lora_rank_pattern'"),
                ("lora_alpha_pattern", "AdaLoRA has one lora_alpha; remove 'lora_alpha_pattern'"),
                ("peft_layer_replication", "PEFT's AdaLoRA has no layer replication; remove it"),
                ("peft_trainable_token_indices", "PEFT's AdaLoRA has no trainable tokens; remove it"),
                ("deepspeed", "pruning edits weights in place, which ZeRO's partitions would overwrite; use DDP"),
                ("fsdp", ADALORA_UNDER_FSDP),
                ("fsdp_config", ADALORA_UNDER_FSDP),
                *(
                    (kernel, "Axolotl's fused LoRA kernels are for adapter: lora; remove it")
                    for kernel in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
                ),
            ))  # fmt: skip
        else:
            reject_keys(data, "rank_scheduler", (
                ("deepspeed", "pruning reads and masks whole factors in the model, which ZeRO's master partitions "
                 "would overwrite at the next step; use DDP"),
                ("fsdp", RANK_SCHEDULING_UNDER_FSDP),
                ("fsdp_config", RANK_SCHEDULING_UNDER_FSDP),
                ("lora_rank_pattern", "every module starts at lora_r; remove it"),
                ("lora_alpha_pattern", "the saved pattern sets each pruned module's alpha; remove it"),
            ))  # fmt: skip
        return data
