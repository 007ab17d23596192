"""Model specs -> `ClipModel`.

Specs: `dual:efficientnet-lite0+minilm` (the offline default), `hf:<hub-id-or-folder>` (a transformers CLIPModel),
`openclip:<arch>[:<pretrained-tag-or-path>]` or `openclip:hf-hub:<repo>` (open_clip, the `clipmed[openclip]` extra),
or a folder: a run folder (its `model/`) or a saved model folder of any family.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ClipmedError
from .base import ClipModel, ImagePreprocess
from .dual import CONFIG_NAME as DUAL_CONFIG
from .dual import DEFAULT_SPEC, DualConfig, DualEncoderCLIP, build_dual
from .hf_clip import MARKER as HF_MARKER
from .hf_clip import HFCLIP
from .openclip import MARKER as OPENCLIP_MARKER
from .openclip import OpenCLIP, build_openclip

__all__ = ["ClipModel", "ImagePreprocess", "DualConfig", "DualEncoderCLIP", "HFCLIP", "OpenCLIP", "DEFAULT_SPEC",
           "load_model", "model_dir"]

SPEC_HELP = ("use dual:efficientnet-lite0+minilm (offline default), hf:<hub-id-or-folder> for a transformers "
             "CLIPModel, openclip:<arch>:<pretrained-tag-or-path> or openclip:hf-hub:<repo>, or a run folder written "
             "by `clipmed train`")


def model_dir(path: str | Path) -> Path | None:
    """The folder that holds a saved model: `path` itself, or `path/model` for a run folder; None if neither."""
    path = Path(path)
    for candidate in (path / "model", path):
        if (candidate / DUAL_CONFIG).exists() or (candidate / HF_MARKER).exists() or (candidate / "config.json").exists():
            return candidate
        if (candidate / OPENCLIP_MARKER).exists():
            return candidate
    return None


def load_model(spec: str, *, trust_remote_code: bool = False) -> ClipModel:
    """Open a model from a spec string or a folder (see module docstring)."""
    if spec.startswith("dual:"):
        return build_dual(spec.removeprefix("dual:"))
    if spec.startswith("hf:"):
        return HFCLIP.load(spec.removeprefix("hf:"), trust_remote_code=trust_remote_code)
    if spec.startswith("openclip:"):
        return build_openclip(spec.removeprefix("openclip:"))
    folder = model_dir(spec) if Path(spec).is_dir() else None
    if folder is None and (Path(spec) / "run.json").is_file():
        raise ClipmedError(f"{spec} is a run folder without a finished model: resume it (`clipmed train --resume "
                           f"{spec}`) or train it")
    if folder is None:
        raise ClipmedError(f"unknown model spec {spec!r}: {SPEC_HELP}")
    if (folder / DUAL_CONFIG).exists():
        return DualEncoderCLIP.load(folder)
    if (folder / OPENCLIP_MARKER).exists():
        return OpenCLIP.load(folder)
    return HFCLIP.load(str(folder), trust_remote_code=trust_remote_code)
