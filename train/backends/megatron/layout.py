"""Layouts the megatron Qwen3-VL cannot run, refused with one line before megatron is imported or anything
is built (this module imports nothing heavy)."""
from __future__ import annotations

from train.backends.megatron.parallel_state import ParallelLayoutError, ParallelSizes
from train.config.model import ModelConfig

PRECISIONS = ("fp32", "bf16")


def check_layout(model_cfg: ModelConfig, sizes: ParallelSizes, precision: str = "fp32", seq_len: int = 0,
                 sequence_parallel: bool = False) -> None:
    """One-line errors for layouts this model cannot run, before anything is built. `seq_len` (packed
    sequence length, 0: unknown) must split into the 2*cp load-balanced chunks, and each CP share into tp
    rows blocks under sequence parallelism."""
    text = model_cfg.text
    deepstack = len(model_cfg.vision.deepstack_visual_indexes)
    problems = []
    if precision not in PRECISIONS:
        problems.append(f"precision={precision!r} is not one of {PRECISIONS}")
    if text.num_attention_heads % sizes.tp or text.num_key_value_heads % sizes.tp:
        problems.append(f"tp={sizes.tp} must divide num_attention_heads={text.num_attention_heads} and "
                        f"num_key_value_heads={text.num_key_value_heads}")
    if text.vocab_size % sizes.tp:
        problems.append(f"tp={sizes.tp} must divide vocab_size={text.vocab_size}")
    if text.num_hidden_layers % sizes.pp:
        problems.append(f"pp={sizes.pp} must divide num_hidden_layers={text.num_hidden_layers}")
    elif text.num_hidden_layers // sizes.pp < deepstack:
        problems.append(f"pp={sizes.pp} leaves {text.num_hidden_layers // sizes.pp} layers on the first stage, "
                        f"fewer than the {deepstack} DeepStack injections it must hold")
    if text.is_moe and text.num_experts % sizes.ep:
        problems.append(f"ep={sizes.ep} must divide num_experts={text.num_experts}")
    if text.is_moe and sizes.pp > 1 and text.router_aux_loss_coef:
        problems.append("the pooled MoE load-balancing loss needs every MoE layer on one stage: pp=1, or "
                        "model.text.router_aux_loss_coef=0")
    if sizes.ep > 1 and not text.is_moe:
        problems.append(f"ep={sizes.ep} needs an MoE model")
    pieces = 2 * sizes.cp if sizes.cp > 1 else 1
    if seq_len and seq_len % pieces:
        problems.append(f"seq_len={seq_len} is not divisible by 2*cp={pieces}")
    if seq_len and sequence_parallel and sizes.tp > 1 and (seq_len // sizes.cp) % sizes.tp:
        problems.append(f"sequence parallel splits each CP share of {seq_len // sizes.cp} tokens over "
                        f"tp={sizes.tp} ranks: not divisible")
    if problems:
        raise ParallelLayoutError(f"megatron layout {sizes.describe()}: " + "; ".join(problems))
