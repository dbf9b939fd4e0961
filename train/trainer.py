"""One stage: build the loader and the backend, resume or initialise, run the steps, save, hand over.

The loop owns only what is common to every backend: which batches a step gets, when to save, when to stop,
what to log. The math of a step (forward, loss, backward, optimizer, LR) is the backend's `train_step`.

Resume rule: the latest complete checkpoint in `<run_dir>/<stage>/checkpoints` wins (model, optimizer,
scheduler, RNG, loader state), so the continued run equals an uninterrupted one; `stage.init_from` (weights
only) is used only when that directory has no checkpoint.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from data.batch import PackedBatch, concat_batches
from data.errors import bad_fractions, over_limit
from train.backends.base import Backend, StepMetrics
from train.checkpoint import (
    StageDir, barrier, load_checkpoint, read_model_dir, resume_checkpoint, save_final,
)
from launch.signals import PreemptionHandler
from train.checkpoint_save import Checkpointer
from train.config.schema import TrainConfig
from train.device import comm_tensor, compute_device
from train.fast_path import describe as describe_run_path
from train.models.weight_source import WeightSource, ZeroInit
from train.metrics import MetricsLogger, StepTimer, global_data_counts, make_record, read_history
from train.parallel.vision_balance import balance_micro_batches

# Stop the stage after this many consecutive skipped (non-finite) steps unless the config says otherwise:
# one bad batch is noise, a streak means the run has diverged and more steps only burn compute.
EVAL_BATCHES_PER_RANK = 2
EVAL_SEED_OFFSET = 10_007  # held-out batches come from the same mix under another seed


class TrainingStopped(RuntimeError):
    """The stage stopped early (divergence); the last good checkpoint is kept as `latest`."""


class Preempted(RuntimeError):
    """A rank got SIGUSR1/SIGTERM (SLURM time limit, preemption); a checkpoint was saved, rerun resumes."""


@dataclass
class StageResult:
    name: str
    steps: int
    tokens: int = 0  # packed capacity trained on (steps x global batch x seq_len)
    seconds: float = 0.0  # wall time of the steps, summed over resumed runs
    skipped: int = 0
    first_loss: float = math.nan  # mean training loss of the first logged steps of the stage
    last_loss: float = math.nan  # mean training loss of the last logged steps
    eval_start: float = math.nan  # held-out loss before the stage's first step (when it did not resume)
    eval_end: float = math.nan
    resumed_from: int = 0  # the checkpoint step this run continued from (0: a fresh start)
    init_from: str = ""  # the weights a fresh start began with ("" for a random initialisation)
    final_dir: str = ""

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "StageResult":
        return cls(**json.loads(path.read_text()))


@dataclass
class StageRuntime:
    """What the loop needs besides the config; tests replace the factories with stand-ins."""

    # (cfg, initial weights or None for the random initialisation) -> backend
    build_backend: Callable[[TrainConfig, WeightSource | None], Backend]
    # (cfg, ParallelInfo, seed) -> resumable loader: an iterable of PackedBatch with state_dict(),
    # load_state_dict() and stats() (counters per data set, see data.loader.StreamingLoader.stats)
    build_loader: Callable[[TrainConfig, Any, int], Any]
    extra_meta: dict[str, Any] = field(default_factory=dict)
    # The pipeline's signal handler, shared by its stages so a signal during one stage's last step stops the
    # pipeline before the next stage (None: the stage installs its own).
    preemption: PreemptionHandler | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_stage(cfg: TrainConfig, runtime: StageRuntime) -> StageResult:
    """Run (or finish) one stage and return its result; a finished stage is not run again."""
    stage_dir = StageDir(cfg.run_dir, cfg.stage.name)
    if stage_dir.is_done():
        return StageResult.load(stage_dir.summary)
    seed_everything(cfg.seed)  # the same initial weights on every rank and in every run
    latest = resume_checkpoint(stage_dir)
    # A fresh stage with init_from is built from those weights directly (never randomly initialised first);
    # a resumed one from zeros (the verified checkpoint then overwrites every value); a fresh one without
    # init_from from the random initialisation (the backend's default).
    initial = ZeroInit(cfg.model) if latest is not None else (
        read_model_dir(cfg.stage.init_from, cfg.model) if cfg.stage.init_from else None)
    backend = runtime.build_backend(cfg, initial)
    info = backend.info
    loader = runtime.build_loader(cfg, info, cfg.data.seed)
    resumed_meta = _resume(cfg, stage_dir, latest, backend, loader)
    start_step = int(resumed_meta["step"]) if resumed_meta else 0
    # The held-out batches are drawn after resuming, from their own loader: they never shift training data.
    eval_batches = _eval_batches(cfg, runtime, info)
    logger = MetricsLogger(cfg.logging, stage_dir.root, cfg.stage.name, Path(cfg.run_dir).name,
                           cfg.stage.num_steps(), start_step, info.is_logging_rank,
                           OmegaConf.to_container(OmegaConf.structured(cfg)))
    logger.note(describe_run_path(cfg, compute_device()))
    result = StageResult(name=cfg.stage.name, steps=cfg.stage.num_steps(), resumed_from=start_step,
                         init_from=cfg.stage.init_from or "")
    if resumed_meta:
        result.eval_start, result.seconds = resumed_meta["eval_start"], resumed_meta["elapsed_s"]
    else:
        result.eval_start = evaluate(backend, eval_batches)
    own_handler = runtime.preemption is None
    preemption = PreemptionHandler().install() if own_handler else runtime.preemption
    checkpointer = Checkpointer(stage_dir, cfg.model, cfg.stage.keep_last, cfg.stage.async_save)
    try:
        _run_steps(cfg, backend, loader, stage_dir, logger, start_step, result, runtime.extra_meta, preemption,
                   checkpointer)
        checkpointer.wait()
    except TrainingStopped:
        checkpointer.wait()  # every rank agreed to stop here: the good checkpoint in flight is completed
        raise
    finally:
        if own_handler:
            preemption.uninstall()
        logger.close()
    result.eval_end = evaluate(backend, eval_batches)
    _fill_from_history(result, stage_dir)
    result.tokens = result.steps * cfg.stage.global_batch_size * cfg.stage.seq_len  # packed capacity
    result.final_dir = str(save_final(stage_dir, backend, cfg.model))
    if info.is_logging_rank:
        result.save(stage_dir.summary)  # last: its presence marks the stage done
    barrier()
    return result


def _resume(cfg: TrainConfig, stage_dir: StageDir, latest: Path | None, backend: Backend,
            loader: Any) -> dict[str, Any] | None:
    """Restore the latest checkpoint (if any) and return its meta, else None."""
    if latest is None:
        return None
    restored = load_checkpoint(stage_dir, latest, backend, cfg.model)
    loader.load_state_dict(restored["loader"])
    return restored["meta"]


def _run_steps(cfg: TrainConfig, backend: Backend, loader: Any, stage_dir: StageDir, logger: MetricsLogger,
               start_step: int, result: StageResult, extra_meta: dict[str, Any],
               preemption: PreemptionHandler, checkpointer: Checkpointer) -> None:
    total = cfg.stage.num_steps()
    per_rank = cfg.stage.global_batch_size // backend.info.dp_size
    max_skips = cfg.stage.max_consecutive_skips
    names = [d.name for d in cfg.data.datasets]
    batches = iter(loader)
    timer, in_a_row = StepTimer(), 0
    for step in range(start_step + 1, total + 1):
        micro = _take(batches, per_rank, cfg.stage.name)
        if cfg.parallel.balance_vision:
            micro = balance_micro_batches(micro, cfg.model.vision.hidden_size, backend.info.dp_group)
        metrics = backend.train_step(join_micro_batches(micro, cfg.stage.micro_batch_size))
        checkpointer.poll()  # publishes the save in flight once every rank has written it
        bad_data = _check_bad_data(cfg, loader, backend.info.dp_rank, stage_dir)
        seconds = timer.lap()
        result.seconds += seconds
        skipped = metrics.skipped or not math.isfinite(metrics.loss)
        in_a_row = in_a_row + 1 if skipped else 0
        result.skipped += int(skipped)
        if step % cfg.stage.log_every == 0 or step == total or skipped:
            logger.log(make_record(step, _as_skipped(metrics, skipped), seconds, packing_efficiency(micro), names,
                                   bad_data))
        if skipped:  # never saved: a checkpoint is only written after a good step
            logger.note(f"{cfg.stage.name} step {step}: non-finite loss/gradients, step skipped "
                        f"({in_a_row} in a row, stop at {max_skips})")
            if in_a_row >= max_skips:
                raise TrainingStopped(f"{cfg.stage.name}: {in_a_row} consecutive non-finite steps (up to step "
                                      f"{step}); stopped, last good checkpoint: {stage_dir.latest()}")
        stop = preemption.should_stop(step)  # collective: every rank stops after the same step
        if not skipped and (step % cfg.stage.save_every == 0 or step == total or stop):
            meta = {"stage": cfg.stage.name, "total_steps": total, "eval_start": result.eval_start,
                    "elapsed_s": result.seconds, **extra_meta}
            checkpointer.save(step, backend, loader.state_dict(), meta)
        if stop and step < total:  # after the last step the stage just finishes: nothing left to resume
            checkpointer.wait()
            raise Preempted(f"{cfg.stage.name}: stopped by signal after step {step}; latest checkpoint "
                            f"{stage_dir.latest()}; run the same command again to resume")


def _check_bad_data(cfg: TrainConfig, loader: Any, dp_rank: int, stage_dir: StageDir) -> dict[str, float]:
    """The bad fraction per data set over every rank and worker (collective); stops the stage in one line
    naming the data sets past data.max_bad_fraction (the checkpoint of this step is not written)."""
    counts = global_data_counts(loader.stats(), [d.name for d in cfg.data.datasets], dp_rank)
    exceeded = over_limit(counts, cfg.data.max_bad_fraction, cfg.data.bad_sample_grace)
    if exceeded:
        raise TrainingStopped(f"{cfg.stage.name}: bad data (bad samples + bad shards of everything read, all "
                              f"ranks and workers) passed data.max_bad_fraction={cfg.data.max_bad_fraction} in "
                              f"{', '.join(exceeded)}; last good checkpoint: {stage_dir.latest()}")
    return bad_fractions(counts)


def _take(batches: Iterator[PackedBatch], count: int, stage: str) -> list[PackedBatch]:
    micro = []
    for _ in range(count):
        try:
            micro.append(next(batches))
        except StopIteration:
            raise TrainingStopped(f"{stage}: the data loader ran out (data.max_epochs is set and the token "
                                  f"budget needs more data)") from None
    return micro


def join_micro_batches(micro: list[PackedBatch], size: int) -> list[PackedBatch]:
    """Consecutive groups of `size` packed sequences, each joined into one (stage.micro_batch_size)."""
    if len(micro) % size:
        raise ValueError(f"stage.micro_batch_size={size} does not divide the {len(micro)} packed sequences "
                         f"of this rank's step")
    return [concat_batches(micro[i:i + size]) for i in range(0, len(micro), size)]


def _as_skipped(metrics: StepMetrics, skipped: bool) -> StepMetrics:
    metrics.skipped = skipped
    return metrics


def packing_efficiency(micro: list[PackedBatch]) -> float:
    """Share of the global batch's packed capacity filled with real tokens. Collective: summed over every
    rank; the model-parallel peers of a data-parallel rank hold the same batches, which scales both sums
    alike and leaves the ratio that of the data-parallel ranks."""
    filled = comm_tensor([float(sum(b.seq_len - b.num_pad for b in micro)), float(sum(b.seq_len for b in micro))],
                         dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(filled)
    return float(filled[0] / filled[1].clamp(min=1))


def _eval_batches(cfg: TrainConfig, runtime: StageRuntime, info: Any) -> list[PackedBatch]:
    loader = runtime.build_loader(cfg, info, cfg.data.seed + EVAL_SEED_OFFSET)
    iterator = iter(loader)
    return [next(iterator) for _ in range(EVAL_BATCHES_PER_RANK)]


def evaluate(backend: Backend, batches: list[PackedBatch]) -> float:
    """Mean held-out loss (each eval_step is already reduced over the data-parallel ranks)."""
    losses = [backend.eval_step(batch).loss for batch in batches]
    return float(sum(losses) / len(losses)) if losses else math.nan


def _fill_from_history(result: StageResult, stage_dir: StageDir) -> None:
    """Loss/token figures over the whole stage, including the steps before a resume (from metrics.jsonl).
    Only the logging rank has the file; other ranks return their result unused."""
    rows = [r for r in read_history(stage_dir.root / "metrics.jsonl") if not r["skipped"]]
    if not rows:
        return
    window = max(1, min(5, len(rows) // 4))
    result.first_loss = sum(r["loss"] for r in rows[:window]) / window
    result.last_loss = sum(r["loss"] for r in rows[-window:]) / window
def build_stage_loader(cfg: TrainConfig, info: Any, seed: int) -> Any:
    """The stage's resumable loader for this rank's data-parallel slot (tokenizer, encoder, packer)."""
    from dataclasses import replace

    from data.encode import DocumentEncoder
    from data.loader import StreamingLoader
    from data.packing import VisionTokens
    from data.tokenizer import Tokenizer
    from train.parallel.batch_broadcast import GroupLoader
    from train.preflight import tokenizer_path

    group = getattr(info, "model_parallel_group", None)
    loader = None
    if group is None or info.is_loading_rank:  # peers of a model-parallel group receive the loading rank's batches
        tok = Tokenizer.load(tokenizer_path(cfg))
        encoder = DocumentEncoder(tok, cfg.data.encode, cfg.stage.seq_len)
        tokens = VisionTokens.from_tokenizer(tok, cfg.model.vision.spatial_merge_size)
        loader = StreamingLoader(replace(cfg.data, seed=seed), encoder.encode, cfg.stage.seq_len,
                                 dp_rank=info.dp_rank, dp_size=info.dp_size, tokens=tokens,
                                 document_multiple=info.document_multiple)
    return loader if group is None else GroupLoader(loader, group, info.model_parallel_ranks)
