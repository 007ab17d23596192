"""The image store: exact pixels, failures recorded, builds resumed and reused; loaders and augmentation in a fixed
order whatever the worker count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipmed.data import store as store_module
from clipmed.data.datasets import (Augment, EpochBatches, StoreImages, loader, pixel_batches, readable_records,
                                   resize_center_crop)
from clipmed.data.images import open_rgb
from clipmed.data.records import Record
from clipmed.data.store import StoreOptions, open_store


@pytest.fixture
def images(tmp_path) -> list[str]:
    """Eight images of assorted shapes and modes, and two that cannot be decoded."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i, (w, h) in enumerate([(40, 30), (30, 41), (64, 64), (17, 90), (100, 23), (33, 33), (50, 70), (45, 44)]):
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels) if i % 3 else Image.fromarray(pixels[..., 0])  # some grayscale
        path = folder / f"im{i}.{'png' if i % 2 else 'jpg'}"
        image.save(path)
        paths.append(str(path))
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    paths.append(str(folder / "broken.png"))
    paths.append(str(folder / "absent.png"))
    return paths


def test_png_store_gives_exactly_the_pixels_of_decoding_the_file(images, tmp_path):
    store = open_store(images, 24, "bicubic", StoreOptions(root=str(tmp_path / "store"), workers=2))
    good = images[:8]
    stored = torch.cat(list(pixel_batches(good, 24, "bicubic", batch_size=3, store=StoreOptions(root=str(tmp_path / "store")),
                                          workers=0)))
    direct = torch.stack([resize_center_crop(open_rgb(p), 24, "bicubic") for p in good])
    assert torch.equal(stored, direct)
    rows, failures = store.lookup(images)
    assert (rows[:8] >= 0).all() and (rows[8:] == -1).all()
    assert failures[images[8]].startswith("not an image") and failures[images[9]] == "missing file"
    assert min(store.image(int(rows[3])).size) == 24  # stored uncropped: shorter side at the input size


def test_jpeg_store_is_close_and_keyed_apart(images, tmp_path):
    options = StoreOptions(root=str(tmp_path / "store"), format="jpeg", workers=1)
    stored = torch.cat(list(pixel_batches(images[:8], 24, "bicubic", batch_size=8, store=options, workers=0)))
    direct = torch.stack([resize_center_crop(open_rgb(p), 24, "bicubic") for p in images[:8]])
    assert (stored.float() - direct.float()).abs().mean() < 6
    png = store_module.store_folder(images, 24, "bicubic", StoreOptions(root=options.root))
    assert png != store_module.store_folder(images, 24, "bicubic", options)


def test_unreadable_records_are_skipped_and_counted(images, tmp_path):
    records = [Record(id=f"r{i}", image_path=p, caption="x") for i, p in enumerate(images)]
    records.append(Record(id="no-image", image_path=None, caption="x"))
    keep, reasons = readable_records(records, 24, "bicubic", StoreOptions(root=str(tmp_path / "s")))
    assert keep == list(range(8))
    assert set(reasons) == {"r8", "r9", "no-image"} and reasons["r9"] == "missing file"


def test_a_second_open_builds_nothing(images, tmp_path, monkeypatch):
    options = StoreOptions(root=str(tmp_path / "store"), workers=1)
    first = open_store(images, 24, "bicubic", options)
    monkeypatch.setattr(store_module, "_build_shard", lambda *a: pytest.fail("rebuilt a stored image"))
    again = open_store(list(reversed(images)), 24, "bicubic", options)
    assert again.shards == first.shards and np.array_equal(again.lookup(images)[0], first.lookup(images)[0])


def test_a_small_parallel_build_gives_every_worker_several_shards_and_a_large_one_full_shards():
    paths = [f"image-{i}.png" for i in range(2626)]
    chunks = store_module.shard_chunks(paths, 2)
    assert len(chunks) == 2 * store_module.SHARDS_PER_WORKER and sum(chunks, []) == paths
    assert max(map(len, chunks)) - min(map(len, chunks)) <= max(map(len, chunks)) // 2
    assert [len(c) for c in store_module.shard_chunks(paths, 1)] == [1024, 1024, 578]
    many = [f"image-{i}.png" for i in range(50_000)]
    assert max(map(len, store_module.shard_chunks(many, 2))) == store_module.SHARD_IMAGES


def test_an_interrupted_build_keeps_finished_shards_and_builds_only_the_rest(images, tmp_path, monkeypatch):
    options = StoreOptions(root=str(tmp_path / "store"), workers=1)
    monkeypatch.setattr(store_module, "SHARD_IMAGES", 3)
    real, built = store_module._build_shard, []

    def dies_on_second_shard(folder, number, paths, *rest):
        if built:
            raise KeyboardInterrupt  # killed mid-build
        built.append(list(paths))
        return real(folder, number, paths, *rest)

    monkeypatch.setattr(store_module, "_build_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        open_store(images, 24, "bicubic", options)
    folder = store_module.store_folder(images, 24, "bicubic", options)
    finished = (folder / "shard-000000.data").stat().st_mtime_ns
    assert not (folder / ".clipmed.lock").exists()  # released on the way out

    resumed: list[str] = []
    monkeypatch.setattr(store_module, "_build_shard",
                        lambda folder, number, paths, *rest: resumed.extend(paths) or real(folder, number, paths, *rest))
    store = open_store(images, 24, "bicubic", options)
    assert sorted(resumed) == sorted(set(images) - set(built[0]))
    assert (folder / "shard-000000.data").stat().st_mtime_ns == finished
    rows, failures = store.lookup(images)
    assert (rows[:8] >= 0).all() and len(failures) == 2


def _training_batches(images, tmp_path, workers: int, augment: Augment | None) -> list[torch.Tensor]:
    store = open_store(images[:8], 24, "bicubic", StoreOptions(root=str(tmp_path / "store"), workers=1))
    rows = store.lookup(images[:8])[0]
    has_image = np.array([True, True, False, True, True, True, True, True])
    batches = EpochBatches(rows, has_image, seed=3, batch_size=4, steps_per_epoch=2, start=1, stop=5)
    return list(loader(StoreImages(store, augment, seed=3), batches, workers=workers))


@pytest.mark.parametrize("augment", [None, Augment(scale=(0.5, 1.0), rotation=20, jitter=0.3, hflip=True)])
def test_loader_workers_yield_the_same_batches_as_the_main_process(images, tmp_path, augment):
    in_process = _training_batches(images, tmp_path, 0, augment)
    assert len(in_process) == 4 and sum(len(b) for b in in_process) == 4 * 4 - 2  # row 2 has no image (2 epochs)
    assert all(torch.equal(a, b) for a, b in zip(in_process, _training_batches(images, tmp_path, 2, augment)))


def test_augmentation_depends_only_on_seed_epoch_and_row(images, tmp_path):
    store = open_store(images[:8], 24, "bicubic", StoreOptions(root=str(tmp_path / "store"), workers=1))
    data = StoreImages(store, Augment(), seed=1)
    row = int(store.lookup(images[:1])[0][0])
    first = data[(row, 0, 5)]
    assert first.shape == (3, 24, 24) and first.dtype == torch.uint8
    assert torch.equal(first, data[(row, 0, 5)])
    assert not torch.equal(first, data[(row, 1, 5)]) and not torch.equal(first, data[(row, 0, 6)])
    assert not torch.equal(first, StoreImages(store, Augment(), seed=2)[(row, 0, 5)])
    assert torch.equal(StoreImages(store)[(row, 0, 5)], StoreImages(store)[row])  # no augment: the centre crop


def test_flip_only_when_asked(images, tmp_path):
    store = open_store(images[:8], 24, "bicubic", StoreOptions(root=str(tmp_path / "store"), workers=1))
    row = int(store.lookup(images[2:3])[0][0])  # square: the crop at scale 1 is the whole image
    still = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), rotation=0, jitter=0)
    centre = StoreImages(store)[row]
    assert all(torch.equal(StoreImages(store, still)[(row, 0, k)], centre) for k in range(8))
    flips = {torch.equal(StoreImages(store, Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), rotation=0, jitter=0,
                                                    hflip=True))[(row, 0, k)], centre.flip(-1)) for k in range(8)}
    assert flips == {True, False}


def test_loaders_leave_the_global_random_state_alone(images, tmp_path):
    """Dropout draws from the global RNG: a loader created at another moment (a resumed run) must not shift it."""
    state = torch.get_rng_state()
    batches = list(pixel_batches(images[:8], 24, "bicubic", batch_size=4, store=StoreOptions(root=str(tmp_path / "s")),
                                 workers=1))
    assert len(batches) == 2 and torch.equal(torch.get_rng_state(), state)
