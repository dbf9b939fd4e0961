"""GPU smoke tests, for a machine with CUDA GPUs (skipped without them): per backend on 1 and 2 GPUs, the real
`python -m train` takes one step, checkpoints it (preempted by SIGUSR1 as SLURM does), resumes with the same
command, takes the second step and writes final/; and `python -m train.doctor` passes every check there.
Run them with `python -m pytest -q -m gpu tests/gpu`."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
FAULTS = str(REPO / "tests" / "e2e" / "programs" / "train_with_faults.py")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", PYTHONPATH=str(REPO), DS_ACCELERATOR="cuda")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _run(args: list[str], gpus: int) -> subprocess.CompletedProcess:
    target = args if args[0].endswith(".py") else ["-m", "train", *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    result = subprocess.run([*launcher, *target], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data.synth import make_corpus

    root = tmp_path_factory.mktemp("corpus") / "demo_data"
    make_corpus(root, scale=0.3, shards_per_set=2)
    return root


@pytest.mark.parametrize("gpus", [1, 2])
@pytest.mark.parametrize("backend", ["deepspeed", "megatron"])
def test_step_checkpoint_resume_final(backend: str, gpus: int, corpus: Path, tmp_path: Path) -> None:
    _step_checkpoint_resume_final(backend, gpus, corpus, tmp_path)


def test_megatron_virtual_pipeline_stages_on_two_gpus(corpus: Path, tmp_path: Path) -> None:
    """PP=2 x VPP=2 (interleaved 1F1B, unbatched p2p at pp=2): one-layer chunks, 2 micro-batches."""
    _step_checkpoint_resume_final("megatron", 2, corpus, tmp_path, "parallel.pp=2", "parallel.vpp=2",
                                  "model.text.num_hidden_layers=4", "model.vision.deepstack_visual_indexes=[0]")


def test_megatron_context_parallel_on_two_gpus(corpus: Path, tmp_path: Path) -> None:
    """CP=2: with Transformer Engine the documents are split per document (THD, TE's own context-parallel
    attention); without it, the whole sequence on ContextParallelAttention."""
    _step_checkpoint_resume_final("megatron", 2, corpus, tmp_path, "parallel.cp=2")


def test_per_document_split_equals_transformer_engines() -> None:
    """train/parallel/context.py's per-document shares are the rows TE's THD attention expects on each rank."""
    tex = pytest.importorskip("transformer_engine_torch")
    from train.parallel.context import document_shard_index

    cu = torch.tensor([0, 16, 40, 64], dtype=torch.int32)  # documents of 16, 24, 24: multiples of 2 x 4
    for cp in (2, 4):
        for rank in range(cp):
            want = tex.thd_get_partitioned_indices(cu.cuda(), 64, cp, rank)
            assert want.cpu().tolist() == document_shard_index(cu, cp, rank).tolist(), (cp, rank)


def _step_checkpoint_resume_final(backend: str, gpus: int, corpus: Path, tmp_path: Path, *extra: str) -> None:
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs, found {torch.cuda.device_count()}")
    common = ["stage=s1", f"backend={backend}", "model=tiny", f"data_root={corpus}", "stage.seq_len=512",
              "stage.global_batch_size=2", "backend.precision=bf16", "logging=quiet", "data.num_workers=0",
              "stage.max_steps=2", "stage.save_every=1", f"run_dir={tmp_path}", *extra]
    first = _run([FAULTS, "--signal-after", "1", *common], gpus)
    assert "run path on cuda:0" in first.stderr
    stage = tmp_path / "s1"
    assert (stage / "checkpoints" / "latest").read_text().strip() == "step_000001"
    assert not (stage / "final").exists()
    _run(common, gpus)  # the same command resumes from step 1
    assert (stage / "final" / "model.safetensors").is_file()
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["resumed_from"] == 1 and math.isfinite(summary["eval_end"])


def test_doctor_passes_every_check_here() -> None:
    result = subprocess.run([sys.executable, "-m", "train.doctor"], cwd=REPO, env=_env(), capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0 and "[FAIL]" not in result.stdout, result.stdout + result.stderr[-4000:]
    assert "flash-attn varlen" in result.stdout and "cuda:0" in result.stdout


def test_uint8_pixels_normalised_on_the_gpu_equal_the_cpu_bits() -> None:
    """The patch embedding's first op on CUDA (float64 rescale, float32 mean/std) gives the CPU's bits."""
    from data.vision import normalize_pixels

    pixels = torch.randint(0, 256, (64, 3 * 2 * 16 * 16), dtype=torch.uint8)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    on_gpu = normalize_pixels(pixels.cuda(), mean, std)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), normalize_pixels(pixels, mean, std))


def test_snapshot_of_cuda_state_is_pinned_and_refilled() -> None:
    from train.backends.snapshot import SnapshotBuffers

    buffers = SnapshotBuffers()
    live = {"w": torch.randn(64, 32, device="cuda"), "e": torch.randn(1, 32, device="cuda").expand(8, 32)}
    first = buffers.copy("f", live)
    assert first["w"].is_pinned() and first["e"].is_pinned() and first["e"].is_contiguous()
    live["w"].add_(1.0)
    second = buffers.copy("f", live)
    assert second["w"].data_ptr() == first["w"].data_ptr() and torch.equal(second["w"], live["w"].cpu())
    assert torch.equal(second["e"], live["e"].cpu())
