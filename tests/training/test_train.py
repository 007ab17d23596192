"""Training: the loss falls, the run folder is complete and reopens identically, and resume is exact."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from clipmed.errors import ClipmedError
from clipmed.training import train as train_module
from clipmed.training.config import TrainConfig
from clipmed.training.optim import build_optimizer
from clipmed.training.train import epoch_order, train
from helpers import tiny_dual


def _config(prepared, model, out, **overrides) -> TrainConfig:
    values = dict(data=str(prepared), model=str(model), out=str(out), objective="caption", epochs=3, batch_size=8,
                  lr_pretrained=3e-3, lr_new=3e-3, checkpoint_every=2, precision="fp32", seed=0,
                  # The tiny towers are random: their BatchNorm statistics mean nothing, so let them adapt.
                  freeze_batchnorm=False)
    values.update(overrides)
    return TrainConfig(**values)


def _losses(run) -> list[float]:
    with open(run / "metrics.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


@pytest.mark.parametrize("objective", ["caption", "label"])
def test_training_lowers_the_loss_and_writes_a_complete_run(prepared_synthetic, tiny_dual_folder, tmp_path, objective):
    run = train(_config(prepared_synthetic, tiny_dual_folder, tmp_path / "run", objective=objective, epochs=4),
                progress=False)
    for part in ("model/model.safetensors", "model/clipmed_dual.json", "run.json", "checkpoints/last.pt", "metrics.csv"):
        assert (run / part).exists(), part
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done" and info["seed"] == 0
    assert info["split"].endswith("split.json")
    assert "updated" in info["batchnorm"]
    assert {g["origin"] for g in info["optimizer"]["groups"]} == {"new"}  # tiny towers are random: all "new"
    assert info["environment"]["torch"] == torch.__version__
    assert info["peak_memory_mib"] > 50  # the run's peak memory, at least the interpreter with torch loaded
    losses = _losses(run)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_label_rows_come_from_train_and_caption_rows_from_the_pool(prepared_synthetic):
    from clipmed.data.split import load_prepared

    prepared = load_prepared(prepared_synthetic)
    label_rows = train_module.training_rows(prepared, TrainConfig(objective="label"))
    caption_rows = train_module.training_rows(prepared, TrainConfig(objective="caption"))
    assert {r.id for r in label_rows.records} == set(prepared.manifest["splits"]["train"])
    assert {r.id for r in caption_rows.records} == set(prepared.manifest["splits"]["pool"])
    assert label_rows.texts[0] == f"A medical image of {label_rows.records[0].label}"
    held_out = set(prepared.manifest["splits"]["val"]) | set(prepared.manifest["splits"]["test"])
    assert not held_out & {r.id for r in caption_rows.records}


def test_resume_after_a_crash_gives_bitwise_identical_weights(prepared_synthetic, tiny_dual_folder, tmp_path, monkeypatch):
    reference = train(_config(prepared_synthetic, tiny_dual_folder, tmp_path / "a"), progress=False)

    from clipmed.training.step import StepRunner

    real_step, calls = StepRunner.__call__, {"n": 0}

    def crashing_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 7:  # mid-epoch, after the checkpoint at step 6
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(StepRunner, "__call__", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train(_config(prepared_synthetic, tiny_dual_folder, tmp_path / "b"), progress=False)
    monkeypatch.setattr(StepRunner, "__call__", real_step)
    resumed = train(TrainConfig(out=str(tmp_path / "b")), resume=True, progress=False)

    a = load_file(str(reference / "model" / "model.safetensors"))
    b = load_file(str(resumed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(reference) == _losses(resumed)


def test_an_existing_run_is_not_overwritten(prepared_synthetic, tiny_dual_folder, tmp_path):
    config = _config(prepared_synthetic, tiny_dual_folder, tmp_path / "run", max_steps=1, epochs=1)
    train(config, progress=False)
    with pytest.raises(ClipmedError, match="--resume"):
        train(config, progress=False)


def test_locking_a_tower_leaves_it_untouched(prepared_synthetic, tiny_dual_folder, tmp_path):
    run = train(_config(prepared_synthetic, tiny_dual_folder, tmp_path / "run", lock_image=True, epochs=1),
                progress=False)
    before = load_file(str(tiny_dual_folder / "model.safetensors"))
    after = load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("image_tower."))
    assert not torch.equal(before["text_projection.weight"], after["text_projection.weight"])


def test_frozen_batchnorm_keeps_running_statistics(prepared_synthetic, tiny_dual_folder, tmp_path):
    run = train(_config(prepared_synthetic, tiny_dual_folder, tmp_path / "run", epochs=1, freeze_batchnorm=True),
                progress=False)
    assert "frozen" in json.loads((run / "run.json").read_text())["batchnorm"]
    before = load_file(str(tiny_dual_folder / "model.safetensors"))
    after = load_file(str(run / "model" / "model.safetensors"))
    stats = [k for k in before if k.endswith("running_mean") or k.endswith("running_var")]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert not torch.equal(before["image_tower._conv_stem.weight"], after["image_tower._conv_stem.weight"])


def test_optimizer_groups_follow_parameter_origin_and_decay_rules():
    model = tiny_dual()
    model.config.towers_pretrained = True
    optimizer, groups = build_optimizer(model, TrainConfig(lr_pretrained=1e-4, lr_new=1e-3, weight_decay=0.1))
    by_key = {(g["origin"], g["weight_decay"]): g for g in groups}
    assert by_key[("pretrained", 0.1)]["lr"] == 1e-4 and by_key[("new", 0.1)]["lr"] == 1e-3
    assert ("new", 0.0) in by_key  # the temperature: new, never decayed
    assert sum(g["n_params"] for g in groups) == sum(p.numel() for p in model.parameters())


def test_clip_learning_rate_is_scaled_by_batch_size():
    assert TrainConfig(batch_size=32).resolved_lr_clip() == pytest.approx(5e-4 * 32 / 32768)
    assert TrainConfig(batch_size=32, lr_clip=1e-5).resolved_lr_clip() == 1e-5


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 1))
    assert not torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 2))
    assert sorted(epoch_order(50, 3, 1).tolist()) == list(range(50))


@pytest.fixture(scope="module")
def prepared_decoupled(tmp_path_factory):
    """Synthetic data where some images are missing (text-only rows) and some captions empty (image-only)."""
    from clipmed.data.records import FieldMap
    from clipmed.data.split import prepare
    from helpers import write_synthetic_imagefolder

    root = write_synthetic_imagefolder(tmp_path_factory.mktemp("decoupled"))
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    for row in rows[-12:-6]:
        row["file_name"] = "images/missing.png"
    for row in rows[-6:]:
        row["caption"] = " "
        row["body_part"] = "Chest"
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path_factory.mktemp("prepared_decoupled")
    prepare(str(root), out, fields=FieldMap(), min_class_count=5, progress=False)
    return out


def test_semantic_objective_trains_on_decoupled_batches(prepared_decoupled, tiny_dual_folder, tmp_path):
    from clipmed.data.records import TextColumn
    from clipmed.data.split import load_prepared

    prepared = load_prepared(prepared_decoupled)
    assert len(prepared.text_only_records()) == 6 and len(prepared.image_only_records()) == 6
    rows = train_module.training_rows(prepared, TrainConfig(objective="semantic"))
    pairs, text_only, image_only = (list(prepared.records("pool")), list(prepared.text_only_records()),
                                    list(prepared.image_only_records()))
    assert list(rows.records) == pairs + text_only + image_only  # a view of the prepared table, in this order
    assert isinstance(rows.texts, TextColumn)  # column-wise: no Python string per row
    assert list(rows.texts) == [r.caption for r in pairs + text_only] + [None] * len(image_only)
    assert sum(not ok for ok in rows.has_image) == 6  # text-only rows
    assert sum(text is None for text in rows.texts) == 6  # image-only rows
    image_only = [i for i, text in enumerate(rows.texts) if text is None]
    chest = rows.concepts[image_only[0]]
    assert chest.sum() > 0  # image-only concepts come from the label
    run = train(_config(prepared_decoupled, tiny_dual_folder, tmp_path / "run", objective="semantic", epochs=4),
                progress=False)
    losses = _losses(run)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert json.loads((run / "run.json").read_text())["n_training_rows"] == len(rows.records)


def test_a_resumed_run_reuses_its_recorded_speed_choices(prepared_synthetic, tiny_dual_folder, tmp_path, monkeypatch):
    from clipmed.machine import Facts

    def machine(flags):
        return lambda device: Facts(device="cpu", cpu_model="test", cpu_flags=frozenset(flags), cpu_capability="AVX512",
                                    cores=torch.get_num_threads())

    seen = []

    class Recording(train_module.StepRunner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.choices)

    monkeypatch.setattr(train_module, "StepRunner", Recording)
    monkeypatch.setattr(train_module, "facts", machine({"avx512_bf16", "amx_bf16"}))
    run = train(_config(prepared_synthetic, tiny_dual_folder, tmp_path / "run", precision="auto", memory_format="contiguous",
                        max_steps=1, epochs=1), progress=False)
    recorded = json.loads((run / "run.json").read_text())["machine"]
    assert (seen[0].image_precision, seen[0].text_precision, seen[0].memory_format) == ("fp32", "bf16", "contiguous")
    assert recorded["choices"] == seen[0].to_dict() and "memory_format" in recorded["decided_by"].split("forced:")[1]

    monkeypatch.setattr(train_module, "facts", machine({"avx2"}))  # a machine whose rule says fp32 everywhere
    train(TrainConfig(out=str(run)), resume=True, progress=False)
    assert seen[1] == seen[0]
    assert json.loads((run / "run.json").read_text())["machine"] == recorded


def test_optimizer_state_follows_its_parameters_memory_layout():
    from clipmed.training.optim import load_optimizer_state

    weight, grad = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)

    def stepped(layout, state=None):
        param = torch.nn.Parameter(weight.clone().contiguous(memory_format=layout))
        optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
        if state is not None:
            load_optimizer_state(optimizer, state)
        (param * grad).sum().backward()
        optimizer.step()
        return param.detach(), optimizer

    _, contiguous = stepped(torch.contiguous_format)
    expected, _ = stepped(torch.contiguous_format, contiguous.state_dict())
    resumed, _ = stepped(torch.channels_last, contiguous.state_dict())
    assert torch.allclose(resumed, expected, atol=1e-6)


def test_val_every_validates_mid_epoch_saves_improvements_and_logs_data_wait(prepared_synthetic, tiny_dual_folder,
                                                                           tmp_path, monkeypatch):
    real_score, seen = train_module.validation_scores, []

    def recording_score(model, val, classes, which, **options):
        seen.append([r.id for r in val])
        return real_score(model, val, classes, which, **options)

    monkeypatch.setattr(train_module, "validation_scores", recording_score)
    run = train(_config(prepared_synthetic, tiny_dual_folder, tmp_path / "run", epochs=1, val_every=2,
                        val_max_rows=4, loader_workers=0), progress=False)
    with open(run / "validation.csv") as handle:
        scores = list(csv.DictReader(handle))
    steps = [int(s["step"]) for s in scores]
    with open(run / "metrics.csv") as handle:
        metrics = list(csv.DictReader(handle))
    assert steps == [s for s in range(2, len(metrics), 2)] + [len(metrics)]  # every 2 steps, and the epoch end
    assert all(float(row["data_wait_s"]) >= 0 for row in metrics)
    best = max(float(s["value"]) for s in scores)
    assert json.loads((run / "run.json").read_text())["best"]["val_mean_recall_at_1"] == best
    # Every validation scores the same seeded subset of 4 val rows.
    assert len(seen) == len(scores) and all(ids == seen[0] for ids in seen) and len(seen[0]) == 4
    from clipmed.data.split import load_prepared
    assert set(seen[0]) < set(load_prepared(prepared_synthetic).manifest["splits"]["val"])


def test_a_second_train_into_a_run_folder_in_use_is_refused_naming_the_holder(prepared_synthetic, tiny_dual_folder,
                                                                              tmp_path):
    import os
    import socket

    run = tmp_path / "run"
    run.mkdir()
    holder = {"host": socket.gethostname(), "pid": os.getppid(), "what": "clipmed train", "since": 0}
    (run / ".clipmed.lock").write_text(json.dumps(holder))  # a live process (pytest's parent) holds it
    with pytest.raises(ClipmedError, match=f"locked by process {os.getppid()} on this host"):
        train(_config(prepared_synthetic, tiny_dual_folder, run, max_steps=1, epochs=1), progress=False)
    assert not (run / "run.json").exists()
