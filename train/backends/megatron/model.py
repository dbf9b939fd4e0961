"""Qwen3-VL built from megatron-core components, numerically the reference model (train/models/qwen3vl).

- LLM decoder: a megatron TransformerBlock from local layer specs (CPU) or Transformer Engine specs (CUDA
  with TE; train/backends/megatron/fast_path.py decides and logs it): RMSNorm, per-head QK RMSNorm (Qwen3's
  q_norm/k_norm), GQA, SwiGLU, no biases; MoE layers (where `is_moe_layer`) from megatron's MoE spec with
  softmax top-k routing (`moe_router_pre_softmax=False` = softmax over the top-k logits = Qwen3's
  normalised top-k probabilities). Core attention is TE's over packed THD documents on the TE path (with
  CP: split per document), else `ContextParallelAttention`: the only local attention that honours
  packed-document boundaries (cu_seqlens) and both CP splits (train/backends/megatron/fast_path.py).
- Vision tower and mergers: the reference model's own `VisionTower` module (reused, not rebuilt), on the
  first pipeline stage, with the reference `embed` placing the features at the placeholders; its linear
  layers tensor-parallel over the TP group (train/backends/megatron/vision_tp.py).
- DeepStack: features added at the visual positions after the first k decoder layers of the first stage.
- Interleaved MRoPE: angles computed with the reference rope helpers and handed to every layer as
  `rotary_pos_emb` (megatron's own mrope is the contiguous Qwen2-VL layout; its `rotary_interleaved` is
  GPT-J rotate-every-two, neither is Qwen3-VL).
- Context parallel: train/parallel/vision_shard.py builds this rank's share (the whole sequence's
  load-balanced split, or every document's on the TE path / cp_layout=document: train/parallel/context.py),
  the vision tower sharded by item over the CP group; with sequence parallelism the share is further
  scattered over the TP ranks.

The MoE load-balancing loss is the reference's (train/models/qwen3vl/moe.py, pooled or per layer as
backend.moe_aux_loss decides): router logits are tapped from megatron's routers during forward and
megatron's own aux loss is switched off.
"""
from __future__ import annotations

import functools
import types
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (TransformerBlock, TransformerBlockSubmodules,
                                                         get_num_layers_to_build)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from data.batch import PackedBatch
from train.backends.megatron.cp_attention import ContextParallelAttention
from train.backends.megatron.cpu_compat import SequenceParallelTorchNorm
from train.backends.megatron.fast_path import LOCAL_PATH, MegatronPath, config_options, packed_seq_params
from train.backends.megatron.parallel_state import ParallelSizes, config_kwargs
from train.backends.megatron.vision_tp import parallelize_vision, vision_sharded_state_dict
from train.config.model import ModelConfig
from train.models.qwen3vl import Qwen3VLModel
from train.models.qwen3vl.common import maybe_checkpoint
from train.models.qwen3vl.rope import mrope_angles
from train.models.qwen3vl.vision import VisionTower
from train.parallel.context import context_shares
from train.parallel.vision_shard import embed_context_share

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SpecBuilders = tuple[Callable[..., ModuleSpec], Callable[..., ModuleSpec]]  # (TE spec, local spec)


def transformer_config(model_cfg: ModelConfig, sizes: ParallelSizes, precision: str = "fp32",
                       sequence_parallel: bool = False, path: MegatronPath = LOCAL_PATH,
                       cp_comm_type: str = "p2p") -> TransformerConfig:
    """The megatron TransformerConfig of the Qwen3-VL LLM under the given layout and fast path
    (cp_comm_type: how TE's context-parallel attention exchanges K/V; the local attention all-gathers)."""
    text = model_cfg.text
    dtype = DTYPES[precision]
    kwargs: dict[str, Any] = dict(
        num_layers=text.num_hidden_layers, hidden_size=text.hidden_size, ffn_hidden_size=text.intermediate_size,
        num_attention_heads=text.num_attention_heads, num_query_groups=text.num_key_value_heads,
        kv_channels=text.head_dim, normalization="RMSNorm", layernorm_epsilon=text.rms_norm_eps,
        qk_layernorm=True, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=text.attention_bias, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=precision == "bf16",
        use_cpu_initialization=not torch.cuda.is_available(), apply_rope_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        # The loss is already normalised by the global weight (train/loss.py): megatron must neither divide
        # it by the micro-batch count nor average gradients over data-parallel ranks (it sums them).
        calculate_per_token_loss=True, sequence_parallel=sequence_parallel and sizes.tp > 1,
        cp_comm_type=cp_comm_type if sizes.cp > 1 else None, **config_kwargs(sizes))
    if text.is_moe:
        kwargs.update(num_moe_experts=text.num_experts, moe_router_topk=text.num_experts_per_tok,
                      moe_ffn_hidden_size=text.moe_intermediate_size, moe_router_score_function="softmax",
                      moe_router_pre_softmax=not text.norm_topk_prob, moe_router_load_balancing_type="none",
                      moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False,
                      moe_router_dtype="fp32" if precision == "fp32" else None)
        pattern = [int(text.is_moe_layer(i)) for i in range(text.num_hidden_layers)]
        if not all(pattern):  # dense layers among MoE ones (mlp_only_layers, decoder_sparse_step): megatron's
            # own form, which also makes dist checkpoints key layers one by one (a stacked key would miss
            # the dense layers' MLP and fail its sharding validation at the first save)
            kwargs.update(moe_layer_freq=pattern)
    kwargs.update(config_options(path, text.is_moe))
    return TransformerConfig(**kwargs)


def decoder_layer_spec(model_cfg: ModelConfig, layer: int, path: MegatronPath = LOCAL_PATH,
                       builders: SpecBuilders | None = None) -> ModuleSpec:
    """megatron's spec of global decoder layer `layer` (dense or MoE as the reference decides): the
    Transformer Engine spec on the TE path, the local one otherwise; its sharded_state_dict_keys_map also
    says how the layer's names appear in dist checkpoints. `builders` (te, local) replace megatron's spec
    functions in tests."""
    text = model_cfg.text
    te_spec, local_spec = builders or _megatron_spec_builders()
    num_experts = text.num_experts if text.is_moe_layer(layer) else None
    if path.transformer_engine:
        return te_spec(num_experts=num_experts, moe_grouped_gemm=path.grouped_gemm, qk_layernorm=True)
    return local_spec(num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm")


def _megatron_spec_builders() -> SpecBuilders:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec, get_gpt_layer_local_spec


def layer_specs(config: TransformerConfig, model_cfg: ModelConfig, path: MegatronPath = LOCAL_PATH,
                builders: SpecBuilders | None = None, vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """Specs of this pipeline stage's decoder layers (dense or MoE per layer, as the reference decides);
    with virtual pipeline stages, of its model chunk `vp_stage`."""
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    specs = [decoder_layer_spec(model_cfg, i, path, builders)
             for i in range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage))]
    if not path.thd_attention:  # the only local attention that honours packed documents, and CP's split
        for spec in specs:
            spec.submodules.self_attention.submodules.core_attention = ContextParallelAttention
    if path.transformer_engine:  # TE norms handle sequence parallelism themselves
        from megatron.core.extensions.transformer_engine import TENorm

        return TransformerBlockSubmodules(layer_specs=specs, layer_norm=TENorm)
    norm = SequenceParallelTorchNorm if config.sequence_parallel else None
    if norm is not None:  # megatron's torch norm refuses sequence_parallel; per-token norms are fine
        for spec in specs:
            attn = spec.submodules.self_attention.submodules
            spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = norm
            attn.q_layernorm = attn.k_layernorm = norm
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=norm or specs[0].submodules.input_layernorm)


class MegatronQwen3VL(LanguageModule):
    """One pipeline stage of Qwen3-VL (with virtual pipeline stages: one model chunk, `vp_stage`; the ViT and
    embedding on chunk 0 of the first stage, the head on the last chunk of the last stage).
    forward(batch) -> final-normed hidden [n, 1, H] on the last stage (the loss reads the lm_head weight
    itself, chunked), the stage's output activations otherwise."""

    def __init__(self, config: TransformerConfig, model_cfg: ModelConfig, visual: VisionTower | None,
                 pre_process: bool = True, post_process: bool = True, path: MegatronPath = LOCAL_PATH,
                 vp_stage: int | None = None) -> None:
        super().__init__(config=config)
        self.vp_stage = vp_stage  # read by LanguageModule's tied-embedding set-up and sharded_state_dict
        text = model_cfg.text
        self.model_cfg = model_cfg
        self.path = path
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.pre_process, self.post_process = pre_process, post_process
        self.share_embeddings_and_output_weights = text.tie_word_embeddings
        self.vocab_size = text.vocab_size
        self.checkpoint_decoder = False
        self.input_tensor: Tensor | None = None
        self._router_sink: list[Tensor] | None = None
        if pre_process:
            if visual is None:
                raise ValueError("the first pipeline stage needs the vision tower")
            self.visual = parallelize_vision(visual, mpu.get_tensor_model_parallel_world_size())
            # Only its vocab-parallel word embedding is used: the vision merge must come before any split.
            self.embedding = LanguageModelEmbedding(config, text.vocab_size, text.max_position_embeddings,
                                                    position_embedding_type="none",
                                                    scatter_to_sequence_parallel=False)
        self.decoder = TransformerBlock(config, layer_specs(config, model_cfg, path, vp_stage=vp_stage),
                                        pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                text.hidden_size, text.vocab_size, config=config, init_method=config.init_method, bias=False,
                gather_output=False, skip_weight_param_allocation=pre_process and text.tie_word_embeddings)
        self.setup_embeddings_and_output_layer()
        self._tap_routers()

    # ------------------------------------------------------------------------------------------ set-up
    def _tap_routers(self) -> None:
        """Record each MoE router's logits of the current forward (the load-balancing loss needs them).
        Under sequence parallelism a TP rank routes only its rows: the rows of all TP ranks are gathered, so
        every TP rank forms the same loss as without TP (backward keeps each rank's rows; megatron sums the
        replicated router's gradient over TP, as for the cross entropy of the gathered hidden states)."""
        sequence_parallel = self.config.sequence_parallel
        for layer in self.decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if router is None:
                continue

            def tapped(inputs: Tensor, _gating=router.gating) -> Tensor:
                logits = _gating(inputs)
                if self._router_sink is not None:  # None during a backward-time recompute
                    rows = logits
                    if sequence_parallel:
                        rows = tensor_parallel.gather_from_sequence_parallel_region(
                            logits, tensor_parallel_output_grad=False)
                    self._router_sink.append(rows.reshape(-1, rows.shape[-1]))
                return logits
            router.gating = tapped

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """megatron's, with the vision tower's TP shards (megatron would file a plain module as replicated)."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.pre_process:
            state.update(vision_sharded_state_dict(self.visual, f"{prefix}visual.", sharded_offsets, metadata))
        return state

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor] | None) -> None:
        """The pipeline schedule hands a non-first stage its input activations here."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def lm_head_weight(self) -> Tensor:
        """The full [V, H] output weight (gathered over TP; backward keeps each rank's vocabulary slice):
        the shared chunked loss needs every logit of a token."""
        weight = (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                  else self.output_layer.weight)
        if mpu.get_tensor_model_parallel_world_size() == 1:
            return weight
        return tensor_parallel.gather_from_tensor_model_parallel_region(weight.t()).t()

    # ----------------------------------------------------------------------------------------- forward
    def cp_shares(self, batch: PackedBatch) -> list[Tensor] | None:
        """Positions of `batch` held by every CP rank, in this path's layout (None without context
        parallelism)."""
        cp = mpu.get_context_parallel_world_size()
        if cp == 1:
            return None
        layout = "document" if self.path.document_split else "sequence"
        return context_shares(layout, batch.cu_seqlens, batch.seq_len, cp)

    def cp_index(self, batch: PackedBatch) -> Tensor | None:
        """Positions this CP rank holds (None without context parallelism)."""
        shares = self.cp_shares(batch)
        return None if shares is None else shares[mpu.get_context_parallel_rank()]

    def _native_view(self) -> types.SimpleNamespace:
        """This stage's modules under the reference model's names (what its embed code reads)."""
        return types.SimpleNamespace(
            cfg=self.model_cfg, visual=self.visual,
            language_model=types.SimpleNamespace(embed_tokens=self.embedding.word_embeddings))

    def embed(self, batch: PackedBatch) -> tuple[Tensor, Tensor, list[Tensor]]:
        """The reference's embed (vision tower once, features at the placeholders) on this stage's modules."""
        return Qwen3VLModel.embed(self._native_view(), batch.input_ids, batch.pixel_values, batch.image_grid_thw,
                                  batch.pixel_values_videos, batch.video_grid_thw, batch.cu_seqlens,
                                  batch.doc_keys)

    def _first_stage_inputs(self, batch: PackedBatch, shares: list[Tensor] | None) -> tuple[Tensor, list[Tensor]]:
        if shares is None:
            embeds, visual_mask, deepstack = self.embed(batch)
        else:
            shard = embed_context_share(self._native_view(), batch, shares, mpu.get_context_parallel_group())
            embeds, visual_mask, deepstack = shard.inputs_embeds, shard.visual_mask, shard.deepstack
        visual_index = visual_mask.nonzero().squeeze(1)
        # Dense [n, H] DeepStack tensors (zero off the visual rows) so sequence parallelism can scatter them
        # like the hidden states (their backward all-gather gives every TP rank the mergers' full gradient).
        dense = [embeds.new_zeros(embeds.shape).index_put((visual_index,), f) for f in deepstack]
        hidden, dense = embeds[:, None], [d[:, None] for d in dense]
        if self.config.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
            dense = [tensor_parallel.scatter_to_sequence_parallel_region(d) for d in dense]
        return hidden, dense

    def forward(self, batch: PackedBatch, router_logits: list[Tensor] | None = None) -> Tensor:
        """Hidden states [n, 1, H] of this rank's share of one packed sequence. MoE router logits of the
        layers on this stage are appended to `router_logits` when given."""
        shares = self.cp_shares(batch)
        index = None if shares is None else shares[mpu.get_context_parallel_rank()]
        if self.pre_process:
            hidden, deepstack = self._first_stage_inputs(batch, shares)
        else:
            hidden, deepstack = self.input_tensor, []
        positions = batch.position_ids
        if index is not None and not self.path.document_split:
            # THD (per-document split): megatron's rotary code takes this rank's rows of the whole sequence's
            # angles itself (rope_utils._apply_rotary_pos_emb_thd, by cu_seqlens, the same chunks as ours).
            positions = positions[:, index.to(positions.device)]
        text = self.model_cfg.text
        rope = mrope_angles(positions, text.head_dim, text.rope_theta, text.mrope_section)[:, None, None, :]
        cu = batch.cu_seqlens.to(torch.int32)
        packed = packed_seq_params(cu, self.path)
        self._router_sink = router_logits
        try:
            for i, layer in enumerate(self.decoder.layers):
                run = functools.partial(layer, attention_mask=None, rotary_pos_emb=rope, packed_seq_params=packed)
                hidden, _ = maybe_checkpoint(run, self.checkpoint_decoder, hidden)
                if i < len(deepstack):
                    hidden = hidden + deepstack[i]
        finally:
            self._router_sink = None
        if self.post_process:
            hidden = self.decoder.final_layernorm(hidden)
        return hidden

    def gather_sequence_parallel(self, hidden: Tensor) -> Tensor:
        """[n/tp, 1, H] -> [n, H] on every TP rank; backward keeps each rank's rows (not a sum: every TP
        rank computes the same loss from the gathered states)."""
        if self.config.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden[:, 0]
