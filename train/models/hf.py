"""Import/export of transformers' Qwen3-VL and Qwen3-VL-MoE checkpoints (config.json + safetensors).

Native parameter names are transformers' Qwen3VL(Moe)ForConditionalGeneration state_dict names without the
leading "model." (`visual.*`, `language_model.*`, `lm_head.weight`), same shapes and semantics, so the weight
mapping is a prefix change plus two details:
- tied embeddings: with tie_word_embeddings, HF checkpoints do not store `lm_head.weight`;
- MoE experts: transformers >= 5 holds `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] (our layout) and
  writes them so, but checkpoints written by transformers 4.x (the published Qwen3-VL-MoE weights) hold the
  transposes [E, H, 2I] / [E, I, H]. We accept both, and per-expert tensors (`experts.{e}.gate_proj.weight`
  etc., the Qwen3-MoE text layout some converters write), and always write the transformers-5 layout.
The map is per tensor (`hf_read_plan` -> `HFTensor` per native name; `hf_name` for writing) so loads and
exports can stream one tensor, or one slice, at a time; the whole-state-dict functions loop over it.
This module does not import transformers: it is a test-only dependency of the project.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import torch

from train.config.model import ConfigError, ModelConfig, TextConfig, VisionConfig
from train.models.native_io import (
    DEFAULT_MAX_SHARD_SIZE, EMBED, LM_HEAD, CheckpointError, StateDict, atomic_directory,
    check_state_dict_fits, drop_tied_lm_head, model_config_from_dict, read_safetensors_dir,
    write_safetensors_dir,
)

HF_CONFIG_FILE = "config.json"
HF_PREFIX = "model."
MODEL_TYPES = {False: "qwen3_vl", True: "qwen3_vl_moe"}  # keyed by is_moe
ARCHITECTURES = {False: "Qwen3VLForConditionalGeneration", True: "Qwen3VLMoeForConditionalGeneration"}
# transformers' vision tower hard-codes these; a config asking for others cannot be represented.
HF_VISION_LAYER_NORM_EPS = 1e-6
HF_VISION_ROPE_THETA = 10000.0

_VISION_REQUIRED = ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "spatial_merge_size",
                    "temporal_patch_size", "num_position_embeddings", "deepstack_visual_indexes")
_TEXT_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_TEXT_OPTIONAL = ("num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "attention_bias",
                  "hidden_act")
_MOE_REQUIRED = ("num_experts_per_tok", "moe_intermediate_size")
_MOE_OPTIONAL = ("decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef")
_TOKEN_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


# ---- config.json <-> ModelConfig ----------------------------------------------------------------------

def model_config_from_hf(config: dict, name: str | None = None, source: str = HF_CONFIG_FILE) -> ModelConfig:
    """ModelConfig from a transformers Qwen3-VL / Qwen3-VL-MoE config.json dict (4.x or 5.x spelling)."""
    model_type = _require(config, "model_type", source)
    if model_type not in MODEL_TYPES.values():
        raise ConfigError(f"{source}: model_type={model_type!r} is not one of {sorted(MODEL_TYPES.values())}")
    is_moe = model_type == MODEL_TYPES[True]
    text_hf = _require(config, "text_config", source)
    vision_hf = _require(config, "vision_config", source)
    text = _text_from_hf(text_hf, is_moe, config, f"{source}: text_config")
    vision = _vision_from_hf(vision_hf, text["hidden_size"], f"{source}: vision_config")
    values: dict[str, Any] = {"name": name or model_type, "vision": vision, "text": text}
    values.update({key: _require(config, key, source) for key in _TOKEN_IDS})
    return model_config_from_dict(values, source)


def _text_from_hf(text: dict, is_moe: bool, top: dict, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {key: _require(text, key, where) for key in _TEXT_REQUIRED}
    out.update({key: text[key] for key in _TEXT_OPTIONAL if text.get(key) is not None})
    # transformers' defaults when head_dim is absent: 128 for dense, hidden/heads for MoE.
    out["head_dim"] = text.get("head_dim") or (out["hidden_size"] // out["num_attention_heads"] if is_moe else 128)
    out.update(_rope_from_hf(text, where))
    # The top-level flag is what transformers ties by; 4.x files also repeat it inside text_config.
    out["tie_word_embeddings"] = bool(top.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    if is_moe:
        num_experts = text.get("num_experts", text.get("num_local_experts"))
        if num_experts is None:
            raise ConfigError(f"{where}: num_experts is missing")
        out["num_experts"] = num_experts
        out.update({key: _require(text, key, where) for key in _MOE_REQUIRED})
        out.update({key: text[key] for key in _MOE_OPTIONAL if text.get(key) is not None})
        if text.get("norm_topk_prob") is False:
            raise ConfigError(f"{where}: norm_topk_prob=false is not supported (Qwen3-VL-MoE renormalises top-k)")
    return out


def _rope_from_hf(text: dict, where: str) -> dict[str, Any]:
    # transformers 5 writes rope_parameters; 4.x wrote rope_scaling plus a text-level rope_theta.
    rope = text.get("rope_parameters") or text.get("rope_scaling")
    if not isinstance(rope, dict):
        raise ConfigError(f"{where}: rope_parameters is missing")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{where}: rope_parameters.rope_type={rope_type!r} is not supported (only 'default')")
    if rope.get("mrope_interleaved") is False:
        raise ConfigError(f"{where}: rope_parameters.mrope_interleaved=false (contiguous Qwen2-VL MRoPE) is "
                          "not supported; Qwen3-VL uses interleaved MRoPE")
    theta = rope.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise ConfigError(f"{where}: rope_parameters.rope_theta is missing")
    return {"rope_theta": float(theta), "mrope_section": list(_require(rope, "mrope_section", where))}


def _vision_from_hf(vision: dict, text_hidden: int, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {key: _require(vision, key, where) for key in _VISION_REQUIRED}
    out["deepstack_visual_indexes"] = list(out["deepstack_visual_indexes"])
    for key in ("hidden_act", "in_channels"):
        if vision.get(key) is not None:
            out[key] = vision[key]
    out_hidden = _require(vision, "out_hidden_size", where)
    if out_hidden != text_hidden:
        raise ConfigError(f"{where}: out_hidden_size={out_hidden} differs from text_config.hidden_size="
                          f"{text_hidden}; the merger must project to the LLM width")
    theta = (vision.get("rope_parameters") or {}).get("rope_theta", HF_VISION_ROPE_THETA)
    if theta != HF_VISION_ROPE_THETA:
        raise ConfigError(f"{where}: rope_parameters.rope_theta={theta} is not supported "
                          f"(the vision 2D RoPE uses {HF_VISION_ROPE_THETA})")
    return out


def _require(mapping: dict, key: str, where: str) -> Any:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(mapping).__name__}")
    if mapping.get(key) is None:
        raise ConfigError(f"{where}: required key {key!r} is missing")
    return mapping[key]


def model_config_to_hf(cfg: ModelConfig) -> dict:
    """transformers config.json dict for `cfg` (5.x keys plus the 4.x rope keys; weights use the 5.x layout)."""
    cfg.validate()
    if cfg.vision.layer_norm_eps != HF_VISION_LAYER_NORM_EPS:
        raise ConfigError(f"model.vision.layer_norm_eps={cfg.vision.layer_norm_eps} cannot be exported: "
                          f"transformers' Qwen3-VL vision tower fixes it to {HF_VISION_LAYER_NORM_EPS}")
    if not cfg.text.mrope:
        raise ConfigError("model.text.mrope=false (1-D positions, an ablation) cannot be exported: transformers' "
                          "Qwen3-VL always uses MRoPE")
    is_moe = cfg.text.is_moe
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[is_moe]],
        "model_type": MODEL_TYPES[is_moe],
        "text_config": _text_to_hf(cfg.text, MODEL_TYPES[is_moe]),
        "vision_config": _vision_to_hf(cfg.vision, cfg.text.hidden_size, MODEL_TYPES[is_moe]),
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
    }
    out.update({key: getattr(cfg, key) for key in _TOKEN_IDS})
    return out


def _text_to_hf(text: TextConfig, model_type: str) -> dict[str, Any]:
    keys = _TEXT_REQUIRED + _TEXT_OPTIONAL + ("head_dim", "tie_word_embeddings")
    out: dict[str, Any] = {key: _plain(getattr(text, key)) for key in keys}
    out["model_type"] = f"{model_type}_text"
    rope = {"rope_type": "default", "mrope_section": list(text.mrope_section), "mrope_interleaved": True}
    out["rope_parameters"] = {**rope, "rope_theta": text.rope_theta}
    # transformers 4.x (and tools pinned to it) read these two instead; 5.x folds them into rope_parameters.
    out["rope_scaling"], out["rope_theta"] = rope, text.rope_theta
    if text.is_moe:
        if not text.norm_topk_prob:
            raise ConfigError("model.text.norm_topk_prob=false cannot be exported: transformers' Qwen3-VL-MoE "
                              "always renormalises the top-k router weights")
        out["num_experts"] = text.num_experts
        out.update({key: _plain(getattr(text, key)) for key in _MOE_REQUIRED + _MOE_OPTIONAL})
    return out


def _vision_to_hf(vision: VisionConfig, text_hidden: int, model_type: str) -> dict[str, Any]:
    out: dict[str, Any] = {key: _plain(getattr(vision, key)) for key in _VISION_REQUIRED}
    out.update(hidden_act=vision.hidden_act, in_channels=vision.in_channels, out_hidden_size=text_hidden,
               model_type=f"{model_type}_vision")
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


# ---- per-tensor name and layout map -------------------------------------------------------------------
# One native tensor is stored in an HF checkpoint as:
RENAME = "rename"  # one HF tensor, same layout ("model." + native name; `lm_head.weight` as is)
TRANSPOSED_EXPERTS = "transposed_experts"  # transformers 4.x fused experts [E, H, 2I] / [E, I, H]
PER_EXPERT_GLU = "per_expert_glu"  # per-expert files: experts.{e}.gate_proj / up_proj [I, H] -> gate_up_proj
PER_EXPERT = "per_expert"  # per-expert files: experts.{e}.down_proj [H, I] -> down_proj
_PER_EXPERT_NAME = re.compile(r"^(.+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED_EXPERTS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")

Index = tuple[slice, ...]


class SliceReader(Protocol):
    """What `HFTensor.read` needs of one stored tensor: safetensors' `get_slice` object or a torch.Tensor."""

    def __getitem__(self, index: Index) -> torch.Tensor: ...


@dataclass(frozen=True)
class HFTensor:
    """Which HF tensor(s) one native tensor is made of, and how (one of the layouts above)."""

    native: str
    shape: tuple[int, ...]  # the native shape
    hf_names: tuple[str, ...]  # PER_EXPERT_GLU: gate_0, up_0, gate_1, up_1, ...; PER_EXPERT: down_0, ...
    layout: str = RENAME

    def to_native(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The native tensor from all of its HF tensors (RENAME returns the HF tensor object itself)."""
        if self.layout == RENAME:
            return tensors[0]
        if self.layout == TRANSPOSED_EXPERTS:
            return tensors[0].transpose(1, 2).contiguous()
        if self.layout == PER_EXPERT_GLU:
            return torch.stack([torch.cat(tensors[i:i + 2]) for i in range(0, len(tensors), 2)])
        return torch.stack(list(tensors))

    def read(self, open_tensor: Callable[[str], SliceReader], index: Index | None = None) -> torch.Tensor:
        """`native[index]` reading only that slice of the HF tensors (per-expert layouts: the experts in it)."""
        index = _full_index(index, self.shape)
        if self.layout == RENAME:
            return open_tensor(self.hf_names[0])[index]
        if self.layout == TRANSPOSED_EXPERTS:
            experts, rows, cols = index
            return open_tensor(self.hf_names[0])[experts, cols, rows].transpose(1, 2).contiguous()
        experts = range(*index[0].indices(self.shape[0]))
        if self.layout == PER_EXPERT:
            return torch.stack([open_tensor(self.hf_names[e])[index[1:]] for e in experts])
        rows = []
        for e in experts:  # one expert's [2I, H] at a time: the slice may straddle gate and up
            gate_up = torch.cat([open_tensor(name)[:] for name in self.hf_names[2 * e:2 * e + 2]])
            rows.append(gate_up[index[1:]])
        return torch.stack(rows)


def _full_index(index: Index | None, shape: tuple[int, ...]) -> Index:
    index = tuple(index or ())
    if len(index) > len(shape) or any(not isinstance(s, slice) or s.step not in (None, 1) for s in index):
        raise ValueError(f"index {index} is not a tuple of contiguous slices for shape {list(shape)}")
    return index + (slice(None),) * (len(shape) - len(index))


def hf_name(native: str) -> str:
    """The HF name a native tensor is written under (always the transformers-5 layout)."""
    return native if native == LM_HEAD else HF_PREFIX + native


def hf_names_to_write(cfg: ModelConfig, native: str) -> str | None:
    """HF name of `native` in an export, None for the tied `lm_head.weight` (not stored)."""
    return None if native == LM_HEAD and cfg.text.tie_word_embeddings else hf_name(native)


def hf_read_plan(cfg: ModelConfig, hf_shapes: Mapping[str, Sequence[int]], source: str = "HF checkpoint",
                 legacy_expert_layout: bool = False) -> dict[str, HFTensor]:
    """Native name -> how to read it from HF tensors of these names and shapes (a checkpoint's headers).

    Tied models get `lm_head.weight` from the embedding. `legacy_expert_layout` resolves the fused expert
    layout when shapes cannot (hidden == 2 * moe_intermediate or hidden == moe_intermediate): true for
    files written by transformers 4.x. Shapes are not checked against `cfg` here (check_state_dict_fits).
    """
    plan: dict[str, HFTensor] = {}
    per_expert: dict[tuple[str, str], dict[int, str]] = {}
    for key, shape in hf_shapes.items():
        expert = _PER_EXPERT_NAME.match(key)
        if expert is not None and key.startswith(HF_PREFIX):
            prefix, index, proj = expert.groups()
            per_expert.setdefault((prefix[len(HF_PREFIX):], proj), {})[int(index)] = key
        elif key == LM_HEAD or key.startswith(HF_PREFIX):
            native = key if key == LM_HEAD else key[len(HF_PREFIX):]
            plan[native] = _fused_or_renamed(cfg, native, key, tuple(shape), legacy_expert_layout)
        else:
            raise CheckpointError(f"{source}: tensor {key!r} is neither 'model.*' nor {LM_HEAD!r}")
    for (prefix, proj), by_index in per_expert.items():
        if proj != "down":
            gates, ups = per_expert.get((prefix, "gate"), {}), per_expert.get((prefix, "up"), {})
            if proj == "up" and gates:
                continue  # planned with its gate
            plan[prefix + ".gate_up_proj"] = _per_expert(source, prefix, hf_shapes, [gates, ups], PER_EXPERT_GLU)
        else:
            plan[prefix + ".down_proj"] = _per_expert(source, prefix, hf_shapes, [by_index], PER_EXPERT)
    embed = plan.get(EMBED)
    if LM_HEAD not in plan and embed is not None and cfg.text.tie_word_embeddings:
        plan[LM_HEAD] = HFTensor(LM_HEAD, embed.shape, embed.hf_names)
    if LM_HEAD not in plan and not cfg.text.tie_word_embeddings:
        raise CheckpointError(f"{source}: tie_word_embeddings is false but {LM_HEAD!r} is missing")
    return plan


def _fused_or_renamed(cfg: ModelConfig, native: str, key: str, shape: tuple[int, ...], legacy: bool) -> HFTensor:
    if not (cfg.text.is_moe and native.endswith(_FUSED_EXPERTS)) or len(shape) != 3:
        return HFTensor(native, shape, (key,))
    experts, hidden, inter = cfg.text.num_experts, cfg.text.hidden_size, cfg.text.moe_intermediate_size
    current = (experts, 2 * inter, hidden) if native.endswith(_FUSED_EXPERTS[0]) else (experts, hidden, inter)
    transposed = (current[0], current[2], current[1])
    if shape == transposed and (legacy or current != transposed):
        return HFTensor(native, current, (key,), TRANSPOSED_EXPERTS)
    return HFTensor(native, shape, (key,))


def _per_expert(source: str, prefix: str, hf_shapes: Mapping[str, Sequence[int]], parts: list[dict[int, str]],
                layout: str) -> HFTensor:
    count = len(parts[0])
    for by_index in parts:
        if sorted(by_index) != list(range(count)):
            raise CheckpointError(f"{source}: per-expert tensors of {HF_PREFIX}{prefix} hold experts "
                                  f"{sorted(by_index)[:8]}, not 0..{count - 1} for each projection")
    names = tuple(by_index[e] for e in range(count) for by_index in parts)
    first = tuple(hf_shapes[names[0]])
    rows = sum(tuple(hf_shapes[n])[0] for n in names[:len(parts)])
    native = prefix + (".gate_up_proj" if layout == PER_EXPERT_GLU else ".down_proj")
    return HFTensor(native, (count, rows, *first[1:]), names, layout)


# ---- state dicts (thin loops over the per-tensor map) -------------------------------------------------

def hf_to_native_state_dict(cfg: ModelConfig, hf_state_dict: StateDict, source: str = "HF state dict",
                            legacy_expert_layout: bool = False) -> StateDict:
    """Native state dict (with `lm_head.weight`, tied or not) from an HF checkpoint's tensors."""
    shapes = {key: tuple(tensor.shape) for key, tensor in hf_state_dict.items()}
    plan = hf_read_plan(cfg, shapes, source, legacy_expert_layout)
    return {native: entry.to_native([hf_state_dict[k] for k in entry.hf_names]) for native, entry in plan.items()}


def native_to_hf_state_dict(cfg: ModelConfig, state_dict: StateDict) -> StateDict:
    """HF on-disk state dict: "model." prefix, and no `lm_head.weight` when embeddings are tied."""
    on_disk = drop_tied_lm_head(state_dict, cfg.text.tie_word_embeddings, EMBED, LM_HEAD)
    return {hf_name(key): tensor for key, tensor in on_disk.items()}


# ---- checkpoint directories ---------------------------------------------------------------------------

def load_hf_checkpoint(directory: str | Path) -> tuple[ModelConfig, StateDict]:
    """(ModelConfig, native state dict) from a transformers Qwen3-VL(-MoE) directory."""
    cfg, config = read_hf_config(directory)
    state_dict = hf_to_native_state_dict(cfg, read_safetensors_dir(directory), str(directory),
                                         legacy_expert_layout=written_by_transformers_4(config))
    check_state_dict_fits(cfg, state_dict, source=str(directory))
    return cfg, state_dict


def read_hf_config(directory: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the raw config.json dict) of a transformers Qwen3-VL(-MoE) directory."""
    directory = Path(directory)
    config_path = directory / HF_CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: not found (not a transformers model directory?)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from None
    return model_config_from_hf(config, name=directory.resolve().name, source=str(config_path)), config


def written_by_transformers_4(config: dict) -> bool:
    """Whether config.json says transformers 4.x wrote the directory (its fused experts are transposed)."""
    major = re.match(r"\d+", str(config.get("transformers_version", "")))
    return major is not None and int(major.group()) < 5


def save_hf_checkpoint(directory: str | Path, cfg: ModelConfig, state_dict: StateDict, *, force: bool = False,
                       max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a transformers-loadable directory atomically (config.json + safetensors, sharded if large)."""
    model_config_to_hf(cfg)  # refuse what transformers cannot represent before any work
    check_state_dict_fits(cfg, state_dict, source="state dict to export")
    hf_state_dict = native_to_hf_state_dict(cfg, state_dict)
    with atomic_directory(directory, force=force) as tmp:
        write_hf_config(tmp, cfg, [t.dtype for t in hf_state_dict.values()])
        write_safetensors_dir(tmp, hf_state_dict, max_shard_size)
    return Path(directory)


def write_hf_config(directory: Path, cfg: ModelConfig, dtypes: Iterable[torch.dtype]) -> None:
    """config.json for `cfg`; its `dtype` is the most common floating dtype of the weights."""
    config = model_config_to_hf(cfg)
    floats = [dtype for dtype in dtypes if dtype.is_floating_point]
    dtype = max(set(floats), key=floats.count) if floats else torch.float32
    config["dtype"] = str(dtype).removeprefix("torch.")
    (directory / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
