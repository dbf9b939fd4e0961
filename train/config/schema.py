"""Dataclass schemas of the training configuration, one per Hydra config group.

`TrainConfig` is registered in Hydra's ConfigStore (train/config/compose.py) and comes first in
configs/train.yaml's defaults list, so every YAML file and every command-line override is type-checked
against these dataclasses. Semantic checks that types cannot express live in `validate()` methods and raise
`ConfigError` naming the dotted key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from data.config import DataConfig
from train.config.model import ConfigError, ModelConfig

# Module groups a stage can train; everything else is frozen (requires_grad False, no optimizer state).
TRAINABLE_GROUPS = ("vision", "merger", "llm")
BACKENDS = ("deepspeed", "megatron")
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("cosine", "linear", "constant")
MOE_AUX_LOSS = ("auto", "pooled", "per_layer")


@dataclass
class StageConfig:
    """One pretraining stage: what trains, how long the sequences are, how many tokens, from which weights."""

    name: str = "s1"
    trainable: list[str] = field(default_factory=lambda: list(TRAINABLE_GROUPS))
    seq_len: int = 8192
    # Tokens to train on (packed capacity, padding included). The step count is
    # ceil(token_budget / (seq_len * global_batch_size)) unless max_steps > 0 overrides it.
    token_budget: int = 0
    max_steps: int = 0
    global_batch_size: int = 8  # packed sequences per optimizer step, over all data-parallel ranks
    # Packed sequences joined into one forward/backward pass (as Megatron's --micro-batch-size): fewer, longer
    # passes cost less per token where per-pass overhead dominates (small models, CPU), at the memory of
    # micro_batch_size x seq_len tokens of activations. The loss and gradients do not depend on it (except an
    # MoE model's load-balancing loss, computed per pass as in Megatron).
    micro_batch_size: int = 1
    # Weights to start from when the stage's run dir has no checkpoint yet: a native or HF model directory,
    # or the previous stage (the pipeline runner fills it in). A checkpoint in the run dir always wins.
    init_from: Optional[str] = None
    save_every: int = 100
    keep_last: int = 2
    # Write checkpoints on a background thread from a host-memory snapshot while the steps go on (`latest`
    # moves once every rank's files are on disk); false: every save blocks until written.
    async_save: bool = True
    # Non-finite steps are skipped; this many in a row stop the stage (the last good checkpoint is kept).
    max_consecutive_skips: int = 5
    log_every: int = 1

    def num_steps(self) -> int:
        if self.max_steps > 0:
            return self.max_steps
        per_step = self.seq_len * self.global_batch_size
        return -(-self.token_budget // per_step)

    def validate(self, prefix: str = "stage") -> None:
        if self.seq_len <= 0 or self.seq_len % 64:
            raise ConfigError(f"{prefix}.seq_len={self.seq_len} must be a positive multiple of 64")
        for i, group in enumerate(self.trainable):
            if group not in TRAINABLE_GROUPS:
                raise ConfigError(f"{prefix}.trainable[{i}]={group!r} is not one of {list(TRAINABLE_GROUPS)}")
        if not self.trainable:
            raise ConfigError(f"{prefix}.trainable is empty: nothing would train")
        if self.global_batch_size <= 0:
            raise ConfigError(f"{prefix}.global_batch_size={self.global_batch_size} must be > 0")
        if self.micro_batch_size <= 0 or self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"{prefix}.micro_batch_size={self.micro_batch_size} must be > 0 and divide "
                              f"{prefix}.global_batch_size={self.global_batch_size}")
        if self.max_steps < 0 or self.token_budget < 0:
            raise ConfigError(f"{prefix}.max_steps / {prefix}.token_budget must be >= 0")
        if self.num_steps() <= 0:
            raise ConfigError(f"{prefix}: set {prefix}.token_budget or {prefix}.max_steps (both are 0)")
        for key in ("save_every", "keep_last", "log_every", "max_consecutive_skips"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)} must be > 0")


@dataclass
class PipelineStage:
    stage: str = "s1"  # name of a configs/stage/ option
    overrides: list[str] = field(default_factory=list)  # extra Hydra overrides for this stage only


HF_DTYPES = ("bf16", "fp32", "fp16")


@dataclass
class PipelineConfig:
    """An ordered list of stages; stage k+1 starts from stage k's final weights with a fresh optimizer."""

    name: str = ""
    stages: list[PipelineStage] = field(default_factory=list)
    # A recipe's stage layouts are planned for this many GPUs (0: the pipeline sets no layouts); tests check
    # that launch.plan accepts every stage's layout at this size.
    gpus: int = 0
    # Run just this stage of the pipeline (one job of slurm/submit_pipeline.sh's chain): composed exactly as
    # in the whole pipeline, starting from the previous stage's final/ in the same run dir. "" runs them all.
    only: str = ""
    hf_dtype: str = "bf16"  # dtype of the run's hf/ export, one of HF_DTYPES (final/ handoffs are always fp32)
    # A `python -m data.synth` preset written to data_root when it holds no corpus, so `make train` and `make
    # needle` work on a fresh checkout; "" (every real recipe): a missing shard is a preflight error.
    synth_corpus: str = ""


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "cosine"
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def validate(self, prefix: str = "optim") -> None:
        if self.name != "adamw":
            raise ConfigError(f"{prefix}.name={self.name!r}: only 'adamw' is supported")
        for key in ("lr", "min_lr", "weight_decay", "eps", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)} must be >= 0")
        if self.min_lr > self.lr:
            raise ConfigError(f"{prefix}.min_lr={self.min_lr} exceeds {prefix}.lr={self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{prefix}.betas={list(self.betas)} must be two values in [0, 1)")
        if self.warmup_steps < 0:
            raise ConfigError(f"{prefix}.warmup_steps={self.warmup_steps} must be >= 0")
        if self.schedule not in LR_SCHEDULES:
            raise ConfigError(f"{prefix}.schedule={self.schedule!r} is not one of {list(LR_SCHEDULES)}")


@dataclass
class BackendConfig:
    name: str = "deepspeed"
    precision: str = "bf16"
    zero_stage: int = 1  # DeepSpeed ZeRO stage; megatron uses distributed_optimizer instead
    distributed_optimizer: bool = True  # megatron only (ZeRO-1 equivalent)
    activation_checkpointing: bool = False
    # MoE load-balancing loss: "pooled" (transformers' formula over all layers' tokens at once), "per_layer"
    # (megatron's: each layer's own tokens, averaged over layers; a pipeline stage adds its layers' share) or
    # "auto" (pooled with pp=1, where it equals HF; per_layer with pp>1). train/backends/megatron/layout.py.
    moe_aux_loss: str = "auto"

    def validate(self, prefix: str = "backend") -> None:
        if self.name not in BACKENDS:
            raise ConfigError(f"{prefix}.name={self.name!r} is not one of {list(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{prefix}.precision={self.precision!r} is not one of {list(PRECISIONS)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{prefix}.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.moe_aux_loss not in MOE_AUX_LOSS:
            raise ConfigError(f"{prefix}.moe_aux_loss={self.moe_aux_loss!r} is not one of {list(MOE_AUX_LOSS)}")


CP_LAYOUTS = ("auto", "sequence", "document")
CP_COMM_TYPES = ("p2p", "all_gather", "a2a")  # a2a+p2p needs hierarchical CP groups, which are not built


@dataclass
class ParallelConfig:
    """Model-parallel sizes; data parallelism takes the remaining ranks (world / (tp * pp * cp)).
    The backends' own rules (train/backends/*/config.py, train/backends/megatron/layout.py) are run by
    preflight before any process group exists, and by the planner for every layout it considers."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    sequence_parallel: bool = False
    # Megatron: tensor-parallel size of the experts (1, as megatron-core's MoE recipes and the published
    # 235B layout use): expert_tp * ep * expert-data-parallel = tp * cp * dp ranks of a pipeline stage.
    expert_tp: int = 1
    # Megatron: decoder layers of the first / last pipeline stage (null: an even split); the middle
    # stages split the rest evenly (megatron-core's num_layers_in_first/last_pipeline_stage).
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    # Megatron: virtual pipeline stages per pipeline rank (null: plain 1F1B; megatron-core's
    # virtual_pipeline_model_parallel_size): each rank holds vpp model chunks, run by the interleaved 1F1B
    # schedule (smaller pipeline bubble; micro-batches per step must be a multiple of pp).
    vpp: Optional[int] = None
    # true: at start-up the planner (launch/plan.py) chooses backend and layout for the job's GPUs, per
    # stage; the sizes above are then ignored. The choice is printed and written to <run_dir>/<stage>/.
    auto: bool = False
    # with auto: "" plans for the local CUDA device's memory; "h100" / "h200" plans for that GPU (a CPU
    # machine preparing a cluster run, tests)
    auto_gpu: str = ""
    # Exchange whole micro-batches between the data-parallel ranks of each step so that their vision-tower
    # cost is even (train/parallel/vision_balance.py); the loss and the loader state are unchanged.
    balance_vision: bool = True
    # How context parallelism splits a packed sequence (train/parallel/context.py). "document": every
    # document cut into 2*cp chunks, rank r holding chunks r and 2*cp-1-r of each, documents padded to
    # multiples of 2*cp by the packer: what Transformer Engine's THD context-parallel attention needs.
    # "sequence": the whole packed sequence cut into 2*cp chunks. "auto": document on the Transformer Engine
    # path (megatron on CUDA with TE), sequence otherwise. DeepSpeed (Ulysses) splits contiguously: auto only.
    cp_layout: str = "auto"
    # Megatron with Transformer Engine and cp > 1: how TE's attention exchanges K/V (TransformerConfig
    # cp_comm_type): p2p (ring, overlapped with compute), all_gather, a2a (Ulysses-style head scatter).
    cp_comm_type: str = "p2p"

    def validate(self, prefix: str = "parallel") -> None:
        for key in ("tp", "pp", "cp", "ep", "expert_tp"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)} must be >= 1")
        if self.cp_layout not in CP_LAYOUTS:
            raise ConfigError(f"{prefix}.cp_layout={self.cp_layout!r} is not one of {', '.join(CP_LAYOUTS)}")
        if self.cp_comm_type not in CP_COMM_TYPES:
            raise ConfigError(f"{prefix}.cp_comm_type={self.cp_comm_type!r} is not one of "
                              f"{', '.join(CP_COMM_TYPES)}")
        for key in ("first_stage_layers", "last_stage_layers", "vpp"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{prefix}.{key}={value} must be >= 1 (or null: "
                                  f"{'no virtual stages' if key == 'vpp' else 'an even split'})")

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tp * parallel.pp * "
                              f"parallel.cp = {self.tp}*{self.pp}*{self.cp} = {model_parallel}")
        return world_size // model_parallel


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "longvl"
    entity: Optional[str] = None
    group: Optional[str] = None


@dataclass
class LoggingConfig:
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    plot_loss: bool = True  # loss-curve PNG per stage in the run dir

    def validate(self, prefix: str = "logging") -> None:
        if self.wandb.mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"{prefix}.wandb.mode={self.wandb.mode!r} is not one of offline/online/disabled")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Every rank composes its own config, so nothing here may depend on time or host: the run dir is named
    # by the user (or the pipeline), never by a timestamp.
    run_dir: str = "runs/default"
    # Root of the data sets; data YAMLs refer to it as ${data_root}/<data set>/shard-*.tar.
    data_root: str = "demo_data"
    seed: int = 1234
    # torch threads per rank on the CPU, set before each stage builds its model; 0: the launcher's choice.
    # A config that pins it reproduces its figures by itself: the floating-point sums, and so the results,
    # depend on the thread count (configs/pipeline/needle.yaml).
    cpu_threads: int = 0

    def moe_aux_loss_form(self) -> str:
        """The MoE load-balancing loss form of this run (train/models/qwen3vl/moe.py load_balancing_loss):
        backend.moe_aux_loss, where "auto" is the pooled HF form with pp=1 (identical to transformers') and
        megatron's per-layer form with pp>1 (a pipeline stage only sees its own layers' routers)."""
        if self.backend.moe_aux_loss != "auto":
            return self.backend.moe_aux_loss
        return "per_layer" if self.parallel.pp > 1 else "pooled"

    def validate(self) -> None:
        self.model.validate("model")
        self.stage.validate("stage")
        self.optim.validate("optim")
        self.backend.validate("backend")
        self.parallel.validate("parallel")
        self.logging.validate("logging")
        self.data.validate("data")
        if self.cpu_threads < 0:
            raise ConfigError(f"cpu_threads={self.cpu_threads} must be >= 0 (0: the launcher's choice)")
        if self.pipeline.synth_corpus:
            from data.synth import PRESETS

            if self.pipeline.synth_corpus not in PRESETS:
                raise ConfigError(f"pipeline.synth_corpus={self.pipeline.synth_corpus!r} is not one of "
                                  f"{sorted(PRESETS)} (data.synth presets)")
        if self.pipeline.hf_dtype not in HF_DTYPES:
            raise ConfigError(f"pipeline.hf_dtype={self.pipeline.hf_dtype!r} is not one of {list(HF_DTYPES)}")
        if self.stage.seq_len % (2 * self.parallel.cp):
            raise ConfigError(f"stage.seq_len={self.stage.seq_len} is not divisible by 2 x parallel.cp="
                              f"{2 * self.parallel.cp}")
