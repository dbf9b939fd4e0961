"""Per-step metrics of a stage: progress bar, wandb (offline by default), metrics.jsonl and a loss-curve PNG.

Only the logging rank writes anything. The JSONL history in the stage dir is the source of truth for the
loss curve and the stage summary; on resume it is cut back to the checkpoint's step so that steps replayed
after a crash are not counted twice.
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from data.loader import STAT_NAMES
from train.backends.base import StepMetrics
from train.config.schema import LoggingConfig
from train.device import comm_tensor, comm_zeros

HISTORY_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


@dataclass
class StepRecord:
    """One logged step: the backend's metrics plus what the trainer measures around them."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
    packing_efficiency: float
    aux_loss: float = 0.0
    memory_gb: float = 0.0
    skipped: bool = False
    loss_per_source: dict[str, float] = field(default_factory=dict)
    # Per data set: (bad samples + bad shards) / read, over every rank and worker so far this stage.
    bad_data_fraction: dict[str, float] = field(default_factory=dict)

    def wandb_row(self) -> dict[str, float]:
        row = {"train/loss": self.loss, "train/lr": self.lr, "train/grad_norm": self.grad_norm,
               "train/tokens_per_s": self.tokens_per_s, "train/packing_efficiency": self.packing_efficiency,
               "train/moe_aux_loss": self.aux_loss, "train/memory_gb": self.memory_gb,
               "train/skipped": float(self.skipped)}
        row.update({f"train/loss/{name}": value for name, value in self.loss_per_source.items()})
        row.update({f"data/bad_fraction/{name}": value for name, value in self.bad_data_fraction.items()})
        return row


def make_record(step: int, metrics: StepMetrics, seconds: float, packing_efficiency: float,
                source_names: Sequence[str], bad_data_fraction: dict[str, float] | None = None) -> StepRecord:
    per_source = {(source_names[i] if 0 <= i < len(source_names) else f"source{i}"): float(v)
                  for i, v in metrics.loss_per_source.items()}
    return StepRecord(step=step, loss=float(metrics.loss), lr=float(metrics.lr), grad_norm=float(metrics.grad_norm),
                      tokens=int(metrics.tokens), tokens_per_s=metrics.tokens / max(seconds, 1e-9),
                      packing_efficiency=packing_efficiency, aux_loss=float(metrics.aux_loss),
                      memory_gb=peak_memory_gb(), skipped=metrics.skipped, loss_per_source=per_source,
                      bad_data_fraction=dict(bad_data_fraction or {}))


def global_data_counts(local: dict[str, dict[str, int]], names: Sequence[str],
                       dp_rank: int) -> dict[str, dict[str, int]]:
    """The loader counters (STAT_NAMES) of data sets `names` summed over every data-parallel rank (each rank's
    `local` already sums its workers; what it lacks counts 0).

    Collective when a process group is up: every rank calls it at the same step, whatever its loader reports.
    The tensor/context/pipeline peers of a DP rank consume the same batches, so each DP rank is counted once:
    the elementwise max over the ranks reporting that dp_rank (equal counts when every peer loads, the
    loading peer's when only one does and the others report zeros)."""
    values = [dp_rank] + [int(local.get(n, {}).get(s, 0)) for n in names for s in STAT_NAMES]
    rows = [torch.tensor(values, dtype=torch.int64)]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        row = comm_tensor(values, dtype=torch.int64)
        gathered = [comm_zeros(row.numel(), torch.int64) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, row)
        rows = [r.cpu() for r in gathered]
    per_dp: dict[int, torch.Tensor] = {}
    for r in rows:
        key = int(r[0])
        per_dp[key] = torch.maximum(per_dp[key], r[1:]) if key in per_dp else r[1:]
    total = torch.stack(list(per_dp.values())).sum(0).view(len(names), len(STAT_NAMES)).tolist()
    return {n: dict(zip(STAT_NAMES, counts)) for n, counts in zip(names, total)}


def peak_memory_gb() -> float:
    """Peak device memory on GPU; peak resident set size of the process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    # ru_maxrss is KiB on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def read_history(path: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


class MetricsLogger:
    """Rank-0 logging of one stage; on other ranks every method is a no-op."""

    def __init__(self, cfg: LoggingConfig, stage_root: Path, stage_name: str, run_name: str,
                 total_steps: int, start_step: int, enabled: bool, config_dict: dict[str, Any]) -> None:
        self.enabled = enabled
        self.stage_name = stage_name
        self.cfg = cfg
        self.history_path = stage_root / HISTORY_FILE
        self.curve_path = stage_root / LOSS_CURVE_FILE
        self._bar = None
        self._wandb_run = None
        if not enabled:
            return
        stage_root.mkdir(parents=True, exist_ok=True)
        # Cut the history back to the resumed step: steps after it are replayed and logged again.
        kept = read_history(self.history_path, up_to_step=start_step)
        self.history_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=stage_name, unit="step",
                             dynamic_ncols=True, file=sys.stderr)
        if cfg.wandb.mode != "disabled":
            self._wandb_run = _start_wandb(cfg, stage_root, stage_name, run_name, config_dict)

    def log(self, record: StepRecord) -> None:
        if not self.enabled:
            return
        with open(self.history_path, "a") as f:
            f.write(json.dumps(record.__dict__) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(record.wandb_row(), step=record.step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record.loss:.4f}", tok_s=f"{record.tokens_per_s:,.0f}", refresh=False)
            self._bar.update(record.step - self._bar.n)

    def note(self, message: str) -> None:
        """A line for the user that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb_run is not None:
            run_dir = Path(self._wandb_run.dir).parent  # .../wandb/offline-run-*/files -> the run dir
            self._wandb_run.finish()
            self._wandb_run = None
            if self.cfg.wandb.mode == "offline":
                self.note(f"{self.stage_name}: wandb offline run in {run_dir} (upload: wandb sync {run_dir})")
        if self.cfg.plot_loss:
            plot_loss_curve(read_history(self.history_path), self.curve_path, self.stage_name)


def _start_wandb(cfg: LoggingConfig, stage_root: Path, stage_name: str, run_name: str,
                 config_dict: dict[str, Any]) -> Any:
    import wandb

    # The id is fixed per run dir and stage, so a resumed stage continues the same wandb run when synced.
    run_id = "".join(c if c.isalnum() else "-" for c in f"{run_name}-{stage_name}")[-120:]
    # silent: wandb's own banners and run summary would bury the progress bar and the stage table.
    return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, group=cfg.wandb.group or run_name,
                      name=f"{run_name}/{stage_name}", id=run_id, resume="allow", mode=cfg.wandb.mode,
                      dir=str(stage_root), config=config_dict, reinit="finish_previous",
                      settings=wandb.Settings(silent=True, console="off"))


def plot_loss_curve(history: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Total loss (and per-source losses) against step; skipped steps are left out."""
    rows = [r for r in history if not r.get("skipped") and math.isfinite(r["loss"])]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="total", linewidth=2)
    sources = sorted({name for r in rows for name in r.get("loss_per_source", {})})
    for name in sources:
        points = [(r["step"], r["loss_per_source"][name]) for r in rows if name in r.get("loss_per_source", {})]
        ax.plot(*zip(*points), label=name, linewidth=1, alpha=0.7)
    ax.set(xlabel="step", ylabel="loss", title=f"{title}: training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


class StepTimer:
    """Wall time of one step (the trainer measures data loading and the step together)."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._start = now - self._start, now
        return elapsed
