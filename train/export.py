"""Streaming exports of a model: (native name, full tensor) pairs -> a native or HF model directory.

The tensors come one at a time (a backend's `export_tensors()`, or a model directory's WeightSource)
and go straight into a StreamingSafetensorsWriter whose shard plan comes from the model config, so no rank
ever holds more than the tensor being written. Only the writing rank writes; the other ranks drive the
same iteration (its collectives) and write nothing. The directory appears atomically (native_io).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist

from train.config.model import ConfigError, ModelConfig
from train.models.hf import hf_names_to_write, write_hf_config
from train.models.native_io import (DEFAULT_MAX_SHARD_SIZE, LM_HEAD, NATIVE_CONFIG_FILE, atomic_directory,
                                    expected_native_shapes, parse_size, save_model_config_yaml)
from train.models.streaming_writer import StreamingSafetensorsWriter, TensorSpec

FORMATS = ("native", "hf")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HANDOFF_DTYPE = torch.float32  # final/: what every next stage (fp32 or bf16 training) loads without loss
HF_DTYPE = "bf16"  # hf/ by default, like the released checkpoints

Tensors = Iterable[tuple[str, torch.Tensor]]


def parse_dtype(name: str, where: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"{where}={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def stored_name(cfg: ModelConfig, fmt: str, native: str) -> str | None:
    """The name `native` is stored under in a `fmt` directory; None for a tied `lm_head.weight`."""
    if fmt == "hf":
        return hf_names_to_write(cfg, native)
    return None if native == LM_HEAD and cfg.text.tie_word_embeddings else native


def planned_specs(cfg: ModelConfig, fmt: str,
                  dtype: torch.dtype | Mapping[str, torch.dtype]) -> dict[str, TensorSpec]:
    """Stored name -> shape and dtype of every tensor of the model (from a meta build), in model order.
    `dtype`: one for all tensors, or per native name (a conversion keeping the source's dtypes)."""
    specs = {}
    for native, shape in expected_native_shapes(cfg).items():
        name = stored_name(cfg, fmt, native)
        if name is not None:
            specs[name] = TensorSpec(shape, dtype if isinstance(dtype, torch.dtype) else dtype[native])
    return specs


def write_model_dir(directory: str | Path, cfg: ModelConfig, tensors: Tensors, *, fmt: str,
                    dtype: torch.dtype | Mapping[str, torch.dtype], writer: bool = True, force: bool = False,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write the model whose native tensors `tensors` yields as a `fmt` directory (atomic, fsync-ed).

    Every rank calls it with its own iterator; only `writer` writes (the others drive the iteration, which
    yields nothing there). A tied head, when yielded, is skipped (it is stored once, as the embedding).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is not one of {FORMATS}")
    if not writer:
        for _ in tensors:
            pass
        return Path(directory)
    specs = planned_specs(cfg, fmt, dtype)
    with atomic_directory(directory, force=force) as tmp:
        _write_config(tmp, cfg, fmt, specs)
        out = StreamingSafetensorsWriter(tmp, specs, parse_size(max_shard_size))
        for native, tensor in tensors:
            name = stored_name(cfg, fmt, native)
            if name is not None:
                out.write(name, tensor)
        out.finish()
    return Path(directory)


def _write_config(directory: Path, cfg: ModelConfig, fmt: str, specs: Mapping[str, TensorSpec]) -> None:
    if fmt == "native":
        save_model_config_yaml(directory / NATIVE_CONFIG_FILE, cfg)
    else:
        write_hf_config(directory, cfg, [spec.dtype for spec in specs.values()])


def in_lockstep(names: Iterable[str],
                read: Callable[[str], torch.Tensor] | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, read(name)) on the rank that has `read`, nothing elsewhere; all ranks iterate `names` and meet
    in a barrier after each tensor, so a rank idle during a long single-rank conversion (hf/ from final/)
    never waits longer than one tensor's read + write (the process-group timeout stays far away)."""
    for name in names:
        if read is not None:
            yield name, read(name)
        if dist.is_initialized():
            dist.barrier()
