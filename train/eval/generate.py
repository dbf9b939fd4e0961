"""Load a model directory for inference and decode greedily with the native Qwen3VLModel.

The vision tower runs once; the prompt is decoded once into a KV cache (train/models/qwen3vl/attention.py)
and every answer token then costs one token's forward. `use_cache=False` recomputes the whole sequence
per token instead: the reference the cache is tested against, and bench/eval_speed.py's baseline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from data.tokenizer import Tokenizer
from data.video import VideoClip
from train.config.model import ConfigError, ModelConfig
from train.checkpoint import CheckpointError, load_model_dir
from train.models.qwen3vl.attention import KVCache
from train.models.qwen3vl.model import Qwen3VLModel
from data.positions import document_position_ids

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def load_model(path: str | Path, device: str = "cpu", dtype: str = "fp32") -> Qwen3VLModel:
    """A native (model_config.yaml) or HF (config.json) model directory as an eval-mode Qwen3VLModel."""
    try:
        cfg, state_dict = load_model_dir(path)
    except CheckpointError as err:
        raise ConfigError(f"checkpoint={err}") from None
    with torch.device("meta"):
        model = Qwen3VLModel(cfg)  # no init: every tensor comes from the checkpoint
    model.load_state_dict(state_dict, assign=True)
    model.tie_weights()
    return model.to(device=device, dtype=DTYPES[dtype]).eval()


def find_tokenizer(checkpoint: str | Path, given: str | None) -> Tokenizer:
    """`given`, else the checkpoint dir's tokenizer.model / tokenizer.json; ConfigError naming the key."""
    if given:
        path = Path(given)
    else:
        found = [Path(checkpoint) / name for name in TOKENIZER_FILES if (Path(checkpoint) / name).is_file()]
        if not found:
            raise ConfigError(f"tokenizer: none of {list(TOKENIZER_FILES)} in {checkpoint}; pass tokenizer=PATH "
                              f"(the demo corpus': <data_root>/tokenizer.model)")
        path = found[0]
    try:
        return Tokenizer.load(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer={path}: {err}") from None


def check_tokenizer_matches(tok: Tokenizer, cfg: ModelConfig) -> None:
    from train.preflight import PreflightError, check_tokenizer

    try:
        check_tokenizer(tok, cfg, tok.path)
    except PreflightError as err:
        raise ConfigError(str(err)) from None


@torch.no_grad()
def greedy_decode(model: Qwen3VLModel, ids: list[int], clip: VideoClip, max_new_tokens: int,
                  stop: Callable[[list[int]], bool] = lambda out: False,
                  use_cache: bool = True, vocab: int | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy continuation of `ids` (with the clip's video): (tokens, the logits each was chosen from).

    The vision tower runs once. With `use_cache` the prompt is decoded once into a KV cache and every new
    token costs one token's forward; without it each token re-runs the decoder over the whole sequence
    (the reference the cached path is tested against). Stops after `max_new_tokens` or when `stop(tokens)`.
    Only ids below `vocab` are chosen: an embedding table padded past the tokenizer's ids cannot be decoded."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    input_ids = torch.tensor(ids, dtype=torch.long)
    positions = document_position_ids(input_ids, None, clip.grid_thw, image_token_id=model.cfg.image_token_id,
                                      video_token_id=model.cfg.video_token_id,
                                      spatial_merge_size=model.cfg.vision.spatial_merge_size).to(device)
    embeds, visual_mask, deepstack = model.embed(input_ids.to(device),
                                                 pixel_values_videos=clip.pixel_values.to(device, dtype),
                                                 video_grid_thw=clip.grid_thw.to(device))
    cache = KVCache(model.cfg.text.num_hidden_layers) if use_cache else None
    step_embeds, step_positions, step_mask, step_deepstack = embeds, positions, visual_mask, deepstack
    out: list[int] = []
    logits: list[torch.Tensor] = []
    while len(out) < max_new_tokens:
        hidden, _ = model.decode(step_embeds, step_positions, None, step_mask, step_deepstack, cache=cache)
        logits.append(model.lm_head(hidden[-1]))
        token = int(logits[-1][:vocab].argmax())
        out.append(token)
        if stop(out):
            break
        # A text token continues the running position on all three MRoPE axes.
        nxt = positions[:, -1:].max() + 1
        positions = torch.cat([positions, nxt.expand(3, 1)], dim=1)
        new = model.language_model.embed_tokens(torch.tensor([token], device=device)).to(embeds.dtype)
        if cache is None:
            embeds = torch.cat([embeds, new])
            visual_mask = torch.cat([visual_mask, visual_mask.new_zeros(1)])
            step_embeds, step_positions, step_mask = embeds, positions, visual_mask
        else:  # only the new token; the vision features already sit in the cached keys and values
            step_embeds, step_positions, step_mask, step_deepstack = new, positions[:, -1:], None, None
    return out, logits


def greedy_answer(model: Qwen3VLModel, tok: Tokenizer, ids: list[int], clip: VideoClip, max_new_tokens: int,
                  use_cache: bool = True) -> list[int]:
    """Greedy answer tokens until a newline, <|endoftext|> or the limit."""
    def stop(out: list[int]) -> bool:
        return out[-1] == tok.eos_id or "\n" in tok.decode(out)

    return greedy_decode(model, ids, clip, max_new_tokens, stop, use_cache, vocab=tok.vocab_size)[0]
