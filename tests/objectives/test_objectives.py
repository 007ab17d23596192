"""Objectives: each loss against a hand computation, and each one goes down when optimised."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from clipmed.objectives import ContrastiveLoss, LabelLoss, SemanticMatchingLoss, soft_cross_entropy


def _lse(values):
    return math.log(sum(math.exp(v) for v in values))


def test_contrastive_loss_matches_hand_computation():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    # logits = 2 * [[1, .6], [0, .8]]
    i2t = ((_lse([2, 1.2]) - 2) + (_lse([0, 1.6]) - 1.6)) / 2
    t2i = ((_lse([2, 0]) - 2) + (_lse([1.2, 1.6]) - 1.6)) / 2
    assert ContrastiveLoss()(image, text, scale).item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_local_contrastive_losses_average_to_the_global_loss():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    scale = torch.tensor(10.0)
    loss = ContrastiveLoss()
    parts = [loss(image, text, scale, rows=slice(0, 3)), loss(image, text, scale, rows=slice(3, 6))]
    assert torch.allclose((parts[0] + parts[1]) / 2, loss(image, text, scale), atol=1e-6)
    assert not torch.allclose(parts[0], parts[1])  # each rank holds a different share


def test_label_loss_multi_positive_matches_hand_computation_and_beats_naive():
    image = F.normalize(torch.tensor([[1.0, 0.2], [0.9, 0.1], [0.0, 1.0]]), dim=-1)
    prompts = F.normalize(torch.tensor([[1.0, 0.0], [0.1, 1.0]]), dim=-1)  # images 0, 1 share prompt 0
    index = torch.tensor([0, 0, 1])
    scale = torch.tensor(5.0)
    logits = (scale * image @ prompts.t()).tolist()  # 3 images x 2 distinct prompts
    i2t = sum(_lse(row) - row[k] for row, k in zip(logits, [0, 0, 1])) / 3
    columns = list(zip(*logits))
    t2i = ((_lse(columns[0]) - (columns[0][0] + columns[0][1]) / 2) + (_lse(columns[1]) - columns[1][2])) / 2
    multi = LabelLoss("multi")(image, prompts, scale, index)
    assert multi.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    naive = LabelLoss("naive")(image, prompts, scale, index)
    assert naive.item() == pytest.approx(ContrastiveLoss()(image, prompts[index], scale).item(), rel=1e-6)
    assert naive.item() > multi.item()


def test_naive_label_loss_floor_is_higher_than_multi_positive_entropy():
    # Perfect embeddings: each image equals its class prompt, classes orthogonal, large scale. Multi-positive
    # reaches its minimum (the entropy of its uniform text->image targets); naive stays at log 2 per direction.
    prompts = torch.eye(2)
    index = torch.tensor([0, 0, 1, 1])
    image = prompts[index]
    scale = torch.tensor(100.0)
    assert LabelLoss("multi")(image, prompts, scale, index).item() < 1e-6 + math.log(2) / 2
    assert LabelLoss("naive")(image, prompts, scale, index).item() == pytest.approx(math.log(2), rel=1e-4)


def test_semantic_loss_matches_hand_computation_on_3x3():
    # Concepts: image/text 0 = {a}, 1 = {a, b}, 2 = {} (no concepts: own pair only).
    concepts = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.7, 0.7], [0.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[0.9, 0.1], [0.6, 0.8], [0.2, 1.0]]), dim=-1)
    scale, tau = torch.tensor(3.0), 0.5
    c = 1 / math.sqrt(2)  # cosine({a}, {a, b})
    sim = [[1, c, 0], [c, 1, 0]]  # rows 0 and 1; row 2 has no concepts
    y = [[math.exp(v / tau) / sum(math.exp(w / tau) for w in row) for v in row] for row in sim] + [[0, 0, 1]]
    logits = (scale * image @ text.t()).tolist()

    def ce(target_rows, logit_rows):
        return sum(-sum(t * (l - _lse(lr)) for t, l in zip(tr, lr)) for tr, lr in zip(target_rows, logit_rows)) / 3

    logits_t = [list(col) for col in zip(*logits)]
    expected = (ce(y, logits) + ce(y, logits_t)) / 2  # the concept similarity is symmetric here
    loss = SemanticMatchingLoss(tau)(image, text, scale, concepts, concepts, torch.tensor([0, 1, 2]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_semantic_loss_handles_image_only_and_text_only_rows():
    # 2 images (second is image-only), 3 texts (third is text-only): the full images x texts matrix.
    image_concepts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text_concepts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss_fn = SemanticMatchingLoss(0.1)
    i2t, valid_i, t2i, valid_t = loss_fn.targets(image_concepts, text_concepts, torch.tensor([0, -1]))
    assert i2t.shape == (2, 3) and t2i.shape == (3, 2)
    assert valid_i.all() and valid_t.all()
    assert i2t[1].argmax().item() == 2  # the image-only row matches the text-only row by concepts
    assert torch.allclose(i2t.sum(1), torch.ones(2)) and torch.allclose(t2i.sum(1), torch.ones(3))
    loss = loss_fn(F.normalize(torch.randn(2, 4), dim=-1), F.normalize(torch.randn(3, 4), dim=-1), torch.tensor(10.0),
                   image_concepts, text_concepts, torch.tensor([0, -1]))
    assert torch.isfinite(loss)


def test_soft_cross_entropy_equals_cross_entropy_for_one_hot():
    logits = torch.randn(4, 5)
    labels = torch.tensor([0, 3, 1, 4])
    assert soft_cross_entropy(logits, F.one_hot(labels, 5).float()).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-6)


@pytest.mark.parametrize("name", ["caption", "label", "semantic"])
def test_each_loss_goes_down_when_optimised(name):
    torch.manual_seed(0)
    image = torch.randn(8, 6, requires_grad=True)
    text = torch.randn(8, 6, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    concepts = F.one_hot(labels, 4).float()
    losses = {
        "caption": lambda i, t: ContrastiveLoss()(i, t, torch.tensor(10.0)),
        "label": lambda i, t: LabelLoss("multi")(i, t[:4], torch.tensor(10.0), labels),
        "semantic": lambda i, t: SemanticMatchingLoss(0.1)(i, t, torch.tensor(10.0), concepts, concepts, torch.arange(8)),
    }
    optimizer = torch.optim.Adam([image, text], lr=0.05)
    first = None
    for _ in range(60):
        loss = losses[name](F.normalize(image, dim=-1), F.normalize(text, dim=-1))
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
