"""Shared fixtures (the helpers they use live in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import tiny_dual, tiny_hf_folder, write_synthetic_imagefolder


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Every test session gets its own clipmed cache folder (image store, embeddings, features): tests never
    read or fill the user's ~/.cache/clipmed. Subprocesses inherit it through the environment."""
    folder = tmp_path_factory.mktemp("clipmed-cache")
    previous = os.environ.get("CLIPMED_CACHE")
    os.environ["CLIPMED_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("CLIPMED_CACHE", None)
    else:
        os.environ["CLIPMED_CACHE"] = previous


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
