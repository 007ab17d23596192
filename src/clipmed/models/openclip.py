"""open_clip models (`clipmed[openclip]`): any architecture open_clip builds, BiomedCLIP included.

Specs: `openclip:<arch>:<pretrained-tag-or-weights-file>` (weights trained contrastively: origin "clip"),
`openclip:hf-hub:<repo>` (config and weights from the hub, as BiomedCLIP is published), `openclip:local-dir:<folder>`
(that layout on disk, e.g. a `clipmed export`) and `openclip:<arch>` (the architecture with fresh weights: origin
"new"). A saved model folder is open_clip's own `local-dir:` layout (`open_clip_config.json`,
`open_clip_model.safetensors` and the tokenizer files of a Hugging Face text tower) plus clipmed's marker, so open_clip
alone reopens it with `create_model_and_transforms("local-dir:<folder>")`.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import ClipmedError, first_line
from ..io import atomic_write, read_json, write_json_atomic
from .base import ClipModel, ImagePreprocess, Origin, Tower, hf_token_lengths

MARKER = "clipmed_openclip.json"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# Parameters of open_clip's `CLIP` class that belong to its text tower (a `CustomTextCLIP` keeps them in `text.`).
_CLIP_TEXT_PARTS = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")


def import_open_clip() -> Any:
    """The open_clip module, or a ClipmedError that says how to install it."""
    try:
        import open_clip
    except ImportError as exc:
        raise ClipmedError("open_clip models need the optional extra: pip install 'clipmed[openclip]'") from exc
    return open_clip


class OpenCLIP(ClipModel):
    """An open_clip `CLIP`/`CustomTextCLIP` with its tokenizer, behind the common interface."""

    family = "openclip"

    def __init__(self, model: nn.Module, tokenizer: Any, model_cfg: dict, *, source: str, origin: Origin) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.source = source
        self.origin = origin
        self._bpe = isinstance(tokenizer, import_open_clip().tokenizer.SimpleTokenizer)
        self.preprocess = _preprocess(model.visual.preprocess_cfg)
        self.image_tower_kind = "transformer" if type(model.visual).__name__ == "VisionTransformer" else "conv"
        # Set through object.__setattr__ so that it is no registered child: its parameters are the model's own,
        # listed once under `model.`.
        text = getattr(model, "text", None)
        object.__setattr__(self, "_text_tower", text if text is not None else _TopLevelTextTower(model))
        if getattr(model, "logit_bias", None) is not None:  # open_clip's SigLIP models keep their bias in the model
            self.logit_bias = model.logit_bias
        self._sdpa_backends: list[SDPBackend] | None = None  # torch's choice until select_attention
        self._grad_checkpointing = False

    @property
    def logit_scale(self) -> nn.Parameter:  # type: ignore[override]
        return self.model.logit_scale

    def add_logit_bias(self, bias: float, log_scale: float) -> None:
        """In open_clip's own place (`CLIP.logit_bias`, `init_logit_bias` in its config), so open_clip reloads it."""
        super().add_logit_bias(bias, log_scale)
        vars(self.model).pop("logit_bias", None)  # open_clip's plain `None` attribute of a softmax model
        self.model.logit_bias = self.logit_bias
        self.model_cfg["init_logit_bias"] = bias

    # ---- encoders --------------------------------------------------------------------------------------

    # open_clip's projections sit inside its towers (and are locked with them): the towers' outputs are the
    # projected features, the heads are the identity.
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._attention():
            return self.model.visual(pixels)

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._attention():  # open_clip builds its causal and padding masks from the ids
            return self._text_tower(tokens["input_ids"])

    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def select_attention(self, kind: str) -> None:
        # open_clip's attention calls torch's scaled_dot_product_attention: "matmul" is its math backend (faster
        # on the CPU than the fused kernel, README Performance), "fused" torch's choice.
        self._sdpa_backends = [SDPBackend.MATH] if kind == "matmul" else None

    def _attention(self):
        # The choice holds inside the encoders' forward only: with gradient checkpointing, backward recomputes
        # the forward outside it, and a recomputation on another kernel would not match what was saved.
        if self._sdpa_backends and not self._grad_checkpointing:
            return sdpa_kernel(self._sdpa_backends)
        return nullcontext()

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.model.set_grad_checkpointing(enabled)
        self._grad_checkpointing = enabled

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """open_clip's ids, always padded to the full context: a CLIP text tower's causal mask is built for that
        length; the attention mask marks the real tokens, as the other families' tokenizers do."""
        texts = list(texts)
        ids = self.tokenizer(texts)
        real = torch.tensor(self.token_lengths(texts)).clamp(max=ids.shape[1])
        mask = (torch.arange(ids.shape[1]).unsqueeze(0) < real.unsqueeze(1)).long()
        return {"input_ids": ids, "attention_mask": mask}

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    def token_lengths(self, texts: list[str]) -> list[int]:
        if self._bpe:
            return [len(self.tokenizer.encode(text)) + 2 for text in texts]  # + start and end of text
        clean = getattr(self.tokenizer, "clean_fn", str)  # the Hugging Face wrappers clean text first
        return hf_token_lengths(self.tokenizer.tokenizer, [clean(text) for text in texts])

    # ---- bookkeeping -----------------------------------------------------------------------------------

    def _tower_and_origin(self, name: str) -> tuple[Tower, Origin]:
        inner = name.removeprefix("model.")
        if inner.startswith("visual."):
            return "image", self.origin
        if inner.startswith("text.") or inner.startswith(_CLIP_TEXT_PARTS):
            return "text", self.origin
        return "head", self.origin  # logit_scale (and a SigLIP logit_bias)

    def towers(self) -> dict[str, nn.Module]:
        return {"image": self.model.visual, "text": self._text_tower}

    def describe(self) -> dict:
        return {**super().describe(), "source": self.source}

    def save(self, directory: str | Path) -> None:
        """open_clip's `local-dir:` layout (see the module docstring) plus clipmed's marker."""
        directory = Path(directory)
        self.save_open_clip(directory)
        write_json_atomic(directory / MARKER, {"family": self.family, "source": self.source, "origin": self.origin})

    def save_open_clip(self, directory: Path) -> None:
        """What open_clip alone opens: config, safetensors weights and a Hugging Face tokenizer's files."""
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.contiguous() for name, tensor in self.model.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        preprocess_cfg = {key: list(value) if isinstance(value, tuple) else value
                          for key, value in self.model.visual.preprocess_cfg.items()}
        write_json_atomic(directory / CONFIG_NAME, {"model_cfg": self.model_cfg, "preprocess_cfg": preprocess_cfg})
        if hasattr(self.tokenizer, "save_pretrained"):  # open_clip reads a local-dir HF tokenizer from the folder
            self.tokenizer.save_pretrained(str(directory))

    @classmethod
    def load(cls, directory: str | Path) -> "OpenCLIP":
        """Reopen a folder written by `save`."""
        directory = Path(directory)
        marker = read_json(directory / MARKER)
        if not (directory / WEIGHTS_NAME).is_file():
            raise ClipmedError(f"{directory} has no {WEIGHTS_NAME}: the saved open_clip model is incomplete")
        return _create(f"local-dir:{directory}", None, source=marker["source"], origin=marker["origin"])


class _TopLevelTextTower(nn.Module):
    """open_clip's `CLIP` keeps the parts of its text tower at its own top level; this groups them into one module
    (for locking, feature-cache fingerprints and compile) whose forward is `CLIP.encode_text`."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.token_embedding, self.transformer, self.ln_final = clip.token_embedding, clip.transformer, clip.ln_final
        self.positional_embedding = clip.positional_embedding
        self.text_projection = clip.text_projection
        self.encode = clip.encode_text

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encode(ids)


def build_openclip(spec_body: str) -> OpenCLIP:
    """`hf-hub:<repo>`, `local-dir:<folder>`, `<arch>:<pretrained-tag-or-path>` or `<arch>` (fresh weights)."""
    if spec_body.startswith(("hf-hub:", "local-dir:")):
        return _create(spec_body, None, source=f"openclip:{spec_body}", origin="clip")
    arch, _, pretrained = spec_body.partition(":")
    if not arch:
        raise ClipmedError("openclip spec needs an architecture: openclip:<arch>[:<pretrained-tag-or-path>] "
                           "or openclip:hf-hub:<repo>")
    return _create(arch, pretrained or None, source=f"openclip:{spec_body}", origin="clip" if pretrained else "new")


def _create(name: str, pretrained: str | None, *, source: str, origin: Origin) -> OpenCLIP:
    open_clip = import_open_clip()
    try:
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            raise ClipmedError(f"open_clip has no architecture {name!r}: see open_clip.list_models(), or use "
                               "openclip:hf-hub:<repo>")
        # weights_only / safetensors: a checkpoint can never run code. require_pretrained: open_clip would
        # otherwise fall back to random weights when a download fails. A fresh model fetches no tower weights.
        model = open_clip.create_model(name, pretrained=pretrained, weights_only=True,
                                       require_pretrained=origin == "clip", pretrained_image=False,
                                       pretrained_text=False)
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, OSError, ValueError) as exc:
        # torch's load_state_dict lists each tensor that does not fit on a line of its own, after a heading.
        detail = next((line.strip() for line in str(exc).splitlines() if line.strip().startswith("size mismatch")),
                      first_line(exc))
        raise ClipmedError(f"cannot open {source} with open_clip: {detail}") from exc
    return OpenCLIP(model, tokenizer, model_cfg, source=source, origin=origin)


def _preprocess(cfg: dict) -> ImagePreprocess:
    """clipmed's pipeline (shorter side, centre crop, normalise) from open_clip's preprocess_cfg."""
    size = cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise ClipmedError(f"open_clip model expects {height}x{width} images; clipmed feeds square crops only")
    if cfg.get("resize_mode", "shortest") != "shortest":
        warnings.warn(f"open_clip resize_mode {cfg['resize_mode']!r}: clipmed resizes the shorter side and crops the "
                      "centre instead", stacklevel=3)
    interpolation = cfg.get("interpolation", "bicubic")
    return ImagePreprocess(size=int(height), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                           interpolation=interpolation if interpolation in ("bicubic", "bilinear") else "bicubic")
