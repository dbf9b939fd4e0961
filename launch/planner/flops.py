"""FLOPs of one optimizer step and the step time they imply (formulas: launch/plan.py's docstring)."""
from __future__ import annotations

from dataclasses import dataclass

from data.video import VideoConfig
from launch.planner.estimate import GPU, Layout, vision_tokens
from launch.planner.model_stats import ModelStats
from train.config.schema import TrainConfig


@dataclass
class StepCost:
    model_flops: float  # FLOPs the step needs (forward + the backward it needs), whole cluster
    recompute_flops: float  # extra forward FLOPs of activation checkpointing
    tokens: int  # LLM tokens per step
    bubble: float  # pipeline bubble fraction (pp - 1) / micro-batches
    seconds: float  # estimated step time


def _multipliers(trainable: set[str]) -> dict[str, int]:
    """FLOPs per parameter and token, per part: 2 forward, +2 for input gradients (needed when anything
    before the part trains), +2 for weight gradients (when the part trains)."""
    def mult(part: str, before: tuple[str, ...]) -> int:
        return 2 + 2 * bool(trainable & set(before)) + 2 * (part in trainable)
    return {"vision": mult("vision", ()), "merger": mult("merger", ("vision",)),
            "llm": mult("llm", ("vision", "merger"))}


def step_flops(cfg: TrainConfig, stats: ModelStats) -> tuple[float, float, int]:
    """(model FLOPs, forward FLOPs, tokens) of one step, with every sequence one document of seq_len tokens
    (causal attention over the whole sequence: an upper bound for packed documents) and the encoder's full
    vision share of every sequence (an upper bound for mixtures with text-only data)."""
    t, v = cfg.model.text, cfg.model.vision
    seq, batch = cfg.stage.seq_len, cfg.stage.global_batch_size
    mult = _multipliers(set(cfg.stage.trainable))
    tokens = seq * batch
    # LLM: 2 FLOPs per multiply-add over the active parameters; causal attention QK^T + AV is
    # 2 * 2 * s^2 * d_q per layer, halved by the causal mask.
    llm_fwd = 2.0 * stats.active_llm_params() * tokens
    attn_fwd = 2.0 * seq * seq * t.num_attention_heads * t.head_dim * t.num_hidden_layers * batch
    # Vision: every patch through the ViT; the mergers once per merged token. ViT attention is full
    # (bidirectional) within one temporal patch of at most VideoConfig.max_pixels pixels.
    merged = vision_tokens(cfg) * batch
    patches = merged * v.spatial_merge_size ** 2
    window = VideoConfig().max_pixels // v.patch_size ** 2
    vit_fwd = 2.0 * stats.vit_params * patches + 4.0 * window * v.hidden_size * v.depth * patches
    merger_fwd = 2.0 * stats.merger_params * merged
    model = ((llm_fwd + attn_fwd) * mult["llm"] + vit_fwd * mult["vision"] + merger_fwd * mult["merger"]) / 2
    return model, llm_fwd + attn_fwd + vit_fwd + merger_fwd, tokens


def step_cost(cfg: TrainConfig, stats: ModelStats, layout: Layout, gpu: GPU, mfu: float) -> StepCost:
    """Step time = (model FLOPs + recomputed forward FLOPs) / (GPUs x peak x MFU) x (1 + bubble); the 1F1B
    bubble is (pp - 1) / micro-batches, the interleaved schedule's vpp times smaller (Narayanan et al. 2021)."""
    model, forward, tokens = step_flops(cfg, stats)
    recompute = forward if layout.recompute else 0.0
    micro = max(1, cfg.stage.global_batch_size // layout.dp)
    bubble = (layout.pp - 1) / (micro * (layout.vpp or 1))
    seconds = (model + recompute) / (layout.world * gpu.peak_bf16_flops * mfu) * (1 + bubble)
    return StepCost(model, recompute, tokens, bubble, seconds)
