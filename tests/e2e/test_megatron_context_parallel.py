"""Context parallelism split per document (Transformer Engine's THD layout) through the real trainer on
backend=megatron, 2 ranks (torchrun, gloo, CP=2, ~25 s unloaded): the backend asks the loader for documents
padded to 2 x cp, the local attention reads the THD split, and the stage trains to final/. The numerics of
the split against the reference model are tests/dist/test_megatron_model.py and test_megatron_backend.py."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import QUICK, run
from test_resume import _history

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_per_document_split_trains_through_the_real_trainer(demo_corpus: Path, tmp_path: Path) -> None:
    result = run(["stage=s1", "backend=megatron", "model=tiny", f"data_root={demo_corpus}", *QUICK,
                  "stage.max_steps=2", "parallel.cp=2", "parallel.cp_layout=document", f"run_dir={tmp_path}"],
                 ranks=2)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "context parallel per document" in result.stdout + result.stderr  # the start-up line
    history = _history(tmp_path)
    assert [r["step"] for r in history] == [1, 2] and all(math.isfinite(r["loss"]) for r in history)
    assert (tmp_path / "s1" / "final" / "model.safetensors").is_file()
