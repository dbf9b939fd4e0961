"""Training-step throughput (real tokens/s of forward + backward + AdamW step): longvl vs transformers.

Both train on the SAME documents, in the same process with the same threads, repetitions interleaved
(A-B, then B-A, ...) so machine noise hits both alike:
  longvl: the documents of a step best-fit packed into one sequence (data.packing), the native Qwen3VLModel
          with cu_seqlens attention, and the shared chunked token-weighted loss, through the DeepSpeed
          backend's LossModule (embed -> decode -> chunked loss in one forward), torch AdamW.
  HF:     transformers' Qwen3VLForConditionalGeneration (sdpa attention, its default) on the same documents
          as one batch padded to the longest (right padding, attention_mask, mm_token_type_ids, labels),
          its own loss, torch AdamW; weights copied from the native model.
Only real (non-pad) tokens count, for both: tokens/s = real tokens of the step's documents / step time.
The documents are a synthetic pretraining mix (bench/common.py: text, captioned images, interleaved, short
videos; log-normal lengths); the first sequences of the packer (while its buffer fills) are skipped.

Configs: `tiny` (configs/model/tiny.yaml) and `m100` (~100M parameters, defined below). Prints
`RESULT train_tokens_per_s_<cfg>[_hf]`, `RESULT train_tokens_per_s_ratio_vs_hf_<cfg>` and
`RESULT train_tokens_per_s_ratio_vs_hf` (the m100 ratio: the more realistic size) and appends to
bench/RESULTS.md. `--profile` prints the top ops of one step of each side (torch profiler).
Usage: python bench/train_throughput.py [--configs tiny,m100] [--reps N] [--no-write]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

import common  # noqa: F401 - puts the repo root on sys.path
from common import MACHINE, ROOT, append_section, document_stream, median, pack, print_results, real_tokens

from data.batch import IGNORE_INDEX, Document, PackedBatch  # noqa: E402
from train.backends.deepspeed.module import LossModule  # noqa: E402
from train.config.model import ModelConfig, TextConfig, VisionConfig  # noqa: E402
from train.loss import global_weight_sum  # noqa: E402
from train.models.hf import model_config_to_hf  # noqa: E402
from train.models.native_io import load_model_config_yaml  # noqa: E402
from train.models.qwen3vl import Qwen3VLModel  # noqa: E402

PAD_ID = 0


def m100_config() -> ModelConfig:
    """~100M parameters: a 12 x 768 Qwen3 LLM (GQA 12/4, head 64), a 4-block 256-wide ViT, 16K vocab."""
    tiny = load_model_config_yaml(ROOT / "configs" / "model" / "tiny.yaml")
    vision = VisionConfig(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, patch_size=16,
                          num_position_embeddings=256, deepstack_visual_indexes=[1, 2, 3])
    text = TextConfig(vocab_size=16384, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, head_dim=64, rope_theta=1_000_000.0,
                      mrope_section=[12, 10, 10], max_position_embeddings=262144, tie_word_embeddings=False)
    return ModelConfig(name="m100", vision=vision, text=text, image_token_id=tiny.image_token_id,
                       video_token_id=tiny.video_token_id, vision_start_token_id=tiny.vision_start_token_id,
                       vision_end_token_id=tiny.vision_end_token_id)


@dataclass
class Setting:
    name: str
    cfg: ModelConfig
    seq_len: int  # tokens per packed step (documents are at most this long)
    steps: int  # distinct batches per repetition
    reps: int  # interleaved repetitions (default; --reps overrides)


def settings(names: list[str]) -> list[Setting]:
    known = {"tiny": Setting("tiny", load_model_config_yaml(ROOT / "configs" / "model" / "tiny.yaml"), 8192, 3, 5),
             "m100": Setting("m100", m100_config(), 2048, 1, 3)}
    return [known[n] for n in names]


# ------------------------------------------------------------------------------------------ models
def build_pair(cfg: ModelConfig, seed: int = 0) -> tuple[Qwen3VLModel, torch.nn.Module]:
    """The native model and transformers' model with the same weights (fp32, train mode)."""
    import transformers

    torch.manual_seed(seed)
    native = Qwen3VLModel(cfg).train()
    hf_cfg = transformers.Qwen3VLConfig(**model_config_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"  # transformers' default when torch has SDPA: its usual path
    hf = transformers.Qwen3VLForConditionalGeneration(hf_cfg).float().train()
    state = {k if k == "lm_head.weight" else "model." + k: v for k, v in native.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    return native, hf


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)


# ------------------------------------------------------------------------------------------ inputs
def hf_inputs(docs: list[Document], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The documents as one right-padded batch in transformers' format (labels unshifted: HF shifts)."""
    longest = max(len(d) for d in docs)
    ids = torch.full((len(docs), longest), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(docs), longest, dtype=torch.long)
    labels = torch.full((len(docs), longest), IGNORE_INDEX, dtype=torch.long)
    for row, d in enumerate(docs):
        n = len(d)
        ids[row, :n], mask[row, :n] = d.input_ids, 1
        labels[row, :n] = torch.where(d.target_mask, d.input_ids, IGNORE_INDEX)
    mm = (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()
    out = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, labels=labels)
    for key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        parts = [(getattr(d, key), getattr(d, grid_key)) for d in docs if getattr(d, grid_key) is not None]
        if parts:
            out[key] = torch.cat([p for p, _ in parts])
            out[grid_key] = torch.cat([g for _, g in parts])
    return out


def native_step(module: LossModule, opt: torch.optim.Optimizer, batch: PackedBatch) -> float:
    total = global_weight_sum([(batch.labels, batch.loss_weights)])
    objective, *_ = module(batch, total, 1, 1.0)
    objective.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(objective.detach())


def hf_step(hf: torch.nn.Module, opt: torch.optim.Optimizer, inputs: dict[str, torch.Tensor]) -> float:
    loss = hf(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def profile_once(label: str, fn, *args, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args)
    print(f"--- profile: {label} (self CPU time) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)


# ------------------------------------------------------------------------------------------ run
def run_setting(s: Setting, reps: int, profile: bool, skip: int = 8) -> dict[str, float]:
    native, hf = build_pair(s.cfg)
    params = sum(p.numel() for p in native.parameters())
    module, native_opt, hf_opt = LossModule(native), adamw(native), adamw(hf)
    packed = pack(document_stream(s.cfg, s.seq_len, seed=1), s.seq_len, skip + s.steps + 1, PAD_ID)
    warm, work = packed[skip], packed[skip + 1:]
    batches = [(b, hf_inputs(docs, s.cfg), docs) for b, docs in work]
    tokens = sum(real_tokens(b) for b, _, _ in batches)
    padded = sum(inp["input_ids"].numel() for _, inp, _ in batches)
    print(f"[{s.name}] {params / 1e6:.1f}M parameters, {torch.get_num_threads()} threads, {len(batches)} steps of "
          f"{s.seq_len} tokens per repetition: {tokens} real tokens, HF pads them to {padded} "
          f"({sum(len(d) for _, _, ds in batches for d in ds) / padded:.2f} real)", flush=True)
    native_step(module, native_opt, warm[0])  # first-call costs (thread pools, lazy kernels) out of the timing
    hf_step(hf, hf_opt, hf_inputs(warm[1], s.cfg))
    if profile:
        profile_once(f"{s.name} longvl", native_step, module, native_opt, batches[0][0])
        profile_once(f"{s.name} HF", hf_step, hf, hf_opt, batches[0][1])
    native_rates, hf_rates, ratios = [], [], []
    for rep in range(reps):
        t_native = t_hf = 0.0
        for batch, inputs, _ in batches:
            order = ("native", "hf") if rep % 2 == 0 else ("hf", "native")  # A-B / B-A alternation
            for side in order:
                if side == "native":
                    t_native += timed(native_step, module, native_opt, batch)
                else:
                    t_hf += timed(hf_step, hf, hf_opt, inputs)
        native_rates.append(tokens / t_native)
        hf_rates.append(tokens / t_hf)
        ratios.append(t_hf / t_native)
        print(f"[{s.name}] rep {rep}: longvl {tokens / t_native:8.0f} tok/s ({t_native:.2f} s), "
              f"HF {tokens / t_hf:8.0f} tok/s ({t_hf:.2f} s), ratio {t_hf / t_native:.2f}", flush=True)
    return {f"train_tokens_per_s_{s.name}": median(native_rates),
            f"train_tokens_per_s_{s.name}_hf": median(hf_rates),
            f"train_tokens_per_s_ratio_vs_hf_{s.name}": median(ratios),
            f"train_hf_padding_real_fraction_{s.name}": tokens / padded,
            f"train_params_millions_{s.name}": params / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,m100")
    parser.add_argument("--reps", type=int, default=None)
    # One thread by default: this machine's 2 cores are shared with other jobs (load 4-7), and with 2
    # OpenMP threads a step's time swings 5x (one thread spin-waits for the other, descheduled one);
    # at 1 thread the same step repeats within ~20%. Both sides always get the same thread count.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    names = args.configs.split(",")
    torch.set_num_threads(args.threads)
    figures: dict[str, float] = {}
    for s in settings(names):
        figures.update(run_setting(s, args.reps or s.reps, args.profile))
    headline = "m100" if "m100" in names else names[0]
    figures["train_tokens_per_s_ratio_vs_hf"] = figures[f"train_tokens_per_s_ratio_vs_hf_{headline}"]
    if not args.no_write:
        lines = ["Training step (forward + backward + AdamW) on the same documents, same process and threads, "
                 f"{args.threads} thread(s), interleaved repetitions A-B/B-A (medians): longvl packed (cu_seqlens, chunked loss) vs "
                 "transformers Qwen3VLForConditionalGeneration (sdpa) on the documents padded to the longest. "
                 "Real (non-pad) tokens only. Synthetic mix (bench/common.py). "
                 f"Headline ratio = {headline}. Machine: {MACHINE}.", ""]
        lines += [f"- {name}: {value:.4g}" for name, value in figures.items()]
        append_section("Training throughput (bench/train_throughput.py)", lines)
    print_results(figures)


if __name__ == "__main__":
    main()
