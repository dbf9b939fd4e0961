"""Compose, type-check and validate the training configuration from configs/ with Hydra's compose API.

We call `compose` ourselves instead of decorating a main with `@hydra.main`: every torchrun/srun rank must
build the same config without Hydra creating time-stamped output dirs or changing the working directory,
and every mistake must come out as one line naming the key (`ConfigError`), not a stack trace.

A user keeps their own options outside the package with `--config-dir DIR` (any number of times, anywhere in
the override list: `compose_config` takes it out): DIR holds group folders like configs/ (`DIR/stage/my_s1.yaml`,
`DIR/data/my_mix.yaml`, `DIR/model/...`, `DIR/pipeline/...`) and is added to Hydra's search path after the
packaged configs, so `stage=my_s1` resolves there with the same schema and checks. A file of DIR with the
name of a packaged option would never be read (the packaged one wins): that is refused, as is a missing DIR.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.errors import DataError
from train.config.model import ConfigError
from train.config.schema import PipelineConfig, TrainConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SCHEMA_NAME = "train_schema"
CONFIG_DIR_FLAG = "--config-dir"


def register_schemas() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def split_config_dirs(args: Sequence[str]) -> tuple[list[str], list[Path]]:
    """(Hydra overrides, user config dirs) of a command line with `--config-dir DIR` / `--config-dir=DIR`."""
    overrides, dirs = [], []
    items = iter(args)
    for arg in items:
        if arg == CONFIG_DIR_FLAG:
            value = next(items, None)
            if value is None:
                raise ConfigError(f"{CONFIG_DIR_FLAG} needs a directory")
            dirs.append(_user_config_dir(value))
        elif arg.startswith(CONFIG_DIR_FLAG + "="):
            dirs.append(_user_config_dir(arg.split("=", 1)[1]))
        else:
            overrides.append(arg)
    return overrides, dirs


def _user_config_dir(value: str) -> Path:
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"{CONFIG_DIR_FLAG} {value}: no such directory")
    if "'" in str(path):
        raise ConfigError(f"{CONFIG_DIR_FLAG} {value}: a path with a quote (') cannot go on Hydra's search path")
    for group in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir()):
        for option in sorted((path / group.name).glob("*.yaml")):
            if (group / option.name).is_file():
                raise ConfigError(f"{option}: {group.name}={option.stem} is a packaged option, which would be "
                                  f"read instead; rename the file")
    if (path / "train.yaml").is_file():
        raise ConfigError(f"{path / 'train.yaml'}: the packaged train.yaml is the primary config; put options in "
                          f"group folders (stage/, data/, model/, pipeline/, ...)")
    return path


def compose_config(overrides: Sequence[str] = (), config_dir: Path = CONFIG_DIR) -> DictConfig:
    """The composed (typed) DictConfig for `overrides` (which may hold `--config-dir DIR`); raises ConfigError
    with a one-line message."""
    overrides, user_dirs = split_config_dirs(overrides)
    if user_dirs:
        overrides.append("hydra.searchpath=[" + ",".join(f"'file://{d}'" for d in user_dirs) + "]")
    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(_one_line(err)) from err


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """The dataclass object of a composed config, validated."""
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from err
    assert isinstance(obj, TrainConfig)
    try:
        obj.validate()
    except DataError as err:  # data/ raises its own error type; to the user it is one more config error
        raise ConfigError(str(err)) from err
    return obj


def load_config(overrides: Sequence[str] = ()) -> TrainConfig:
    return to_train_config(compose_config(overrides))


def stage_configs(overrides: Sequence[str] = ()) -> list[TrainConfig]:
    """The configs to run: one per stage of the selected pipeline, or the single selected stage.

    Each pipeline stage is composed afresh (its own stage file, data mix and LR schedule) from `stage=<name>`,
    the pipeline's per-stage overrides and then the user's overrides, so a stage of a pipeline is exactly the
    config `python -m train stage=<name> <pipeline overrides> <user overrides>` would run. With
    `pipeline.only=<stage>` just that stage's config is returned, starting from the previous stage's final/.
    """
    base = load_config(overrides)
    if not base.pipeline.stages:
        if base.pipeline.only:
            raise ConfigError(f"pipeline.only={base.pipeline.only} needs a pipeline (pipeline=NAME)")
        return [base]
    clashing = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") == "stage"]
    if clashing:
        raise ConfigError(f"{clashing[0]} conflicts with pipeline={base.pipeline.name}: the pipeline picks "
                          f"the stages (override stage keys as stage.KEY=VALUE)")
    configs = []
    for i, entry in enumerate(base.pipeline.stages):
        try:
            # The user's overrides come last so they win over the pipeline's (e.g. a shorter stage.max_steps).
            configs.append(load_config([f"stage={entry.stage}", *entry.overrides, *overrides]))
        except ConfigError as err:
            raise ConfigError(f"pipeline.stages[{i}] ({entry.stage}): {err}") from err
    if base.pipeline.only:
        return [_only_stage(base.pipeline, configs)]
    return configs


def _only_stage(pipeline: PipelineConfig, configs: list[TrainConfig]) -> TrainConfig:
    """The config of the stage `pipeline.only` names, with the handoff the whole pipeline would give it.

    Every stage is composed above, so a mistake in any stage is still caught before a job of the chain runs.
    The handoff is the previous stage's final/ in the same run dir (as run_pipeline sets it; the path
    mirrors train.checkpoint.StageDir.final, not imported here to keep composing free of torch)."""
    names = [entry.stage for entry in pipeline.stages]
    if pipeline.only not in names:
        raise ConfigError(f"pipeline.only={pipeline.only} is not a stage of pipeline={pipeline.name} "
                          f"(stages: {', '.join(names)})")
    if names.count(pipeline.only) > 1:
        raise ConfigError(f"pipeline.only={pipeline.only} is ambiguous: pipeline={pipeline.name} runs it "
                          f"{names.count(pipeline.only)} times")
    k = names.index(pipeline.only)
    cfg = configs[k]
    if k > 0:
        previous = configs[k - 1]
        cfg.stage.init_from = str(Path(previous.run_dir) / previous.stage.name / "final")
    return cfg


def _one_line(err: BaseException) -> str:
    """Hydra/OmegaConf errors span several lines (value, type, full_key, object_type); keep what names the
    key and the problem."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    kept = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "reference_type="))]
    message = kept[0] if kept else type(err).__name__
    if message.endswith(":") and len(kept) > 1:  # "In 'data/x': ConfigKeyError raised while composing config:"
        message = f"{message} {kept[1]}"
    full_key = getattr(err, "full_key", None) or next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    if full_key and full_key not in message:
        message = f"{full_key}: {message}"
    cause = err.__cause__
    if cause is not None and isinstance(cause, OmegaConfBaseException) and str(cause) not in message:
        message = f"{message} ({_one_line(cause)})"
    return message
