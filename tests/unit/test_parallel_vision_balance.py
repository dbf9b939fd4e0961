"""train.parallel.vision_balance: the plan keeps every micro-batch exactly once and GA per rank, evens out the
ViT cost, and leaves the step's loss unchanged (the loss is normalised over the whole global batch)."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

from train.models.native_io import load_model_config_yaml  # noqa: E402
from train.loss import micro_batch_loss, supervised_weights  # noqa: E402
from train.models.qwen3vl.model import Qwen3VLModel  # noqa: E402
from train.parallel.vision_balance import max_over_mean, plan_balanced, vit_cost  # noqa: E402

TINY = ROOT / "configs" / "model" / "tiny.yaml"  # the bench documents' token ids fit its vocabulary


def _loads(costs, plan):
    return [sum(costs[r][i] for r, i in items) for items in plan]


def test_plan_keeps_every_micro_batch_once_and_balances_skewed_ranks():
    rng = random.Random(0)
    for dp, ga in ((8, 8), (8, 4), (4, 6)):
        # Log-normal micro-batch costs, two ranks drawing twice the vision of the others (today 1.4-1.7).
        costs = [[rng.lognormvariate(0, 0.5) * (2 if r < 2 else 1) for _ in range(ga)] for r in range(dp)]
        plan = plan_balanced(costs)
        assert sorted(x for items in plan for x in items) == [(r, i) for r in range(dp) for i in range(ga)]
        assert all(len(items) == ga for items in plan)
        assert max_over_mean(_loads(costs, plan)) < max_over_mean([sum(c) for c in costs])
        assert max_over_mean(_loads(costs, plan)) <= 1.10


def test_already_balanced_ranks_keep_their_own_micro_batches():
    costs = [[5.0, 1.0], [1.0, 5.0], [3.0, 3.0]]
    assert plan_balanced(costs) == [[(0, 0), (0, 1)], [(1, 0), (1, 1)], [(2, 0), (2, 1)]]


def test_vit_cost_counts_patches_and_per_frame_attention():
    cfg = load_model_config_yaml(TINY)
    (batch, _), = common.pack(common.document_stream(cfg, 512, seed=3, mix=common.Mix(text=0, caption=0,
                                                                                        interleaved=0, video=1)),
                              512, 1)
    rows = batch.video_grid_thw.double()
    n = rows[:, 1] * rows[:, 2]
    want = float((rows[:, 0] * n).sum() + (rows[:, 0] * n * n).sum() / (6 * 32))
    assert vit_cost(batch, 32) == want > 0


def test_balanced_assignment_leaves_the_step_loss_unchanged():
    """Global loss sum(w * ce) / sum(w) of a DP=4 x GA=2 step, each rank's own micro-batches vs the plan."""
    cfg = load_model_config_yaml(TINY)
    torch.manual_seed(0)
    model = Qwen3VLModel(cfg).eval()
    batches = [b for b, _ in common.pack(common.document_stream(cfg, 192, seed=1), 256, 8)]
    step = [batches[2 * r:2 * r + 2] for r in range(4)]
    costs = [[vit_cost(b, cfg.vision.hidden_size) for b in micro] for micro in step]
    plan = plan_balanced(costs)
    assert plan != [[(r, 0), (r, 1)] for r in range(4)]  # the plan does move micro-batches here
    global_weight = sum(supervised_weights(b.labels, b.loss_weights).sum() for b in batches).float()

    def step_loss(assignment):
        total = torch.zeros((), dtype=torch.float64)
        for items in assignment:  # rank by rank, in each rank's order, as the backends accumulate
            for r, i in items:
                b = step[r][i]
                with torch.no_grad():
                    hidden = model(input_ids=b.input_ids, position_ids=b.position_ids, cu_seqlens=b.cu_seqlens,
                                   pixel_values=b.pixel_values, image_grid_thw=b.image_grid_thw,
                                   pixel_values_videos=b.pixel_values_videos, video_grid_thw=b.video_grid_thw,
                                   compute_logits=False).hidden_states
                part = micro_batch_loss(hidden, model.lm_head.weight, b.labels, b.loss_weights,
                                        global_weight=global_weight)
                total += part.objective.double()
        return total

    today = step_loss([[(r, 0), (r, 1)] for r in range(4)])
    balanced = step_loss(plan)
    assert torch.allclose(today, balanced, rtol=1e-12, atol=0)
