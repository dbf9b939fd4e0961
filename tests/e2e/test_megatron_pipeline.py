"""The demo pipeline on the megatron backend, and the stage handoff between DeepSpeed and megatron.

One shortened `pipeline=demo backend=megatron` run on 2 ranks (torchrun, DP=2 + distributed optimizer; ~35 s)
serves both tests: every stage builds its backend in the same process, so megatron's parallel groups are torn
down and rebuilt three times. The runs go through tests/e2e/programs/train_probe_handoff.py, the real pipeline
plus a <stage>/loaded/ dir holding what the backend exported right after loading its initial weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run
from test_stages import _init_weights
from train.freeze import param_group
from train.models.hf import hf_to_native_state_dict
from train.models.native_io import load_native_checkpoint

pytestmark = [pytest.mark.dist, pytest.mark.slow]

PROBE = str(Path(__file__).parent / "programs" / "train_probe_handoff.py")
STAGES = ("s0", "s1", "s2", "s3")
# The user's overrides win over the demo's per-stage ones: 2 steps of 2 x 256 tokens per stage. fp32 as the
# demo itself sets (it comes after the backend group, so megatron's bf16 default does not apply).
SHORT = ["stage.max_steps=2", "stage.seq_len=256", "stage.global_batch_size=2", "backend.precision=fp32",
         "logging=quiet", "data.num_workers=0"]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def assert_bitwise_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == expected.keys(), f"{what}: tensor names differ"
    differing = [k for k in expected if got[k].dtype != expected[k].dtype or not torch.equal(got[k], expected[k])]
    assert not differing, f"{what}: {len(differing)} tensors differ, e.g. {differing[:3]}"


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def megatron_demo(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run dir, init dir) of the shortened demo on megatron; s0 starts from a known random init (a user
    stage.init_from reaches s0 only: the pipeline hands every later stage its predecessor's final/)."""
    root = tmp_path_factory.mktemp("megatron_demo")
    _init_weights(root / "init")
    run_dir = root / "demo"
    _ok(run([PROBE, "pipeline=demo", "backend=megatron", f"data_root={demo_corpus}", f"run_dir={run_dir}",
             f"stage.init_from={root / 'init'}", *SHORT], ranks=2))
    return run_dir, root / "init"


def test_demo_pipeline_runs_on_megatron(megatron_demo: tuple[Path, Path]) -> None:
    import transformers

    run_dir, init_dir = megatron_demo
    for stage in STAGES:
        summary = json.loads((run_dir / stage / "summary.json").read_text())
        assert summary["name"] == stage and summary["steps"] == 2 and summary["skipped"] == 0
        history = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in history] == [1, 2] and all(r["loss"] > 0 for r in history)

    # Each stage starts from exactly the weights it was handed: s0 from the init dir, stage k+1 from k's final/.
    init = _weights(init_dir)
    assert_bitwise_equal(_weights(run_dir / "s0" / "loaded"), init, "s0 after loading init")
    for previous, stage in zip(STAGES, STAGES[1:]):
        handed = run_dir / previous / "final"
        assert json.loads((run_dir / stage / "summary.json").read_text())["init_from"] == str(handed)
        assert_bitwise_equal(_weights(run_dir / stage / "loaded"), _weights(handed), f"{stage} after loading")

    # S0 trains only the mergers: every other tensor leaves the stage bitwise as it came in.
    s0 = _weights(run_dir / "s0" / "final")
    frozen = {k: v for k, v in s0.items() if param_group(k) != "merger"}
    assert frozen and len(frozen) < len(s0)
    assert_bitwise_equal(frozen, {k: init[k] for k in frozen}, "s0 frozen tensors")
    assert all(not torch.equal(s0[k], init[k]) for k in s0 if k.startswith("visual.merger."))

    # hf/ is a transformers model holding exactly s3's final weights, in bf16 (pipeline.hf_dtype's default).
    model_cfg, s3 = load_native_checkpoint(run_dir / "s3" / "final")
    hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(run_dir / "hf", dtype="auto")
    s3_bf16 = {k: v.to(torch.bfloat16) for k, v in s3.items()}
    assert_bitwise_equal(hf_to_native_state_dict(model_cfg, hf.state_dict()), s3_bf16, "hf/ vs s3/final")


def test_handoff_between_deepspeed_and_megatron(megatron_demo: tuple[Path, Path], demo_corpus: Path,
                                                tmp_path: Path) -> None:
    """megatron final/ -> DeepSpeed stage -> its final/ -> megatron TP=2 + SP stage: each backend, right after
    loading, exports the very tensors of the dir it loaded (sharded into its layout and gathered back)."""
    run_dir, _ = megatron_demo
    common = [f"data_root={demo_corpus}", f"run_dir={tmp_path}", *SHORT]
    megatron_final = run_dir / "s0" / "final"
    _ok(run([PROBE, "stage=s1", "backend=deepspeed", f"stage.init_from={megatron_final}", *common]))
    assert_bitwise_equal(_weights(tmp_path / "s1" / "loaded"), _weights(megatron_final),
                         "deepspeed after loading megatron's final/")

    deepspeed_final = tmp_path / "s1" / "final"
    _ok(run([PROBE, "stage=s2", "backend=megatron", "parallel.tp=2", "parallel.sequence_parallel=true",
             f"stage.init_from={deepspeed_final}", *common], ranks=2))
    assert_bitwise_equal(_weights(tmp_path / "s2" / "loaded"), _weights(deepspeed_final),
                         "megatron tp=2 after loading deepspeed's final/")
    assert json.loads((tmp_path / "s2" / "summary.json").read_text())["skipped"] == 0
