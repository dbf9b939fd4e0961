"""Configuration of `python -m train.eval vniah`: a dataclass schema composed with Hydra's compose API from
configs/eval/vniah.yaml plus the command-line overrides (the same way train/config/compose.py builds the
training config: no output dirs, no working-directory change, one-line ConfigError for every mistake)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.errors import DataError
from data.video import VideoConfig
from data.vision import ImageConfig
from train.config.compose import CONFIG_DIR, _one_line
from train.config.model import ConfigError

EVAL_CONFIG_DIR = CONFIG_DIR / "eval"
DTYPES = ("fp32", "bf16")


@dataclass
class VNIAHConfig:
    checkpoint: str = ""  # native model dir (<run_dir>/<stage>/final) or HF dir
    # sentencepiece .model or tokenizer.json; default: tokenizer.model / tokenizer.json in the checkpoint dir
    tokenizer: Optional[str] = None
    lengths: list[float] = field(default_factory=lambda: [60.0, 300.0, 900.0])  # seconds
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # 0 = start, 1 = end
    trials: int = 2
    budget: int = 16384  # visual LLM tokens per video
    videos: list[str] = field(default_factory=list)  # haystack videos (decord); empty: synthetic haystacks
    source_fps: float = 4.0  # frame rate of synthetic haystacks (user videos keep theirs)
    frame_size: int = 64  # side of synthetic haystack frames, pixels (the demo corpus' needle size)
    needle_seconds: float = 1.0  # needle duration; stretched when sparse sampling could step over it
    video: VideoConfig = field(default_factory=lambda: VideoConfig(fps=1.0, max_frames=4096))
    image: ImageConfig = field(default_factory=ImageConfig)
    max_new_tokens: int = 24
    device: str = "cpu"
    dtype: str = "fp32"
    out: str = "runs/eval/vniah"  # directory for vniah.json and vniah.png
    seed: int = 0

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint=PATH is required (a native or HF model directory)")
        if not Path(self.checkpoint).is_dir():
            raise ConfigError(f"checkpoint={self.checkpoint}: not a directory")
        if not self.lengths or any(t <= 0 for t in self.lengths):
            raise ConfigError(f"lengths={list(self.lengths)} must be a non-empty list of positive seconds")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise ConfigError(f"depths={list(self.depths)} must be a non-empty list of fractions in [0, 1]")
        for key in ("trials", "budget", "max_new_tokens", "frame_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if self.frame_size % 2:
            raise ConfigError(f"frame_size={self.frame_size} must be even")
        if not self.source_fps > 0 or not self.needle_seconds > 0:
            raise ConfigError(f"source_fps={self.source_fps} and needle_seconds={self.needle_seconds} must be > 0")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {list(DTYPES)}")
        for i, path in enumerate(self.videos):
            if not Path(path).is_file():
                raise ConfigError(f"videos[{i}]={path}: file not found")
        try:
            self.video.validate("video")
            self.image.validate("image")
        except DataError as err:
            raise ConfigError(str(err)) from err


def load_vniah_config(overrides: Sequence[str] = ()) -> VNIAHConfig:
    """The validated config of configs/eval/vniah.yaml + `overrides`; ConfigError with a one-line message."""
    ConfigStore.instance().store(name="vniah_schema", node=VNIAHConfig)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(EVAL_CONFIG_DIR), version_base="1.3"):
            composed = compose(config_name="vniah", overrides=list(overrides))
        cfg = OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(_one_line(err)) from err
    assert isinstance(cfg, VNIAHConfig)
    cfg.validate()
    return cfg
