"""Checkpoint directories: atomic saves, `latest`, keep-last-k, RNG/loader state, model-shape refusal.

The backend here is a stand-in (a linear layer and its AdamW in one file): these tests are about the
directory protocol around `backend.save/load`, which is the same for every backend.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from train.checkpoint import (
    StageDir, check_fingerprint, load_checkpoint, model_fingerprint, resume_checkpoint, verify_share,
)
from train.backends.snapshot import PendingWrite, SnapshotBuffers
from train.checkpoint_files import WrittenFile, file_digest, save_hashed
import train.checkpoint_save as checkpoint_save
from train.checkpoint_save import Checkpointer, save_checkpoint
from train.config.model import ModelConfig, TextConfig
from train.models.native_io import CheckpointError


class FileBackend:
    """Stand-in for a Backend: the model + optimizer state as one file in the checkpoint dir."""

    def __init__(self, fail_on_save: bool = False) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 4)
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.fail_on_save = fail_on_save

    def step(self) -> None:
        self.model(torch.randn(2, 4)).square().sum().backward()
        self.optim.step()
        self.optim.zero_grad()

    def save(self, directory: Path) -> None:
        torch.save({"model": self.model.state_dict(), "optim": self.optim.state_dict()}, directory / "state.pt")
        if self.fail_on_save:
            raise RuntimeError("disk full")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "state.pt")
        self.model.load_state_dict(state["model"])
        self.optim.load_state_dict(state["optim"])


@pytest.fixture
def model_cfg() -> ModelConfig:
    return ModelConfig(text=TextConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=1))


def _save(stage: StageDir, step: int, backend, cfg: ModelConfig, keep_last: int = 2) -> Path:
    return save_checkpoint(stage, step, backend, {"batches": step}, cfg, {"stage": "s1"}, keep_last)


def test_save_writes_complete_dir_then_latest(tmp_path: Path, model_cfg: ModelConfig) -> None:
    stage = StageDir(tmp_path, "s1")
    assert stage.latest() is None
    ckpt = _save(stage, 100, FileBackend(), model_cfg)
    assert ckpt == tmp_path / "s1" / "checkpoints" / "step_000100"
    assert stage.latest() == ckpt
    assert (stage.checkpoints / "latest").read_text().strip() == "step_000100"
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "rank_00000.json", "state.pt"]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 100 and meta["world_size"] == 1 and meta["stage"] == "s1"
    assert meta["model"]["model.text.hidden_size"] == 256
    assert not [p for p in stage.checkpoints.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_keep_last_k(tmp_path: Path, model_cfg: ModelConfig) -> None:
    stage = StageDir(tmp_path, "s1")
    backend = FileBackend()
    for step in (10, 20, 30, 40):
        _save(stage, step, backend, model_cfg, keep_last=2)
    assert [p.name for p in stage.list_checkpoints()] == ["step_000030", "step_000040"]
    _save(stage, 50, backend, model_cfg, keep_last=1)
    assert [p.name for p in stage.list_checkpoints()] == ["step_000050"]


def test_failed_save_keeps_latest_and_previous_checkpoint(tmp_path: Path, model_cfg: ModelConfig) -> None:
    stage = StageDir(tmp_path, "s1")
    good = _save(stage, 10, FileBackend(), model_cfg)
    before = (good / "state.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*\.step_000020\.tmp: RuntimeError: disk full; "
                       r"latest checkpoint kept: .*step_000010"):
        _save(stage, 20, FileBackend(fail_on_save=True), model_cfg, keep_last=1)
    assert stage.latest() == good and (good / "state.pt").read_bytes() == before
    assert not stage.step_dir(20).exists()  # only the hidden temp dir holds the partial save
    # The next successful save cleans the leftover and moves on.
    _save(stage, 20, FileBackend(), model_cfg, keep_last=1)
    assert stage.latest() == stage.step_dir(20)
    assert not [p for p in stage.checkpoints.iterdir() if p.name.startswith(".step")]


def test_resave_of_same_step_replaces_it(tmp_path: Path, model_cfg: ModelConfig) -> None:
    stage = StageDir(tmp_path, "s1")
    backend = FileBackend()
    _save(stage, 10, backend, model_cfg)
    backend.step()
    _save(stage, 10, backend, model_cfg)
    saved = torch.load(stage.step_dir(10) / "state.pt")["model"]["weight"]
    assert torch.equal(saved, backend.model.weight.detach())


def test_load_restores_model_optimizer_rng_and_loader(tmp_path: Path, model_cfg: ModelConfig) -> None:
    stage = StageDir(tmp_path, "s1")
    backend = FileBackend()
    backend.step()
    weight_at_save = backend.model.weight.detach().clone()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt = _save(stage, 7, backend, model_cfg)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    backend.step()  # training goes on; the state and the RNGs move past the checkpoint

    fresh = FileBackend()
    restored = load_checkpoint(stage, ckpt, fresh, model_cfg)
    assert restored["loader"] == {"batches": 7} and restored["meta"]["step"] == 7
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    assert torch.equal(fresh.model.weight, weight_at_save)
    assert fresh.optim.state_dict()["state"][0]["step"] == 1  # optimizer state came back, not a fresh one


def test_checkpoint_of_another_model_shape_is_refused(tmp_path: Path, model_cfg: ModelConfig) -> None:
    stage = StageDir(tmp_path, "s1")
    ckpt = _save(stage, 5, FileBackend(), model_cfg)
    other = ModelConfig(text=TextConfig(hidden_size=512, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(stage, ckpt, FileBackend(), other)
    message = str(err.value)
    assert "\n" not in message and "model.text.hidden_size=256 there, 512 in this run" in message
    # The name is a label, not a shape: renaming the model is fine.
    renamed = ModelConfig(name="renamed", text=model_cfg.text)
    check_fingerprint(model_fingerprint(model_cfg), renamed, "x")


def test_latest_naming_a_missing_dir_is_an_error(tmp_path: Path, model_cfg: ModelConfig) -> None:
    stage = StageDir(tmp_path, "s1")
    ckpt = _save(stage, 5, FileBackend(), model_cfg)
    (ckpt / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        stage.latest()


# ---- verified loads ------------------------------------------------------------------------------------

def _two_checkpoints(tmp_path: Path, cfg: ModelConfig) -> tuple[StageDir, Path, Path]:
    stage = StageDir(tmp_path, "s1")
    backend = FileBackend()
    older = _save(stage, 10, backend, cfg)
    backend.step()
    return stage, older, _save(stage, 20, backend, cfg)


def test_meta_records_size_and_checksum_of_every_file(tmp_path: Path, model_cfg: ModelConfig) -> None:
    stage, _, ckpt = _two_checkpoints(tmp_path, model_cfg)
    files = json.loads((ckpt / "meta.json").read_text())["files"]
    assert len(files) == 1 and sorted(files[0]) == ["rank_00000.json", "state.pt"]
    size, digest = files[0]["state.pt"]
    assert size == (ckpt / "state.pt").stat().st_size and digest.startswith("xxh3_64:")
    assert resume_checkpoint(stage) == ckpt


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, phrase", [(_truncate, "truncated"), (_flip_byte, "checksum mismatch"),
                                            (Path.unlink, "missing")])
def test_damaged_latest_falls_back_to_previous(tmp_path: Path, model_cfg: ModelConfig, capsys, damage,
                                               phrase: str) -> None:
    stage, older, latest = _two_checkpoints(tmp_path, model_cfg)
    damage(latest / "state.pt")
    assert resume_checkpoint(stage) == older
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and str(latest / "state.pt") in warning[0] and phrase in warning[0]
    # The fallback restores the older state; the damaged one is left for the user to inspect.
    restored = load_checkpoint(stage, older, FileBackend(), model_cfg)
    assert restored["meta"]["step"] == 10 and (stage.checkpoints / "latest").read_text().strip() == "step_000020"


def test_nothing_verifies_is_one_line_error(tmp_path: Path, model_cfg: ModelConfig) -> None:
    stage, older, latest = _two_checkpoints(tmp_path, model_cfg)
    _truncate(latest / "rank_00000.json")
    _flip_byte(older / "state.pt")
    with pytest.raises(CheckpointError, match=r"no checkpoint of .* verifies; the newest: .*rank_00000.json.*"
                                              r"truncated") as err:
        resume_checkpoint(stage)
    assert "\n" not in str(err.value)


def test_verify_command(tmp_path: Path, model_cfg: ModelConfig) -> None:
    _, older, latest = _two_checkpoints(tmp_path, model_cfg)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}

    def verify(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "train.checkpoint", "verify", str(path)], env=env,
                              capture_output=True, text=True, timeout=120)

    ok = verify(tmp_path)
    assert ok.returncode == 0 and ok.stdout.split() == ["ok", str(older), "ok", str(latest)]
    _flip_byte(latest / "state.pt")
    bad = verify(tmp_path)
    assert bad.returncode == 1
    assert bad.stdout.splitlines()[1] == f"BAD  {latest}: {latest / 'state.pt'}: checksum mismatch (content " \
                                         f"changed since it was written)"


# ---- asynchronous saves --------------------------------------------------------------------------------

class AsyncFileBackend(FileBackend):
    """FileBackend with the snapshot/write split of a real backend (reused host buffers, files hashed as they
    are written, as the DeepSpeed backend does); `gate` holds the writer thread."""

    def __init__(self, fail_on_write: bool = False) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.fail_on_write = fail_on_write
        self.buffers = SnapshotBuffers()

    def save_async(self, directory: Path) -> PendingWrite:
        state = self.buffers.copy("state.pt", {"model": self.model.state_dict(), "optim": self.optim.state_dict()})

        def write() -> list[WrittenFile]:
            self.gate.wait(60)
            if self.fail_on_write:
                raise OSError(28, "No space left on device")
            return [save_hashed(state, directory / "state.pt")]
        return PendingWrite(write)


def test_snapshot_buffers_are_refilled_not_reallocated() -> None:
    buffers = SnapshotBuffers()
    live = {"w": torch.randn(4, 3), "steps": [torch.tensor(1.0), 7], "t": torch.randn(3).t()}
    first = buffers.copy("f", live)
    pointers = first["w"].data_ptr(), first["steps"][0].data_ptr()
    live["w"].add_(1.0)
    assert not torch.equal(first["w"], live["w"])  # a copy: later updates do not reach it
    second = buffers.copy("f", live)
    assert (second["w"].data_ptr(), second["steps"][0].data_ptr()) == pointers
    assert torch.equal(second["w"], live["w"]) and second["steps"][1] == 7
    live["w"] = torch.randn(5, 3)  # another shape: a new buffer
    third = buffers.copy("f", live)
    assert third["w"].data_ptr() != pointers[0] and torch.equal(third["w"], live["w"])
    assert buffers.copy("other", live)["w"].data_ptr() != third["w"].data_ptr()


def test_save_hashed_records_what_is_on_disk(tmp_path: Path) -> None:
    state = {"w": torch.randn(1000, 10), "n": 3}
    written = save_hashed(state, tmp_path / "s.pt")
    assert (written.size, written.digest) == file_digest(tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["n"] == 3
    assert torch.serialization.get_crc32_options()  # torch.save's default is restored


def test_async_save_snapshots_then_publishes_after_the_write(tmp_path: Path, model_cfg: ModelConfig) -> None:
    stage = StageDir(tmp_path, "s1")
    backend = AsyncFileBackend()
    checkpointer = Checkpointer(stage, model_cfg, keep_last=2)
    first = checkpointer.save(4, backend, {"batches": 4}, {"stage": "s1"})
    at_save = backend.model.weight.detach().clone()
    backend.step()  # training goes on while the writer waits
    assert checkpointer.pending and checkpointer.poll() is None and stage.latest() is None
    backend.gate.set()
    checkpointer.wait()
    assert stage.latest() == first and not checkpointer.pending
    saved = torch.load(first / "state.pt")["model"]["weight"]
    assert torch.equal(saved, at_save) and not torch.equal(saved, backend.model.weight.detach())
    assert sorted(json.loads((first / "meta.json").read_text())["files"][0]) == ["rank_00000.json", "state.pt"]


def test_next_save_waits_for_the_pending_one(tmp_path: Path, model_cfg: ModelConfig) -> None:
    stage = StageDir(tmp_path, "s1")
    backend = AsyncFileBackend()
    backend.gate.set()
    checkpointer = Checkpointer(stage, model_cfg, keep_last=5)
    for step in (2, 4, 6):
        checkpointer.save(step, backend, {"batches": step}, {})
    checkpointer.wait()
    assert [p.name for p in stage.list_checkpoints()] == ["step_000002", "step_000004", "step_000006"]
    assert all(verify_share(p, 0, 1) is None for p in stage.list_checkpoints())


def test_failed_async_write_raises_at_publish_and_keeps_latest(tmp_path: Path, model_cfg: ModelConfig) -> None:
    stage = StageDir(tmp_path, "s1")
    good = _save(stage, 2, FileBackend(), model_cfg)
    backend = AsyncFileBackend(fail_on_write=True)
    backend.gate.set()
    checkpointer = Checkpointer(stage, model_cfg, keep_last=1)
    checkpointer.save(4, backend, {}, {})
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*\.step_000004\.tmp: No space left on "
                                              r"device; latest checkpoint kept: .*step_000002"):
        checkpointer.wait()
    assert stage.latest() == good and not stage.step_dir(4).exists()


def test_retired_checkpoints_are_hidden_at_once_and_deleted_off_the_step_loop(tmp_path: Path, model_cfg: ModelConfig,
                                                                           monkeypatch) -> None:
    stage = StageDir(tmp_path, "s1")
    backend = AsyncFileBackend()
    backend.gate.set()
    checkpointer = Checkpointer(stage, model_cfg, keep_last=1)
    checkpointer.save(2, backend, {}, {})
    checkpointer.wait()
    leftover = stage.checkpoints / ".step_000001.deleting"  # a run that died while deleting
    (leftover / "sub").mkdir(parents=True)
    release = threading.Event()
    deleting: list[list[Path]] = []

    def slow_delete(paths: list[Path]) -> None:  # holds the deletion so the test sees it in flight
        deleting.append(list(paths))
        release.wait(60)
        original_delete(paths)

    original_delete = checkpoint_save._delete
    monkeypatch.setattr(checkpoint_save, "_delete", slow_delete)
    checkpointer.save(4, backend, {}, {})
    checkpointer._in_flight.thread.join()
    assert checkpointer.poll() == stage.step_dir(4)  # published while the old one is still on disk
    assert [p.name for p in stage.list_checkpoints()] == ["step_000004"]
    assert stage.latest() == stage.step_dir(4) and resume_checkpoint(stage) == stage.step_dir(4)
    assert sorted(p.name for p in deleting[0]) == [".step_000001.deleting", ".step_000002.deleting"]
    assert (stage.checkpoints / ".step_000002.deleting").is_dir()
    release.set()
    checkpointer.wait()
    assert sorted(p.name for p in stage.checkpoints.iterdir()) == ["latest", "step_000004"]
