"""Checks that run before anything expensive (process groups, model build, shard streaming).

Each check raises `PreflightError` with one line naming the key, file or value at fault. The pipeline runs
them for every stage up front, so a typo in stage 3's shards stops the run before stage 0 trains for a day.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from train.checkpoint import StageDir, check_fingerprint, model_fingerprint
from train.config.model import ConfigError, ModelConfig
from train.config.schema import TrainConfig
from train.models.native_io import NATIVE_CONFIG_FILE, CheckpointError, load_model_config_yaml


class PreflightError(ValueError):
    """The run cannot start; the message is one line naming what to fix."""


def check_layout(cfg: TrainConfig, world_size: int) -> int:
    """The data-parallel size; refuses a world size the parallel sizes do not divide and every layout the
    configured backend cannot run, by calling that backend's own rules (the ones it runs itself, and the
    planner runs for every layout it considers)."""
    try:
        dp = cfg.parallel.data_parallel_size(world_size)
        backend_layout_rules(cfg.backend.name)(cfg, world_size)
    except ConfigError as err:
        raise PreflightError(str(err)) from None
    if cfg.stage.global_batch_size % dp:
        raise PreflightError(f"stage.global_batch_size={cfg.stage.global_batch_size} is not divisible by the "
                             f"data-parallel size {dp} (world size {world_size})")
    if (cfg.stage.global_batch_size // dp) % cfg.stage.micro_batch_size:
        raise PreflightError(f"stage.micro_batch_size={cfg.stage.micro_batch_size} does not divide the "
                             f"{cfg.stage.global_batch_size // dp} packed sequences per data-parallel rank "
                             f"(stage.global_batch_size={cfg.stage.global_batch_size} / dp {dp})")
    return dp


def backend_layout_rules(name: str) -> Callable[[TrainConfig, int], Any]:
    """`rules(cfg, world_size)` of backend `name`: raises ConfigError (one line) for a layout it refuses.
    Imports nothing heavy (no deepspeed, no megatron)."""
    if name == "deepspeed":
        from train.backends.deepspeed.config import check_layout as deepspeed_rules

        return deepspeed_rules
    from train.backends.megatron.layout import check_config as megatron_rules

    return megatron_rules


def check_seq_len(cfg: TrainConfig) -> None:
    cp = cfg.parallel.cp
    if cfg.stage.seq_len % (2 * cp):
        raise PreflightError(f"stage.seq_len={cfg.stage.seq_len} ({cfg.stage.name}) is not divisible by "
                             f"2 x parallel.cp = {2 * cp} (context parallel splits each sequence in 2*cp chunks)")
    if not cfg.model.text.mrope and (cp > 1 or cfg.backend.name != "deepspeed"):
        # The 1-D ablation numbers tokens inside Qwen3VLModel.decode, which sees whole documents only there.
        raise PreflightError(f"model.text.mrope=false (an ablation) runs with backend=deepspeed and parallel.cp=1 "
                             f"only, not backend={cfg.backend.name} parallel.cp={cp}")


def check_pixel_normalisation(cfg: TrainConfig) -> None:
    """uint8 pixels are normalised by the model with model.vision's mean/std: they must be the data's."""
    image, vision = cfg.data.encode.image, cfg.model.vision
    for key in ("image_mean", "image_std"):
        if image.pixel_dtype == "uint8" and list(getattr(image, key)) != list(getattr(vision, key)):
            raise PreflightError(f"stage {cfg.stage.name}: data.encode.image.{key}={list(getattr(image, key))} "
                                 f"differs from model.vision.{key}={list(getattr(vision, key))} (uint8 pixels are "
                                 f"normalised by the model with the latter)")


def check_shards(cfg: TrainConfig) -> None:
    """Every shard pattern of the stage's mix matches at least one file."""
    from data.errors import DataError
    from data.shards import list_shards

    for dataset in cfg.data.datasets:
        try:
            list_shards(dataset)
        except DataError as err:
            hint = ""
            if not Path(cfg.data_root).is_dir():
                hint = f" (data_root={cfg.data_root!r} does not exist; `python -m data.synth --out {cfg.data_root}` " \
                       f"writes the demo corpus)"
            raise PreflightError(f"stage {cfg.stage.name}: {err}{hint}") from None


def check_run_dir(run_dir: str | Path) -> None:
    """The run dir can be created and written (a probe file is created and removed)."""
    path = Path(run_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise PreflightError(f"run_dir={str(run_dir)!r} is not writable ({err.strerror or err})") from None


def check_resume_and_init(cfg: TrainConfig, init_from_pipeline: bool = False) -> None:
    """A checkpoint in the stage's run dir (which would win) or the init_from weights must fit the model."""
    stage_dir = StageDir(cfg.run_dir, cfg.stage.name)
    try:
        latest = stage_dir.latest()
        if latest is not None:
            meta = stage_dir.read_meta(latest)
            check_fingerprint(meta.get("model", {}), cfg.model, str(latest))
            return
        if cfg.stage.init_from and not init_from_pipeline:
            check_init_from(cfg.stage.init_from, cfg.model)
    except (CheckpointError, ConfigError) as err:
        raise PreflightError(str(err)) from None


def check_init_from(path: str, model: ModelConfig) -> None:
    """init_from is a native or HF model directory whose config has this run's model shape."""
    directory = Path(path)
    if not directory.is_dir():
        raise PreflightError(f"stage.init_from={path!r} is not a directory")
    if (directory / NATIVE_CONFIG_FILE).is_file():
        saved = load_model_config_yaml(directory / NATIVE_CONFIG_FILE)
    elif (directory / "config.json").is_file():
        import json

        from train.models.hf import model_config_from_hf

        saved = model_config_from_hf(json.loads((directory / "config.json").read_text()),
                                     source=str(directory / "config.json"))
    else:
        raise PreflightError(f"stage.init_from={path!r} has neither {NATIVE_CONFIG_FILE} nor config.json")
    check_fingerprint(model_fingerprint(saved), model, f"stage.init_from={path}")


def check_tokenizer(tokenizer: Any, model: ModelConfig, where: str) -> None:
    """The tokenizer's special ids are the model's, and its vocabulary fits the embedding table."""
    pairs = (("image_token_id", tokenizer.image_pad_id), ("video_token_id", tokenizer.video_pad_id),
             ("vision_start_token_id", tokenizer.vision_start_id), ("vision_end_token_id", tokenizer.vision_end_id))
    for key, token_id in pairs:
        if getattr(model, key) != token_id:
            raise PreflightError(f"tokenizer {where} has {key.removesuffix('_id')} id {token_id} but "
                                 f"model.{key}={getattr(model, key)}")
    if tokenizer.vocab_size > model.text.vocab_size:
        raise PreflightError(f"tokenizer {where} has {tokenizer.vocab_size} tokens but "
                             f"model.text.vocab_size={model.text.vocab_size}")


def check_tokenizer_file(cfg: TrainConfig) -> None:
    path = tokenizer_path(cfg)
    from data.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.load(path)
    except (OSError, ValueError) as err:
        raise PreflightError(f"tokenizer {path!r}: {err}") from None
    check_tokenizer(tokenizer, cfg.model, path)


def tokenizer_path(cfg: TrainConfig) -> str:
    """data.tokenizer when the data config names one, else the corpus' own `<data_root>/tokenizer.model`."""
    return cfg.data.tokenizer or str(Path(cfg.data_root) / "tokenizer.model")


# Packages the code was written and checked against: (minimum, first unsupported), as pyproject.toml pins
# them (dependencies and the `gpu` extra).
SUPPORTED_PACKAGES = {
    "megatron-core": ("0.16.1", "0.17"),
    "deepspeed": ("0.16", "0.20"),
    "transformer-engine": ("2.9", "2.12"),
    "flash-attn": ("2.7", "3"),
}
# The packages a backend imports itself; the optional GPU ones are checked whenever they are installed.
BACKEND_PACKAGES = {"megatron": ("megatron-core",), "deepspeed": ("deepspeed",)}
OPTIONAL_PACKAGES = ("transformer-engine", "flash-attn")


def installed_version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_packages(cfg: TrainConfig, version_of: Callable[[str], str | None] = installed_version) -> None:
    """The backend's package and any installed GPU package are within the versions the code supports."""
    from packaging.version import Version

    for package in (*BACKEND_PACKAGES.get(cfg.backend.name, ()), *OPTIONAL_PACKAGES):
        version = version_of(package)
        low, high = SUPPORTED_PACKAGES[package]
        if version is None:
            if package in OPTIONAL_PACKAGES:
                continue
            raise PreflightError(f"backend={cfg.backend.name} needs {package} (pip install '{package}>={low},<{high}')")
        if not Version(low) <= Version(version) < Version(high):
            raise PreflightError(f"{package} {version} is installed; longvl supports {package}>={low},<{high} "
                                 f"(pip install '{package}>={low},<{high}')")


def check_memory(cfg: TrainConfig, world_size: int, gpu: Any, stats: Any = None) -> None:
    """The configured layout fits in `gpu`'s memory by the planner's estimate (launch/plan.py). `stats`:
    the model's parameter inventory when the caller has it (stages of a pipeline share the model)."""
    from launch.plan import configured_layout, evaluate, usable_bytes
    from launch.planner.estimate import DEFAULT_MFU, GIB
    from launch.planner.model_stats import model_stats

    stats = stats or model_stats(cfg.model)
    plan = evaluate(cfg, stats, configured_layout(cfg, world_size), gpu, DEFAULT_MFU)
    if plan.memory is not None and not plan.fits:
        raise PreflightError(
            f"stage {cfg.stage.name}: {plan.layout.describe()} needs {plan.memory.total / GIB:.1f} GiB per GPU "
            f"(pipeline stage {plan.memory.stage}), {gpu.name} has {usable_bytes(gpu) / GIB:.1f} GiB usable: "
            f"raise parallel.tp/pp/cp, set backend.activation_checkpointing=true, or use parallel=auto")


def local_gpu(local_rank: int = 0) -> Any:
    """This rank's CUDA device as the planner's GPU (memory as CUDA reports it), or None without CUDA."""
    import torch

    from launch.planner.estimate import GPUS, GPU

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(local_rank % torch.cuda.device_count())
    peak = GPUS["h100"].peak_bf16_flops  # step-time estimates only; memory is what is checked
    return GPU(props.name, props.total_memory, peak)


def check_layouts(configs: Sequence[TrainConfig], world_size: int, gpu: Any = None) -> None:
    """The layout checks of every stage: what runs before any process group exists. With `gpu` (the
    local CUDA device) the planner's memory estimate of each stage's layout must fit it."""
    inventories: dict[str, Any] = {}  # the model's parameter inventory, once per model shape
    for cfg in configs:
        check_packages(cfg)
        check_layout(cfg, world_size)
        check_seq_len(cfg)
        if gpu is not None:
            from launch.planner.model_stats import model_stats

            key = repr(cfg.model)
            if key not in inventories:
                inventories[key] = model_stats(cfg.model)
            check_memory(cfg, world_size, gpu, inventories[key])


def preflight(configs: Sequence[TrainConfig], world_size: int) -> None:
    """All checks for all stages, cheapest first. Stage k > 0 of a pipeline starts from stage k-1's final
    weights, which do not exist yet; only their model shape (the same config key) matters there."""
    for i, cfg in enumerate(configs):
        check_layout(cfg, world_size)
        check_seq_len(cfg)
        check_pixel_normalisation(cfg)
        if i > 0:
            try:
                check_fingerprint(model_fingerprint(configs[i - 1].model), cfg.model,
                                  f"stage {configs[i - 1].stage.name} (handing over to {cfg.stage.name})")
            except CheckpointError as err:
                raise PreflightError(str(err)) from None
    check_run_dir(configs[0].run_dir)
    for cfg in configs:
        check_shards(cfg)
    for cfg in configs:
        check_tokenizer_file(cfg)
    for i, cfg in enumerate(configs):
        check_resume_and_init(cfg, init_from_pipeline=i > 0)
