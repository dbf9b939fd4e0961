"""Per-rank memory of building + loading a published-size model, and of exporting it, in sharded layouts.

(a) Build + load `qwen3vl_2b` (bf16) from a sharded HF checkpoint whose random weights transformers makes in
    this run (no download), through each backend's own construction (meta device / deepspeed.zero.Init,
    then each rank's slices read from the checkpoint by train.models.checkpoint_sources):
      megatron_1          1 rank
      megatron_tp2        2 ranks, TP=2
      megatron_tp2_pp2    4 ranks, TP=2 x PP=2, first/last stage layers as the planner balances them by bytes
                          (launch/planner/stages.py; qwen3vl_2b: 10 / 18, the first stage holds the ViT)
      megatron_tp2_ep2    2 ranks, TP=2 dense x EP=2 experts, on a 2B-class MoE shape of our own (MOE_SHAPE)
      deepspeed_z3_dp2    2 ranks, ZeRO-3
      deepspeed_z3_dp4    4 ranks, ZeRO-3
    Each rank measures its peak RSS during the backend's model build (`_build_model`, megatron's
    `_build_chunk`) above its RSS just before (the process baseline: interpreter, torch,
    megatron/deepspeed, process groups; reported separately):
    `RESULT scale_build_peak_over_shard_<layout>` = max over ranks of that peak / (model bytes / ranks).
(b) In megatron_tp2 and deepspeed_z3_dp2 the model as loaded is exported to an HF directory (bf16) by
    Backend.export_tensors' iterators and train.export.write_model_dir: `RESULT scale_export_peak_gib_<layout>`
    (the writing rank's peak above its baseline) against 1.3 x shard + 1 GiB; the export must equal the
    checkpoint it was loaded from bitwise and load with transformers (checked here, in a subprocess).
The optimizer is not built (the measured process stops after the model): a training step of the 2B model
does not fit this machine; tests cover weights after steps on the tiny model.

`--model tiny` runs the same code path on the tiny model (tests/dist/test_scale_memory.py): equality and
transformers loading are asserted there too; the memory bounds only mean something at 2B size.
Needs ~10 GB free for qwen3vl_2b (checked first). Usage: python bench/scale_memory.py [--model tiny]
[--layouts a,b] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common  # noqa: F401 - puts the repo root on sys.path
from common import ALLOCATOR_ENV, ROOT, PeakMemory, append_section, print_results, status_kib

GIB = 1024 ** 3
LAYOUTS = {  # name: (ranks, backend, parallel sizes, zero stage, MoE shape)
    "megatron_1": (1, "megatron", {}, 0, False),
    "megatron_tp2": (2, "megatron", {"tp": 2}, 0, False),
    "megatron_tp2_pp2": (4, "megatron", {"tp": 2, "pp": 2}, 0, False),
    "megatron_tp2_ep2": (2, "megatron", {"tp": 2, "ep": 2}, 0, True),
    "deepspeed_z3_dp2": (2, "deepspeed", {}, 3, False),
    "deepspeed_z3_dp4": (4, "deepspeed", {}, 3, False),
}
EXPORTED = ("megatron_tp2", "deepspeed_z3_dp2")
# Ours: qwen3vl_2b's vision tower and width, 16 MoE layers of 8 experts (top-2), ~1.8B parameters.
MOE_SHAPE = {"num_hidden_layers": 16, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 1024,
             "decoder_sparse_step": 1}
BUILD_BOUND, EXPORT_FACTOR, EXPORT_SLACK = 1.3, 1.3, 1 * GIB
FREE_GIB_NEEDED = {"qwen3vl_2b": 10, "tiny": 1}


def model_config(name: str, moe: bool):
    from train.models.native_io import load_model_config_yaml

    cfg = load_model_config_yaml(ROOT / "configs" / "model" / f"{name}.yaml")
    if moe:
        for key, value in MOE_SHAPE.items():
            setattr(cfg.text, key, value)
        cfg.name = f"{name}_moe"
        cfg.validate()
    return cfg


def model_bytes(cfg) -> int:
    """bf16 bytes of every stored tensor (a tied head counted once)."""
    import torch

    from train.export import planned_specs

    return sum(spec.nbytes for spec in planned_specs(cfg, "native", torch.bfloat16).values())


# ---------------------------------------------------------------------------------- the HF checkpoint
def make_hf(directory: str, name: str, moe: bool) -> None:
    """A random bf16 transformers Qwen3-VL(-MoE) saved sharded (500 MB files): made by transformers."""
    import torch
    import transformers

    from train.models.hf import model_config_to_hf

    cfg = model_config(name, moe)
    values = model_config_to_hf(cfg)
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    kind = "Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"
    model = getattr(transformers, kind)(config)
    model.save_pretrained(directory, max_shard_size="500MB")


def load_with_transformers(directory: str, moe: bool) -> None:
    import torch
    import transformers

    kind = "Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"
    model = getattr(transformers, kind).from_pretrained(directory, dtype=torch.bfloat16)
    print(f"transformers loaded {sum(p.numel() for p in model.parameters())} parameters", flush=True)


def same_tensors(a: Path, b: Path) -> list[str]:
    """Names whose tensors differ (dtype, shape or any bit) between two safetensors directories, plus names
    only one side has; read one tensor at a time."""
    import torch

    from train.models.checkpoint_sources import read_directory

    stored_a, stored_b = read_directory(a), read_directory(b)
    bad = sorted(set(stored_a) ^ set(stored_b))
    for name in sorted(set(stored_a) & set(stored_b)):
        x, y = stored_a[name][None], stored_b[name][None]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            bad.append(name)
    return bad


# ---------------------------------------------------------------------------------- one torchrun rank
class _Built(Exception):
    """Raised after the measured build (and export): the optimizer is not built."""


def planned_stage_split(cfg, ranks: int) -> tuple[int | None, int | None]:
    """The planner's first/last stage layer counts for this layout, balanced by parameter-state bytes (this
    bench builds and loads, it does not train: no activations; None: even or pp=1)."""
    from launch.plan import configured_layout
    from launch.planner.model_stats import model_stats
    from launch.planner.stages import balanced_stage_split

    layout = balanced_stage_split(cfg, model_stats(cfg.model), configured_layout(cfg, ranks), activations=False)
    return layout.first, layout.last


def worker(layout: str, name: str, hf_dir: str, export_dir: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    ranks, backend_name, sizes, zero, moe = LAYOUTS[layout]
    from train.backends import build_backend
    from train.config.schema import TrainConfig
    from train.export import write_model_dir
    from train.models.checkpoint_sources import open_model_dir

    cfg = TrainConfig()
    cfg.model = model_config(name, moe)
    cfg.backend.name, cfg.backend.precision, cfg.backend.zero_stage = backend_name, "bf16", zero
    for key, value in sizes.items():
        setattr(cfg.parallel, key, value)
    if backend_name == "megatron":
        cfg.parallel.first_stage_layers, cfg.parallel.last_stage_layers = planned_stage_split(cfg, ranks)
    if backend_name == "deepspeed":
        from train.backends.deepspeed.backend import DeepSpeedBackend as Backend
        from train.backends.deepspeed.weights import iter_native

        def tensors(model):
            return iter_native(model, zero == 3, None)
    else:
        from train.backends.megatron.backend import MegatronBackend as Backend
        from train.backends.megatron.weights import iter_native

        def tensors(model):
            return iter_native(model, cfg.model)
    figures: dict = {"rank": dist.get_rank(),
                     "stage_layers": [cfg.parallel.first_stage_layers, cfg.parallel.last_stage_layers]}
    # The method that builds (and fills) this rank's model: megatron builds one chunk per virtual pipeline stage
    # (the bench's layouts have none, so the one call builds the rank's whole stage).
    hook = "_build_model" if backend_name == "deepspeed" else "_build_chunk"
    build = getattr(Backend, hook)

    def measured_build(self, *args):
        figures["baseline_mib"] = status_kib("VmRSS") / 1024
        with PeakMemory() as peak:
            model = build(self, *args)
        figures["build_extra_mib"] = peak.extra_mib
        held = [getattr(p, "ds_tensor", p) for p in model.parameters()]  # ZeRO-3: the partition
        figures["local_param_mib"] = sum(t.numel() * t.element_size() for t in held) / 2**20
        dist.barrier()
        if layout in EXPORTED:
            with PeakMemory() as peak:
                write_model_dir(export_dir, cfg.model, tensors(model), fmt="hf", dtype=torch.bfloat16,
                                writer=dist.get_rank() == 0, max_shard_size="500MB")
            figures["export_peak_above_baseline_mib"] = peak.peak_mib - figures["baseline_mib"]
        raise _Built

    setattr(Backend, hook, measured_build)
    try:
        build_backend(cfg, weights=open_model_dir(hf_dir)[1])
    except _Built:
        pass
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, figures)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(everyone))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------- the driver
def run(cmd: list[str], env: dict | None = None) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def measure(name: str, layouts: list[str], work: Path) -> tuple[dict[str, float], list[str], list[str]]:
    """(figures, failures, notes). Memory bounds are failures at published sizes only (not for `tiny`)."""
    figures: dict[str, float] = {}
    failures, notes = [], []
    me = str(Path(__file__).resolve())
    env = {**ALLOCATOR_ENV, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for moe in sorted({LAYOUTS[layout][4] for layout in layouts}):
        run([sys.executable, me, "_make_hf", str(work / f"hf_moe{int(moe)}"), name] + (["--moe"] if moe else []),
            env)
    for layout in layouts:
        ranks, _, _, _, moe = LAYOUTS[layout]
        hf_dir, export_dir, out = work / f"hf_moe{int(moe)}", work / f"export_{layout}", work / f"{layout}.json"
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", me,
             "_worker", layout, name, str(hf_dir), str(export_dir), str(out)], env)
        per_rank = json.loads(out.read_text())
        shard = model_bytes(model_config(name, moe)) / ranks
        ratio = max(r["build_extra_mib"] * 2**20 for r in per_rank) / shard
        figures[f"scale_build_peak_over_shard_{layout}"] = ratio
        figures[f"scale_baseline_mib_{layout}"] = max(r["baseline_mib"] for r in per_rank)
        first, last = per_rank[0]["stage_layers"]
        split = "" if first is None else f", first/last stage layers {first}/{last}"
        notes.append(f"{layout}: shard {shard / 2**20:.0f} MiB (model bytes / {ranks}){split}; per rank: " + ", ".join(
            f"r{r['rank']} baseline {r['baseline_mib']:.0f} MiB, build peak +{r['build_extra_mib']:.0f} MiB, "
            f"holds {r['local_param_mib']:.0f} MiB" for r in per_rank))
        if ratio > BUILD_BOUND and name != "tiny":
            failures.append(f"{layout}: build peak / shard {ratio:.3f} > {BUILD_BOUND}")
        if layout in EXPORTED:
            writer = per_rank[0]["export_peak_above_baseline_mib"] * 2**20
            bound = EXPORT_FACTOR * shard + EXPORT_SLACK
            figures[f"scale_export_peak_gib_{layout}"] = writer / GIB
            figures[f"scale_export_bound_gib_{layout}"] = bound / GIB
            if writer > bound and name != "tiny":
                failures.append(f"{layout}: export peak {writer / GIB:.2f} GiB > {bound / GIB:.2f} GiB")
            bad = same_tensors(hf_dir, export_dir)
            figures[f"scale_export_tensors_differing_{layout}"] = len(bad)
            if bad:
                failures.append(f"{layout}: export differs from the loaded checkpoint in {bad[:3]}")
            run([sys.executable, me, "_load_hf", str(export_dir)] + (["--moe"] if moe else []), env)
    return figures, failures, notes


def free_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_make_hf":
        make_hf(argv[1], argv[2], "--moe" in argv)
        return 0
    if argv and argv[0] == "_worker":
        worker(*argv[1:6])
        return 0
    if argv and argv[0] == "_load_hf":
        load_with_transformers(argv[1], "--moe" in argv)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen3vl_2b", choices=sorted(FREE_GIB_NEEDED))
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args(argv)
    layouts = args.layouts.split(",")
    unknown = [layout for layout in layouts if layout not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layout(s) {unknown}; known: {list(LAYOUTS)}")
    if free_gib() < FREE_GIB_NEEDED[args.model]:
        print(f"scale_memory: {free_gib():.1f} GiB available, {args.model} needs {FREE_GIB_NEEDED[args.model]}: "
              "run it when the machine is free", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="scale_memory_") as work:
        figures, failures, notes = measure(args.model, layouts, Path(work))
    print_results(figures)
    for line in notes + [f"FAIL {f}" for f in failures]:
        print(line, flush=True)
    if not args.no_write:
        append_section(f"Build/load/export memory per rank, {args.model} (bench/scale_memory.py)",
                       [f"- {k}: {v:.4g}" for k, v in figures.items()] + [""] + [f"- {n}" for n in notes]
                       + ["", "FAILED: " + "; ".join(failures) if failures else "All bounds met."])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
