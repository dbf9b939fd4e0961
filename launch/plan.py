"""Plan a cluster run: per-GPU memory, step time and the smallest parallel layout that fits.

    python -m launch.plan model=qwen3vl_235b_a22b stage=s1 gpus=256 gpu=h100
    python -m launch.plan model=qwen3vl_235b_a22b stage=s1 gpus=256 gpu=h100 backend=megatron \
        parallel=qwen3vl_235b_h100 backend.activation_checkpointing=true      # check one layout
    (planner keys: gpus=N, gpu=h100|h200, mfu=0.40; every other argument is a Hydra override of configs/)

The model, stage, backend and parallel groups are composed by train/config/compose.py, as for training.
Validity is decided by the backends' own rules (train/preflight.py check_layout, which the trainer runs at
start-up and the backends run when they are built), so the planner and a run never disagree. `parallel=auto`
runs `choose_layout` at start-up for each stage of a training run.
With a `parallel...` or `backend...` override the given layout is checked (and refused with its reason);
in every case the planner proposes the smallest valid layout that fits: fewest model-parallel ranks
tp*pp*cp, then the shortest estimated step, then the least memory. Search: tp in {1,2,4,8} (one node), pp
and cp dividing the world, ep dividing num_experts, dp the rest, activation checkpointing off/on, and,
without a backend override, Megatron (distributed optimizer) and DeepSpeed ZeRO-1/2/3.

Memory per GPU (worst pipeline stage), P = parameters this GPU holds, T = its trainable part:
  placement  ViT, mergers and token embedding on the first stage; LM head and final norm on the last
             (a tied head is copied there when pp > 1); decoder layers as megatron-core places them
             (train/backends/megatron/layout.py: even, or parallel.first/last_stage_layers; the search
             picks first/last by bytes, launch/planner/stages.py: the heaviest stage's total below as
             small as possible, e.g. qwen3vl_8b s1 at tp=2 pp=4: 3 / 11 / 11 / 11 layers).
             LLM, ViT and merger matrices / tp (train/backends/megatron/vision_tp.py); norms, row-parallel
             biases, routers, patch embedding, position table replicated; routed experts / (ep x expert_tp).
  weights    2 B x P (bf16); DeepSpeed ZeRO-3: / shard
  grads      Megatron 4 B x T (fp32 main_grad buffer); DeepSpeed 2 B x T (bf16), ZeRO-2/3: / shard
  optimizer  12 B x T (fp32 master copy + Adam m + v); distributed optimizer or ZeRO >= 1: / shard
  shard      dense parameters: dp*cp ranks; experts: the expert-data-parallel ranks,
             tp*cp*dp/(ep*expert_tp) (Megatron) or world/ep (DeepSpeed)
  activations  one micro-batch = one packed sequence; per rank s = seq_len/cp tokens, everything / tp
             (sequence parallel). Per decoder layer and token, bf16 (flash attention, no s^2 scores):
               dense: 4h + 3q + 3kv + 4f          MoE: 4h + 3q + 3kv + k(2h + 4f_e) + 2E
             (h hidden, q = heads*head_dim, kv = kv_heads*head_dim, f FFN, f_e expert FFN, k top-k, E experts)
             1F1B keeps min(pp - stage, micro-batches) micro-batches in flight.
             Full recompute keeps h per token and layer plus one layer's working set.
             Vision (first stage; / cp: the CP ranks share a sequence's images and frame groups), per patch
             of the vision share (encoder vision_fraction x seq_len tokens, 4 patches each), bf16:
               no recompute: depth x (8 H_v + 2 I_v)   recompute: depth x H_v + (8 H_v + 2 I_v);
               mergers: 4 H_v x (1 + DeepStack levels)
  logits     last stage: 6 B x s x vocab / tp (bf16 logits + fp32 softmax of the loss)
  buffers    ZeRO-3: 2 x 2 B x the largest decoder layer (gathered + prefetched)
  A layout fits when the total is at most 90% of the GPU's memory (the rest: CUDA context, NCCL,
  fragmentation).

Step time: model FLOPs = (2 + 2 [input grads, if anything before the part trains] + 2 [weight grads, if
the part trains]) x (active params x tokens + attention), per part (ViT, mergers, LLM):
  LLM       active = attention + dense MLPs + routers + (k/E) x experts + LM head; tokens = seq x batch
  attention causal, one document per sequence (upper bound): 2 x 2 s^2 x q per layer, halved by the mask
  ViT       2 x ViT params x patches + 4 x window x H_v x depth x patches (full attention inside one
            temporal patch, window = VideoConfig.max_pixels / patch^2 patches); mergers per merged token
  time      (model FLOPs + recomputed forward FLOPs) / (GPUs x peak bf16 x MFU) x (1 + (pp-1)/micro-batches)
  with MFU an assumption (default 40%, printed with every estimate); communication is not modelled.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator, Sequence

from launch.planner.stages import balanced_stage_split
from launch.planner.estimate import (DEFAULT_MFU, GIB, GPUS, GPUS_PER_NODE, USABLE_FRACTION, GPU, Layout,
                                     Memory, check_layout, memory)
from launch.planner.flops import StepCost, step_cost
from launch.planner.model_stats import ModelStats, model_stats
from train.backends.megatron.layout import suggest_stage_split
from train.config.compose import load_config
from train.config.model import ConfigError
from train.config.schema import TrainConfig

PLANNER_KEYS = ("gpus", "gpu", "mfu")


@dataclass
class Plan:
    layout: Layout
    fits: bool
    reason: str  # why it does not fit or is invalid; "" when it fits
    memory: Memory | None = None
    cost: StepCost | None = None


@dataclass
class PlanArgs:
    gpus: int
    gpu: GPU
    mfu: float
    overrides: list[str]


def parse_args(argv: Sequence[str]) -> PlanArgs:
    """Split planner keys (gpus, gpu, mfu) from the Hydra overrides; ConfigError naming a bad one."""
    values: dict[str, str] = {}
    overrides = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in PLANNER_KEYS:
            values[key] = value
        else:
            overrides.append(arg)
    if "gpus" not in values:
        raise ConfigError("gpus=N is required (the number of GPUs of the run)")
    try:
        gpus, mfu = int(values["gpus"]), float(values.get("mfu", DEFAULT_MFU))
    except ValueError as err:
        raise ConfigError(f"gpus / mfu must be numbers: {err}") from None
    gpu = values.get("gpu", "h100").lower()
    if gpu not in GPUS:
        raise ConfigError(f"gpu={gpu} is not one of {sorted(GPUS)}")
    if gpus < 1 or not 0 < mfu <= 1:
        raise ConfigError(f"gpus={gpus} must be >= 1 and mfu={mfu} in (0, 1]")
    return PlanArgs(gpus, GPUS[gpu], mfu, overrides)


def usable_bytes(gpu: GPU) -> float:
    return USABLE_FRACTION * gpu.memory_bytes


def evaluate(cfg: TrainConfig, stats: ModelStats, layout: Layout, gpu: GPU, mfu: float) -> Plan:
    """Check, size and time one layout."""
    try:
        check_layout(layout, cfg, layout.world)
    except ConfigError as err:
        return Plan(layout, False, str(err))
    mem = memory(cfg, stats, layout)
    cost = step_cost(cfg, stats, layout, gpu, mfu)
    if mem.total > usable_bytes(gpu):
        return Plan(layout, False, f"memory: {mem.total / GIB:.1f} GiB per GPU (pipeline stage {mem.stage}) "
                                   f"exceeds {usable_bytes(gpu) / GIB:.1f} GiB usable on {gpu.name}", mem, cost)
    return Plan(layout, True, "", mem, cost)


def configured_layout(cfg: TrainConfig, world: int) -> Layout:
    """The layout the composed config asks for (dp = the rest of the world, rounded down)."""
    par, backend = cfg.parallel, cfg.backend
    zero = backend.zero_stage if backend.name == "deepspeed" else int(backend.distributed_optimizer)
    dp = max(1, world // (par.tp * par.pp * par.cp))
    return Layout(backend.name, par.tp, par.pp, par.cp, par.ep, dp, zero, backend.activation_checkpointing,
                  par.expert_tp, par.first_stage_layers, par.last_stage_layers, par.vpp)


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def candidates(cfg: TrainConfig, world: int, backends: Sequence[tuple[str, int]]) -> Iterator[Layout]:
    text = cfg.model.text
    eps = _divisors(text.num_experts, text.num_experts) if text.is_moe else [1]
    for name, zero in backends:
        model_parallel = name == "megatron"
        for tp in [t for t in (1, 2, 4, 8) if t <= GPUS_PER_NODE and world % t == 0] if model_parallel else [1]:
            for pp in _divisors(world // tp, text.num_hidden_layers) if model_parallel else [1]:
                for cp in _divisors(world // (tp * pp), 64):
                    dp = world // (tp * pp * cp)
                    split = suggest_stage_split(text.num_hidden_layers, pp) or [0]
                    first, last = (None, None) if len(set(split)) == 1 else (split[0], split[-1])
                    for ep in eps:
                        for recompute in (False, True):
                            yield Layout(name, tp, pp, cp, ep, dp, zero, recompute, 1, first, last)


def search_backends(cfg: TrainConfig, overrides: Sequence[str]) -> list[tuple[str, int]]:
    """The configured backend when the user chose one, else Megatron (distributed optimizer) and DeepSpeed
    ZeRO-1/2/3."""
    if any(o.split("=", 1)[0].lstrip("+~").startswith("backend") for o in overrides):
        layout = configured_layout(cfg, 1)
        return [(layout.backend, layout.zero)]
    return [("megatron", 1), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]


def propose(cfg: TrainConfig, stats: ModelStats, args: PlanArgs, backends: Sequence[tuple[str, int]]) -> Plan | None:
    """The smallest fitting layout: fewest model-parallel ranks, then fastest, then least memory."""
    best: tuple | None = None
    for layout in candidates(cfg, args.gpus, backends):
        plan = evaluate(cfg, stats, balanced_stage_split(cfg, stats, layout), args.gpu, args.mfu)
        if not plan.fits:
            continue
        assert plan.cost is not None and plan.memory is not None
        key = (layout.tp * layout.pp * layout.cp, round(plan.cost.seconds, 6), plan.memory.total)
        if best is None or key < best[0]:
            best = (key, plan)
    return None if best is None else best[1]


def auto_backends(cfg: TrainConfig) -> list[tuple[str, int]]:
    """What `parallel=auto` searches: the configured backend (a deliberate choice), with the distributed
    optimizer on Megatron and ZeRO-1/2/3 on DeepSpeed."""
    if cfg.backend.name == "megatron":
        return [("megatron", 1)]
    return [("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]


def choose_layout(cfg: TrainConfig, gpus: int, gpu: GPU, mfu: float = DEFAULT_MFU) -> tuple[TrainConfig, Plan]:
    """`parallel=auto`: `cfg` with the planner's layout for `gpus` x `gpu` (ConfigError when none fits)."""
    best = propose(cfg, model_stats(cfg.model), PlanArgs(gpus, gpu, mfu, []), auto_backends(cfg))
    if best is None:
        raise ConfigError(f"parallel=auto: no {cfg.backend.name} layout of stage {cfg.stage.name} "
                          f"(seq_len {cfg.stage.seq_len}) fits on {gpus} x {gpu.name}; `python -m launch.plan "
                          f"gpus={gpus} ...` shows why")
    return best.layout.apply(cfg), best


def auto_gpu(cfg: TrainConfig, local: GPU | None) -> GPU:
    """The GPU `parallel=auto` plans for: parallel.auto_gpu when set, else the local CUDA device."""
    name = cfg.parallel.auto_gpu.lower()
    if name:
        if name not in GPUS:
            raise ConfigError(f"parallel.auto_gpu={name!r} is not one of {sorted(GPUS)}")
        return GPUS[name]
    if local is None:
        raise ConfigError("parallel=auto needs a CUDA device to plan for, or parallel.auto_gpu=h100|h200")
    return local


def format_plan(plan: Plan, gpu: GPU, mfu: float) -> str:
    head = f"{plan.layout.describe()}: " + ("fits" if plan.fits else f"refused ({plan.reason})")
    if plan.memory is None or plan.cost is None:
        return head
    m, c = plan.memory, plan.cost
    gib = lambda x: f"{x / GIB:.1f}"  # noqa: E731
    lines = [head,
             f"  per GPU (worst pipeline stage {m.stage}), GiB: weights {gib(m.weights)}  grads {gib(m.grads)}  "
             f"optimizer {gib(m.optimizer)}  activations {gib(m.activations)} (recompute off "
             f"{gib(m.activations_no_recompute)} / on {gib(m.activations_recompute)})  logits {gib(m.logits)}"
             + (f"  zero3 buffers {gib(m.buffers)}" if m.buffers else "")
             + f"  total {gib(m.total)} of {gib(usable_bytes(gpu))} usable",
             f"  step: {c.model_flops:.3g} model FLOPs + {c.recompute_flops:.3g} recompute, {c.tokens:,} tokens, "
             f"pipeline bubble {c.bubble:.1%} -> {c.seconds:.2f} s/step at an assumed MFU of {mfu:.0%} "
             f"({c.tokens / c.seconds / plan.layout.world:,.0f} tokens/s/GPU)"]
    return "\n".join(lines)


def describe_run(cfg: TrainConfig, stats: ModelStats, args: PlanArgs) -> str:
    return (f"model {cfg.model.name}: {stats.total / 1e9:.2f}B parameters ({stats.expert_total / 1e9:.2f}B in "
            f"experts), {stats.active_llm_params() / 1e9:.2f}B active LLM parameters per token\n"
            f"stage {cfg.stage.name}: seq_len {cfg.stage.seq_len:,}, global batch {cfg.stage.global_batch_size}, "
            f"trains {'+'.join(cfg.stage.trainable)}\n"
            f"{args.gpus} x {args.gpu.name} ({args.gpu.memory_bytes / GIB:.1f} GiB, {USABLE_FRACTION:.0%} usable, "
            f"{args.gpu.peak_bf16_flops / 1e12:.0f} TFLOPS bf16 peak); MFU assumption {args.mfu:.0%}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        return 0
    try:
        args = parse_args(argv)
        cfg = load_config(args.overrides)
    except ConfigError as err:
        print(f"longvl plan: config error: {err}", file=sys.stderr)
        return 2
    stats = model_stats(cfg.model)
    print(describe_run(cfg, stats, args))
    status = 0
    if any(o.split("=", 1)[0].lstrip("+~").startswith(("parallel", "backend")) for o in args.overrides):
        asked = evaluate(cfg, stats, configured_layout(cfg, args.gpus), args.gpu, args.mfu)
        if configured_layout(cfg, args.gpus).world != args.gpus:
            asked = Plan(asked.layout, False, f"world size {args.gpus} is not divisible by tp*pp*cp")
        print("requested " + format_plan(asked, args.gpu, args.mfu))
        status = 0 if asked.fits else 1
    best = propose(cfg, stats, args, search_backends(cfg, args.overrides))
    if best is None:
        print(f"proposed: nothing fits on {args.gpus} x {args.gpu.name}")
        return 1
    print("proposed " + format_plan(best, args.gpu, args.mfu))
    return status


if __name__ == "__main__":
    sys.exit(main())
