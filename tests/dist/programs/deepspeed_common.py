"""Shared pieces of the DeepSpeed torchrun programs: a global batch of PackedBatches with
images, a video and a text-only sequence (built by hand, not by the loader), the TrainConfig, and the
single-process reference training loop (plain Qwen3VLModel + torch AdamW + the shared loss)."""
from __future__ import annotations

import math
import os
import sys

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
for extra in (REPO, os.path.join(REPO, "tests", "unit")):
    if extra not in sys.path:
        sys.path.insert(0, extra)

from data.batch import IGNORE_INDEX, PackedBatch  # noqa: E402
from model_fixtures import (image_span, random_pixels, randomize_constant_parameters, tiny_dense_config,  # noqa: E402
                            tiny_moe_config)
from train.config.schema import TrainConfig  # noqa: E402
from train.loss import micro_batch_loss, supervised_weights  # noqa: E402
from train.models.qwen3vl import Qwen3VLModel  # noqa: E402
from data.positions import packed_position_ids  # noqa: E402
from train.optim import learning_rate, param_groups, set_learning_rate  # noqa: E402
from train.models.weight_source import RandomInit  # noqa: E402

SEQ = 64


def make_config(moe: bool = False, zero_stage: int = 1, cp: int = 1, ep: int = 1, batch: int = 4,
                precision: str = "fp32") -> TrainConfig:
    cfg = TrainConfig()
    cfg.model = tiny_moe_config(num_experts=4) if moe else tiny_dense_config()
    cfg.backend.precision, cfg.backend.zero_stage = precision, zero_stage
    cfg.parallel.cp, cfg.parallel.ep = cp, ep
    cfg.stage.seq_len, cfg.stage.global_batch_size, cfg.stage.max_steps = SEQ, batch, 10
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, cfg.optim.schedule = 2e-3, 2e-4, 2, "cosine"
    cfg.optim.grad_clip = 0.5  # low enough that clipping is active in the compared steps
    # Adam divides by sqrt(v) + eps: for parameters whose gradient is pure rounding noise (e.g. embedding rows
    # that summation order cancels to ~1e-9) eps=1e-8 turns noise into lr-sized steps; 1e-6 keeps the
    # comparison about the layouts, not about noise amplification.
    cfg.optim.eps = 1e-6
    return cfg


def _document(cfg, text: list[int], image: list[int] | None, tail: list[int], gen) -> tuple:
    """(tokens, grid rows) of one document: text, optionally an image span, more text."""
    tokens = list(text)
    grids = []
    if image is not None:
        tokens += image_span(image, cfg)
        grids.append(image)
    tokens += tail
    return tokens, grids


def packed_batch(cfg, docs: list[tuple[list[int], list[list[int]]]], source_ids: list[int], seed: int,
                 document_multiple: int = 1) -> PackedBatch:
    """One sequence of SEQ tokens from documents (padded with a last segment); sqrt loss weights. With
    document_multiple > 1 every document is followed by pad tokens (no target) up to a multiple of it, inside
    its segment: the per-document context-parallel layout."""
    ids, bounds, labels, weights, sources, grids = [], [0], [], [], [], []
    for (tokens, doc_grids), source in zip(docs, source_ids):
        vision = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id}
        targets = [t if t not in vision else IGNORE_INDEX for t in tokens[1:]] + [IGNORE_INDEX]
        supervised = sum(t != IGNORE_INDEX for t in targets)
        extra = -len(tokens) % document_multiple
        ids += tokens + [0] * extra
        labels += targets + [IGNORE_INDEX] * extra
        weights += [1.0 / math.sqrt(supervised) if t != IGNORE_INDEX else 0.0 for t in targets] + [0.0] * extra
        sources += [source] * len(tokens) + [-1] * extra
        grids += doc_grids
        bounds.append(len(ids))
    pad = SEQ - len(ids)
    assert pad >= 0, f"documents use {len(ids)} > {SEQ} tokens"
    if pad:
        ids += [0] * pad
        labels += [IGNORE_INDEX] * pad
        weights += [0.0] * pad
        sources += [-1] * pad
        bounds.append(SEQ)
    input_ids, cu = torch.tensor(ids), torch.tensor(bounds, dtype=torch.int32)
    pixels, grid = random_pixels(grids, cfg, seed=seed) if grids else (None, None)
    positions = packed_position_ids(input_ids, cu, grid, None, image_token_id=cfg.image_token_id,
                                    video_token_id=cfg.video_token_id,
                                    spatial_merge_size=cfg.vision.spatial_merge_size)
    return PackedBatch(input_ids=input_ids, position_ids=positions, cu_seqlens=cu, labels=torch.tensor(labels),
                       loss_weights=torch.tensor(weights), source_ids=torch.tensor(sources),
                       pixel_values=pixels, image_grid_thw=grid, num_pad=SEQ - sum(len(t) for t, _ in docs),
                       doc_keys=[f"doc{i}" for i in range(len(docs))])


def global_batch(cfg, step: int, document_multiple: int = 1) -> list[PackedBatch]:
    """Four sequences: text-only, images (one straddles the middle of the sequence: the CP=2 boundary),
    text-only, one image. Ranks take batches[rank::world], so rank 0 sees only text and rank 1 images.
    document_multiple 4 (per-document CP=2 split): documents padded to multiples of 4, some text a little
    shorter so that they still fit; the image then straddles the boundary of two ranks' chunks of its
    document (chunks of 11 tokens: the image holds positions 18..35)."""
    gen = torch.Generator().manual_seed(100 + step)
    padded = document_multiple > 1

    def text(n: int) -> list[int]:
        return torch.randint(10, 240, (n,), generator=gen).tolist()

    text_only = [(text(19 if padded else 20), []), (text(27 if padded else 30), []), (text(13 if padded else 14), [])]
    # Image grid [1, 8, 8] = 16 merged tokens + start/end = 18 tokens at positions 20..37 (straddles 32).
    straddling = _document(cfg, text(18 if padded else 20), [1, 8, 8], text(8), gen)
    small = _document(cfg, text(5), [1, 4, 4], text(6), gen)  # 4 merged tokens
    batches = [
        packed_batch(cfg, text_only, [0, 0, 1], seed=step, document_multiple=document_multiple),
        packed_batch(cfg, [straddling, small], [2, 2], seed=1000 + step, document_multiple=document_multiple),
        packed_batch(cfg, [(text(40), []), (text(20), [])], [1, 0], seed=step, document_multiple=document_multiple),
        packed_batch(cfg, [small, (text(15), [])], [2, 1], seed=2000 + step, document_multiple=document_multiple),
    ]
    return batches


def reference_training(cfg, init_state: dict, steps: list[list[PackedBatch]],
                       lr_steps: list[int] | None = None) -> tuple[list[float], dict]:
    """One process, plain PyTorch: the same objective, AdamW, LR schedule and global-norm clipping; no
    collectives (it runs inside the torchrun programs). `lr_steps`: the schedule index of each step.
    Returns (loss per step, final state dict)."""
    model = Qwen3VLModel(cfg.model)
    model.load_state_dict(init_state)
    model.aux_loss_form = cfg.moe_aux_loss_form()  # the run's form, as the backends use it
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps)
    losses, norms = [], []
    for step, batches in enumerate(steps):
        lr_step = step if lr_steps is None else lr_steps[step]
        set_learning_rate(optimizer, learning_rate(lr_step, cfg.optim, cfg.stage.num_steps()))
        total_weight = sum(supervised_weights(b.labels, b.loss_weights).sum() for b in batches).float()
        value = 0.0
        for b in batches:
            embeds, mask, deep = model.embed(b.input_ids, b.pixel_values, b.image_grid_thw, None, None,
                                             b.cu_seqlens)
            hidden, aux = model.decode(embeds, b.position_ids, b.cu_seqlens, mask, deep)
            text = cfg.model.text
            out = micro_batch_loss(hidden, model.lm_head.weight, b.labels, b.loss_weights,
                                   global_weight=total_weight, aux_loss=aux if text.is_moe else None,
                                   aux_coef=text.router_aux_loss_coef, aux_count=len(batches))
            out.objective.backward()
            value += float(out.weighted_ce) / float(total_weight)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value)
    reference_training.grad_norms = norms  # type: ignore[attr-defined]  # pre-clip norms of the last call
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def initial_state(cfg, seed: int = 7) -> dict:
    """Random weights in which every parameter matters (norm gains and biases random too)."""
    torch.manual_seed(seed)
    model = randomize_constant_parameters(Qwen3VLModel(cfg.model), seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_random_init(backend, cfg, failures: list[str], what: str) -> None:
    """A freshly built backend holds exactly RandomInit(cfg.model, cfg.seed), whatever its layout (each rank
    generated only its shard: TP pieces, ZeRO-3 partitions, experts). Collective (the export gathers)."""
    import torch.distributed as dist

    from train.backends.base import gathered_state_dict

    exported = gathered_state_dict(backend)
    if dist.get_rank() != 0:
        return
    source = RandomInit(cfg.model, cfg.seed)
    if set(exported) != source.names():
        failures.append(f"{what}: exported names differ from the random init's")
    differing = [name for name in sorted(source.names() & set(exported))
                 if not torch.equal(exported[name], source.read(name).to(exported[name].dtype))]
    if differing:
        failures.append(f"{what}: the initial weights differ from RandomInit, first {differing[0]}")


def compare_states(got: dict, want: dict, tol: float, failures: list[str], what: str) -> float:
    """Largest |got - want| / max(1, |want|) over all tensors; records a failure above tol. Exports are
    gathered on rank 0 only (gathered_state_dict): other ranks compare nothing."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0 and not got:
        return 0.0
    worst, worst_name = 0.0, ""
    for name, ref in want.items():
        diff = float(((got[name] - ref).abs() / ref.abs().clamp_min(1.0)).max())
        if diff > worst:
            worst, worst_name = diff, name
    if worst > tol:
        failures.append(f"{what}: parameters differ by {worst:.3g} > {tol} (worst: {worst_name})")
    return worst


def compare_losses(got: list[float], want: list[float], tol: float, failures: list[str], what: str) -> float:
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    if worst > tol:
        failures.append(f"{what}: losses {got} vs reference {want} (relative {worst:.3g} > {tol})")
    return worst


def reference_per_source(cfg, init_state: dict, batches: list[PackedBatch]) -> dict[int, float]:
    """sum(w * ce) / sum(w) per source id at the initial weights (one process)."""
    model = Qwen3VLModel(cfg.model)
    model.load_state_dict(init_state)
    sums: dict[int, list[float]] = {}
    with torch.no_grad():
        for b in batches:
            out = model(b.input_ids, b.position_ids, b.cu_seqlens, b.pixel_values, b.image_grid_thw)
            ce = torch.nn.functional.cross_entropy(out.logits, b.labels, ignore_index=IGNORE_INDEX,
                                                   reduction="none")
            w = supervised_weights(b.labels, b.loss_weights)
            for s in b.source_ids.unique().tolist():
                if s >= 0:
                    sel = b.source_ids == s
                    acc = sums.setdefault(s, [0.0, 0.0])
                    acc[0] += float((w[sel] * ce[sel]).sum())
                    acc[1] += float(w[sel].sum())
    return {s: a / b for s, (a, b) in sums.items() if b > 0}
