"""Per-GPU memory and step time of one parallel layout (the formulas are documented in launch/plan.py)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from launch.planner.model_stats import ModelStats
from train.backends.megatron.layout import stage_layers
from train.config.model import ConfigError
from train.config.schema import TrainConfig

GIB = 1024 ** 3


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int  # what torch.cuda reports as total memory
    peak_bf16_flops: float  # dense bf16 tensor-core peak


# H100 SXM and H200 SXM: same compute, 80 GB vs 141 GB HBM (81,559 / 143,771 MiB as CUDA reports them).
GPUS = {"h100": GPU("h100", 81_559 * 2 ** 20, 989e12), "h200": GPU("h200", 143_771 * 2 ** 20, 989e12)}
GPUS_PER_NODE = 8
USABLE_FRACTION = 0.90  # CUDA context, NCCL buffers and allocator fragmentation take the rest
DEFAULT_MFU = 0.40


@dataclass(frozen=True)
class Layout:
    backend: str  # "megatron" (distributed optimizer on/off) or "deepspeed" (ZeRO stage)
    tp: int
    pp: int
    cp: int
    ep: int
    dp: int
    zero: int  # deepspeed: ZeRO stage; megatron: 1 with the distributed optimizer, else 0
    recompute: bool  # full activation checkpointing (every decoder layer and ViT block)
    etp: int = 1  # megatron expert tensor-parallel size
    first: int | None = None  # megatron: decoder layers of the first / last pipeline stage (None: even)
    last: int | None = None
    vpp: int | None = None  # megatron: virtual pipeline stages per rank (interleaved 1F1B; None: plain 1F1B)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def describe(self) -> str:
        opt = f"zero{self.zero}" if self.backend == "deepspeed" else ("distopt" if self.zero else "no-distopt")
        split = "" if self.first is None and self.last is None else f" stage layers {self.first}/../{self.last}"
        etp = f" expert_tp={self.etp}" if self.etp != 1 else ""
        etp += f" vpp={self.vpp}" if self.vpp is not None else ""
        return (f"{self.backend} {opt} tp={self.tp} pp={self.pp} cp={self.cp} ep={self.ep}{etp} dp={self.dp}"
                f"{split} recompute={'on' if self.recompute else 'off'}")

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        """`cfg` with this layout's backend and parallel keys (what the trainer would run)."""
        backend = replace(cfg.backend, name=self.backend, activation_checkpointing=self.recompute)
        if self.backend == "deepspeed":
            backend = replace(backend, zero_stage=self.zero)
        else:
            backend = replace(backend, distributed_optimizer=bool(self.zero))
        parallel = replace(cfg.parallel, tp=self.tp, pp=self.pp, cp=self.cp, ep=self.ep, expert_tp=self.etp,
                           first_stage_layers=self.first, last_stage_layers=self.last, vpp=self.vpp, auto=False,
                           sequence_parallel=self.tp > 1 if self.backend == "megatron" else False)
        return replace(cfg, backend=backend, parallel=parallel)


@dataclass
class Memory:
    """Bytes per GPU on the worst pipeline stage (the one with the largest total)."""

    stage: int
    weights: float
    grads: float
    optimizer: float
    activations: float  # with the layout's recompute setting
    activations_no_recompute: float
    activations_recompute: float
    logits: float
    buffers: float  # ZeRO-3 gathered-layer buffers

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits + self.buffers


def check_layout(layout: Layout, cfg: TrainConfig, world: int) -> None:
    """ConfigError (one line) naming what makes `layout` impossible: the planner's own limit (TP inside one
    node), then exactly the rules preflight and the backend run (train/preflight.py check_layout)."""
    from train.preflight import PreflightError
    from train.preflight import check_layout as preflight_layout

    if layout.tp > GPUS_PER_NODE or layout.tp not in (1, 2, 4, 8):
        raise ConfigError(f"parallel.tp={layout.tp} must be 1, 2, 4 or 8 (within one {GPUS_PER_NODE}-GPU node)")
    try:
        preflight_layout(layout.apply(cfg), world)
    except PreflightError as err:
        raise ConfigError(str(err)) from None


def _stage_params(stats: ModelStats, layout: Layout, stage: int, layers: list[int],
                  trainable: set[str]) -> dict[tuple[str, bool], float]:
    """Per-GPU parameter counts of one pipeline stage holding decoder `layers` (global indices, all its
    model chunks), keyed by (kind "dense"/"expert", trainable)."""
    out: dict[tuple[str, bool], float] = {("dense", True): 0.0, ("dense", False): 0.0,
                                          ("expert", True): 0.0, ("expert", False): 0.0}
    last = stage == layout.pp - 1
    for (place, split, group), count in stats.outside.items():
        on_stage = (place in ("vision", "embed") and stage == 0) or (place in ("head", "final_norm") and last)
        if on_stage:
            out[("dense", group in trainable)] += count / (layout.tp if split == "tp" else 1)
    if last and layout.pp > 1 and stats.cfg.text.tie_word_embeddings:
        tied = sum(n for (place, _, _), n in stats.outside.items() if place == "embed")
        out[("dense", "llm" in trainable)] += tied / layout.tp  # Megatron keeps a copy of the tied head
    llm = "llm" in trainable
    for layer in (stats.layers[i] for i in layers):
        out[("dense", llm)] += layer.get("tp", 0) / layout.tp + layer.get("rep", 0)
        out[("expert", llm)] += layer.get("expert", 0) / (layout.ep * layout.etp)
    return out


def _state_bytes(params: dict[tuple[str, bool], float], layout: Layout) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes from per-GPU parameter counts.

    bf16 weights 2 B; Adam in mixed precision 12 B (fp32 master + m + v) per trainable parameter; gradients
    fp32 4 B (Megatron main_grad buffer, never sharded) or bf16 2 B (DeepSpeed). Shards: dense over the
    DP x CP ranks, experts over the expert-data-parallel ranks (tp*cp*dp/ep on Megatron, world/ep on
    DeepSpeed, which has no TP).
    """
    shard = {"dense": layout.dp * layout.cp,
             "expert": max(1, layout.tp * layout.cp * layout.dp // (layout.ep * layout.etp))}
    weights = grads = optimizer = 0.0
    for (kind, trains), count in params.items():
        d = shard[kind]
        if layout.backend == "megatron":
            weights += 2 * count
            if trains:
                grads += 4 * count
                optimizer += 12 * count / (d if layout.zero else 1)
            continue
        weights += 2 * count / (d if layout.zero >= 3 else 1)
        if trains:
            grads += 2 * count / (d if layout.zero >= 2 else 1)
            optimizer += 12 * count / (d if layout.zero >= 1 else 1)
    return weights, grads, optimizer


def vision_tokens(cfg: TrainConfig) -> int:
    """LLM tokens of vision in one worst-case sequence: the encoder's vision share of seq_len."""
    from data.encode import EncodeConfig

    encode = getattr(cfg.data, "encode", None) or EncodeConfig()
    return int(encode.vision_fraction * cfg.stage.seq_len)


def _layer_elements(cfg: TrainConfig, moe: bool) -> float:
    """Activation elements one decoder layer keeps per token for backward (bf16, flash attention)."""
    t = cfg.model.text
    h, q, kv = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    # two norm inputs, QKV and MLP inputs (4h); q/k norm inputs, rotated q/k, v, attention output (3q + 3kv)
    attention = 4 * h + 3 * q + 3 * kv
    if moe:
        # per routed copy: permuted input and output (2h), gate, up, act, down input (4 f_e); router logits
        k = t.num_experts_per_tok
        return attention + k * (2 * h + 4 * t.moe_intermediate_size) + 2 * t.num_experts
    return attention + 4 * t.intermediate_size  # gate, up, act(gate), down input


def _vision_bytes(cfg: TrainConfig, tp: int, cp: int, recompute: bool) -> tuple[float, float]:
    """(kept per in-flight sequence, working set once) of ViT + merger activations. Divided by CP: the CP
    ranks share the images and video frame groups of a sequence (train/parallel/vision_shard.py)."""
    v = cfg.model.vision
    patches = vision_tokens(cfg) * v.spatial_merge_size ** 2
    block = 8 * v.hidden_size + 2 * v.intermediate_size  # per patch: norms, qkv, q/k/v, attn out, fc1 in/out
    mergers = v.hidden_size * 4 * (1 + len(v.deepstack_visual_indexes))  # per patch, all mergers
    per_elem = 2.0 * patches / (tp * cp)
    if recompute:
        return per_elem * (v.hidden_size * v.depth + mergers), per_elem * block
    return per_elem * (block * v.depth + mergers), 0.0


def _in_flight(layout: Layout, stage: int, micro: int) -> float:
    """Micro-batches whose activations a stage holds at its peak, in units of all its layers. 1F1B:
    min(pp - stage, micro). Interleaved (megatron's warm-up of 2(pp - stage - 1) + (vpp - 1) pp chunk
    forwards, plus the one in progress; a chunk is 1/vpp of the stage): stage 0 holds pp + (pp - 1)/vpp."""
    if layout.vpp is None:
        return min(layout.pp - stage, micro)
    chunk_forwards = 2 * (layout.pp - stage - 1) + (layout.vpp - 1) * layout.pp + 1
    return min(chunk_forwards, micro * layout.vpp) / layout.vpp


def layer_activation_bytes(cfg: TrainConfig, layout: Layout) -> list[float]:
    """Per decoder layer (global index): the bytes one micro-batch's activations of it keep for backward
    without recompute, per GPU (one packed sequence of seq_len tokens, seq_len / cp per rank; sequence
    parallel spreads them over TP)."""
    t = cfg.model.text
    tokens = cfg.stage.seq_len / layout.cp
    return [2.0 * tokens * _layer_elements(cfg, t.is_moe_layer(i)) / layout.tp for i in range(t.num_hidden_layers)]


def _activation_bytes(cfg: TrainConfig, layout: Layout, stage: int, layers: Sequence[int], recompute: bool,
                      per_layer_bytes: list[float] | None = None) -> float:
    """Activations of one pipeline stage (`_in_flight` sequences of its decoder `layers`). Full recompute
    keeps each layer's input plus one layer's working set. `per_layer_bytes`: layer_activation_bytes, when
    the caller already has it (the stage balancing tries many splits)."""
    t = cfg.model.text
    tokens = cfg.stage.seq_len / layout.cp
    micro = cfg.stage.global_batch_size // layout.dp
    in_flight = _in_flight(layout, stage, micro)
    n_layers = len(layers)
    every_layer = per_layer_bytes if per_layer_bytes is not None else layer_activation_bytes(cfg, layout)
    per_layer = [every_layer[i] for i in layers]
    if recompute:
        kept = 2.0 * tokens * t.hidden_size / layout.tp * n_layers * in_flight + max(per_layer, default=0.0)
    else:
        kept = sum(per_layer) * in_flight
    if stage == 0:
        per_sequence, working = _vision_bytes(cfg, layout.tp, layout.cp, recompute)
        kept += per_sequence * in_flight + working
    return kept


def logits_bytes(cfg: TrainConfig, layout: Layout, stage: int) -> float:
    """bf16 logits + their fp32 softmax in the loss, for the micro-batch being processed (last stage)."""
    if stage != layout.pp - 1:
        return 0.0
    return 6.0 * cfg.stage.seq_len / layout.cp * cfg.model.text.vocab_size / layout.tp


def memory(cfg: TrainConfig, stats: ModelStats, layout: Layout) -> Memory:
    """Per-GPU memory of the worst pipeline stage under `layout`."""
    trainable = set(cfg.stage.trainable)
    placed = stage_layers(cfg.model.text.num_hidden_layers, layout.pp, layout.first, layout.last, layout.vpp)
    worst: Memory | None = None
    for stage in range(layout.pp):
        layers = [layer for chunk in placed[stage] for layer in chunk]
        params = _stage_params(stats, layout, stage, layers, trainable)
        weights, grads, optimizer = _state_bytes(params, layout)
        act = {rc: _activation_bytes(cfg, layout, stage, layers, rc) for rc in (False, True)}
        logits = logits_bytes(cfg, layout, stage)
        buffers = 0.0
        if layout.backend == "deepspeed" and layout.zero >= 3:
            largest = max(sum(layer.values()) for layer in stats.layers)
            buffers = 2 * 2.0 * largest  # the gathered layer and the prefetched next one, bf16
        mem = Memory(stage, weights, grads, optimizer, act[layout.recompute], act[False], act[True], logits,
                     buffers)
        if worst is None or mem.total > worst.total:
            worst = mem
    assert worst is not None
    return worst
