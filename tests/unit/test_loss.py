"""The shared loss: chunked cross entropy (values and gradients), the global normaliser, the three weightings
of the recipe note, the aux-loss and gradient-scale terms, and per-source metrics."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from data.batch import IGNORE_INDEX
from data.packing import document_loss_weight
from train.loss import (chunked_cross_entropy, global_weight_sum, micro_batch_loss, reduce_step_metrics)


def _inputs(n=37, hidden=16, vocab=50, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(vocab, hidden, generator=gen)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::5] = IGNORE_INDEX
    weights = torch.rand(n, generator=gen)
    return h, w, labels, weights


def _reference(h, w, labels, weights):
    ce = F.cross_entropy((h @ w.t()).float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (weights * ce).sum(), ce


@pytest.mark.parametrize("budget_tokens", [1, 4, 1000])
def test_chunked_cross_entropy_matches_full_logits(budget_tokens):
    h, w, labels, weights = _inputs()
    total, token_ce = chunked_cross_entropy(h, w, labels, weights, logits_budget=budget_tokens * w.shape[0])
    total.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref_total, ref_ce = _reference(h, w, labels, weights)
    ref_total.backward()
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(token_ce, ref_ce.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], w.grad, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_bf16_and_upstream_gradient():
    h, w, labels, weights = _inputs(dtype=torch.bfloat16)
    total, _ = chunked_cross_entropy(h, w, labels, weights, logits_budget=3 * w.shape[0])
    (2.5 * total).backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    hf, wf = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref_total, _ = _reference(hf, wf, labels, weights)
    (2.5 * ref_total).backward()
    torch.testing.assert_close(total, ref_total.detach(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(h.grad.float(), hf.grad, rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(w.grad.float(), wf.grad, rtol=3e-2, atol=3e-3)


def test_no_gradient_work_without_grad():
    h, w, labels, weights = _inputs()
    with torch.no_grad():
        total, token_ce = chunked_cross_entropy(h, w, labels, weights, logits_budget=2 * w.shape[0])
    assert not total.requires_grad and torch.isfinite(token_ce).all()


def _documents(sizes, vocab=11, seed=1):
    """Per-document per-token losses from random logits: list of (logits [n, V], labels [n])."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, vocab, generator=gen), torch.randint(0, vocab, (n,), generator=gen)) for n in sizes]


def _split_losses(docs, mode, cuts):
    """Sum of micro_batch_loss objectives when the documents are packed into micro-batches at `cuts`."""
    weights = [torch.full((lab.numel(),), document_loss_weight(lab.numel(), mode)) for _, lab in docs]
    logits = [lg for lg, _ in docs]
    labels = [lab for _, lab in docs]
    bounds = [0, *cuts, len(docs)]
    micro = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        micro.append((torch.cat(logits[lo:hi]), torch.cat(labels[lo:hi]), torch.cat(weights[lo:hi])))
    total_w = global_weight_sum([(lab, w) for _, lab, w in micro])
    eye = torch.eye(logits[0].shape[1])  # hidden = logits, lm_head = identity: ce of the given logits
    return sum(micro_batch_loss(lg, eye, lab, w, global_weight=total_w).objective for lg, lab, w in micro)


@pytest.mark.parametrize("mode", ["per_token", "per_sample", "sqrt"])
def test_weightings_give_the_recipe_formula(mode):
    sizes = [3, 17, 8, 1, 30]
    docs = _documents(sizes)
    per_doc = [F.cross_entropy(lg, lab, reduction="none") for lg, lab in docs]
    if mode == "per_token":
        expected = torch.cat(per_doc).mean()
    elif mode == "per_sample":
        expected = torch.stack([ce.mean() for ce in per_doc]).mean()
    else:  # sum_s sum_t l_t / sqrt(N_s) / sum_s sqrt(N_s)
        expected = sum(ce.sum() / math.sqrt(ce.numel()) for ce in per_doc) / sum(math.sqrt(n) for n in sizes)
    for cuts in ([], [2], [1, 3, 4]):  # the micro-batch layout must not matter
        torch.testing.assert_close(_split_losses(docs, mode, cuts), expected, rtol=1e-6, atol=1e-7)


def test_global_normaliser_gives_layout_independent_gradients():
    h, w, labels, weights = _inputs(n=40)
    grads = []
    for cuts in ([0, 40], [0, 7, 19, 40]):
        w.grad = None
        parts = [(labels[a:b], weights[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
        total_w = global_weight_sum(parts)
        for a, b in zip(cuts[:-1], cuts[1:]):
            micro_batch_loss(h[a:b], w, labels[a:b], weights[a:b], global_weight=total_w).objective.backward()
        grads.append(w.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_aux_loss_and_grad_scale_terms():
    h, w, labels, weights = _inputs()
    total_w = global_weight_sum([(labels, weights)])
    aux = torch.tensor(1.7, requires_grad=True)
    out = micro_batch_loss(h, w, labels, weights, global_weight=total_w, aux_loss=aux, aux_coef=0.01,
                           aux_count=4, grad_scale=6.0)
    ref_total, _ = _reference(h, w, labels, weights)
    expected = 6.0 * (ref_total / weights[labels != IGNORE_INDEX].sum() + 0.01 * 1.7 / 4)
    torch.testing.assert_close(out.objective, expected, rtol=1e-6, atol=1e-6)
    out.objective.backward()
    torch.testing.assert_close(aux.grad, torch.tensor(6.0 * 0.01 / 4))


def test_all_padding_batch_gives_zero_not_nan():
    h, w, labels, weights = _inputs()
    labels[:] = IGNORE_INDEX
    total_w = global_weight_sum([(labels, weights)])
    out = micro_batch_loss(h, w, labels, weights, global_weight=total_w)
    assert float(out.objective.detach()) == 0.0


def test_per_source_metrics():
    h, w, labels, weights = _inputs(n=30)
    sources = torch.tensor([0] * 10 + [2] * 12 + [-1] * 8)  # source 1 absent, 8 padding tokens
    labels[22:] = IGNORE_INDEX
    total_w = global_weight_sum([(labels[:15], weights[:15]), (labels[15:], weights[15:])])
    parts = [micro_batch_loss(h[a:b], w, labels[a:b], weights[a:b], global_weight=total_w)
             for a, b in ((0, 15), (15, 30))]
    shares = [(labels[a:b], weights[a:b], sources[a:b]) for a, b in ((0, 15), (15, 30))]
    metrics = reduce_step_metrics(parts, shares, total_w, aux_count=2)
    _, ce = _reference(h, w, labels, weights)
    mask = labels != IGNORE_INDEX
    ww = torch.where(mask, weights, 0.0)
    assert metrics.tokens == 22
    assert metrics.loss == pytest.approx(float((ww * ce).sum() / ww.sum()), rel=1e-6)
    assert set(metrics.loss_per_source) == {0, 2}
    for s in (0, 2):
        sel = sources == s
        expected = float((ww[sel] * ce[sel]).sum() / ww[sel].sum())
        assert metrics.loss_per_source[s] == pytest.approx(expected, rel=1e-6)
