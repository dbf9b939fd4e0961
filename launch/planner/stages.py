"""Pipeline stage sizes by bytes: the first stage also holds the ViT, mergers and token embedding and, under
1F1B, the activations of pp micro-batches in flight (the last stage: one, plus the logits); the last stage
holds the LM head (a copy of a tied embedding when pp > 1). So an even split of the decoder layers leaves
the end stages heavier than the middle ones. `balanced_stage_split` picks parallel.first_stage_layers /
last_stage_layers (megatron-core's uneven pipeline split; the middle stages stay even) so that the heaviest
stage needs as few bytes as possible: parameter state (weights + gradients + optimizer) plus activations
and logits, launch/planner/estimate.py's formulas, the same per-stage total `memory` reports. The planner
uses it for every pipeline layout it considers (`parallel=auto`, `python -m launch.plan`);
bench/scale_memory.py, which builds models without training them, balances the state alone.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import replace

from launch.planner.estimate import (Layout, _activation_bytes, _stage_params, _state_bytes, layer_activation_bytes,
                                     logits_bytes)
from launch.planner.model_stats import ModelStats
from train.backends.megatron.layout import stage_layer_counts
from train.config.schema import TrainConfig

Split = tuple[int | None, int | None]


def split_options(num_layers: int, pp: int, min_first: int = 1) -> list[Split]:
    """(first, last) stage layer counts megatron-core accepts and worth considering: the even split when
    there is one, then, for pp > 2, middle stages of m layers with first/last stages of at most m (they
    carry the ViT + embedding and the head), and for pp = 2 every split. `min_first`: the first stage must
    hold the DeepStack injection layers."""
    if pp == 1:
        return [(None, None)]
    options: list[Split] = [(None, None)] if num_layers % pp == 0 and num_layers // pp >= min_first else []
    if pp == 2:
        return options + [(f, num_layers - f) for f in range(max(1, min_first), num_layers)]
    for per_middle in range(math.ceil(num_layers / pp), num_layers):
        ends = num_layers - (pp - 2) * per_middle
        if ends < 2:
            break
        options += [(f, ends - f) for f in range(max(1, min_first, ends - per_middle), min(per_middle, ends - 1) + 1)]
    return options


def stage_state_bytes(cfg: TrainConfig, stats: ModelStats, layout: Layout, counts: list[int]) -> list[float]:
    """Weights + gradients + optimizer bytes per GPU of each pipeline stage, for these layer counts."""
    trainable = set(cfg.stage.trainable)
    starts = [sum(counts[:stage]) for stage in range(len(counts))]
    return [sum(_state_bytes(_stage_params(stats, layout, stage, list(range(start, start + count)), trainable),
                             layout)) for stage, (start, count) in enumerate(zip(starts, counts))]


def balanced_stage_split(cfg: TrainConfig, stats: ModelStats, layout: Layout, activations: bool = True) -> Layout:
    """`layout` with the first/last stage layer counts whose heaviest stage needs the fewest bytes: state
    plus (activations=True) activations under the layout's recompute setting and logits (ties: the even
    split, then the first found). pp = 1 or virtual pipeline stages (whose stages are not contiguous layer
    ranges; the planner does not choose them): unchanged."""
    if layout.pp == 1 or layout.vpp is not None:
        return layout
    layers, pp = cfg.model.text.num_hidden_layers, layout.pp
    # State bytes are linear in the parameter counts: an end stage's extras (ViT + embedding, head) plus
    # per-layer bytes, summed over prefix sums for each option (the planner balances every layout it tries).
    ends = stage_state_bytes(cfg, stats, layout, [0] * pp)
    trainable = set(cfg.stage.trainable)
    per_layer = [sum(_state_bytes(_stage_params(stats, layout, 0, [i], trainable), layout)) - ends[0]
                 for i in range(layers)]
    prefix = list(itertools.accumulate(per_layer, initial=0.0))
    layer_act = layer_activation_bytes(cfg, layout)

    def stage_bytes(stage: int, start: int, stop: int) -> float:
        state = ends[stage] + prefix[stop] - prefix[start]
        if not activations:
            return state
        return state + logits_bytes(cfg, layout, stage) + _activation_bytes(
            cfg, layout, stage, range(start, stop), layout.recompute, layer_act)

    deepstack = len(cfg.model.vision.deepstack_visual_indexes)
    best: tuple[float, Layout] | None = None
    for first, last in split_options(layers, pp, max(1, deepstack)):
        counts = stage_layer_counts(layers, pp, first, last)
        starts = list(itertools.accumulate(counts, initial=0))
        worst = max(stage_bytes(stage, starts[stage], starts[stage + 1]) for stage in range(pp))
        if best is None or worst < best[0]:
            best = (worst, replace(layout, first=first, last=last))
    return layout if best is None else best[1]
