"""Parameter inventory of a Qwen3-VL model config, for the cluster planner.

Counts come from the parameter shapes of a meta-device build of the reference model
(`train.models.native_io.expected_native_shapes`), so they are the exact numbers the trainer allocates, not
a re-derivation that could drift from the model code. Each tensor is filed by where it lives under model
parallelism:

  place  "vision" (ViT + mergers: first pipeline stage), "embed" (first stage), "head" (last stage),
         "layer" (decoder layer i), "final_norm" (last stage)
  split  "tp" (LLM matrices and the ViT / merger linear layers: column/row split over tensor parallel
         ranks, train/backends/megatron/vision_tp.py), "rep" (norm weights, row-parallel biases, routers,
         the patch embedding and position table: replicated over TP), "expert" (routed experts: split over
         the expert parallel x expert tensor parallel ranks)
  group  the stage-freezing group of train/freeze.py (vision / merger / llm)
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

from train.backends.megatron.vision_tp import vision_split
from train.config.model import ModelConfig
from train.freeze import param_group
from train.models.native_io import EMBED, LM_HEAD, expected_native_shapes

_LAYER = re.compile(r"language_model\.layers\.(\d+)\.")


@dataclass
class ModelStats:
    """Parameter counts of one model, by (place, split, group); layers keep their own counts."""

    cfg: ModelConfig
    # {(place, split, group): count} for everything outside the decoder layers
    outside: dict[tuple[str, str, str], int] = field(default_factory=dict)
    # per decoder layer: {split: count} (all layers are "llm")
    layers: list[dict[str, int]] = field(default_factory=list)
    vit_params: int = 0  # patch embedding + position table + ViT blocks (run once per patch)
    merger_params: int = 0  # 2x2 merger + DeepStack mergers (run once per merged token)

    @property
    def total(self) -> int:
        return sum(self.outside.values()) + sum(sum(layer.values()) for layer in self.layers)

    @property
    def expert_total(self) -> int:
        return sum(layer.get("expert", 0) for layer in self.layers)

    def active_llm_params(self) -> int:
        """Parameters one token multiplies through in the LLM: attention, dense MLPs, routers, top-k of the
        experts, the LM head. The embedding is a lookup (no FLOPs)."""
        text = self.cfg.text
        share = text.num_experts_per_tok / text.num_experts if text.is_moe else 0.0
        per_layer = sum(layer.get("tp", 0) + layer.get("rep", 0) + share * layer.get("expert", 0)
                        for layer in self.layers)
        head = sum(n for (place, _, _), n in self.outside.items() if place in ("head", "final_norm"))
        return int(per_layer + head)


def _place(name: str) -> str:
    if name.startswith("visual."):
        return "vision"
    if name == EMBED:
        return "embed"
    if name == LM_HEAD:
        return "head"
    return "final_norm"


def _split(name: str, shape: tuple[int, ...]) -> str:
    if ".mlp.experts." in name:
        return "expert"
    if name.startswith("visual."):  # the megatron backend's vision TP table
        return "rep" if vision_split(name) is None else "tp"
    # Routers (mlp.gate) are replicated in Megatron; so are all 1-D tensors (norms, biases).
    if len(shape) == 1 or name.endswith(".mlp.gate.weight"):
        return "rep"
    return "tp"


def model_stats(cfg: ModelConfig) -> ModelStats:
    """The inventory of `cfg` (a tied LM head is the embedding tensor: counted once, under "embed")."""
    stats = ModelStats(cfg=cfg, layers=[defaultdict(int) for _ in range(cfg.text.num_hidden_layers)])
    outside: dict[tuple[str, str, str], int] = defaultdict(int)
    for name, shape in expected_native_shapes(cfg).items():
        if name == LM_HEAD and cfg.text.tie_word_embeddings:
            continue
        count = math.prod(shape)
        layer = _LAYER.match(name)
        if layer:
            stats.layers[int(layer.group(1))][_split(name, shape)] += count
            continue
        group = param_group(name)
        outside[(_place(name), _split(name, shape), group)] += count
        if group == "merger":
            stats.merger_params += count
        elif group == "vision":
            stats.vit_params += count
    stats.outside = dict(outside)
    stats.layers = [dict(layer) for layer in stats.layers]
    return stats
