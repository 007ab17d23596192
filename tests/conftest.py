"""Shared fixtures (the helpers they use live in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import tiny_dual, tiny_hf_folder, write_synthetic_imagefolder


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    return write_synthetic_imagefolder(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def prepared_synthetic(synthetic_dataset, tmp_path_factory) -> Path:
    from clipmed.data.records import FieldMap
    from clipmed.data.split import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(str(synthetic_dataset), out, fields=FieldMap(group_field="article"), min_class_count=5, n=4096, seed=0,
            progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_dual_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_dual")
    tiny_dual().save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    return tiny_hf_folder(tmp_path_factory.mktemp("tiny_hf"))
