"""run_pipeline with stand-in backend and loader (the real ones are covered in tests/e2e and tests/dist):
stage order, the handoff of final weights with a fresh backend per stage, skipping finished stages, the
HF export, the summary table, and one-line refusals before any stage starts."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Iterator

import pytest
import torch

from data.batch import PackedBatch
from data.errors import DataError
from train.backends.base import ParallelInfo, StepMetrics, gathered_state_dict
from train.config.compose import stage_configs
from train.config.schema import TrainConfig
from train.models.materialize import fill_native
from train.models.weight_source import WeightSource
from train.models.qwen3vl.model import Qwen3VLModel
from train.pipeline import EXIT_CONFIG, EXIT_STOPPED, run_pipeline, summary_table
from train.trainer import StageResult, StageRuntime


class StandInBackend:
    """The Backend protocol on a tiny Qwen3VLModel whose 'step' moves trainable tensors by a fixed amount."""

    def __init__(self, cfg: TrainConfig, log: list, skip_from: int = 0, skip_stage: str = "s0",
                 weights: WeightSource | None = None) -> None:
        torch.manual_seed(cfg.seed)
        self.model = Qwen3VLModel(cfg.model)
        self.cfg, self.log, self.steps = cfg, log, 0
        self.skip_from = skip_from if cfg.stage.name == skip_stage else 0  # steps from here on are non-finite
        self.info = ParallelInfo(rank=0, world_size=1, dp_rank=0, dp_size=1)
        self.loaded: dict[str, torch.Tensor] | None = None  # the weights it was built from, if not random
        self.built_from_weights = weights is not None
        if weights is not None:
            self.load_model_weights(weights)
        log.append(self)

    def train_step(self, micro: list[PackedBatch]) -> StepMetrics:
        self.steps += 1
        if self.skip_from and self.steps >= self.skip_from:
            return StepMetrics(loss=float("nan"), grad_norm=float("nan"), lr=0.1, tokens=0, skipped=True)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name.startswith("visual.merger.") or "merger" not in self.cfg.stage.trainable:
                    p.add_(0.01)
        return StepMetrics(loss=4.0 / self.steps, grad_norm=1.0, lr=0.1, tokens=sum(b.seq_len for b in micro),
                           loss_per_source={0: 4.0 / self.steps})

    def eval_step(self, batch: PackedBatch) -> StepMetrics:
        return StepMetrics(loss=float(self.model.visual.merger.norm.weight.detach().mean()), grad_norm=0.0, lr=0.1,
                           tokens=batch.seq_len)

    def save(self, directory: Path) -> None:
        torch.save({"model": self.model.state_dict(), "steps": self.steps}, directory / "standin.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "standin.pt")
        self.model.load_state_dict(state["model"])
        self.steps = state["steps"]

    def export_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.model.named_parameters()

    def load_model_weights(self, weights: WeightSource) -> None:
        fill_native(self.model, weights)
        self.loaded = {k: v.clone() for k, v in self.model.state_dict().items()}


class StandInLoader:
    def __init__(self, seq_len: int) -> None:
        self.seq_len, self.count = seq_len, 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]

    def stats(self) -> dict:
        return {}

    def __iter__(self) -> Iterator[PackedBatch]:
        while True:
            self.count += 1
            n, zeros = self.seq_len, torch.zeros(self.seq_len, dtype=torch.long)
            yield PackedBatch(input_ids=zeros, position_ids=torch.zeros(3, n, dtype=torch.long),
                              cu_seqlens=torch.tensor([0, n], dtype=torch.int32), labels=zeros,
                              loss_weights=torch.ones(n), source_ids=zeros, num_pad=n // 4)


def _runtime(log: list, skip_from: int = 0, skip_stage: str = "s0") -> StageRuntime:
    return StageRuntime(build_backend=lambda cfg, weights: StandInBackend(cfg, log, skip_from, skip_stage, weights),
                        build_loader=lambda cfg, info, seed: StandInLoader(cfg.stage.seq_len))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("data")
    for name in ("text", "caption", "ocr", "video", "needle"):
        (root / name).mkdir()
        (root / name / "shard-000000.tar").write_bytes(b"")
    words = "the red blue green square circle triangle left right big small".split()
    train_sentencepiece([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20, 300,
                        root / "tokenizer.model")
    return root


def _configs(data_root: Path, run_dir: Path, *extra: str) -> list[TrainConfig]:
    configs = stage_configs(["pipeline=qwen3vl", f"data_root={data_root}", f"run_dir={run_dir}", "logging=quiet",
                             *extra])
    for cfg in configs:
        cfg.stage.max_steps, cfg.stage.global_batch_size, cfg.stage.seq_len = 3, 2, 128
    return configs


def test_stages_run_in_order_and_hand_over_final_weights(data_root: Path, tmp_path: Path, capsys) -> None:
    log: list[StandInBackend] = []
    assert run_pipeline(_configs(data_root, tmp_path), _runtime(log)) == 0
    assert [b.cfg.stage.name for b in log] == ["s0", "s1", "s2", "s3"]  # a fresh backend (optimizer) per stage
    assert log[0].loaded is None
    assert [b.built_from_weights for b in log] == [False, True, True, True]  # no random init to discard
    for previous, current in zip(log, log[1:]):
        exported = gathered_state_dict(previous)
        assert current.loaded is not None and exported.keys() == current.loaded.keys()
        assert all(torch.equal(exported[k], current.loaded[k]) for k in exported)
        assert current.cfg.stage.init_from == str(tmp_path / previous.cfg.stage.name / "final")
    assert (tmp_path / "hf" / "config.json").is_file()
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out[out.index("stage  steps"):].splitlines()[2:6]] == ["s0", "s1", "s2", "s3"]
    assert f"final model (HF format): {tmp_path / 'hf'}" in out

    log.clear()  # the same command again: every stage is done, nothing is rebuilt or retrained
    assert run_pipeline(_configs(data_root, tmp_path), _runtime(log)) == 0
    assert log == []


def test_cpu_threads_is_set_before_each_stage_builds_its_model(data_root: Path, tmp_path: Path,
                                                                monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    before = torch.get_num_threads()
    threads: list[tuple[str, int, str]] = []

    def build(cfg: TrainConfig, weights: WeightSource | None) -> StandInBackend:
        threads.append((cfg.stage.name, torch.get_num_threads(), os.environ["OMP_NUM_THREADS"]))
        return StandInBackend(cfg, [], weights=weights)

    runtime = StageRuntime(build_backend=build, build_loader=lambda cfg, info, seed: StandInLoader(cfg.stage.seq_len))
    pinned = 2 if before == 1 else 1  # a count this process does not already run with
    try:
        configs = _configs(data_root, tmp_path, f"cpu_threads={pinned}")
        configs[2].cpu_threads = 0  # a stage that leaves the count as it finds it
        configs[3].cpu_threads = pinned + 1
        assert run_pipeline(configs, runtime) == 0
    finally:
        torch.set_num_threads(before)
    assert threads == [("s0", pinned, str(pinned)), ("s1", pinned, str(pinned)), ("s2", pinned, str(pinned)),
                       ("s3", pinned + 1, str(pinned + 1))]


def test_rerun_after_a_stop_skips_done_stages_and_resumes_from_the_checkpoint(data_root: Path,
                                                                              tmp_path: Path) -> None:
    def configs() -> list[TrainConfig]:
        out = _configs(data_root, tmp_path)
        for cfg in out:
            cfg.stage.max_steps, cfg.stage.save_every = 12, 2
        return out

    log: list[StandInBackend] = []
    assert run_pipeline(configs(), _runtime(log, skip_from=4, skip_stage="s1")) == EXIT_STOPPED
    assert [b.cfg.stage.name for b in log] == ["s0", "s1"]
    log.clear()
    assert run_pipeline(configs(), _runtime(log)) == 0
    assert [b.cfg.stage.name for b in log] == ["s1", "s2", "s3"]  # s0 is done and not rebuilt
    # s1's checkpoint wins over its init_from (s0's final weights): it is built from zeros (no random init
    # pass, no read of s0's weights), then loads the checkpoint
    assert log[0].loaded is not None and not any(v.any() for v in log[0].loaded.values())
    assert log[0].steps == 12 and log[1].loaded is not None
    assert StageResult.load(tmp_path / "s1" / "summary.json").resumed_from == 2


def test_nan_streak_stops_pipeline_with_exit_3(data_root: Path, tmp_path: Path, capsys) -> None:
    configs = _configs(data_root, tmp_path)
    for cfg in configs:
        cfg.stage.max_steps, cfg.stage.save_every = 12, 2
    log: list[StandInBackend] = []
    assert run_pipeline(configs, _runtime(log, skip_from=4)) == EXIT_STOPPED
    assert [b.cfg.stage.name for b in log] == ["s0"]
    err = capsys.readouterr().err
    assert "s0: 5 consecutive non-finite steps (up to step 8)" in err
    assert (tmp_path / "s0" / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert not (tmp_path / "s0" / "final").exists()


def test_bad_input_exits_2_before_any_stage(data_root: Path, tmp_path: Path, capsys) -> None:
    log: list[StandInBackend] = []
    configs = _configs(data_root, tmp_path / "run", "parallel=cp2")  # cp=2 on a world of 1
    assert run_pipeline(configs, _runtime(log)) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "world size 1 is not divisible" in err
    assert log == [] and not (tmp_path / "run" / "s0").exists()


def test_summary_table() -> None:
    rows = [StageResult(name="s0", steps=30, tokens=30720, seconds=57.2, first_loss=7.5, last_loss=7.4,
                        eval_start=7.6, eval_end=7.4),
            StageResult(name="s3", steps=11921, tokens=100_000_000_000, seconds=3600)]
    lines = summary_table(rows).splitlines()
    assert lines[0].split()[:4] == ["stage", "steps", "tokens", "time"]
    assert lines[2].split() == ["s0", "30", "30.7K", "57s", "7.500", "->", "7.400", "7.600", "->", "7.400", "0"]
    assert lines[3].split()[:4] == ["s3", "11921", "100.0B", "3600s"] and "- -> -" in lines[3]


class BadDataLoader(StandInLoader):
    """Counts like StreamingLoader.stats(): from batch `bad_from` on, every other sample of `bad_set` is bad."""

    def __init__(self, seq_len: int, names: list[str], bad_set: str, bad_from: int) -> None:
        super().__init__(seq_len)
        self.names, self.bad_set, self.bad_from = names, bad_set, bad_from

    def stats(self) -> dict:
        bad = max(0, self.count - self.bad_from) * 10
        return {n: {"samples": 100 * self.count, "bad_samples": bad if n == self.bad_set else 0, "bad_shards": 0}
                for n in self.names}


def test_bad_data_past_the_limit_stops_the_run_in_one_line_naming_the_data_set(data_root: Path, tmp_path: Path,
                                                                               capsys) -> None:
    configs = _configs(data_root, tmp_path)[:1]
    cfg = configs[0]
    cfg.stage.max_steps, cfg.stage.save_every, cfg.data.bad_sample_grace = 12, 2, 0
    names = [d.name for d in cfg.data.datasets]
    runtime = StageRuntime(build_backend=lambda c, weights: StandInBackend(c, [], weights=weights),
                           build_loader=lambda c, info, seed: BadDataLoader(c.stage.seq_len, names, names[-1], 6))
    assert run_pipeline(configs, runtime) == EXIT_STOPPED
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("longvl:")]
    assert len(err) == 1 and f"passed data.max_bad_fraction=0.05 in {names[-1]} " in err[0], err
    assert all(f"in {n} " not in err[0] for n in names[:-1])
    history = [json.loads(line) for line in (tmp_path / cfg.stage.name / "metrics.jsonl").read_text().splitlines()]
    assert history and history[0]["bad_data_fraction"] == dict.fromkeys(names, 0.0)
    assert 0 < history[-1]["bad_data_fraction"][names[-1]] <= 0.05  # the step that passed it is not logged

    class Refusing(StandInLoader):  # what StreamingLoader raises for a state saved with another data mix
        def load_state_dict(self, state: dict) -> None:
            raise DataError("data loader state does not fit this data mix; differs in seq_len: state 128, now 256")

    runtime.build_loader = lambda c, info, seed: Refusing(c.stage.seq_len)
    assert run_pipeline(_configs(data_root, tmp_path)[:1], runtime) == EXIT_CONFIG  # resumes its checkpoint
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"longvl: {cfg.stage.name}: data loader state does not fit")


class SignallingBackend(StandInBackend):
    """Sends its own process SIGUSR1 during step `at` of stage `stage`, as SLURM's warning would."""

    def __init__(self, cfg: TrainConfig, log: list, stage: str, at: int, weights: WeightSource | None) -> None:
        super().__init__(cfg, log, weights=weights)
        self.signal_at = at if cfg.stage.name == stage else 0

    def train_step(self, micro: list[PackedBatch]) -> StepMetrics:
        metrics = super().train_step(micro)
        if self.steps == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return metrics


@pytest.mark.parametrize("stage, at, requeue, done", [
    ("s1", 2, True, ["s0"]),  # steps left: checkpoint, stop, ask for the requeue
    ("s1", 3, True, ["s0", "s1"]),  # s1's last step: s1 finishes, the pipeline stops before s2
    ("s3", 3, False, ["s0", "s1", "s2", "s3"]),  # the run's last step: it just finishes (and exports)
])
def test_usr1_requeues_only_a_run_with_steps_left(data_root: Path, tmp_path: Path, monkeypatch, stage: str,
                                                  at: int, requeue: bool, done: list[str]) -> None:
    marker, run_dir = tmp_path / "requeue", tmp_path / "run"
    monkeypatch.setenv("LONGVL_REQUEUE_FILE", str(marker))
    log: list[StandInBackend] = []
    runtime = StageRuntime(build_backend=lambda cfg, weights: SignallingBackend(cfg, log, stage, at, weights),
                           build_loader=lambda cfg, info, seed: StandInLoader(cfg.stage.seq_len))
    assert run_pipeline(_configs(data_root, run_dir), runtime) == 0
    assert marker.exists() == requeue
    assert [s for s in ("s0", "s1", "s2", "s3") if (run_dir / s / "summary.json").is_file()] == done
    assert (run_dir / "hf").is_dir() == (not requeue)
