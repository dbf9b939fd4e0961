"""The module DeepSpeed wraps: the Qwen3-VL model plus the shared loss, in ONE forward per micro-batch.

Keeping embed (under CP: train/parallel/vision_shard.py) -> decode -> chunked loss inside one `forward`
lets ZeRO-3's module hooks gather and release every parameter where it is used; the lm_head weight is read
directly by the chunked cross entropy (never through lm_head.forward, which would build [L, V] logits), so it is
registered as an external parameter of this module under ZeRO-3.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from data.batch import PackedBatch
from train.loss import micro_batch_loss
from train.models.qwen3vl import Qwen3VLModel
from train.parallel.context import shard_index
from train.parallel.vision_shard import embed_context_share


class LossModule(nn.Module):
    def __init__(self, model: Qwen3VLModel, cp_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.model = model
        self.cp_group = cp_group
        self.cp_size = 1 if cp_group is None else dist.get_world_size(cp_group)
        self.cp_rank = 0 if cp_group is None else dist.get_rank(cp_group)

    def token_share(self, seq_len: int) -> torch.Tensor | None:
        """Positions of a packed sequence this rank computes the loss of (None: all of them)."""
        if self.cp_size == 1:
            return None
        return shard_index(seq_len, self.cp_size, self.cp_rank)

    def forward(self, batch: PackedBatch, global_weight: torch.Tensor, aux_count: int,
                grad_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(objective, sum(w*ce) detached, per-token ce [share], aux loss detached) of one micro-batch."""
        model = self.model
        if self.cp_size == 1:
            embeds, visual_mask, deepstack = model.embed(
                batch.input_ids, batch.pixel_values, batch.image_grid_thw, batch.pixel_values_videos,
                batch.video_grid_thw, batch.cu_seqlens, batch.doc_keys)
            hidden, aux = model.decode(embeds, batch.position_ids, batch.cu_seqlens, visual_mask, deepstack)
            labels, weights = batch.labels, batch.loss_weights
        else:
            shares = [shard_index(batch.seq_len, self.cp_size, r) for r in range(self.cp_size)]
            shard = embed_context_share(model, batch, shares, self.cp_group)
            hidden, aux = model.decode(shard.inputs_embeds, shard.position_ids, shard.cu_seqlens,
                                       shard.visual_mask, shard.deepstack)
            labels, weights = shard.labels, shard.loss_weights
        text = model.cfg.text
        out = micro_batch_loss(hidden, model.lm_head.weight, labels, weights, global_weight=global_weight,
                               aux_loss=aux if text.is_moe else None, aux_coef=text.router_aux_loss_coef,
                               aux_count=aux_count, grad_scale=grad_scale)
        return out.objective, out.weighted_ce, out.token_ce, out.aux_loss
