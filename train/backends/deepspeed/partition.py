"""ZeRO-3 construction that never holds a full parameter: meta build, then partition-sized allocation.

`deepspeed.zero.Init` as a context creates every parameter whole (in the training dtype), runs the
module's default initialisation on it, broadcasts it from rank 0 and only then keeps this rank's part: a
transient of the largest module (qwen3vl_2b's 311M-element embedding, twice with the untied head
created before tying; ~0.6 of a DP=4 rank's share) and one collective per parameter. Here the model is
built on the meta device (no memory, no init) and each parameter is turned into a ZeRO-3 parameter with
DeepSpeed's own conversion (`Init._convert_to_deepspeed_param`: ds_* attributes, gather/partition
methods, persistence) and given only its partition tensor, laid out as DeepSpeed's `_partition_param`
lays it out (flattened, padded to a multiple of the group size, rank r holds the r-th equal part). The
caller fills the partitions from a weight source (weights.load_weights), so every value comes from
there; the padding is zeroed.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from train.config.model import ConfigError


def build_partitioned(build: Callable[[], nn.Module], ds_config: dict) -> nn.Module:
    """`build()` run on the meta device, every parameter (a tied one once) made a ZeRO-3 parameter that
    holds only this rank's partition (uninitialised but for the zeroed padding)."""
    import deepspeed

    with torch.device("meta"):
        model = build()
    init = deepspeed.zero.Init(config_dict_or_path=ds_config)  # DeepSpeed's settings; never entered
    _check_supported(init)
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in made:  # a tied weight is one parameter in two modules
                    made[id(param)] = _partitioned(init, param)
                module._parameters[key] = made[id(param)]
    return model


def _check_supported(init) -> None:
    """Partition-first construction covers the plain layout this project configures, nothing else."""
    unsupported = {"hpZ (zero_hpz_partition_size > 1)": init.zero_param_process_group is not None,
                   "quantized weights": bool(init.quantized_weights or init.quantized_nontrainable_weights),
                   "NVMe parameter offload": init.remote_device == "nvme"}  # a str enum
    chosen = [what for what, on in unsupported.items() if on]
    if chosen:
        raise ConfigError(f"deepspeed zero_optimization: {chosen[0]} is not supported by this backend's ZeRO-3 "
                          f"construction")


@torch.no_grad()
def _partitioned(init, meta: nn.Parameter) -> nn.Parameter:
    """A ZeRO-3 parameter of `meta`'s shape holding only this rank's partition."""
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus, ZeroParamStatus

    # The full shape on one element of storage (a meta tensor cannot become a CPU one in place): DeepSpeed's
    # conversion takes ds_shape / ds_numel from it, then the data is replaced as `free_param` does.
    one = torch.empty(1, dtype=init.dtype, device=init.local_device).expand(meta.shape)
    param = nn.Parameter(one, requires_grad=meta.requires_grad)
    param.__dict__.update(meta.__dict__)
    init._convert_to_deepspeed_param(param)
    aligned = init._aligned_size(param)
    size = aligned // init._partition_world_size(param)
    device = init.local_device if param.ds_persist else init.remote_device
    part = torch.empty(size, dtype=init.dtype, device=device)
    if getattr(device, "type", device) == "cpu" and init.pin_memory:  # parameter offload to host memory, as DeepSpeed pins it
        from deepspeed.accelerator import get_accelerator

        part = get_accelerator().pin_memory(part)
    start = init._partition_rank(param) * size
    part[max(0, min(size, param.ds_numel - start)):].zero_()  # padding past the last element
    part.requires_grad = False
    part.ds_numel, part.status, part.final_location = size, PartitionedParamStatus.AVAILABLE, None
    param.ds_tensor, param.ds_numel_aligned = part, aligned
    param.data = torch.empty(0, dtype=init.dtype, device=init.local_device)  # what free_param leaves
    param.ds_status = ZeroParamStatus.NOT_AVAILABLE
    return param
