"""Parameter counts of a model config: `python -m train.models.summary model=NAME`.

NAME is a file of configs/model/ (without .yaml) or a path to a ModelConfig YAML. The native model is built on
the meta device, so even the 235B config is counted in about a second without allocating weights.

total_params counts every parameter once (vision tower, mergers, embeddings, lm_head unless tied); active_params
counts the routed experts of MoE layers at num_experts_per_tok / num_experts (the share one token uses).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from train.config.model import ModelConfig
from train.models.native_io import load_model_config_yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
EXPERT_MARKER = ".mlp.experts."  # routed expert weights (the router `mlp.gate` is always active)


def resolve_model_config(name: str) -> ModelConfig:
    """ModelConfig for a configs/model/ option name or a YAML path."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{name}.yaml"
        if not path.is_file():
            options = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise SystemExit(f"model={name}: no {path}; options: {', '.join(options)}")
    return load_model_config_yaml(path)


def build_meta_model(cfg: ModelConfig) -> nn.Module:
    from train.models.qwen3vl.model import Qwen3VLModel

    with torch.device("meta"):
        return Qwen3VLModel(cfg)


def count_parameters(model: nn.Module, cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameter counts; shared (tied) parameters are counted once."""
    total = experts = 0
    for name, param in model.named_parameters():  # named_parameters() already skips tied duplicates
        total += param.numel()
        if EXPERT_MARKER in name:
            experts += param.numel()
    if not cfg.text.is_moe:
        return total, total
    inactive = experts * (cfg.text.num_experts - cfg.text.num_experts_per_tok) // cfg.text.num_experts
    return total, total - inactive


def summarize(cfg: ModelConfig) -> str:
    total, active = count_parameters(build_meta_model(cfg), cfg)
    return f"total_params={total} active_params={active}"


def _parse_args(argv: list[str]) -> str:
    usage = "usage: python -m train.models.summary model=NAME  (NAME: configs/model/NAME.yaml or a YAML path)"
    names = [arg.split("=", 1)[1] for arg in argv if arg.startswith("model=")]
    if len(names) != 1 or len(argv) != 1:
        raise SystemExit(usage)
    return names[0]


def main(argv: list[str] | None = None) -> None:
    cfg = resolve_model_config(_parse_args(sys.argv[1:] if argv is None else argv))
    print(f"model={cfg.name} {summarize(cfg)}")


if __name__ == "__main__":
    main()
