"""BlobPlugin: Axolotl's hooks, each a few lines that hand over to the modules that hold the science.

Every hook does nothing unless a feature of this plugin is selected, so the plugin is safe to auto-load.
Order in a training run: register → (config validation: args.py) → pre_model_load → pre_lora_load →
load_adapter → get_trainer_cls → add_callbacks_post_trainer → post_train.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from axolotl.loaders.adapter import load_lora
from axolotl.utils.dict import DictDefault
from axolotl.utils.logging import get_logger
from transformers import set_seed

from axolotl_blob.args import MultipleChoiceSettings, RankSchedulerSettings
from axolotl_blob.blob.model import (
    POSTERIOR_CONFIG_FILE,
    POSTERIOR_FILE,
    bayesianize,
    check_posterior_files,
    load_posterior,
    missing_posterior_files,
    posterior_state_dict,
    save_posterior,
    untie_output_embeddings,
)
from axolotl_blob.blob.trainer import blob_trainer_cls, posterior_spec
from axolotl_blob.calibration.callback import CalibrationCallback
from axolotl_blob.checkpoints import check_resumable, resume_checkpoint
from axolotl_blob.compat import (
    configure_cpu_runs,
    cpu_training_args,
    patch_deepspeed_cpu_backend,
    patch_model_loader,
    patch_p2p_probe,
    warn_if_one_thread,
)
from axolotl_blob.engines import is_global_main_process, process_group_gone
from axolotl_blob.ivon.optimizer import IVON
from axolotl_blob.ivon.trainer import ivon_optimizer_kwargs, ivon_trainer_cls
from axolotl_blob.cloze import ClozeCollator, ClozeLikelihood, question_count_trainer_cls
from axolotl_blob.multiple_choice import ChoiceLikelihood, choice_count, label_token_ids
from axolotl_blob.rank.adalora import load_adalora
from axolotl_blob.rank.budget import check_steps
from axolotl_blob.rank.trainer import STATE_FILE as RANK_STATE_FILE
from axolotl_blob.rank.trainer import rank_trainer_cls
from axolotl_blob.run_config import answer_format, blob_settings, calibration_evaluator, ivon_settings

LOG = get_logger(__name__)
get_logger("axolotl_blob")  # the level of the package's stdlib loggers (compat, rank): their INFO lines reach the log


def rank_scheduler_settings(cfg: DictDefault) -> RankSchedulerSettings:
    return RankSchedulerSettings(**dict(cfg.rank_scheduler))


def uses_plugin_features(cfg: DictDefault | dict) -> bool:
    """Whether the run selects a feature of this plugin; a run that selects none is left exactly as Axolotl runs it
    (Axolotl 0.21 loads every installed plugin into every run)."""
    cfg = cfg if isinstance(cfg, DictDefault) else DictDefault(cfg)
    return (
        cfg.adapter in ("blob", "adalora")
        or cfg.optimizer == "ivon"
        or bool(cfg.rank_scheduler or cfg.calibration or cfg.multiple_choice)
        or answer_format(cfg) == "cloze"
    )


def training_choice_count(cfg: DictDefault) -> int:
    """K of the training (and test) questions; one K for all (config validation checked)."""
    return choice_count([entry["path"] for entry in [*cfg.datasets, *(cfg.test_datasets or [])]])


def _check_loss_free(trainer, feature: str) -> None:
    if trainer.compute_loss_func is not None:
        raise ValueError(
            f"{feature} replaces the Trainer's loss, which another setting already replaced "
            f"({trainer.compute_loss_func!r}); use one of them"
        )


def install_choice_likelihood(cfg: DictDefault, trainer) -> None:
    """`multiple_choice.likelihood: choices`: the Trainer's loss (and eval loss) becomes the K-way cross-entropy over
    the answer letters, for any adapter, through the Trainer's own `compute_loss_func`."""
    _check_loss_free(trainer, "multiple_choice.likelihood 'choices'")
    n_choices = training_choice_count(cfg)
    label_ids = label_token_ids(trainer.processing_class, n_choices)
    trainer.compute_loss_func = ChoiceLikelihood(label_ids)
    LOG.info(f"multiple_choice: training on the {n_choices}-way cross-entropy over the answer-letter tokens {label_ids}")


def install_cloze(cfg: DictDefault, trainer) -> None:
    """`type: axolotl_blob.cloze` data: the collators expand each question row into its K choice sequences, and the loss
    (and eval loss) becomes the K-way cross-entropy over the choices' mean token log-likelihoods."""
    _check_loss_free(trainer, "type: axolotl_blob.cloze")
    n_choices, tokenizer = training_choice_count(cfg), trainer.processing_class
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for name in ("data_collator", "train_data_collator", "eval_data_collator"):
        if getattr(trainer, name, None) is not None:
            setattr(trainer, name, ClozeCollator(getattr(trainer, name), n_choices, pad_id))
    trainer.compute_loss_func = ClozeLikelihood(n_choices)
    LOG.info(f"cloze: training on the {n_choices}-way cross-entropy over the choices' mean token log-likelihoods")


def adapter_seed(cfg: DictDefault) -> int:
    """The run's seed: `seed`, else the Trainer's default (the seed its data order and noise then use)."""
    from transformers import TrainingArguments

    return cfg.seed if cfg.seed is not None else TrainingArguments.__dataclass_fields__["seed"].default


def checkpoint_files(cfg: DictDefault) -> list[str]:
    """What a checkpoint of this run holds besides the Trainer's own state (checkpoints.py: complete)."""
    files = ["adapter_model.safetensors"] if cfg.adapter else []
    if cfg.adapter == "blob":
        files += [POSTERIOR_FILE, POSTERIOR_CONFIG_FILE]
    if cfg.rank_scheduler:
        files.append(RANK_STATE_FILE)
    return files


def _without_reinitialisation(config):
    """Axolotl ≥ 0.20 re-draws lora_A after loading when the returned config says init_lora_weights=True."""
    config = copy.copy(config)
    config.init_lora_weights = False
    return config


def _first_instance_only(plugin_cls: type[BasePlugin]) -> type[BasePlugin]:
    """Every hook of a second instance behaves as BasePlugin's (does nothing).

    Axolotl 0.21 auto-loads the entry point's class as `axolotl_blob.BlobPlugin`; a config that lists it by another
    dotted path (`axolotl_blob.plugin.BlobPlugin`) adds a second instance, whose schema would collide with the
    first's ("duplicate base class BlobPluginArgs") and whose hooks would run everything twice.
    """

    def guard(name: str, hook: Callable) -> Callable:
        inert = getattr(BasePlugin, name)

        @functools.wraps(hook)
        def run(self, *args, **kwargs):
            return (hook if self.is_first_instance() else inert)(self, *args, **kwargs)

        return run

    for name, hook in list(vars(plugin_cls).items()):
        if callable(hook) and not name.startswith("_") and hasattr(BasePlugin, name):
            setattr(plugin_cls, name, guard(name, hook))
    return plugin_cls


@_first_instance_only
class BlobPlugin(BasePlugin):
    """`adapter: blob` (Bayesian LoRA by backprop), `optimizer: ivon`, `adapter: adalora` with the `rank_scheduler:`,
    and the `calibration:` evaluation."""

    def is_first_instance(self) -> bool:
        from axolotl.integrations.base import PluginManager

        loaded = {name: p for name, p in PluginManager().plugins.items() if isinstance(p, BlobPlugin)}
        first = next(iter(loaded.values()), self)
        if first is not self and not getattr(self, "_said_inert", False):
            self._said_inert = True
            LOG.info(f"axolotl_blob: loaded as {', '.join(loaded)}; hooks run once, in {next(iter(loaded))}")
        return first is self

    def get_input_args(self) -> str:
        return "axolotl_blob.args.BlobPluginArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [AdapterCapabilities(name="blob", lora_like=True), AdapterCapabilities(name="adalora", lora_like=True)]

    def register(self, cfg: dict):
        if not uses_plugin_features(cfg):
            return
        patch_model_loader()  # each patch acts only when its condition holds (compat.py)
        patch_p2p_probe()
        configure_cpu_runs(deepspeed=bool(cfg.get("deepspeed")))
        warn_if_one_thread()
        if cfg.get("deepspeed"):
            patch_deepspeed_cpu_backend()

    def pre_model_load(self, cfg: DictDefault):
        """Files written by an earlier run must be whole: the checkpoint a run resumes from, and the posterior in
        lora_model_dir. Checked before any weights load."""
        checkpoint = resume_checkpoint(cfg.resume_from_checkpoint, cfg.auto_resume_from_checkpoints, cfg.output_dir)
        if checkpoint is not None and uses_plugin_features(cfg):
            check_resumable(checkpoint, checkpoint_files(cfg))
        if cfg.adapter == "blob" and cfg.lora_model_dir and not missing_posterior_files(cfg.lora_model_dir):
            check_posterior_files(cfg.lora_model_dir)

    def pre_lora_load(self, cfg: DictDefault, model):
        """Axolotl 0.19 draws LoRA's A (and then BLoB's σ) from the unseeded global generator; 0.21 seeds it inside
        load_lora. Seeded here for every run that uses this plugin, so the same seed gives the same adapter."""
        if uses_plugin_features(cfg):
            set_seed(adapter_seed(cfg))

    def load_adapter(self, model, cfg: DictDefault, inference: bool = False, config_only: bool = False):
        """blob: the PEFT LoRA model exactly as `adapter: lora` would build it, with a posterior on every A.
        adalora: PEFT's AdaLoRA from the same lora_* keys."""
        if cfg.adapter == "adalora":
            settings = rank_scheduler_settings(cfg)
            model, config = load_adalora(model, cfg, settings, inference=inference, config_only=config_only)
            return model, (config if config_only else _without_reinitialisation(config))
        if cfg.adapter != "blob":
            return None
        if model is not None and "lm_head" in (cfg.lora_target_modules or []):
            copied = untie_output_embeddings(model)
            if copied:
                LOG.info(
                    f"BLoB: lm_head shared its weight with the input embeddings (tie_word_embeddings); it now has its "
                    f"own frozen copy ({copied:,} parameters), so merging its LoRA leaves the embeddings unchanged"
                )
        model, lora_config = load_lora(model, cfg, inference=inference, config_only=config_only)
        if config_only:
            return None, lora_config
        settings = blob_settings(cfg)
        count = bayesianize(model, settings.init_std, noise=settings.noise)
        if cfg.lora_model_dir and not missing_posterior_files(cfg.lora_model_dir):
            load_posterior(model, cfg.lora_model_dir)
            LOG.info(f"BLoB: restored the posterior of {count} layers from {cfg.lora_model_dir}")
        else:
            LOG.info(f"BLoB: Gaussian posterior over A in {count} LoRA layers")
        return model, _without_reinitialisation(lora_config)

    def get_training_args(self, cfg: DictDefault) -> dict:
        if not uses_plugin_features(cfg):
            return {}
        # `optimizer: ivon` must not reach TrainingArguments(optim=...): a placeholder, replaced in post_trainer_create
        return {**cpu_training_args(deepspeed=bool(cfg.deepspeed)), **({"optim": "adamw_torch"} if cfg.optimizer == "ivon" else {})}

    def get_trainer_cls(self, cfg: DictDefault):
        cloze = answer_format(cfg) == "cloze"
        if cfg.adapter != "blob" and cfg.optimizer != "ivon" and not cfg.rank_scheduler and not cloze:
            return None
        from axolotl.core.trainers.base import AxolotlTrainer
        from axolotl.utils.import_helper import get_cls_from_module_str

        trainer_cls = get_cls_from_module_str(cfg.trainer_cls) if cfg.trainer_cls else AxolotlTrainer
        if cloze:
            trainer_cls = question_count_trainer_cls(trainer_cls, training_choice_count(cfg))
        if cfg.adapter == "blob":
            trainer_cls = blob_trainer_cls(trainer_cls, blob_settings(cfg))
        if cfg.rank_scheduler:  # inside IVON's sampling: the regulariser is part of each sample's loss
            trainer_cls = rank_trainer_cls(trainer_cls, rank_scheduler_settings(cfg), cfg.adapter)
        if cfg.optimizer == "ivon":
            trainer_cls = ivon_trainer_cls(trainer_cls, ivon_settings(cfg))
        return trainer_cls

    def post_trainer_create(self, cfg: DictDefault, trainer):
        """The step count is known now (before training starts); IVON is built lazily by the Trainer (after any
        model wrapping) from `optimizer_cls_and_kwargs`."""
        if cfg.rank_scheduler and trainer.args.max_steps > 0:
            settings = rank_scheduler_settings(cfg)
            check_steps(settings.t_init, settings.t_final, trainer.args.max_steps)
        if answer_format(cfg) == "cloze":
            install_cloze(cfg, trainer)
        elif cfg.multiple_choice and MultipleChoiceSettings(**dict(cfg.multiple_choice)).likelihood == "choices":
            install_choice_likelihood(cfg, trainer)
        if cfg.optimizer != "ivon":
            return
        settings = ivon_settings(cfg)
        ess = settings.ess or float(len(trainer.train_dataset))
        kwargs = ivon_optimizer_kwargs(
            settings, ess, beta1=trainer.args.adam_beta1, weight_decay=trainer.args.weight_decay,
            distributed=trainer.args.world_size > 1,
        )  # fmt: skip
        trainer.optimizer_cls_and_kwargs = (IVON, {"lr": trainer.args.learning_rate, **kwargs})
        initial_std = (ess * (settings.hess_init + trainer.args.weight_decay)) ** -0.5
        LOG.info(f"IVON: ess={ess:g}, hess_init={settings.hess_init:g}, mc_samples={settings.mc_samples}, initial σ={initial_std:.3g}")
        if initial_std > 0.1:
            LOG.warning(f"IVON starts with σ = {initial_std:.3g}, larger than typical weights: raise ivon.ess or ivon.hess_init")

    def add_callbacks_post_trainer(self, cfg: DictDefault, trainer) -> list:
        if not cfg.calibration:
            return []
        evaluator = calibration_evaluator(cfg)
        evaluator.check_tokenizer(trainer.processing_class)  # fail now, not after training
        return [CalibrationCallback(trainer, evaluator, blob_settings(cfg).eval_draws)]

    def post_train(self, cfg: DictDefault, model):
        """Axolotl saves the final adapter; the posterior goes beside it, gathered on every rank (ZeRO-3, FSDP2) and
        written by global rank 0 alone (every node has a local rank 0, and nodes may share the output directory).
        Axolotl calls this hook twice; in a multi-process run the second call comes after the process group is
        destroyed, when shards could not be gathered: the first call has written the file."""
        if cfg.adapter != "blob" or process_group_gone():
            return
        tensors = posterior_state_dict(model)
        if is_global_main_process():
            save_posterior(model, cfg.output_dir, posterior_spec(blob_settings(cfg)), tensors)
