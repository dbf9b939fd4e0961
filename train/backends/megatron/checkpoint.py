"""Resumable training state of the megatron backend through dist_checkpointing.

One dist_checkpointing directory (`<checkpoint>/megatron/`) holds the sharded model (megatron's own
sharded_state_dict: TP/PP/EP shards with global layer and expert numbering, so the model part reshards
across layouts, e.g. saved TP=2 and loaded TP=1), the optimizer state and the step. The distributed
optimizer's state is saved "fully_reshardable" (each parameter's moments in model space), so a full load
(elastic resume) may change DP, TP, PP, CP and EP sizes. The save records its layout; a change of what
cannot be resharded (precision, optimizer kind) is refused in one line. A new stage loads the model alone
(load_model_state: weights resharded by dist_checkpointing, the optimizer starts fresh), as does the
layout-independent native handoff (Backend.export_tensors / load_model_weights).

Saves are asynchronous (train/backends/snapshot.py): dist_checkpointing's async save planned on the training
thread from host copies of the shards, its file writer run on a writer thread (no forked writers, no spawn
Manager), its finalize step (global metadata) on the training thread once every rank has written.
"""
from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import torch

from train.backends.snapshot import PendingWrite, host_copy
from train.models.native_io import CheckpointError

SUBDIR = "megatron"
# The distributed optimizer's state in model space (each parameter's moments in the parameter's global shape):
# it loads into any TP/PP/DP layout (gathered over the DP group at save). With expert parallelism megatron
# chains a dense and an expert optimizer, at EP=1 it builds one (experts are then ordinary parameters): without
# the "chained_N." key prefix the moments' keys are the same in both, so the state loads across an EP change.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
PREFIXED_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}  # checkpoints saved before 2026-12-04
RESHARDABLE = ("tp", "pp", "cp", "ep", "dp", "etp", "first", "last", "vpp")  # layout keys a full load may change


def _model_state(ddps: list) -> dict[str, Any]:
    """The model's sharded state: one chunk's as it is; virtual pipeline chunks' under "vp0", "vp1", ...
    The tensors inside carry global layer numbers (megatron's sharded keys), so a checkpoint saved with or
    without virtual stages loads into the other layout."""
    if len(ddps) == 1:
        return ddps[0].module.sharded_state_dict()
    return {f"vp{index}": ddp.module.sharded_state_dict() for index, ddp in enumerate(ddps)}


def _load_model(ddps: list, loaded: dict[str, Any]) -> None:
    if len(ddps) == 1:
        ddps[0].module.load_state_dict(loaded)
        return
    for index, ddp in enumerate(ddps):
        ddp.module.load_state_dict(loaded[f"vp{index}"])


def _optimizer_parts(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _state(ddps: list, optimizer: Any, step: int, is_loading: bool, layout: dict[str, Any],
           metadata: dict[str, Any] = OPTIMIZER_METADATA) -> dict[str, Any]:
    model_state = _model_state(ddps)
    optim_state = optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)
    return {"model": model_state, "optimizer": optim_state, "step": step, "adam_steps": _adam_steps(optimizer),
            "layout": layout, "optimizer_metadata": metadata}


def _saved_parts(common: dict[str, Any]) -> int:
    """How many chained optimizers wrote the saved state (their states are keyed 0, 1, ...; one: unkeyed)."""
    return sum(isinstance(key, int) for key in common["optimizer"]) or 1


def _own_structure(optimizer: Any, loaded: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state dict for THIS optimizer's chain from a load across an EP change: the loaded
    parameter states sit where this optimizer's request put them, but the rest (param groups) came from the
    saved chain, which has another number of parts; take this optimizer's own (the same hyper-parameters:
    one config; the Adam steps are restored from the saved counts afterwards)."""
    parts = _optimizer_parts(optimizer)
    states = [loaded] if len(parts) == 1 else [loaded[index] for index in range(len(parts))]
    own = [{**part.state_dict(), "param_state": state["param_state"],
            "param_state_sharding_type": OPTIMIZER_METADATA["distrib_optim_sharding_type"]}
           for part, state in zip(parts, states)]
    return own[0] if len(parts) == 1 else dict(enumerate(own))


def _adam_steps(optimizer: Any) -> list[float]:
    """Adam's update count per optimizer part (torch AdamW keeps it per parameter; all are equal)."""
    steps = []
    for part in _optimizer_parts(optimizer):
        values = {float(s["step"]) for s in part.optimizer.state.values() if "step" in s}
        steps.append(values.pop() if len(values) == 1 else 0.0)
    return steps


def _skip_step_in_reshardable_load(part: Any) -> None:
    """megatron 0.16's fully reshardable load copies every key of a parameter's torch AdamW state from the
    checkpoint, which stores no "step" (KeyError): copy the others; _restore_adam_steps sets the step."""
    setter = getattr(part, "_set_main_param_and_optimizer_states", None)
    if setter is None or getattr(setter, "skips_step", False):
        return

    def set_states(model_param: Any, tensors: dict[str, Any]) -> None:
        group_index, group_order = part.model_param_group_index_map[model_param]
        state = part.optimizer.state[part.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            setter(model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    set_states.skips_step = True
    part._set_main_param_and_optimizer_states = set_states


def _restore_adam_steps(optimizer: Any, steps: list[float]) -> None:
    """megatron 0.16 restores torch AdamW's step as ONE tensor shared by every parameter, which the
    foreach update then advances once per parameter group (and after the dummy initialisation): the bias
    correction of the resumed run would be off. Give each parameter its own, saved, count."""
    parts = _optimizer_parts(optimizer)
    if len(steps) != len(parts):  # another EP size: one chain or two, which step together
        steps = [max(steps)] * len(parts)
    for part, step in zip(parts, steps):
        for state in part.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(step, dtype=torch.float32)


def save_training_state(directory: Path, ddps: list, optimizer: Any, step: int, layout: dict[str, Any]) -> PendingWrite:
    """Snapshot the model and optimizer state for `directory` (which exists: the caller's temp checkpoint
    dir) and return the writer (train/backends/snapshot.py). Every rank calls it: dist_checkpointing plans
    the save collectively now (and rank 0 writes common.pt); `write()` writes this rank's .distcp files from
    the host copies on any thread; `finalize()` (collective) gathers the write results and writes the global
    metadata. `layout` describes what the optimizer state's sharding depends on."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    target = directory / SUBDIR
    target.mkdir(parents=True, exist_ok=True)
    # The writer runs on a thread of this process, not in forked workers: an in-process results queue
    # replaces the spawn Manager dist_checkpointing would start (seconds per save, and it outlives os._exit).
    filesystem_async._results_queue = queue.Queue()
    state = _host_snapshot(_state(ddps, optimizer, step, is_loading=False, layout=layout))
    request = dist_checkpointing.save(state, str(target), async_sharded_save=True)
    buckets, results = (request.async_fn_args[1], request.async_fn_args[2]) if request.async_fn else ([], None)
    transforms = request.async_fn.args[0] if request.async_fn else []

    def write() -> list[Path]:
        _write_buckets(transforms, buckets, results)
        return [Path(bucket[0]) for bucket in buckets]

    def finalize() -> None:
        for fn in request.finalize_fns:
            fn()
        filesystem_async._results_queue = None
    return PendingWrite(write, finalize)


def _host_snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """The sharded state with every shard's data replaced by a host copy (the ShardedTensor objects are built
    per call, so the model's tensors are untouched): the training step may change them while the copies are
    written. On GPU this is the device-to-host copy dist_checkpointing's async save would make."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    def snapshot(value: Any) -> Any:
        if isinstance(value, (ShardedTensor, ShardedTensorFactory, ShardedObject)):
            value.data = host_copy(value.data)
        return value

    dict_list_map_inplace(snapshot, state)
    return state


def _write_buckets(transforms: list, buckets: list, results: Any) -> None:
    """dist_checkpointing's per-bucket file writer (write + fsync each file), called in this thread in turn
    instead of in forked processes; the collected results go where its finalize step reads them."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    local, done = queue.Queue(), queue.Queue()
    collected: dict[int, Any] = {}
    for index, bucket in enumerate(buckets):
        done.put(index)
        FileSystemWriterAsync.write_preloaded_data(transforms, index, bucket, local, done, True)
        proc_index, outcome = local.get()
        if isinstance(outcome, Exception):
            raise outcome
        collected[proc_index] = outcome
    if results is not None:
        results.put(collected)


def _checkpoint_dir(directory: Path) -> Path:
    target = directory / SUBDIR
    if not (target / "metadata.json").is_file():
        raise CheckpointError(f"no megatron checkpoint under {directory} (expected {target}/metadata.json)")
    return target


def _saved_common(directory: Path) -> dict[str, Any]:
    """A checkpoint's common state (layout, step, optimizer hyper-parameters; no tensors loaded)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(_checkpoint_dir(directory)))


def saved_layout(directory: Path) -> dict[str, Any]:
    """The layout a checkpoint was written in (read from its common state, no tensors loaded)."""
    layout = _saved_common(directory).get("layout")
    return dict(layout) if layout is not None else {}


def load_training_state(directory: Path, ddps: list, optimizer: Any, layout: dict[str, Any]) -> int:
    """Restore what save_training_state wrote, model and optimizer; returns the saved step. The parallel
    sizes may differ from the saving run's (dist_checkpointing reshards the model and the fully reshardable
    optimizer state); precision and optimizer kind may not, nor anything for checkpoints saved before the
    state was reshardable (dp_reshardable): refused up front in one line (load_model_state loads the weights
    alone). Checkpoints written before layouts were recorded (no "layout") are loaded unchecked."""
    from megatron.core import dist_checkpointing

    target = _checkpoint_dir(directory)
    common = _saved_common(directory)
    saved = dict(common.get("layout") or {})
    keys = {*saved, *layout} - (set(RESHARDABLE) if saved.get("reshardable") else set())
    changed = ", ".join(f"{k} {saved.get(k)}->{layout.get(k)}" for k in sorted(keys) if saved.get(k) != layout.get(k))
    if saved and changed:
        raise CheckpointError(f"{target}: optimizer state was saved in another layout ({changed}); it only "
                              f"resumes with those unchanged: load the weights alone (a new stage) instead")
    metadata = common.get("optimizer_metadata", PREFIXED_METADATA)
    rechained = _saved_parts(common) != len(_optimizer_parts(optimizer))
    if rechained and metadata != OPTIMIZER_METADATA:
        raise CheckpointError(f"{target}: saved at parallel.ep={saved.get('ep')} with chained-optimizer key "
                              f"prefixes (before 2026-12-04): resume at that expert-parallel size")
    for part in _optimizer_parts(optimizer):
        # A fresh distributed optimizer has no Adam state yet; dist_checkpointing loads into existing tensors.
        init = getattr(part, "_init_optimizer_states_with_dummy_values", None)
        if init is not None:
            init()
        _skip_step_in_reshardable_load(part)
    with torch.no_grad():
        request = _state(ddps, optimizer, 0, is_loading=True, layout=layout, metadata=metadata)
        state = dist_checkpointing.load(request, str(target))
        _load_model(ddps, state["model"])
        optimizer.load_state_dict(_own_structure(optimizer, state["optimizer"]) if rechained else state["optimizer"])
    _restore_adam_steps(optimizer, state["adam_steps"])
    return int(state["step"])


def load_model_state(directory: Path, ddps: list, optimizer: Any) -> int:
    """Load only the model weights of a checkpoint, in any layout (dist_checkpointing reshards the TP/PP/EP
    shards by their global offsets); the optimizer keeps its fresh state, only its master copies of the
    weights are refreshed. Returns the step the checkpoint was saved at."""
    from megatron.core import dist_checkpointing

    target = _checkpoint_dir(directory)
    with torch.no_grad():
        state = dist_checkpointing.load({"model": _model_state(ddps)}, str(target))
        _load_model(ddps, state["model"])
    # Mixed-precision / distributed optimizers step fp32 master copies: without this the next step would
    # overwrite the loaded weights with the fresh model's.
    optimizer.reload_model_params()
    return int(state["step"])
