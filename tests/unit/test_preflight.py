"""Pre-flight checks: one line naming the key/file/value, before any process group or model exists."""
from __future__ import annotations

from pathlib import Path

import pytest

from train.checkpoint import StageDir
from train.checkpoint_save import save_checkpoint
from train.config.compose import load_config
from train.config.schema import TrainConfig
from train.preflight import (
    PreflightError, check_layout, check_resume_and_init, check_run_dir, check_seq_len, check_shards,
    check_tokenizer, preflight,
)


def _cfg(tmp_path: Path, *overrides: str) -> TrainConfig:
    return load_config([f"run_dir={tmp_path / 'run'}", f"data_root={tmp_path / 'data'}", "stage=s1",
                        "stage.global_batch_size=8", *overrides])


def _write_shards(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "shard-000000.tar").write_bytes(b"")


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_world_size_not_divisible_by_parallel_sizes(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "parallel=cp2")
    assert check_layout(cfg, 4) == 2
    with pytest.raises(PreflightError) as err:
        check_layout(cfg, 3)
    assert "world size 3 is not divisible" in _one_line(err) and "parallel.cp" in _one_line(err)


def test_global_batch_not_divisible_by_data_parallel_size(tmp_path: Path) -> None:
    with pytest.raises(PreflightError) as err:
        check_layout(_cfg(tmp_path), 3)
    assert "stage.global_batch_size=8 is not divisible by the data-parallel size 3" in _one_line(err)


def test_micro_batch_size_must_divide_each_ranks_share(tmp_path: Path) -> None:
    assert check_layout(_cfg(tmp_path, "stage.micro_batch_size=4"), 2) == 2  # 4 sequences per rank
    with pytest.raises(PreflightError) as err:
        check_layout(_cfg(tmp_path, "stage.micro_batch_size=4"), 4)  # 2 per rank
    assert "stage.micro_batch_size=4 does not divide the 2 packed sequences per data-parallel rank" in _one_line(err)


def test_seq_len_not_divisible_by_two_cp(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "stage.seq_len=192")
    check_seq_len(cfg)
    cfg.parallel.cp = 64  # 192 % 128 != 0
    with pytest.raises(PreflightError) as err:
        check_seq_len(cfg)
    assert "stage.seq_len=192 (s1) is not divisible by 2 x parallel.cp = 128" in _one_line(err)


def test_missing_shards_name_the_data_set_and_pattern(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _write_shards(tmp_path / "data", ["text", "caption", "ocr"])  # s1's video shards are missing
    with pytest.raises(PreflightError) as err:
        check_shards(cfg)
    assert "data set 'video'" in _one_line(err) and f"{tmp_path}/data/video/shard-*.tar" in _one_line(err)
    _write_shards(tmp_path / "data", ["video"])
    check_shards(cfg)


def test_unwritable_run_dir(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PreflightError) as err:
        check_run_dir(tmp_path / "a_file" / "run")
    assert f"run_dir='{tmp_path}/a_file/run' is not writable" in _one_line(err)
    check_run_dir(tmp_path / "fine" / "run")
    assert (tmp_path / "fine" / "run").is_dir() and not list((tmp_path / "fine" / "run").iterdir())


class _NoStateBackend:
    def save(self, directory: Path) -> None:
        (directory / "model.pt").write_bytes(b"")


def test_checkpoint_of_another_model_shape(tmp_path: Path) -> None:
    small = _cfg(tmp_path, "model=tiny")
    wide = _cfg(tmp_path, "model=tiny", "model.text.hidden_size=128", "model.text.intermediate_size=256")
    save_checkpoint(StageDir(small.run_dir, "s1"), 10, _NoStateBackend(), {}, small.model, {}, keep_last=2)
    check_resume_and_init(small)
    with pytest.raises(PreflightError) as err:
        check_resume_and_init(wide)
    assert "another model shape: model.text.hidden_size=64 there, 128 in this run" in _one_line(err)
    assert "step_000010" in _one_line(err)


def test_init_from_of_another_model_shape(tmp_path: Path) -> None:
    from train.models.native_io import save_model_config_yaml

    other = _cfg(tmp_path, "model.text.num_hidden_layers=5").model
    (tmp_path / "weights").mkdir()
    save_model_config_yaml(tmp_path / "weights" / "model_config.yaml", other)
    cfg = _cfg(tmp_path, f"stage.init_from={tmp_path / 'weights'}")
    with pytest.raises(PreflightError) as err:
        check_resume_and_init(cfg)
    assert "model.text.num_hidden_layers=5 there, 3 in this run" in _one_line(err)
    with pytest.raises(PreflightError, match="is not a directory"):
        check_resume_and_init(_cfg(tmp_path, f"stage.init_from={tmp_path / 'nowhere'}"))


def test_tokenizer_special_ids_must_match_the_model(tmp_path: Path) -> None:
    from data.tokenizer import train_sentencepiece

    words = "the red blue green square circle triangle left right big small".split()
    texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20
    tok = train_sentencepiece(texts, 300, tmp_path / "t.model")
    model = _cfg(tmp_path, "model=tiny").model
    check_tokenizer(tok, model, "t.model")  # tiny.yaml uses the project tokenizer's fixed ids
    model.image_token_id = 7
    with pytest.raises(PreflightError) as err:
        check_tokenizer(tok, model, "t.model")
    assert "tokenizer t.model has image_token id 5 but model.image_token_id=7" in _one_line(err)
    model.image_token_id, model.text.vocab_size = 5, 100
    with pytest.raises(PreflightError, match="model.text.vocab_size=100"):
        check_tokenizer(tok, model, "t.model")


def test_pipeline_preflight_checks_every_stage_first(tmp_path: Path) -> None:
    _write_shards(tmp_path / "data", ["caption", "ocr", "text", "video"])  # s3's needle is missing
    configs = [_cfg(tmp_path, f"stage={s}", "stage.global_batch_size=8") for s in ("s0", "s1", "s2", "s3")]
    with pytest.raises(PreflightError, match="stage s3: data set 'needle'"):
        preflight(configs, world_size=1)
    assert not (tmp_path / "run" / "s0").exists()  # nothing of stage 0 was started
    configs[2].model.text.hidden_size = 128
    with pytest.raises(PreflightError, match=r"stage s1 \(handing over to s2\)"):
        preflight(configs, world_size=1)
