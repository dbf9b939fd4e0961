"""MoE load-balancing loss forms: transformers' pooled form and megatron's per-layer form."""
from __future__ import annotations

import torch

from train.models.qwen3vl.moe import attach_loss, load_balancing_loss


def test_per_layer_form_is_the_mean_of_single_layer_losses_and_splits_over_stages():
    torch.manual_seed(0)
    layers = [torch.randn(50, 8) * (i + 1) for i in range(4)]  # routers of different sharpness
    single = [load_balancing_loss([logits], 8, 2) for logits in layers]
    per_layer = load_balancing_loss(layers, 8, 2, "per_layer")
    assert torch.allclose(per_layer, torch.stack(single).mean())
    # pipeline stages holding layers [0, 1] and [2, 3] add up to the whole model's value
    stages = [load_balancing_loss(layers[:2], 8, 2, "per_layer", 4), load_balancing_loss(layers[2:], 8, 2, "per_layer", 4)]
    assert torch.allclose(stages[0] + stages[1], per_layer)
    # pooling differs once layers route differently: the per-layer form is not the HF one
    assert not torch.allclose(load_balancing_loss(layers, 8, 2), per_layer)


def test_both_forms_equal_top_k_for_a_uniform_router():
    """Uniform probabilities: E * sum_e f_e / E = sum_e f_e = top_k, whatever the assignments."""
    logits = torch.zeros(64, 8)
    logits[torch.arange(64), torch.arange(64) % 8] = 1e-3  # break ties
    for form in ("pooled", "per_layer"):
        value = load_balancing_loss([logits, logits], 8, 2, form)
        assert abs(float(value) - 2.0) < 1e-2


def test_attach_loss_adds_the_loss_gradient_without_changing_the_activations():
    hidden = torch.randn(3, 4, requires_grad=True)
    weight = torch.tensor(2.0, requires_grad=True)
    out = attach_loss(hidden, weight * 3.0)
    assert torch.equal(out, hidden)
    out.sum().backward()
    assert torch.equal(hidden.grad, torch.ones(3, 4)) and float(weight.grad) == 3.0
