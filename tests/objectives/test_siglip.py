"""SigLIP's sigmoid loss against a hand computation."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from clipmed.objectives import SigmoidLoss


def test_sigmoid_loss_is_the_papers_sum_over_every_pair():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(3, 4), dim=-1), F.normalize(torch.randn(3, 4), dim=-1)
    scale, bias = 10.0, -10.0
    expected = 0.0
    for i in range(3):
        for j in range(3):
            z = 1.0 if i == j else -1.0
            logit = scale * float(image[i] @ text[j]) + bias
            expected -= math.log(1 / (1 + math.exp(-z * logit)))
    loss = SigmoidLoss(torch.nn.Parameter(torch.tensor(bias)))(image, text, torch.tensor(scale))
    assert abs(loss.item() - expected / 3) < 1e-5
