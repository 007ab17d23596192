"""Captions as they come in real data: non-English scripts, emoji, control and zero-width characters, and one
far beyond the text tower's context (truncated and counted, never a crash)."""

from __future__ import annotations

import json

from clipmed.data.split import load_prepared, prepare
from clipmed.training.config import TrainConfig
from clipmed.training.train import train
from helpers import write_synthetic_imagefolder

UNUSUAL = [
    "Distension digestive avec niveaux hydro-aériques coliques et vacuité pelvienne",  # roco holds French ones
    "胸部X线片显示左侧气胸",
    "صورة شعاعية للصدر تظهر انصبابا جنبيا",
    "Röntgen Thorax: Pneumothorax links 🫁✅",
    "zero\u200bwidth\u200djoiner and\tcontrol\x07characters",
    "MRI " + "showing a large enhancing mass " * 400,  # ~2,400 tokens: far past the 32-token context
]


def test_unusual_captions_prepare_and_train_and_long_ones_are_counted(tmp_path, tiny_dual_folder):
    root = write_synthetic_imagefolder(tmp_path / "data")
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    for row, caption in zip(rows, UNUSUAL):
        row["caption"] = caption
    (root / "metadata.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    prepare(str(root), tmp_path / "prepared", min_class_count=5, progress=False)
    prepared = load_prepared(tmp_path / "prepared")
    by_id = {r.id: r for r in prepared.records("pool") + prepared.records("val") + prepared.records("test")}
    assert [by_id[row["id"]].caption for row in rows[:len(UNUSUAL)] if row["id"] in by_id] == \
        [c for row, c in zip(rows, UNUSUAL) if row["id"] in by_id]  # text kept exactly, nothing normalised away
    run = train(TrainConfig(data=str(tmp_path / "prepared"), model=str(tiny_dual_folder), out=str(tmp_path / "run"),
                            objective="caption", epochs=1, batch_size=8, precision="fp32", freeze_batchnorm=False),
                progress=False)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done"
    from helpers import minilm_tokenizer

    lengths = [len(ids) for ids in minilm_tokenizer()([r.caption for r in prepared.records("pool")])["input_ids"]]
    assert info["truncated_texts"] == sum(n > 32 for n in lengths)  # the tiny model's context is 32 tokens
    if rows[len(UNUSUAL) - 1]["id"] in set(prepared.manifest["splits"]["pool"]):
        assert info["truncated_texts"] >= 1
