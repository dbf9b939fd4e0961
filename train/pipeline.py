"""Run the stages of a pipeline one after another, then export the final model to HF format.

    preflight (every stage, before anything expensive) -> for each stage: train_stage (stage k+1 starts
    from stage k's final/ weights with a fresh optimizer, its own data mix and LR schedule) -> summary
    table -> <run_dir>/hf (transformers directory of the last stage's weights)

Re-running the same command continues where it stopped: finished stages are skipped (their summary.json),
an interrupted stage resumes from its latest checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch.distributed as dist

from launch.env import set_cpu_threads
from launch.signals import PreemptionHandler, request_requeue
from train.backends.base import Backend
from train.checkpoint import StageDir, barrier, latest_kept, rank
from train.config.model import ConfigError
from train.config.schema import TrainConfig
from train.models.weight_source import WeightSource
from train.trainer import (
    Preempted, StageResult, StageRuntime, TrainingStopped, build_stage_loader, train_stage,
)

HF_EXPORT_DIR = "hf"
EXIT_CONFIG = 2  # bad input, found before training
EXIT_STOPPED = 3
LAYOUT_FILE = "layout.yaml"  # per stage: the layout it runs (the planner's choice with parallel=auto)  # training stopped early (divergence, data ran out, disk full); checkpoints kept


def default_runtime() -> StageRuntime:
    return StageRuntime(build_backend=build_stage_backend, build_loader=build_stage_loader)


def build_stage_backend(cfg: TrainConfig, weights: WeightSource | None = None) -> Backend:
    """The configured backend filled from `weights` (the trainer passes stage.init_from's, or zeros for a
    stage it resumes; None: the random initialisation), the stage's frozen groups frozen by name before its
    optimizer exists."""
    from train.backends import build_backend

    return build_backend(cfg, weights)


def run_pipeline(configs: Sequence[TrainConfig], runtime: StageRuntime | None = None) -> int:
    """Train `configs` in order; returns the process exit code (0 done, 2 bad input, 3 stopped early)."""
    from launch.env import detect_env, init_distributed

    env = detect_env()
    from train.preflight import PreflightError

    try:  # before any process group: a layout no backend can run costs nothing but one line
        configs = start_up_layouts(configs, env)
    except (ConfigError, PreflightError) as err:
        if env.rank == 0:
            print(f"longvl: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    if env.rank == 0:
        ensure_synth_corpus(configs)
    started_group = not dist.is_initialized()
    if started_group:
        init_distributed(env)
    with _launcher_variables(env):
        code = _run_initialised(list(configs), runtime, env.world_size)
    return _finish(code, started_group, env.world_size)


def start_up_layouts(configs: Sequence[TrainConfig], env: Any) -> list[TrainConfig]:
    """Each stage's layout: the planner's choice for `parallel=auto` stages (for this job's world size and
    GPU; printed), then the layout checks preflight runs (the backends' own rules, package versions, the
    memory estimate on the local GPU). ConfigError or PreflightError with one line."""
    from train.preflight import check_layouts, local_gpu

    gpu = local_gpu(env.local_rank)
    chosen = []
    for cfg in configs:
        if cfg.parallel.auto:
            from launch.plan import auto_gpu, choose_layout

            target = auto_gpu(cfg, gpu)
            cfg, plan = choose_layout(cfg, env.world_size, target)
            if env.rank == 0:
                print(f"longvl: stage {cfg.stage.name}: parallel=auto chose {plan.layout.describe()} for "
                      f"{env.world_size} x {target.name} ({plan.memory.total / 2 ** 30:.1f} GiB per GPU)", flush=True)
        chosen.append(cfg)
    check_layouts(chosen, env.world_size, gpu)
    return chosen


def record_layout(cfg: TrainConfig) -> Path:
    """<run_dir>/<stage>/layout.yaml: the backend and parallel keys this start of the stage runs with."""
    from omegaconf import OmegaConf

    path = StageDir(cfg.run_dir, cfg.stage.name).root / LAYOUT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"backend": dataclasses.asdict(cfg.backend), "parallel": dataclasses.asdict(cfg.parallel)}
    path.write_text(OmegaConf.to_yaml(record))
    return path


def _run_initialised(configs: list[TrainConfig], runtime: StageRuntime | None, world_size: int) -> int:
    from train.preflight import PreflightError, preflight

    barrier()  # rank 0 may still be writing the demo corpus
    try:
        preflight(configs, world_size)
    except PreflightError as err:
        _say(f"longvl: {err}", error=True)
        return EXIT_CONFIG
    if rank() == 0:
        for cfg in configs:
            record_layout(cfg)
    # One signal handler for all stages and the export: a signal during a stage's last step stops the
    # pipeline before the next stage; one during the last stage's last step or the export changes nothing.
    preemption = PreemptionHandler().install()
    try:
        return _run_stages(configs, dataclasses.replace(runtime or default_runtime(), preemption=preemption))
    finally:
        preemption.uninstall()


def _run_stages(configs: list[TrainConfig], runtime: StageRuntime) -> int:
    from data.errors import DataError
    from train.models.native_io import CheckpointError

    results: list[StageResult] = []
    try:
        for k, cfg in enumerate(configs):
            if k > 0:  # the handoff: layout-independent full weights of the previous stage
                previous = StageDir(configs[k - 1].run_dir, configs[k - 1].stage.name)
                # A signal during the previous stage's last step stops here, before the next stage.
                if runtime.preemption is not None and runtime.preemption.should_stop(0):
                    raise Preempted(f"stopped by signal after stage {configs[k - 1].stage.name} finished; run "
                                    f"the same command again to continue with {cfg.stage.name}")
                cfg.stage.init_from = str(previous.final)
            set_cpu_threads(cfg.cpu_threads)
            results.append(train_stage(cfg, runtime))
    except Preempted as err:  # exit 0; the requeue file asks the SLURM script to requeue, the rerun resumes
        _say(f"longvl: {err}", error=True)
        if rank() == 0:
            request_requeue()
        return 0
    except (TrainingStopped, CheckpointError) as err:
        _say(f"longvl: {err}", error=True)
        _say(summary_table(results))
        return EXIT_STOPPED
    except DataError as err:  # the data cannot be used as configured (a saved state from another mix, ...)
        _say(f"longvl: {configs[len(results)].stage.name}: {err}", error=True)
        return EXIT_CONFIG
    except OSError as err:  # a full or unwritable disk (checkpoint, final/): one line, earlier saves stay
        _say(f"longvl: {_os_error_line(err, configs[len(results)])}", error=True)
        return EXIT_STOPPED
    _say(summary_table(results))
    last = configs[-1]
    if last.pipeline.only and last.pipeline.only != last.pipeline.stages[-1].stage:
        # One job of a chain (slurm/submit_pipeline.sh): the HF export belongs to the pipeline's last stage.
        _say(f"stage {last.stage.name} done; its weights: {StageDir(last.run_dir, last.stage.name).final}")
        return 0
    if not last.model.text.mrope:
        _say(f"no HF export (model.text.mrope=false has no transformers equivalent); native weights: "
             f"{StageDir(last.run_dir, last.stage.name).final}")
        return 0
    export = export_hf(last)
    _say(f"final model (HF format): {export}")
    return 0


def _os_error_line(err: OSError, cfg: TrainConfig) -> str:
    """`s1: <file>: No space left on device; latest checkpoint kept: <dir>`."""
    where = str(err.filename) if err.filename else "I/O error"
    kept = latest_kept(StageDir(cfg.run_dir, cfg.stage.name).checkpoints)
    return f"{cfg.stage.name}: {where}: {err.strerror or err}; {kept}"


def export_hf(cfg: TrainConfig) -> Path:
    """<run_dir>/hf from the last stage's final/ native dir, in `pipeline.hf_dtype` (bf16 by default): rank 0
    converts tensor by tensor (atomic directory); the other ranks keep pace in a barrier per tensor."""
    from train.export import in_lockstep, parse_dtype, stored_name, write_model_dir
    from train.models.checkpoint_sources import open_model_dir
    from train.models.native_io import expected_native_shapes

    destination = Path(cfg.run_dir) / HF_EXPORT_DIR
    dtype = parse_dtype(cfg.pipeline.hf_dtype, "pipeline.hf_dtype")
    source = open_model_dir(StageDir(cfg.run_dir, cfg.stage.name).final)[1] if rank() == 0 else None
    names = [n for n in expected_native_shapes(cfg.model) if stored_name(cfg.model, "hf", n) is not None]
    tensors = in_lockstep(names, source.read if source is not None else None)
    write_model_dir(destination, cfg.model, tensors, fmt="hf", dtype=dtype, writer=source is not None, force=True)
    barrier()
    return destination


def summary_table(results: Sequence[StageResult]) -> str:
    header = ("stage", "steps", "tokens", "time", "train loss first->last", "eval loss start->end", "skipped")
    rows = [header]
    for r in results:
        rows.append((r.name, str(r.steps), _human(r.tokens), f"{r.seconds:.0f}s",
                     f"{_num(r.first_loss)} -> {_num(r.last_loss)}", f"{_num(r.eval_start)} -> {_num(r.eval_end)}",
                     str(r.skipped)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ensure_synth_corpus(configs: Sequence[TrainConfig]) -> None:
    """A pipeline with `pipeline.synth_corpus` (demo, needle) writes that data.synth corpus when <data_root>
    has none: `make train` / `make needle` work on a fresh checkout. Other pipelines never generate data: a
    missing shard is a preflight error."""
    cfg = configs[0]
    root = Path(cfg.data_root)
    preset = cfg.pipeline.synth_corpus
    if not preset or (root / "manifest.json").is_file():
        return
    from data.synth import make_corpus

    _say(f"longvl: writing the {preset} corpus to {root} (python -m data.synth --preset {preset})")
    make_corpus(root, preset=preset)


@contextlib.contextmanager
def _launcher_variables(env: Any) -> Iterator[None]:
    """RANK / LOCAL_RANK / WORLD_SIZE for libraries that read them themselves (DeepSpeed asserts LOCAL_RANK)
    when started as a plain `python -m train` or by srun; removed afterwards, so a later single-process
    launch from the same process is not mistaken for a half-configured torchrun."""
    added = []
    for name, value in (("RANK", env.rank), ("LOCAL_RANK", env.device_local_rank), ("WORLD_SIZE", env.world_size)):
        if name not in os.environ:
            os.environ[name] = str(value)
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _finish(code: int, started_group: bool, world_size: int) -> int:
    if started_group and world_size > 1:
        from launch.env import shutdown_distributed

        shutdown_distributed(code)  # barrier, destroy, flush, os._exit: the only clean multi-rank exit
    if started_group and dist.is_initialized():
        dist.destroy_process_group()
    return code


def _say(message: str, error: bool = False) -> None:
    if rank() == 0:
        print(message, file=sys.stderr if error else sys.stdout, flush=True)


def _num(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _human(count: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)
