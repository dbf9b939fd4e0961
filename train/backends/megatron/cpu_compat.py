"""Run megatron-core on machines without CUDA (CI, laptops): every CPU work-around in one place.

megatron-core assumes a GPU in a handful of calls even when the math is device-agnostic. `activate()`
installs small stand-ins for exactly those calls; it does nothing when `torch.cuda.is_available()`, so on a
GPU cluster megatron runs untouched. What is patched and which megatron call needs it:

- torch.cuda RNG (get/set_rng_state, manual_seed): `model_parallel_cuda_manual_seed` and the tensor-parallel
  RNG tracker (`CudaRNGStatesTracker.add/fork`) save and restore the "device" generator. On CPU the device
  generator *is* the CPU default generator, so forked regions (TP dropout) really draw from their own seed.
- torch.cuda.current_device -> "cpu": `GlobalMemoryBuffer`, the all-to-all output buffers and the optimizer
  allocate with `device=torch.cuda.current_device()`. It must be "cpu" (not 0) because some of those run in
  autograd backward, outside the function mode below.
- a TorchFunctionMode: factory calls with device="cuda" (causal mask, found-inf buffers, token counters in
  the schedules) go to CPU; `Tensor.cuda()` is a no-op; `Tensor.type()` reports torch.cuda.* because the
  optimizers and grad clipping only accept params whose type() is 'torch.cuda.FloatTensor' (and friends).
- torch.cuda.Stream / stream / current_stream / Event / synchronize: the MoE all-to-all dispatcher creates a
  device-to-host copy stream and synchronises on it; on CPU everything is already synchronous.
- moe_utils.te_general_gemm: megatron-core 0.16 references it even when TransformerEngine is missing
  (NameError in the router gemm); defining it as None selects the plain torch path.
- moe `maybe_move_tensor_to_cpu`: on CUDA it turns the all-to-all split sizes into numpy arrays on the way
  to the host; on CPU the tensors are "already on the host", stay tensors, and all_to_all_single rejects
  them. The stand-in converts them to lists that also answer `.tolist()` like the CUDA path's numpy
  arrays (the expert-tensor-parallel path calls it).

Version pin: these patches were checked against megatron-core 0.16.x only. Any other version raises at
activation with a one-line message; set LONGVL_MEGATRON_UNTESTED_OK=1 to try anyway (at your own risk: a
patch may then silently not apply to the code path it was written for).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

TESTED_MEGATRON_SERIES = ("0.16",)
UNTESTED_OK_ENV = "LONGVL_MEGATRON_UNTESTED_OK"

_lock = threading.Lock()
_active_mode: "CudaToCpuMode | None" = None


class MegatronVersionError(RuntimeError):
    """The installed megatron-core is not a version the CPU compatibility layer was tested with."""


def check_megatron_version(version: str | None = None) -> str:
    """Return the megatron-core version, raising MegatronVersionError if it is not a tested series."""
    if version is None:
        from megatron.core import package_info
        version = package_info.__version__
    series = ".".join(version.split(".")[:2])
    if series not in TESTED_MEGATRON_SERIES and os.environ.get(UNTESTED_OK_ENV) != "1":
        raise MegatronVersionError(
            f"megatron-core {version} is untested with longvl's CPU compatibility layer (tested: "
            f"{', '.join(s + '.x' for s in TESTED_MEGATRON_SERIES)}); install megatron-core==0.16.1 "
            f"or set {UNTESTED_OK_ENV}=1 to try anyway")
    return version


def is_active() -> bool:
    return _active_mode is not None


def activate() -> bool:
    """Install the CPU stand-ins (idempotent). Returns True if they are active, False on a CUDA machine."""
    global _active_mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _active_mode is not None:
            return True
        check_megatron_version()
        _patch_cuda_rng_and_device()
        _patch_cuda_streams()
        _patch_megatron_modules()
        _active_mode = CudaToCpuMode()
        # Entered for the rest of the process: megatron's CUDA-only calls happen throughout training.
        _active_mode.__enter__()
    return True


def _cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (str, int index, torch.device) to CPU; leave anything else unchanged."""
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    return device


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor", torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor", torch.bool: "torch.cuda.BoolTensor",
}


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement in torch calls so megatron's `device="cuda"` code runs on CPU."""

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and "dtype" not in kwargs:
            # Megatron's optimizer only accepts params whose type() names a CUDA tensor.
            return _CUDA_TYPE_NAMES.get(args[0].dtype, func(*args, **kwargs))
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:  # t.to("cuda") / t.to(torch.device("cuda"), dtype)
            args = (args[0], _cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


def _patch_cuda_rng_and_device() -> None:
    # The "device" generator is the CPU default generator: seeding/forking it changes what CPU ops draw.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all itself (recursion).
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.current_device = lambda: "cpu"


class _HostStream:
    """Stand-in for torch.cuda.Stream/Event: CPU work is synchronous, so waiting is always done."""

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_HostStream":
        return self

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def record(self, stream: Any = None) -> None:
        pass


_HOST_STREAM = _HostStream()


def _patch_cuda_streams() -> None:
    # Needed by MoEAlltoAllTokenDispatcher (device-to-host split-size copies on a side stream).
    torch.cuda.Stream = lambda *args, **kwargs: _HostStream()
    torch.cuda.Event = lambda *args, **kwargs: _HostStream()
    torch.cuda.current_stream = lambda device=None: _HOST_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None


def _patch_megatron_modules() -> None:
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # The RNG tracker goes through these private helpers (default_generators / _lazy_call), not torch.cuda.
    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # fork() warns when the CPU generator moves inside a device-RNG region; here they are one generator.
    logging.getLogger(mp_random.__name__).addFilter(_SharedGeneratorWarningFilter())
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    token_dispatcher.maybe_move_tensor_to_cpu = _host_tensor_or_splits


class _SharedGeneratorWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


class _SplitSizes(list):
    """Split sizes as a list (what all_to_all_single takes) with numpy's .tolist() (what megatron calls)."""

    def tolist(self) -> list:
        return list(self)


def _host_tensor_or_splits(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """CPU version of moe_utils.maybe_move_tensor_to_cpu: split sizes must leave as lists, not tensors."""
    if as_numpy and torch.is_tensor(tensor):
        return _SplitSizes(tensor.tolist())
    return tensor


class SequenceParallelTorchNorm:
    """megatron's torch LayerNorm/RMSNorm for layer specs used with sequence parallelism (no apex, no TE).

    WrappedTorchNorm refuses config.sequence_parallel, but a norm is per token, so a sequence-sharded input
    is fine. What SP does need is the `.sequence_parallel` tag on its params: finalize_model_grads then
    all-reduces their gradients over the TP group (each TP rank saw only its share of the tokens).
    A class, not a function, because megatron's build_module returns plain functions uncalled.
    """

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> torch.nn.Module:
        import copy

        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        local_config = copy.copy(config)
        local_config.sequence_parallel = False
        norm = WrappedTorchNorm(local_config, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm
