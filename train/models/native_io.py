"""Model directories on disk: safetensors shards, model config YAML, atomic directory writes.

Two directory formats share this code:
- native: `model_config.yaml` (a ModelConfig) + safetensors with native parameter names. Written by
  `train.convert` and by the trainer's stage-handoff checkpoints (layout-independent full weights).
- HF: `config.json` + safetensors with transformers' names (train/models/hf.py adds the renaming).

Both store weights as `model.safetensors`, or, above `max_shard_size`, as `model-0000i-of-0000n.safetensors`
shards plus `model.safetensors.index.json` (transformers' layout, so HF tools read either).
Tied embeddings: in memory a state dict always holds `lm_head.weight`; on disk it is omitted when tied.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from train.config.model import ConfigError, ModelConfig
from train.models.streaming_writer import INDEX_FILE, SINGLE_FILE, TensorSpec, write_tensors

NATIVE_CONFIG_FILE = "model_config.yaml"
DEFAULT_MAX_SHARD_SIZE = "5GB"
LM_HEAD = "lm_head.weight"
EMBED = "language_model.embed_tokens.weight"

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A model directory is missing, incomplete or does not fit its config. The message names the file."""


# ---- model config <-> YAML ----------------------------------------------------------------------------

def model_config_from_dict(values: dict, source: str) -> ModelConfig:
    """Merge `values` into the ModelConfig schema (types checked, unknown keys refused) and validate."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), values)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: {first_line}") from None
    assert isinstance(cfg, ModelConfig)
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def load_model_config_yaml(path: str | Path) -> ModelConfig:
    """Read a ModelConfig YAML (configs/model/*.yaml or a native directory's model_config.yaml)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model config file not found")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of ModelConfig fields, got {type(values).__name__}")
    return model_config_from_dict(values, str(path))


def save_model_config_yaml(path: str | Path, cfg: ModelConfig) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


# ---- safetensors shards -------------------------------------------------------------------------------

def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "10KiB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size.upper().replace("IB", "iB"))
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size like '5GB' or '500MB'")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_KMGT".index(unit or "_"))


def read_safetensors_dir(directory: str | Path) -> StateDict:
    """All tensors of `model.safetensors`, or of the shards named by `model.safetensors.index.json`."""
    files = safetensors_files(directory)
    state_dict: StateDict = {}
    for path in sorted(set(files.values())):
        tensors = _read_shard(path)
        for key in [k for k, file in files.items() if file == path and k not in tensors]:
            raise CheckpointError(f"{Path(directory) / INDEX_FILE}: maps {key!r} to {path.name!r}, which does "
                                  "not contain it")
        state_dict.update(tensors)
    return state_dict


def safetensors_files(directory: str | Path) -> dict[str, Path]:
    """Tensor name -> the file holding it, from the index (every shard it names must exist) or the header of
    the single `model.safetensors`. Reads no tensor data."""
    directory = Path(directory)
    index_path, single_path = directory / INDEX_FILE, directory / SINGLE_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: not a safetensors index with a 'weight_map' ({exc})") from None
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                key = next(k for k, v in weight_map.items() if v == shard)
                raise CheckpointError(f"{index_path}: shard {shard!r} (holding {key!r}) does not exist")
        return {key: directory / shard for key, shard in weight_map.items()}
    if single_path.is_file():
        try:
            with safe_open(single_path, framework="pt") as f:
                return {key: single_path for key in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{single_path}: unreadable safetensors file ({exc})") from None
    raise CheckpointError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _read_shard(path: Path) -> StateDict:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None


def write_safetensors_dir(directory: str | Path, state_dict: StateDict,
                          max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
    """Write `state_dict` as one file, or as shards + index when it exceeds `max_shard_size` bytes.

    Returns the names of the files written (train/models/streaming_writer.py; tensors keep their dtypes).
    """
    specs = {key: TensorSpec(tuple(t.shape), t.dtype) for key, t in state_dict.items()}
    return write_tensors(directory, specs, state_dict.items(), parse_size(max_shard_size))


# ---- atomic directory write ---------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_directory(destination: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `destination` only if the block succeeds.

    A failed or interrupted export leaves `destination` as it was (absent, or the old contents), never a
    half-written directory. An existing non-empty destination is refused unless `force`.
    """
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise CheckpointError(f"{destination}: exists and is not a directory")
    if destination.is_dir() and any(destination.iterdir()) and not force:
        raise CheckpointError(f"{destination}: exists and is not empty (pass --force / force=True to replace it)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.parent / f".{destination.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)  # the data is on disk before the rename makes it visible
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = destination.parent / f".{destination.name}.old-{os.getpid()}"
    if destination.exists():
        destination.rename(old)  # a directory cannot be os.replace'd onto a non-empty one
    tmp.rename(destination)
    fsync_path(destination.parent)
    shutil.rmtree(old, ignore_errors=True)


def fsync_tree(directory: Path) -> None:
    """fsync every file and directory under `directory`, then `directory` itself."""
    paths = sorted(directory.rglob("*"))
    for path in [p for p in paths if p.is_file()] + [p for p in paths if p.is_dir()] + [directory]:
        fsync_path(path)


def fsync_path(path: Path) -> None:
    """fsync one file or directory (a directory's fsync makes its entries' renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- tied embeddings ----------------------------------------------------------------------------------

def drop_tied_lm_head(state_dict: StateDict, tied: bool, embed_key: str, head_key: str) -> StateDict:
    """On-disk form: without `head_key` when tied (refusing a head that differs from the embedding)."""
    if not tied or head_key not in state_dict:
        return dict(state_dict)
    head, embed = state_dict[head_key], state_dict.get(embed_key)
    if embed is None:
        raise CheckpointError(f"state dict has {head_key!r} but no {embed_key!r} to tie it to")
    same = head is embed or (head.device.type != "meta" and torch.equal(head, embed))
    if not same and head.device.type != "meta":
        raise CheckpointError(f"tie_word_embeddings is true but {head_key!r} differs from {embed_key!r}")
    return {k: v for k, v in state_dict.items() if k != head_key}


def restore_tied_lm_head(state_dict: StateDict, tied: bool, embed_key: str, head_key: str,
                         source: str) -> StateDict:
    """In-memory form: `head_key` present (the embedding tensor itself when tied)."""
    out = dict(state_dict)
    if tied and head_key not in out and embed_key in out:
        out[head_key] = out[embed_key]
    if not tied and head_key not in out:
        raise CheckpointError(f"{source}: tie_word_embeddings is false but {head_key!r} is missing")
    return out


# ---- native model directories -------------------------------------------------------------------------

def save_native_checkpoint(directory: str | Path, cfg: ModelConfig, state_dict: StateDict, *,
                           force: bool = False, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a native model directory atomically: model_config.yaml + safetensors (native names)."""
    cfg.validate()
    check_state_dict_fits(cfg, state_dict, source="state dict to save")
    on_disk = drop_tied_lm_head(state_dict, cfg.text.tie_word_embeddings, EMBED, LM_HEAD)
    with atomic_directory(directory, force=force) as tmp:
        save_model_config_yaml(tmp / NATIVE_CONFIG_FILE, cfg)
        write_safetensors_dir(tmp, on_disk, max_shard_size)
    return Path(directory)


def load_native_checkpoint(directory: str | Path) -> tuple[ModelConfig, StateDict]:
    """Read a native model directory; the state dict is checked against the config's shapes."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    cfg = load_model_config_yaml(directory / NATIVE_CONFIG_FILE)
    state_dict = restore_tied_lm_head(read_safetensors_dir(directory), cfg.text.tie_word_embeddings,
                                      EMBED, LM_HEAD, str(directory))
    check_state_dict_fits(cfg, state_dict, source=str(directory))
    return cfg, state_dict


def expected_native_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer shapes of the native model, from a meta-device build (no memory, no init cost)."""
    from train.models.qwen3vl.model import Qwen3VLModel

    with torch.device("meta"):
        model = Qwen3VLModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict_fits(cfg: ModelConfig, state_dict: StateDict, source: str) -> None:
    """Refuse missing, unexpected or mis-shaped tensors with one line naming the key and both shapes."""
    expected = expected_native_shapes(cfg)
    for key, shape in expected.items():
        if key not in state_dict:
            raise CheckpointError(f"{source}: missing tensor {key!r} (expected shape {list(shape)})")
        if tuple(state_dict[key].shape) != shape:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {list(state_dict[key].shape)}, "
                                  f"the model config expects {list(shape)}")
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected tensor(s), first {unexpected[0]!r}")
