"""Convert model directories between transformers' Qwen3-VL format and the native format.

    python -m train.convert hf-to-native SRC DST [--force] [--max-shard-size 5GB]
    python -m train.convert native-to-hf SRC DST [--force] [--max-shard-size 5GB] [--dtype bf16]

HF directory: config.json + model.safetensors (or sharded with model.safetensors.index.json), as written by
`save_pretrained` (transformers 4.x or 5.x). Native directory: model_config.yaml + safetensors with native
names (train/models/native_io.py). DST is written atomically and an existing non-empty DST is refused
unless --force. Errors print one line and exit with status 1.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from train.config.model import ConfigError
from train.models.hf import load_hf_checkpoint, save_hf_checkpoint
from train.models.native_io import (DEFAULT_MAX_SHARD_SIZE, CheckpointError, StateDict, load_native_checkpoint,
                                    parse_size, save_native_checkpoint)

DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hf_to_native(src: str, dst: str, force: bool = False, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 dtype: torch.dtype | None = None) -> None:
    cfg, state_dict = load_hf_checkpoint(src)
    save_native_checkpoint(dst, cfg, _cast(state_dict, dtype), force=force, max_shard_size=max_shard_size)


def native_to_hf(src: str, dst: str, force: bool = False, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 dtype: torch.dtype | None = None) -> None:
    cfg, state_dict = load_native_checkpoint(src)
    save_hf_checkpoint(dst, cfg, _cast(state_dict, dtype), force=force, max_shard_size=max_shard_size)


COMMANDS = {"hf-to-native": hf_to_native, "native-to-hf": native_to_hf}


def _cast(state_dict: StateDict, dtype: torch.dtype | None) -> StateDict:
    """Floating tensors to `dtype`; tied tensors stay one tensor (the cast of a shared tensor is cached)."""
    if dtype is None:
        return state_dict
    cast: dict[int, torch.Tensor] = {}
    out: StateDict = {}
    for key, tensor in state_dict.items():
        if tensor.is_floating_point():
            tensor = cast.setdefault(id(tensor), tensor.to(dtype))
        out[key] = tensor
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in COMMANDS.items():
        cmd = sub.add_parser(name, help=f"{name.replace('-to-', ' -> ')} model directory")
        cmd.add_argument("src", help="source model directory")
        cmd.add_argument("dst", help="destination directory (must be absent or empty unless --force)")
        cmd.add_argument("--force", action="store_true", help="replace a non-empty destination")
        cmd.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                         help="split the weights into shards of at most this size (default %(default)s)")
        cmd.add_argument("--dtype", choices=sorted(DTYPES), default="keep",
                         help="cast floating weights (default: keep the stored dtypes)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        parse_size(args.max_shard_size)
        COMMANDS[args.command](args.src, args.dst, force=args.force, max_shard_size=args.max_shard_size,
                               dtype=DTYPES[args.dtype])
    except (CheckpointError, ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.command}: wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
