"""Streaming exports of a model: (native name, full tensor) pairs -> a native or HF model directory.

The tensors come one at a time (a backend's `export_tensors()`, or a model directory read tensor by tensor)
and go straight into a StreamingSafetensorsWriter whose shard plan comes from the model config, so no rank
ever holds more than the tensor being written. Only the writing rank writes; the other ranks drive the
same iteration (its collectives) and write nothing. The directory appears atomically (native_io).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from train.config.model import ConfigError, ModelConfig
from train.models.hf import (HF_CONFIG_FILE, HF_PREFIX, hf_name, hf_names_to_write, hf_read_plan, read_hf_config,
                             write_hf_config, written_by_transformers_4)
from train.models.native_io import (DEFAULT_MAX_SHARD_SIZE, LM_HEAD, NATIVE_CONFIG_FILE, CheckpointError,
                                    atomic_directory, check_state_dict_fits, expected_native_shapes,
                                    load_model_config_yaml, parse_size, safetensors_files, save_model_config_yaml)
from train.models.streaming_writer import SAFETENSORS_DTYPES, StreamingSafetensorsWriter, TensorSpec

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


class ModelDirReader:
    """A native (model_config.yaml) or HF (config.json) model directory read one native tensor, or slice, at
    a time: only the safetensors headers are read up front (names, shapes, dtypes, checked against the
    config). Missing shards, unreadable files and tensors of another model's shapes are one line each."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory")
        native = (self.directory / NATIVE_CONFIG_FILE).is_file()
        if not native and not (self.directory / HF_CONFIG_FILE).is_file():
            raise CheckpointError(f"{self.directory}: neither a native model dir ({NATIVE_CONFIG_FILE}) nor an HF "
                                  f"one ({HF_CONFIG_FILE})")
        self.files = safetensors_files(self.directory)
        shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for path in sorted(set(self.files.values())):
            with _opened(path) as f:
                for name in [n for n, p in self.files.items() if p == path]:
                    stored = f.get_slice(name)
                    shapes[name], self.dtypes[name] = tuple(stored.get_shape()), SAFETENSORS_DTYPES[stored.get_dtype()]
        if native:
            self.cfg = load_model_config_yaml(self.directory / NATIVE_CONFIG_FILE)
            self.plan = hf_read_plan(self.cfg, {hf_name(k): v for k, v in shapes.items()}, str(self.directory))
            self._stored_name = lambda hf_key: hf_key if hf_key == LM_HEAD else hf_key[len(HF_PREFIX):]
        else:
            self.cfg, config = read_hf_config(self.directory)
            self.plan = hf_read_plan(self.cfg, shapes, str(self.directory), written_by_transformers_4(config))
            self._stored_name = lambda hf_key: hf_key
        check_state_dict_fits(self.cfg, {k: torch.empty(v.shape, device="meta") for k, v in self.plan.items()},
                              source=str(self.directory))

    def names(self) -> set[str]:
        """Every native name (a tied head included: it reads the embedding)."""
        return set(self.plan)

    def shape(self, native: str) -> tuple[int, ...]:
        return self.plan[native].shape

    def dtype(self, native: str) -> torch.dtype:
        return self.dtypes[self._stored_name(self.plan[native].hf_names[0])]

    def read(self, native: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """`native[index]`, reading only that slice from the files (a WeightSource, train/models)."""
        return self.plan[native].read(lambda hf_key: self._slice(self._stored_name(hf_key)), index)

    def _slice(self, name: str) -> "_StoredTensor":
        return _StoredTensor(self.files[name], name)


class _StoredTensor:
    """One stored tensor, sliced by opening its file for that read only. safetensors hands out slices as
    views of its memory map, and a file's touched pages stay resident (RssFile) for as long as the file is
    open: keeping every shard open would make a rank's RSS grow towards the whole checkpoint while it reads
    its shard. Per-read opening keeps only the slices in use mapped."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name

    def __getitem__(self, index: tuple[slice, ...]) -> torch.Tensor:
        with _opened(self.path) as f:
            return f.get_slice(self.name)[index]


def _opened(path: Path) -> Any:
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None
