"""Checkpoint directories of a stage: finding, verifying and loading checkpoints, and the stage handoff.

Layout of one stage (`<run_dir>/<stage>/`):

    checkpoints/step_000100/     backend.save() files + meta.json + rank_00000.json (RNG + loader state) ...
    checkpoints/latest           the name of the newest complete checkpoint ("step_000100")
    final/                       native model dir (model_config.yaml + model.safetensors): the handoff
    summary.json                 the stage's result; written last, so its presence means "stage done"

Saving (atomic, verified, asynchronous) is train/checkpoint_save.py: a save goes to
`checkpoints/.step_000100.tmp`, every file is fsync'ed by its writer, the directory is renamed into place, and
only then is `latest` replaced; a crash at any point leaves `latest` naming a complete checkpoint (or absent).

Every rank calls save/load (the backend's save is collective); rank 0 does the renames. All ranks must see
the same file system (one node, or a shared cluster file system).
"""
from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from train.checkpoint_files import check_manifests, my_share
from train.config.model import ModelConfig
from train.models.hf import HF_CONFIG_FILE, load_hf_checkpoint
from train.export import HANDOFF_DTYPE, write_model_dir
from train.models.native_io import NATIVE_CONFIG_FILE, CheckpointError, load_native_checkpoint
from train.models.checkpoint_sources import open_model_dir
from train.models.weight_source import WeightSource, check_source_fits

LATEST = "latest"
META = "meta.json"
FINAL = "final"
SUMMARY = "summary.json"
STEP_DIR = re.compile(r"step_(\d{6,})")


def model_fingerprint(cfg: ModelConfig) -> dict[str, Any]:
    """The model-shape part of a config, flattened to dotted keys (the name is a label, not a shape)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}", sub)
        else:
            flat[prefix] = value

    walk("model", {k: v for k, v in asdict(cfg).items() if k != "name"})
    return flat


def check_fingerprint(saved: dict[str, Any], cfg: ModelConfig, source: str) -> None:
    """One-line refusal naming the first model key whose value differs from the checkpoint's."""
    current, defaults = model_fingerprint(cfg), model_fingerprint(ModelConfig())
    for key in sorted(set(saved) | set(current)):
        if key not in saved and current.get(key) == defaults.get(key):
            continue  # a key added to the schema after the checkpoint was written, left at its default
        if saved.get(key) != current.get(key):
            raise CheckpointError(f"{source} was written for another model shape: {key}={saved.get(key)!r} "
                                  f"there, {current.get(key)!r} in this run")


class StageDir:
    """Paths of one stage's run dir and the operations on its checkpoints."""

    def __init__(self, run_dir: str | Path, stage: str) -> None:
        self.root = Path(run_dir) / stage
        self.checkpoints = self.root / "checkpoints"
        self.final = self.root / FINAL
        self.summary = self.root / SUMMARY

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None. A `latest` naming a missing directory is an error: it
        means someone deleted checkpoints by hand, and silently restarting from scratch would be worse."""
        pointer = self.checkpoints / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        path = self.checkpoints / name
        if not STEP_DIR.fullmatch(name) or not (path / META).is_file():
            raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint directory")
        return path

    def read_meta(self, ckpt: Path) -> dict[str, Any]:
        try:
            return json.loads((ckpt / META).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{ckpt / META}: unreadable ({exc})") from None

    def is_done(self) -> bool:
        return self.summary.is_file() and self.final.is_dir()

    def list_checkpoints(self) -> list[Path]:
        found = [p for p in self.checkpoints.glob("step_*") if STEP_DIR.fullmatch(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: int(p.name[5:]))


# ---- shared by save and load ------------------------------------------------------------------------

def latest_kept(checkpoints: Path) -> str:
    """What a failed write leaves for the next run to resume from, for error messages."""
    pointer = checkpoints / LATEST
    name = pointer.read_text().strip() if pointer.is_file() else ""
    return f"latest checkpoint kept: {checkpoints / name}" if name else "no earlier checkpoint of this stage"


def all_gather_object(value: Any) -> list[Any]:
    """`value` of every rank (a list of one without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# ---- verify -------------------------------------------------------------------------------------------

def verify_share(ckpt: Path, rank: int, world: int) -> str | None:
    """What is wrong with the part of `ckpt` this rank checks (see checkpoint_files.my_share), or None.
    Checkpoints written before files were recorded (no "files" in meta.json) are trusted as they are."""
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, ValueError) as exc:
        return f"{ckpt / META}: unreadable ({type(exc).__name__})"
    files = meta.get("files")
    if files is None:
        return None
    return check_manifests(ckpt, files, my_share(len(files), rank, world))


def resume_checkpoint(stage_dir: StageDir) -> Path | None:
    """The newest checkpoint of the stage whose files all verify, or None if the stage has none. Collective:
    every rank checks its share of each candidate and all agree. A `latest` that fails is skipped for the
    next older one with one warning line naming the bad file; if none verifies, a CheckpointError."""
    latest = stage_dir.latest()
    if latest is None:
        return None
    older = [p for p in reversed(stage_dir.list_checkpoints())
             if int(p.name[5:]) < int(latest.name[5:]) and (p / META).is_file()]
    first_problem = None
    for candidate in [latest, *older]:
        problems = [p for p in all_gather_object(verify_share(candidate, rank(), world_size())) if p]
        if not problems:
            if first_problem is not None and rank() == 0:
                print(f"longvl: warning: checkpoint {latest} failed verification ({first_problem}); resuming "
                      f"from {candidate} instead", file=sys.stderr, flush=True)
            return candidate
        first_problem = first_problem or problems[0]
    raise CheckpointError(f"no checkpoint of {stage_dir.checkpoints} verifies; the newest: {first_problem}")


def verify_run_dir(path: Path) -> list[tuple[Path, str | None]]:
    """(checkpoint, problem or None) for every checkpoint under a run dir, a stage dir or one checkpoint."""
    if (path / META).is_file():
        found = [path]
    else:
        found = sorted(p for pattern in ("checkpoints/step_*", "*/checkpoints/step_*") for p in path.glob(pattern)
                       if STEP_DIR.fullmatch(p.name) and p.is_dir())
    return [(ckpt, verify_share(ckpt, 0, 1)) for ckpt in found]


def _verify_main(args: list[str]) -> int:
    if len(args) != 2 or args[0] != "verify":
        print("usage: python -m train.checkpoint verify RUN_DIR|STAGE_DIR|CHECKPOINT_DIR", file=sys.stderr)
        return 2
    results = verify_run_dir(Path(args[1]))
    if not results:
        print(f"{args[1]}: no checkpoints found", file=sys.stderr)
        return 1
    for ckpt, problem in results:
        print(f"ok   {ckpt}" if problem is None else f"BAD  {ckpt}: {problem}")
    return 1 if any(problem for _, problem in results) else 0


# ---- load ---------------------------------------------------------------------------------------------

def load_checkpoint(stage_dir: StageDir, ckpt: Path, backend: Any, model_cfg: ModelConfig) -> dict[str, Any]:
    """Restore backend state and this rank's RNG from `ckpt`; return {"meta": ..., "loader": ...}.

    In the layout it was written in, "loader" is this rank's loader state. Written by another number of
    ranks (a requeued job on fewer or more nodes), it is the list of every saved rank's loader state (the
    data streams move between ranks, data.loader.StreamingLoader.load_state_dict), the RNG comes from saved
    rank (rank mod saved world), and the backend reshards its state or refuses in one line."""
    meta = stage_dir.read_meta(ckpt)
    check_fingerprint(meta.get("model", {}), model_cfg, str(ckpt))
    saved_world = int(meta.get("world_size", 0))
    if saved_world < 1:
        raise CheckpointError(f"{ckpt / META}: world_size={meta.get('world_size')!r} is not a rank count")
    same_layout = saved_world == world_size()
    wanted = [rank()] if same_layout else list(range(saved_world))
    states = {r: _read_rank_file(ckpt / rank_file_name(r)) for r in wanted}
    backend.load(ckpt)
    set_rng_state(states[rank() % saved_world]["rng"])
    loader = states[rank()]["loader"] if same_layout else [states[r]["loader"] for r in wanted]
    return {"meta": meta, "loader": loader}


def _read_rank_file(path: Path) -> dict[str, Any]:
    """A rank's RNG and loader state; JSON: reading a checkpoint never unpickles (nor runs) anything."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (incomplete checkpoint)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__})") from None


# ---- stage handoff: layout-independent full weights ----------------------------------------------------

def save_final(stage_dir: StageDir, backend: Any, model_cfg: ModelConfig) -> Path:
    """Write `final/`, the stage handoff, as a native model dir (every rank must call): the backend's tensors
    stream one at a time into rank 0's writer, in fp32 (HANDOFF_DTYPE: what the next stage loads without
    loss whether it trains in fp32 or bf16), so no rank holds the model and no rank idles in a collective
    for longer than one tensor's gather + write."""
    write_model_dir(stage_dir.final, model_cfg, backend.export_tensors(), fmt="native", dtype=HANDOFF_DTYPE,
                    writer=rank() == 0, force=True)
    barrier()
    return stage_dir.final


def load_model_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, full native state dict) of a native (model_config.yaml) or HF (config.json) model directory."""
    path = Path(path)
    if (path / NATIVE_CONFIG_FILE).is_file():
        return load_native_checkpoint(path)
    if (path / HF_CONFIG_FILE).is_file():
        return load_hf_checkpoint(path)
    raise CheckpointError(f"{path}: neither a native model dir ({NATIVE_CONFIG_FILE}) nor an HF one "
                          f"({HF_CONFIG_FILE})")


def read_model_dir(path: str | Path, model_cfg: ModelConfig) -> WeightSource:
    """The weights of a native or HF model directory as a WeightSource that reads only the slices asked
    for (train/models/checkpoint_sources.py). Refused in one line naming the file and key before any
    training step: another model's config or tensor shapes, a shard the index names that is missing, a
    truncated file."""
    saved_cfg, source = open_model_dir(path)
    check_fingerprint(model_fingerprint(saved_cfg), model_cfg, str(path))
    check_source_fits(source, model_cfg, str(path))
    return source


# ---- RNG ----------------------------------------------------------------------------------------------

def rank_file_name(rank: int) -> str:
    """A rank's RNG and data-loader state (JSON) inside a checkpoint."""
    return f"rank_{rank:05d}.json"


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and this rank's CUDA device RNG states as JSON-able values. Only the current
    CUDA device: each rank drives one GPU, and reading every visible GPU's state would create a context on
    each of them from every rank."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"python": [version, list(mt_state), gauss],
                             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                             "torch": _hex(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = _hex(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unhex(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unhex(state["cuda"]))


def _hex(byte_tensor: torch.Tensor) -> str:
    return byte_tensor.numpy().tobytes().hex()


def _unhex(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray.fromhex(text), dtype=torch.uint8)


# ---- process group helpers (a single process without a group behaves as rank 0 of 1) -------------------

def rank() -> int:
    """This process' global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


if __name__ == "__main__":
    sys.exit(_verify_main(sys.argv[1:]))
