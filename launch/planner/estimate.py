"""Per-GPU memory and step time of one parallel layout (the formulas are documented in launch/plan.py)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from launch.planner.model_stats import ModelStats
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

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def describe(self) -> str:
        opt = f"zero{self.zero}" if self.backend == "deepspeed" else ("distopt" if self.zero else "no-distopt")
        return (f"{self.backend} {opt} tp={self.tp} pp={self.pp} cp={self.cp} ep={self.ep} dp={self.dp} "
                f"recompute={'on' if self.recompute else 'off'}")


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
    """ConfigError (one line) naming what makes `layout` impossible for this model and stage."""
    text, par = cfg.model.text, layout
    if world % (par.tp * par.pp * par.cp):
        raise ConfigError(f"world size {world} is not divisible by tp*pp*cp={par.tp}*{par.pp}*{par.cp}")
    if par.tp > GPUS_PER_NODE or par.tp not in (1, 2, 4, 8):
        raise ConfigError(f"parallel.tp={par.tp} must be 1, 2, 4 or 8 (within one {GPUS_PER_NODE}-GPU node)")
    for key, heads in (("model.text.num_attention_heads", text.num_attention_heads),
                       ("model.text.num_key_value_heads", text.num_key_value_heads),
                       ("model.vision.num_heads", cfg.model.vision.num_heads)):
        if heads % par.tp:
            raise ConfigError(f"parallel.tp={par.tp} does not divide {key}={heads}")
    if text.is_moe and text.num_experts % par.ep:
        raise ConfigError(f"parallel.ep={par.ep} does not divide model.text.num_experts={text.num_experts}")
    if par.ep > 1 and not text.is_moe:
        raise ConfigError(f"parallel.ep={par.ep} but model {cfg.model.name} is dense")
    if par.pp > text.num_hidden_layers:
        raise ConfigError(f"parallel.pp={par.pp} exceeds model.text.num_hidden_layers={text.num_hidden_layers}")
    if cfg.stage.seq_len % (2 * par.cp):
        raise ConfigError(f"stage.seq_len={cfg.stage.seq_len} is not divisible by 2 x parallel.cp={2 * par.cp}")
    if cfg.stage.global_batch_size % par.dp:
        raise ConfigError(f"stage.global_batch_size={cfg.stage.global_batch_size} is not divisible by "
                          f"dp={par.dp}")
    if layout.backend == "deepspeed":
        from train.backends.deepspeed.config import check_layout as deepspeed_check

        trial = replace(cfg, parallel=replace(cfg.parallel, tp=par.tp, pp=par.pp, cp=par.cp, ep=par.ep),
                        backend=replace(cfg.backend, zero_stage=par.zero))
        deepspeed_check(trial, world)
    elif (par.tp * par.cp * par.dp) % par.ep:
        # Megatron-core with expert-tensor-parallel 1: expert ranks span the TP x CP x DP ranks of a stage.
        raise ConfigError(f"parallel.ep={par.ep} does not divide tp*cp*dp={par.tp * par.cp * par.dp}")


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Decoder layers per pipeline stage: an even split, the remainder to the middle stages first (the
    first stage also runs the ViT and the embedding, the last the LM head)."""
    base, extra = divmod(num_layers, pp)
    order = list(range(1, pp - 1)) + [pp - 1, 0] if pp > 2 else list(range(pp))[::-1]
    counts = [base] * pp
    for s in order[:extra]:
        counts[s] += 1
    return counts


def _stage_params(stats: ModelStats, layout: Layout, stage: int, first_layer: int, n_layers: int,
                  trainable: set[str]) -> dict[tuple[str, bool], float]:
    """Per-GPU parameter counts of one pipeline stage, keyed by (kind "dense"/"expert", trainable)."""
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
    for layer in stats.layers[first_layer:first_layer + n_layers]:
        out[("dense", llm)] += layer.get("tp", 0) / layout.tp + layer.get("rep", 0)
        out[("expert", llm)] += layer.get("expert", 0) / layout.ep
    return out


def _state_bytes(params: dict[tuple[str, bool], float], layout: Layout) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes from per-GPU parameter counts.

    bf16 weights 2 B; Adam in mixed precision 12 B (fp32 master + m + v) per trainable parameter; gradients
    fp32 4 B (Megatron main_grad buffer, never sharded) or bf16 2 B (DeepSpeed). Shards: dense over the
    DP x CP ranks, experts over the expert-data-parallel ranks (tp*cp*dp/ep on Megatron, world/ep on
    DeepSpeed, which has no TP).
    """
    shard = {"dense": layout.dp * layout.cp,
             "expert": max(1, layout.tp * layout.cp * layout.dp // layout.ep)}
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


def _activation_bytes(cfg: TrainConfig, layout: Layout, stage: int, first_layer: int,
                      n_layers: int, recompute: bool) -> float:
    """Activations of one pipeline stage. 1F1B keeps min(pp - stage, micro-batches) sequences in flight;
    one micro-batch is one packed sequence of seq_len tokens, seq_len / cp per rank; sequence parallel
    spreads everything over TP. Full recompute keeps each layer's input plus one layer's working set."""
    t = cfg.model.text
    tokens = cfg.stage.seq_len / layout.cp
    micro = cfg.stage.global_batch_size // layout.dp
    in_flight = min(layout.pp - stage, micro)
    layers = range(first_layer, first_layer + n_layers)
    per_layer = [2.0 * tokens * _layer_elements(cfg, t.is_moe_layer(i)) / layout.tp for i in layers]
    if recompute:
        kept = 2.0 * tokens * t.hidden_size / layout.tp * n_layers * in_flight + max(per_layer, default=0.0)
    else:
        kept = sum(per_layer) * in_flight
    if stage == 0:
        per_sequence, working = _vision_bytes(cfg, layout.tp, layout.cp, recompute)
        kept += per_sequence * in_flight + working
    return kept


def memory(cfg: TrainConfig, stats: ModelStats, layout: Layout) -> Memory:
    """Per-GPU memory of the worst pipeline stage under `layout`."""
    trainable = set(cfg.stage.trainable)
    counts = stage_layers(cfg.model.text.num_hidden_layers, layout.pp)
    worst: Memory | None = None
    for stage in range(layout.pp):
        first = sum(counts[:stage])
        params = _stage_params(stats, layout, stage, first, counts[stage], trainable)
        weights, grads, optimizer = _state_bytes(params, layout)
        act = {rc: _activation_bytes(cfg, layout, stage, first, counts[stage], rc) for rc in (False, True)}
        # bf16 logits + their fp32 softmax in the loss, for the micro-batch being processed
        logits = 0.0
        if stage == layout.pp - 1:
            logits = 6.0 * cfg.stage.seq_len / layout.cp * cfg.model.text.vocab_size / layout.tp
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
