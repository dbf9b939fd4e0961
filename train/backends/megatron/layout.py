"""The megatron backend's layout rules: one implementation, called by preflight (train/preflight.py, before
any process group exists), by the planner (launch/plan.py, for every candidate) and by the backend itself.
Imports nothing heavy (no torch, no megatron), so preflight and the planner stay fast.

Groups as megatron-core builds them (initialize_model_parallel, order tp-cp-ep-dp-pp):
  world = tp x cp x dp x pp; a pipeline stage has tp x cp x dp ranks.
  Experts fold over a stage's ranks differently: expert-TP x ep x expert-DP = tp x cp x dp. With expert-TP 1
  (megatron-core's and the published 235B recipe's choice) the published TP2 PP8 EP32 on 256 GPUs gives
  expert-DP (2 x 1 x 16) / 32 = 1.
Pipeline stages: even by default; `first_stage_layers` / `last_stage_layers` give the first / last stage
their own count (megatron-core's num_layers_in_first/last_pipeline_stage), the middle stages split the rest
evenly. When the layers do not split evenly the error names a split that works (`suggest_stage_split`).
Virtual pipeline stages (`vpp`, megatron-core's interleaved 1F1B): every pipeline rank holds vpp model chunks
of count/vpp layers each; chunk v of stage p starts at global layer v*(layers/vpp) + (layers before p)/vpp
(megatron-core's get_transformer_layer_offset), so the model runs chunk 0 of every stage, then chunk 1, ...
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from train.config.model import ConfigError, ModelConfig
from train.backends.megatron.vision_tp import check_vision_tp

PRECISIONS = ("fp32", "bf16")
AUX_LOSS_FORMS = ("pooled", "per_layer")


class ParallelLayoutError(ConfigError):
    """The layout cannot run (sizes vs world size, vs the model); the message is one line."""


@dataclass(frozen=True)
class ParallelSizes:
    """Parallel layout; dp=None means "the rest of the world" until resolve_sizes fills it in.
    etp: expert tensor-parallel size; first/last: decoder layers of the first/last pipeline stage (None: an
    even split)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    dp: Optional[int] = None
    etp: int = 1
    first: Optional[int] = None
    last: Optional[int] = None
    vpp: Optional[int] = None  # virtual pipeline stages per pipeline rank (None: plain 1F1B)

    def describe(self) -> str:
        text = f"tp={self.tp} pp={self.pp} cp={self.cp} ep={self.ep} dp={self.dp}"
        if self.etp != 1:
            text += f" expert_tp={self.etp}"
        if self.first is not None or self.last is not None:
            text += f" first_stage_layers={self.first} last_stage_layers={self.last}"
        if self.vpp is not None:
            text += f" vpp={self.vpp}"
        return text

    @property
    def expert_dp(self) -> int:
        """Ranks holding the same experts (megatron's expert-data-parallel size)."""
        return self.tp * self.cp * (self.dp or 1) // (self.etp * self.ep)


def resolve_sizes(config: Any, world_size: int) -> ParallelSizes:
    """Validate the sizes of `config` (a ParallelConfig or ParallelSizes-like object) against `world_size`;
    derive dp when it is None or 0."""
    tp, pp, cp, ep = (int(_get(config, key, 1)) for key in ("tp", "pp", "cp", "ep"))
    if isinstance(config, ParallelSizes):
        etp, first, last, vpp = config.etp, config.first, config.last, config.vpp
    else:  # a ParallelConfig (train/config/schema.py)
        etp = int(_get(config, "expert_tp", 1))
        first, last = getattr(config, "first_stage_layers", None), getattr(config, "last_stage_layers", None)
        vpp = getattr(config, "vpp", None)
    dp = getattr(config, "dp", None)
    given = f"tp={tp} pp={pp} cp={cp} ep={ep} expert_tp={etp} dp={dp if dp else 'auto'}"
    if min(tp, pp, cp, ep, etp) < 1 or (dp is not None and dp < 0):
        raise ParallelLayoutError(f"parallel sizes must be positive: {given}")
    model_parallel = tp * pp * cp
    if not dp:
        if world_size % model_parallel:
            raise ParallelLayoutError(f"world size {world_size} is not divisible by parallel.tp*pp*cp="
                                      f"{tp}*{pp}*{cp}={model_parallel} ({given})")
        dp = world_size // model_parallel
    if model_parallel * dp != world_size:
        raise ParallelLayoutError(f"tp*pp*cp*dp={model_parallel * dp} != world size {world_size} ({given})")
    if (tp * cp * dp) % (etp * ep):
        raise ParallelLayoutError(
            f"parallel.expert_tp*ep={etp}*{ep} must divide the tp*cp*dp={tp}*{cp}*{dp} ranks of a pipeline stage "
            f"(megatron-core folds experts over them; world size {world_size})")
    return ParallelSizes(tp=tp, pp=pp, cp=cp, ep=ep, dp=dp, etp=etp, first=first, last=last, vpp=vpp)


def _get(config: Any, key: str, default: Any) -> Any:
    value = getattr(config, key, None)
    return default if value is None else value


def stage_layer_counts(num_layers: int, pp: int, first: Optional[int] = None,
                       last: Optional[int] = None) -> list[int]:
    """Decoder layers per pipeline stage, as megatron-core places them: `first` / `last` on the first / last
    stage when given, the rest split evenly over the other stages. ParallelLayoutError when that is
    impossible, naming a split that works."""
    if pp == 1:
        if first not in (None, num_layers) or last not in (None, num_layers):
            raise ParallelLayoutError("parallel.first_stage_layers / last_stage_layers need pp > 1")
        return [num_layers]
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    bad = min(x for x in (first, last, 1) if x is not None) < 1 or middle_layers < 0 \
        or bool(middle_layers) != bool(middle_stages) or (middle_stages and middle_layers % middle_stages)
    if bad:
        hint = suggest_stage_split(num_layers, pp)
        fix = (f"set parallel.first_stage_layers={hint[0]} parallel.last_stage_layers={hint[-1]}" if hint
               else f"choose a pp of at most {num_layers}")
        raise ParallelLayoutError(
            f"{num_layers} decoder layers do not split over pp={pp} with first_stage_layers={first} "
            f"last_stage_layers={last}: {fix}")
    per_middle = middle_layers // middle_stages if middle_stages else 0
    counts = [per_middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def stage_layers(num_layers: int, pp: int, first: Optional[int] = None, last: Optional[int] = None,
                 vpp: Optional[int] = None) -> list[list[list[int]]]:
    """Global decoder layer indices of every pipeline stage's model chunks ([stage][chunk] -> layers), as
    megatron-core places them (one chunk per stage without virtual stages). ParallelLayoutError when a
    stage's layers do not split into vpp equal chunks, naming a split that does."""
    chunks = vpp or 1
    if chunks < 1 or (vpp is not None and pp == 1):
        raise ParallelLayoutError(f"parallel.vpp={vpp} needs pp > 1 and vpp >= 1")
    try:
        counts = stage_layer_counts(num_layers, pp, first, last)
    except ParallelLayoutError as err:
        if vpp is None:
            raise
        hint = _virtual_split_hint(num_layers, pp, vpp)
        raise ParallelLayoutError(f"{num_layers} decoder layers do not split over pp={pp} with first_stage_layers="
                                  f"{first} last_stage_layers={last}: {hint}") from err
    if vpp is not None and pp == 2 and first is not None and last is not None:
        # megatron-core 0.16 divides by the number of middle stages when it places virtual chunks
        raise ParallelLayoutError(f"parallel.vpp with pp=2 takes first_stage_layers or last_stage_layers, not "
                                  f"both (set only first_stage_layers={first}: the last stage gets the rest)")
    if any(count % chunks for count in counts):
        raise ParallelLayoutError(f"parallel.vpp={vpp} must divide every pipeline stage's decoder layers "
                                  f"{counts} (pp={pp}, first_stage_layers={first}, last_stage_layers={last}): "
                                  f"{_virtual_split_hint(num_layers, pp, vpp)}")
    per_round = num_layers // chunks  # layers of one chunk on every stage together
    out = []
    for stage, count in enumerate(counts):
        start, size = sum(counts[:stage]) // chunks, count // chunks
        out.append([list(range(v * per_round + start, v * per_round + start + size)) for v in range(chunks)])
    return out


def _virtual_split_hint(num_layers: int, pp: int, vpp: int) -> str:
    """What to set so that every stage's layers split into vpp chunks: a stage split of num_layers / vpp
    "units" of vpp layers each (megatron-core 0.16 takes only first_stage_layers with pp=2)."""
    units = suggest_stage_split(num_layers // vpp, pp) if num_layers % vpp == 0 else None
    if units is None:
        return f"no split gives every stage a multiple of vpp={vpp} layers: change parallel.vpp or pp"
    counts = [unit * vpp for unit in units]
    if len(set(counts)) == 1:
        return "leave parallel.first_stage_layers / last_stage_layers unset (an even split)"
    if pp == 2:
        return f"set parallel.first_stage_layers={counts[0]} and last_stage_layers=null"
    return f"set parallel.first_stage_layers={counts[0]} parallel.last_stage_layers={counts[-1]}"


def suggest_stage_split(num_layers: int, pp: int) -> Optional[list[int]]:
    """An even split if there is one, else middle stages of m layers and first/last stages with at most m
    (the first stage also runs the ViT and the embedding, the last the LM head): 94 over 8 -> 11, 12 x 6, 11.
    None when pp exceeds the layers."""
    if pp > num_layers:
        return None
    if num_layers % pp == 0:
        return [num_layers // pp] * pp
    if pp == 2:
        return [num_layers // 2, num_layers - num_layers // 2]
    for per_middle in range(math.ceil(num_layers / pp), num_layers):
        ends = num_layers - (pp - 2) * per_middle
        if 2 <= ends <= 2 * per_middle:
            first = ends // 2
            return [first] + [per_middle] * (pp - 2) + [ends - first]
        if ends < 2:
            break
    return None


def check_layout(model_cfg: ModelConfig, sizes: ParallelSizes, precision: str = "fp32", seq_len: int = 0,
                 sequence_parallel: bool = False, aux_loss_form: str = "pooled") -> None:
    """One-line errors for layouts this model cannot run, before anything is built. `seq_len` (packed
    sequence length, 0: unknown) must split into the 2*cp load-balanced chunks, and each CP share into tp
    rows blocks under sequence parallelism."""
    text = model_cfg.text
    deepstack = len(model_cfg.vision.deepstack_visual_indexes)
    problems = []
    if precision not in PRECISIONS:
        problems.append(f"backend.precision={precision!r} is not one of {PRECISIONS}")
    if text.num_attention_heads % sizes.tp or text.num_key_value_heads % sizes.tp:
        problems.append(f"parallel.tp={sizes.tp} must divide model.text.num_attention_heads="
                        f"{text.num_attention_heads} and num_key_value_heads={text.num_key_value_heads}")
    if text.vocab_size % sizes.tp:
        problems.append(f"parallel.tp={sizes.tp} must divide model.text.vocab_size={text.vocab_size}")
    problems += check_vision_tp(model_cfg.vision, sizes.tp)
    try:
        first_chunk = stage_layers(text.num_hidden_layers, sizes.pp, sizes.first, sizes.last, sizes.vpp)[0][0]
        if len(first_chunk) < deepstack:
            problems.append(f"the first pipeline stage's first model chunk holds {len(first_chunk)} decoder "
                            f"layers, fewer than the {deepstack} DeepStack injections it must hold")
    except ParallelLayoutError as err:
        problems.append(str(err))
    if text.is_moe and text.num_experts % sizes.ep:
        problems.append(f"parallel.ep={sizes.ep} must divide model.text.num_experts={text.num_experts}")
    if text.is_moe and text.moe_intermediate_size % sizes.etp:
        problems.append(f"parallel.expert_tp={sizes.etp} must divide model.text.moe_intermediate_size="
                        f"{text.moe_intermediate_size}")
    if aux_loss_form not in AUX_LOSS_FORMS:
        problems.append(f"backend.moe_aux_loss={aux_loss_form!r} is not one of {AUX_LOSS_FORMS} or 'auto'")
    elif text.is_moe and sizes.pp > 1 and text.router_aux_loss_coef and aux_loss_form == "pooled":
        problems.append("backend.moe_aux_loss=pooled needs every MoE layer on one stage: pp=1, "
                        "backend.moe_aux_loss=per_layer, or model.text.router_aux_loss_coef=0")
    if (sizes.ep > 1 or sizes.etp > 1) and not text.is_moe:
        problems.append(f"parallel.ep={sizes.ep} / expert_tp={sizes.etp} need an MoE model")
    pieces = 2 * sizes.cp if sizes.cp > 1 else 1
    if seq_len and seq_len % pieces:
        problems.append(f"stage.seq_len={seq_len} is not divisible by 2*cp={pieces}")
    if seq_len and sequence_parallel and sizes.tp > 1 and (seq_len // sizes.cp) % sizes.tp:
        problems.append(f"sequence parallel splits each CP share of {seq_len // sizes.cp} tokens over "
                        f"tp={sizes.tp} ranks: not divisible")
    if problems:
        raise ParallelLayoutError(f"megatron layout {sizes.describe()}: " + "; ".join(problems))


def check_config(cfg: Any, world_size: int) -> ParallelSizes:
    """Every megatron rule for a composed TrainConfig on `world_size` ranks; the resolved sizes."""
    sizes = resolve_sizes(cfg.parallel, world_size)
    check_layout(cfg.model, sizes, cfg.backend.precision, cfg.stage.seq_len, cfg.parallel.sequence_parallel,
                 cfg.moe_aux_loss_form())
    text = cfg.model.text
    if sizes.cp > 1 and cfg.parallel.cp_comm_type == "a2a" and (
            (text.num_attention_heads // sizes.tp) % sizes.cp or (text.num_key_value_heads // sizes.tp) % sizes.cp):
        raise ParallelLayoutError(f"megatron layout {sizes.describe()}: parallel.cp_comm_type=a2a scatters each "
                                  f"TP rank's {text.num_attention_heads // sizes.tp} query / "
                                  f"{text.num_key_value_heads // sizes.tp} key-value heads over cp={sizes.cp}: "
                                  f"not divisible; use cp_comm_type=p2p")
    micro = cfg.stage.global_batch_size // (sizes.dp or 1) // cfg.stage.micro_batch_size
    if sizes.vpp is not None and micro % sizes.pp:
        # the interleaved schedule runs micro-batches in groups of pp per model chunk
        raise ParallelLayoutError(f"megatron layout {sizes.describe()}: parallel.vpp needs the micro-batches per "
                                  f"step (stage.global_batch_size={cfg.stage.global_batch_size} / dp={sizes.dp} / "
                                  f"stage.micro_batch_size={cfg.stage.micro_batch_size} = {micro}) to be a "
                                  f"multiple of pp={sizes.pp}")
    return sizes
