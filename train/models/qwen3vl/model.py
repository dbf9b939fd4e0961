"""Qwen3-VL (dense or MoE) in plain PyTorch, over one packed sequence.

Stages, separable so context parallelism can split the sequence after the vision merge:
  embed(input_ids, vision inputs) -> (inputs_embeds [L, H], visual_mask [L], DeepStack features [Nvis, H] each)
  decode(inputs_embeds, position_ids, cu_seqlens, visual_mask, deepstack) -> (hidden [L, H] normed, aux_loss)
  forward = embed + decode + lm_head.
Parameter names are transformers' Qwen3VL(Moe)ForConditionalGeneration names without the leading "model."
(`visual.*`, `language_model.*`, `lm_head.weight`), so HF weights load with `k.removeprefix("model.")`.

Building on the meta device skips initialisation: backends materialise their shard and fill it from a
WeightSource (train/models/materialize.py); `init_weights(seed)` fills a whole model with the random init.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from train.config.model import ModelConfig
from train.models.qwen3vl.attention import KVCache, full_cu_seqlens, segments_of
from train.models.qwen3vl.common import maybe_checkpoint
from train.models.qwen3vl.moe import load_balancing_loss
from data.positions import packed_position_ids
from train.models.qwen3vl.rope import mrope_cos_sin
from train.models.qwen3vl.text import TextModel
from train.models.qwen3vl.vision import VisionTower
from train.models.qwen3vl.vision_inputs import (check_placeholder_counts, concat_vision_inputs,
                                                dummy_vision_input, visual_positions)


@dataclass
class Qwen3VLOutput:
    logits: torch.Tensor | None  # [L, V] (or [1, L, V] for batched input), None when compute_logits=False
    hidden_states: torch.Tensor  # [L, H] after the final norm
    aux_loss: torch.Tensor  # scalar fp32 load-balancing loss, not yet scaled by router_aux_loss_coef; 0 if dense


def sequential_positions(cu_seqlens: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """1-D positions [3, L] (the `model.text.mrope=false` ablation): each token's index in its document
    (segment of cu_seqlens) plus `offset` (tokens already decoded), the same on every MRoPE axis."""
    lengths = segments_of(cu_seqlens, cu_seqlens.device).lengths
    index = torch.cat([torch.arange(n, device=cu_seqlens.device) for n in lengths])
    return (index + offset).expand(3, -1)


class Qwen3VLModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        """A meta-device build is never initialised (the backends fill what each rank holds)."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision, out_size=cfg.text.hidden_size)
        self.language_model = TextModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.checkpoint_decoder = False
        # MoE load-balancing loss form (moe.load_balancing_loss): "pooled" is transformers'; the backends set
        # the run's choice (train/backends/megatron/layout.py aux_loss_form).
        self.aux_loss_form = "pooled"
        self.tie_weights()
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    # ----------------------------------------------------------------------------------------- set-up
    def tie_weights(self) -> None:
        """Share lm_head with the token embedding when the config ties them (again after to_empty)."""
        if self.cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """The project's random initialisation (train/models/weight_source.py RandomInit: HF's
        distributions, normal(0, 0.02) matrices and embeddings, zero biases, unit norms), the same values
        every backend gets for `seed` in any layout. seed=None draws one from torch's global RNG."""
        from train.models.materialize import fill_native
        from train.models.weight_source import RandomInit

        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, ()))
        self.tie_weights()
        fill_native(self, RandomInit(self.cfg, seed))

    def enable_activation_checkpointing(self, decoder: bool = True, vision: bool = True) -> None:
        """Recompute each decoder layer's / ViT block's activations in backward (non-reentrant)."""
        self.checkpoint_decoder = decoder
        self.visual.checkpoint_blocks = vision

    def set_core_attention(self, make: Callable[[], nn.Module], text: bool = True, vision: bool = False) -> None:
        """Give every LLM (and/or ViT) attention layer a new core attention object from `make()`, e.g.
        Ulysses or context-parallel attention; it is called as core(q, k, v, cu_seqlens, causal)."""
        if text:
            for layer in self.language_model.layers:
                layer.self_attn.core_attention = make()
        if vision:
            for block in self.visual.blocks:
                block.attn.core_attention = make()

    # ----------------------------------------------------------------------------------------- stages
    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        doc_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Token embeddings with vision features placed at the placeholders. Runs the vision tower exactly
        once (on a dummy image, its output added times 0, when the sequence has no vision)."""
        check_placeholder_counts(input_ids, cu_seqlens, image_grid_thw, video_grid_thw, self.cfg, doc_keys)
        embeds = self.language_model.embed_tokens(input_ids)
        pixels, grid = concat_vision_inputs(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        if pixels is None:
            # No vision in this sequence: run the tower on a dummy image anyway and keep the graph the same
            # shape as a vision batch. The merger output enters the embeddings times 0 and each DeepStack
            # feature enters decode as an empty row slice, after the same decoder layer as real features.
            # Why: under ZeRO-3 every rank gathers parameters in the same order in forward AND backward; if
            # the DeepStack mergers got their (zero) gradient through the embeddings instead, a text-only rank
            # would run their backward after the whole decoder while a vision rank runs it between decoder
            # layers, and the ranks' all-gathers would pair up wrongly (hang or collective mismatch).
            # embeds.dtype, not a vision weight's: under ZeRO-3 touching a partitioned weight outside its
            # module's forward desynchronises the ranks' parameter gathers.
            pixels, grid = dummy_vision_input(self.cfg, embeds.device, embeds.dtype)
            merged, deepstack = self.visual(pixels, grid)
            visual_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            return (embeds + 0.0 * merged.sum().to(embeds.dtype), visual_mask,
                    [features[:0].to(embeds.dtype) for features in deepstack])
        merged, deepstack = self.visual(pixels, grid)
        num_image_features = 0 if image_grid_thw is None or pixel_values is None else int(
            image_grid_thw.prod(-1).sum()) // self.cfg.vision.spatial_merge_size ** 2
        visual_mask, index, rows = visual_positions(input_ids, self.cfg.image_token_id,
                                                    self.cfg.video_token_id, num_image_features)
        embeds = embeds.index_put((index,), merged[rows].to(embeds.dtype))
        return embeds, visual_mask, [d[rows].to(embeds.dtype) for d in deepstack]

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        deepstack_features: list[torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layers + final norm -> (hidden [L, H], aux loss). DeepStack features are added at the
        visual positions after decoder layers 0, 1, ... (one feature tensor per layer).

        With `cache` (decoding one sequence): the inputs are the tokens after the cached ones, their keys and
        values are appended to it, and they attend to every cached token; cu_seqlens must be None."""
        text = self.cfg.text
        x = inputs_embeds
        if tuple(position_ids.shape) != (3, x.shape[0]):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected (3, {x.shape[0]}): "
                             f"one (t, h, w) row each for the {x.shape[0]} tokens")
        if cache is not None and cu_seqlens is not None:
            raise ValueError("decode with a KV cache takes one sequence: cu_seqlens must be None")
        cu = full_cu_seqlens(x.shape[0], x.device) if cu_seqlens is None else cu_seqlens
        if not text.mrope:
            position_ids = sequential_positions(cu, 0 if cache is None else cache.length)
        rope = mrope_cos_sin(position_ids, text.head_dim, text.rope_theta, text.mrope_section, x.dtype)
        deepstack = deepstack_features or []
        visual_index = visual_mask.nonzero().squeeze(1) if deepstack else None
        router_logits = []
        for i, layer in enumerate(self.language_model.layers):
            if cache is None:
                x, logits = maybe_checkpoint(layer, self.checkpoint_decoder, x, rope, cu)
            else:
                x, logits = layer(x, rope, cu, cache.layers[i])
            if logits is not None:
                router_logits.append(logits)
            if i < len(deepstack):
                x = x.index_add(0, visual_index, deepstack[i])
        x = self.language_model.norm(x)
        if router_logits:
            aux = load_balancing_loss(router_logits, text.num_experts, text.num_experts_per_tok,
                                      self.aux_loss_form)
        else:
            aux = torch.zeros((), dtype=torch.float32, device=x.device)
        return x, aux

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        compute_logits: bool = True,
        doc_keys: list[str] | str | None = None,
    ) -> Qwen3VLOutput:
        """One packed sequence input_ids [L] (or [1, L], HF style: outputs then keep the batch dim).
        Position ids [3, L] (or [3, 1, L]) are computed per document when not given. `doc_keys` (one key
        per document, or a single sample id) only serve error messages."""
        batched = input_ids.dim() == 2
        if batched:
            if input_ids.shape[0] != 1:
                raise ValueError(f"input_ids has batch size {input_ids.shape[0]}; pack documents into one "
                                 f"sequence with cu_seqlens instead")
            input_ids = input_ids[0]
            if position_ids is not None and position_ids.dim() == 3:
                position_ids = position_ids[:, 0]
        keys = [doc_keys] if isinstance(doc_keys, str) else doc_keys
        embeds, visual_mask, deepstack = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos,
                                                    video_grid_thw, cu_seqlens, keys)
        if position_ids is None:
            position_ids = packed_position_ids(
                input_ids.cpu(), None if cu_seqlens is None else cu_seqlens.cpu(),
                None if image_grid_thw is None else image_grid_thw.cpu(),
                None if video_grid_thw is None else video_grid_thw.cpu(),
                image_token_id=self.cfg.image_token_id, video_token_id=self.cfg.video_token_id,
                spatial_merge_size=self.cfg.vision.spatial_merge_size).to(input_ids.device)
        hidden, aux = self.decode(embeds, position_ids, cu_seqlens, visual_mask, deepstack)
        logits = self.lm_head(hidden) if compute_logits else None
        if batched:
            hidden = hidden[None]
            logits = None if logits is None else logits[None]
        return Qwen3VLOutput(logits=logits, hidden_states=hidden, aux_loss=aux)
