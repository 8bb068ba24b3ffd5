"""Narrow patches to Axolotl's ModelLoader, each closing a gap that plugin hooks cannot reach.

1. Axolotl switches on k-bit quantisation (`load_in_8bit` / `load_in_4bit`), k-bit training preparation and
   gradient checkpointing only for adapter names `lora` / `qlora`. For `adapter: blob` and `adapter: adalora` the
   loader steps that do this run with the adapter name read as `lora` (`qlora` when loading in 4 bit), so both
   get exactly the LoRA treatment. Axolotl's fused LoRA kernels are *not* aliased: they bypass the layer forward.
   Under FSDP, Axolotl's QLoRA placement (each rank loads its 4-bit base on its own GPU, no later move, no k-bit
   preparation) hangs on one property, `is_qlora_and_fsdp_enabled`: it also holds for these adapters in 4 bit.
2. Multi-process runs on CPU-only machines (torchrun, gloo). Axolotl 0.19 maps every rank to device index
   LOCAL_RANK, which there is no device at all: the model is loaded on the CPU instead.
3. CPU-only machines need the Trainer told so, and Axolotl has no config key for it: without `use_cpu` the HF
   Trainer refuses `bf16` autocast on CPU (:func:`cpu_training_args`), and without `ACCELERATE_USE_CPU`
   accelerate sees no distributed state in a multi-process run and trains every rank on its own, without DDP:
   the ranks silently drift apart (:func:`configure_cpu_runs`).
4. Axolotl ≥ 0.20 probes GPU peer access before a multi-process run; with a CUDA build of torch on a machine
   without a GPU (what `pip install axolotl` gives there) the probe raises "Found no NVIDIA driver". Where no
   CUDA device exists there is no peer access to probe: the probe answers as it does with a CPU build of torch,
   "nothing to disable" (:func:`patch_p2p_probe`).
5. DeepSpeed on CPU-only machines: accelerate knows no process-group backend for DeepSpeed's CPU accelerator, so
   its state counts one process while DeepSpeed's own group has all of them (DeepSpeed then refuses the batch
   size the Trainer computed for one process). There the backend is gloo, what DeepSpeed falls back to without
   oneCCL (:func:`patch_deepspeed_cpu_backend`).
6. `axolotl train` runs `accelerate launch`, which sets OMP_NUM_THREADS=1 where it is unset: a one-process CPU run
   then trains on one core. Nothing in the run's environment tells that value from one the user chose (accelerate
   copies either into the same variable), so the thread count is left alone and the log says how to get every core
   (:func:`one_thread_warning`).
The plugin installs these only in runs that use one of its features (plugin.py), so an auto-loaded but unused
plugin changes nothing; each is installed once per process, acts only when its condition holds at call time,
and says so in the log when it acts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping

import torch

from axolotl_blob.engines import is_global_main_process

LOG = logging.getLogger(__name__)  # not Axolotl's logger: importing this module must not import Axolotl (args.py does)

LORA_LIKE_ADAPTERS = ("blob", "adalora")
ALIASED_LOADER_STEPS = ("_set_quantization_config", "_prepare_model_for_quantization", "_configure_embedding_dtypes")


@contextlib.contextmanager
def adapter_read_as_lora(cfg) -> Iterator[None]:
    """Let Axolotl's LoRA-only branches see `lora`/`qlora` while a BLoB or AdaLoRA model is being loaded."""
    adapter = cfg.adapter
    if adapter not in LORA_LIKE_ADAPTERS:
        yield
        return
    cfg.adapter = "qlora" if cfg.load_in_4bit else "lora"
    try:
        yield
    finally:
        cfg.adapter = adapter


def _wrap_once(owner: object, name: str, make: Callable[[Callable], Callable]) -> None:
    original = getattr(owner, name, None)
    if original is None or getattr(original, "_axolotl_blob_patched", False):
        return
    patched = functools.wraps(original)(make(original))
    patched._axolotl_blob_patched = True
    setattr(owner, name, patched)


def axolotl_version() -> tuple[int, ...]:
    """Axolotl's (major, minor): where the supported releases (0.19, 0.21) behave differently."""
    import axolotl

    return tuple(int(part) for part in axolotl.__version__.split(".")[:2])


def cpu_only() -> bool:
    return not torch.cuda.is_available() and not torch.backends.mps.is_available()


def cpu_multiprocess() -> bool:
    return cpu_only() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def cpu_training_args(deepspeed: bool = False) -> dict:
    """`use_cpu` on CPU-only machines, except under DeepSpeed: accelerate's `cpu` flag switches DeepSpeed off (the
    run would silently train with DDP); DeepSpeed brings its own CPU accelerator and process group."""
    return {"use_cpu": True} if cpu_only() and not deepspeed else {}


def configure_cpu_runs(deepspeed: bool = False) -> None:
    """As :func:`cpu_training_args`: not under DeepSpeed."""
    if cpu_only() and not deepspeed and "ACCELERATE_USE_CPU" not in os.environ:
        os.environ["ACCELERATE_USE_CPU"] = "true"
        if is_global_main_process():
            LOG.info("axolotl_blob: no GPU: ACCELERATE_USE_CPU=true, so multi-process runs train with DDP on the CPU")


def one_thread_warning(environ: Mapping[str, str], cores: int, threads: int, gpu: bool) -> str | None:
    """What to tell a one-process CPU run that torch holds to one thread by OMP_NUM_THREADS=1 where more cores are
    free (see 6. above); None for every other run."""
    one_process = int(environ.get("WORLD_SIZE", "1")) == 1
    if gpu or not one_process or cores < 2 or threads != 1 or environ.get("OMP_NUM_THREADS") != "1":
        return None
    return (
        f"axolotl_blob: training on 1 CPU thread of {cores}: OMP_NUM_THREADS=1, which `accelerate launch` (run by "
        "`axolotl train`) sets when it is unset. `axolotl train CONFIG --launcher python` trains one process on "
        "every core; or set OMP_NUM_THREADS to the threads you want"
    )


def warn_if_one_thread() -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    message = one_thread_warning(os.environ, cores, torch.get_num_threads(), not cpu_only())
    if message:
        LOG.warning(message)


def patch_p2p_probe() -> None:
    """Axolotl ≥ 0.20's P2P probe, answered without CUDA where no CUDA device exists (see 4. above)."""
    import axolotl.utils.trainer as trainer_utils

    def answered_on_cpu(original):
        def run(*args, **kwargs):
            if torch.cuda.is_available():
                return original(*args, **kwargs)
            if is_global_main_process():
                LOG.info("axolotl_blob: no CUDA device: skipping Axolotl's GPU peer-access probe")
            return True

        return run

    _wrap_once(trainer_utils, "check_cuda_p2p_ib_support", answered_on_cpu)


def patch_deepspeed_cpu_backend() -> None:
    """accelerate's backend for a multi-process DeepSpeed run where no GPU exists: gloo (see 5. above)."""
    from accelerate.state import PartialState

    def gloo_on_cpu(original):
        def run(self, cpu=False, *args, **kwargs):
            backend, distributed_type = original(self, cpu, *args, **kwargs)
            deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
            if backend is None and deepspeed and not cpu and cpu_only() and int(os.environ.get("LOCAL_RANK", -1)) != -1:
                backend = "gloo"  # not logged here: the logger itself asks this half-built state for the rank
            return backend, distributed_type

        return run

    _wrap_once(PartialState, "_prepare_backend", gloo_on_cpu)


def patch_model_loader() -> None:
    from axolotl.loaders.model import ModelLoader

    for step in ALIASED_LOADER_STEPS:

        def aliased(original):
            def run(self, *args, **kwargs):
                with adapter_read_as_lora(self.cfg):
                    return original(self, *args, **kwargs)

            return run

        _wrap_once(ModelLoader, step, aliased)

    def cpu_device_map(original):
        def run(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if cpu_multiprocess():
                self.model_kwargs["device_map"] = "cpu"

        return run

    _wrap_once(ModelLoader, "_set_device_map_config", cpu_device_map)

    qlora_and_fsdp = ModelLoader.is_qlora_and_fsdp_enabled.fget
    if not getattr(qlora_and_fsdp, "_axolotl_blob_patched", False):

        def qlora_like_and_fsdp(self) -> bool:
            lora_like_in_4bit = self.cfg.adapter in LORA_LIKE_ADAPTERS and bool(self.cfg.load_in_4bit)
            return qlora_and_fsdp(self) or (self.is_fsdp_enabled and lora_like_in_4bit)

        qlora_like_and_fsdp._axolotl_blob_patched = True
        ModelLoader.is_qlora_and_fsdp_enabled = property(functools.wraps(qlora_and_fsdp)(qlora_like_and_fsdp))
