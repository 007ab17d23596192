"""Any transformers `CLIPModel` with its processor: openai/clip-vit-base-patch32, PubMedCLIP, a local folder."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Sequence

import torch

from ..errors import ClipmedError, first_line
from ..io import write_json_atomic
from .base import (ClipModel, ImagePreprocess, Origin, Tower, check_tensor_shapes, hf_token_lengths, set_hf_checkpointing,
                   tokenize_padded)
from .clip_pooling import supports_pooled_forward, text_pooled, vision_pooled

MARKER = "clipmed_hf.json"
# Files whose `auto_map` asks transformers to import Python code shipped with the model.
REMOTE_CODE_FILES = ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def remote_code_request(folder: str | Path) -> str | None:
    """The first file of a local model folder whose `auto_map` asks for the model's own code, else None."""
    for name in REMOTE_CODE_FILES:
        try:
            data = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            return name
    return None


class HFCLIP(ClipModel):
    family = "hf"

    def __init__(self, model, processor, *, source: str) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.source = source
        image_processor = processor.image_processor
        crop = image_processor.crop_size
        size = crop["height"] if isinstance(crop, dict) else crop.height
        self.preprocess = ImagePreprocess(size=int(size), mean=tuple(image_processor.image_mean),
                                          std=tuple(image_processor.image_std))
        self._context_length = int(model.config.text_config.max_position_embeddings)
        self._loaded_attention = model.config._attn_implementation
        self._pooled_forward = supports_pooled_forward(model.vision_model, model.text_model)

    @property
    def logit_scale(self) -> torch.nn.Parameter:  # type: ignore[override]
        return self.model.logit_scale

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._pooled_forward:
            return vision_pooled(self.model.vision_model, pixels)
        return self.model.vision_model(pixel_values=pixels).pooler_output

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.visual_projection(features)

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._pooled_forward:
            return text_pooled(self.model.text_model, tokens["input_ids"], tokens["attention_mask"])
        return self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output

    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.text_projection(features)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        set_hf_checkpointing(self.model, enabled)

    def select_attention(self, kind: str) -> None:
        # "matmul" is transformers' eager attention; "fused" keeps what the model was loaded with (sdpa by default).
        wanted = "eager" if kind == "matmul" else self._loaded_attention
        if self.model.config._attn_implementation == wanted or not hasattr(self.model, "set_attn_implementation"):
            return
        try:
            self.model.set_attn_implementation(wanted)
        except (ValueError, NotImplementedError):
            pass  # a model (remote code) that offers no such choice keeps its own: same results, its own speed

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return tokenize_padded(self.processor.tokenizer, texts, self.context_length)

    @property
    def context_length(self) -> int:
        return self._context_length

    def token_lengths(self, texts: list[str]) -> list[int]:
        return hf_token_lengths(self.processor.tokenizer, texts)

    def _tower_and_origin(self, name: str) -> tuple[Tower, Origin]:
        inner = name.removeprefix("model.")
        if inner.startswith("vision_model.") or inner.startswith("visual_projection."):
            return "image", "clip"
        if inner.startswith("text_model.") or inner.startswith("text_projection."):
            return "text", "clip"
        return "head", "clip"

    def towers(self) -> dict[str, torch.nn.Module]:
        return {"image": self.model.vision_model, "text": self.model.text_model}

    def lora_targets(self) -> dict[str, list[str]]:
        layers = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # every linear layer of both towers
        return {"image": layers, "text": list(layers)}

    def describe(self) -> dict:
        return {**super().describe(), "source": self.source}

    def save(self, directory: str | Path) -> None:
        """What `save_pretrained` writes for model and processor: `CLIPModel.from_pretrained(directory)` opens it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(directory))
        self.processor.save_pretrained(str(directory))
        bias = None if self.logit_bias is None else self.logit_bias.item()
        write_json_atomic(directory / MARKER, {"family": self.family, "source": self.source, "logit_bias": bias})

    @classmethod
    def load(cls, source: str, *, trust_remote_code: bool = False) -> "HFCLIP":
        """Open a hub id or a local folder (`save_pretrained` layout) as a CLIPModel with its processor.

        Loading never runs code from the model's files unless `trust_remote_code` (`--trust-remote-code`):
        - a folder or hub config whose `auto_map` asks for the model's own Python code is refused without the
          flag (transformers' CLIPModel would silently ignore that code and build a different model); with it,
          the Auto classes load the model's code;
        - weights: safetensors whenever the folder has them (`use_safetensors=True`, so a `pytorch_model.bin`
          beside them is never read); a folder with only `.bin` weights is read with `weights_only=True`, the
          restricted unpickler that accepts tensors and plain data only, and a pickle naming anything else is
          refused. `.bin` files are not refused outright: many published CLIP checkpoints have nothing else, and
          the restricted unpickler is what PyTorch itself prescribes for untrusted checkpoints.
        """
        from transformers import AutoModel, AutoProcessor, CLIPModel, CLIPProcessor

        folder = Path(source) if Path(source).is_dir() else None
        asked = remote_code_request(folder) if folder is not None else None
        if asked and not trust_remote_code:
            raise ClipmedError(_remote_code_refusal(source, asked))
        options: dict = {"weights_only": True}
        if folder is not None and any(folder.glob("*.safetensors")):
            options["use_safetensors"] = True
        model_class, processor_class = (AutoModel, AutoProcessor) if trust_remote_code else (CLIPModel, CLIPProcessor)
        if trust_remote_code:  # only ever passed when the user asked for it
            options["trust_remote_code"] = True
        try:
            model = model_class.from_pretrained(source, **options)
            if not trust_remote_code and getattr(model.config, "auto_map", None):  # a hub config asking for code
                raise ClipmedError(_remote_code_refusal(source, "config.json"))
            processor = processor_class.from_pretrained(
                source, **({"trust_remote_code": True} if trust_remote_code else {}))
        except pickle.UnpicklingError as exc:
            raise ClipmedError(f"refusing to load hf:{source}: its weights file holds objects that would run code "
                               f"when loaded, not only tensors ({first_line(exc)}); use a copy of the model with "
                               "safetensors weights") from None
        except RuntimeError as exc:  # transformers' "ignore_mismatched_sizes" refusal, which names no tensor
            if folder is not None and not trust_remote_code:
                _check_folder_shapes(folder)
            raise
        except (OSError, ValueError) as exc:
            where = "folder" if Path(source).exists() else "hub id (needs internet, or a local folder)"
            raise ClipmedError(f"cannot open hf:{source} as a transformers CLIPModel with its processor "
                               f"({where}): {first_line(exc)}") from exc
        try:
            loaded = cls(model, processor, source=source)
        except AttributeError as exc:
            raise ClipmedError(f"hf:{source} is not a CLIP-style model with an image and a text tower "
                               f"({first_line(exc)})") from exc
        bias = _saved_bias(folder)
        if bias is not None:  # trained with SigLIP's loss by clipmed: the bias is kept in clipmed's marker
            loaded.logit_bias = torch.nn.Parameter(torch.tensor(bias))
        return loaded


def _saved_bias(folder: Path | None) -> float | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("logit_bias") if folder else None
    except (OSError, ValueError):
        return None


def _check_folder_shapes(folder: Path) -> None:
    """Compare every safetensors file of a save_pretrained folder with the CLIPModel its config.json builds (on the
    meta device: no memory, no weights); refuses the first tensor that does not fit."""
    from transformers import CLIPConfig, CLIPModel

    with torch.device("meta"):
        expected = CLIPModel(CLIPConfig.from_pretrained(str(folder))).state_dict()
    for weights in sorted(folder.glob("*.safetensors")):
        check_tensor_shapes(expected, weights)


def _remote_code_refusal(source: str, asked: str) -> str:
    return (f"hf:{source} asks to run its own Python code ('auto_map' in {asked}); clipmed does not run code that "
            "comes with a model unless you pass --trust-remote-code, and only do that for a model you trust")
