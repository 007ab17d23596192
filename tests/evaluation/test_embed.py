"""Text embedding batches: bounded by texts and by tokens, results in input order whatever the batching."""

from __future__ import annotations

import torch

from clipmed.evaluation import embed as embed_module
from clipmed.evaluation.embed import embed_texts, text_batches
from helpers import tiny_dual


def test_text_batches_cap_texts_and_tokens_and_cover_every_text_once():
    lengths = [5, 40, 3, 40, 12, 100, 7, 40, 40, 9]
    batches = text_batches(lengths, batch_size=3, max_tokens=90)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(lengths)  # by length: each batch pads only to its own longest
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 90
    assert [lengths[i] for i in batches[-1]] == [100]  # longer than the budget: alone
    assert [[lengths[i] for i in b] for b in batches] == [[3, 5, 7], [9, 12], [40, 40], [40, 40], [100]]


def test_embed_texts_returns_input_order_whatever_the_batches(monkeypatch):
    model = tiny_dual()
    texts = ["short", "a much longer caption about a chest radiograph with an effusion and a small nodule",
             "mid length caption of the pelvis", "x", "another long caption of an axial computed tomography slice"]
    alone = torch.cat([embed_texts(model, [t], precision="fp32") for t in texts])
    calls = []
    encode = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda tokens: calls.append(tokens["input_ids"].shape) or encode(tokens))
    for budget, passes in ((16, 4), (10 ** 6, 1)):  # the long texts one by one; then every text in one batch
        monkeypatch.setattr(embed_module, "TEXT_TOKENS_PER_BATCH", budget)
        calls.clear()
        torch.testing.assert_close(embed_texts(model, texts, precision="fp32"), alone, atol=1e-5, rtol=0)
        assert len(calls) == passes
