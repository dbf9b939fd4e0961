"""Convert model directories between transformers' Qwen3-VL format and the native format, and a megatron
training checkpoint to either, tensor by tensor (no step holds more than one tensor, or one MoE layer's
stacked experts).

    python -m train.convert hf-to-native SRC DST [--force] [--max-shard-size 5GB] [--dtype keep]
    python -m train.convert native-to-hf SRC DST [--force] [--max-shard-size 5GB] [--dtype bf16]
    python -m train.convert megatron-to-hf CKPT DST [--model-config YAML] [--force] [--dtype bf16] ...
    python -m train.convert megatron-to-native CKPT DST [--model-config YAML] ...

HF directory: config.json + model.safetensors (or sharded with model.safetensors.index.json), as written by
`save_pretrained` (transformers 4.x or 5.x). Native directory: model_config.yaml + safetensors with native
names (train/models/native_io.py). CKPT: a megatron backend checkpoint (`<stage>/checkpoints/step_N`, whose
meta.json names the model, or its `megatron/` dist_checkpointing dir with --model-config), in any TP/PP/EP
layout. DST is written atomically and an existing non-empty DST is refused unless --force. Errors print
one line and exit with status 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from train.config.model import ConfigError, ModelConfig
from train.export import DTYPES, stored_name, write_model_dir
from train.models.checkpoint_sources import open_model_dir
from train.models.native_io import (DEFAULT_MAX_SHARD_SIZE, CheckpointError, expected_native_shapes,
                                    load_model_config_yaml, model_config_from_dict, parse_size)
from train.models.weight_source import check_source_fits

MEGATRON_SUBDIR, META = "megatron", "meta.json"  # train/backends/megatron/checkpoint.py, train/checkpoint.py


def convert_dir(src: str, dst: str, fmt: str, force: bool = False,
                max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, dtype: torch.dtype | None = None) -> None:
    """A native or HF directory to `fmt` (dtype None: each tensor keeps its stored dtype)."""
    if not Path(src).is_dir():
        raise CheckpointError(f"{src}: not a directory")
    cfg, source = open_model_dir(src)
    check_source_fits(source, cfg, src)
    names = [name for name in expected_native_shapes(cfg) if stored_name(cfg, fmt, name) is not None]
    dtypes = dtype or {name: source.dtype(name) for name in names}
    write_model_dir(dst, cfg, ((name, source.read(name)) for name in names), fmt=fmt, dtype=dtypes, force=force,
                    max_shard_size=max_shard_size)


def convert_megatron(src: str, dst: str, fmt: str, force: bool = False,
                     max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, dtype: torch.dtype | None = None,
                     model_config: str | None = None) -> None:
    """A megatron dist checkpoint (any layout) to a `fmt` directory, on one process."""
    from train.backends.megatron.dist_export import MegatronDistCheckpoint

    source = Path(src)
    dist_dir = source / MEGATRON_SUBDIR if (source / MEGATRON_SUBDIR).is_dir() else source
    cfg = load_model_config_yaml(model_config) if model_config else _checkpoint_model_config(source)
    checkpoint = MegatronDistCheckpoint(dist_dir, cfg)
    write_model_dir(dst, cfg, checkpoint.tensors(), fmt=fmt, dtype=dtype or checkpoint.dtype(), force=force,
                    max_shard_size=max_shard_size)


def _checkpoint_model_config(checkpoint: Path) -> ModelConfig:
    """The ModelConfig a training checkpoint records in meta.json (dotted `model.*` keys)."""
    meta_path = checkpoint / META
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: not found (pass --model-config for a bare dist checkpoint dir)")
    try:
        flat = json.loads(meta_path.read_text())["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_path}: no 'model' section ({exc}); pass --model-config") from None
    values: dict = {"name": checkpoint.resolve().parent.parent.name}
    for key, value in flat.items():
        *parents, leaf = key.split(".")[1:]  # drop the leading "model"
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return model_config_from_dict(values, str(meta_path))


COMMANDS = {"hf-to-native": ("native", False), "native-to-hf": ("hf", False),
            "megatron-to-hf": ("hf", True), "megatron-to-native": ("native", True)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, megatron) in COMMANDS.items():
        cmd = sub.add_parser(name, help=f"{name.replace('-to-', ' -> ')} model directory")
        cmd.add_argument("src", help="megatron checkpoint directory" if megatron else "source model directory")
        cmd.add_argument("dst", help="destination directory (must be absent or empty unless --force)")
        cmd.add_argument("--force", action="store_true", help="replace a non-empty destination")
        cmd.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                         help="split the weights into shards of at most this size (default %(default)s)")
        cmd.add_argument("--dtype", choices=["keep", *sorted(DTYPES)], default="keep",
                         help="cast floating weights (default: keep the stored dtypes)")
        if megatron:
            cmd.add_argument("--model-config", help="ModelConfig YAML (default: the checkpoint's meta.json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fmt, megatron = COMMANDS[args.command]
    dtype = None if args.dtype == "keep" else DTYPES[args.dtype]
    try:
        parse_size(args.max_shard_size)
        if megatron:
            convert_megatron(args.src, args.dst, fmt, args.force, args.max_shard_size, dtype, args.model_config)
        else:
            convert_dir(args.src, args.dst, fmt, args.force, args.max_shard_size, dtype)
    except (CheckpointError, ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.command}: wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
