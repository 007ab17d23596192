"""Any transformers `CLIPModel` with its processor: openai/clip-vit-base-patch32, PubMedCLIP, a local folder."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..errors import ClipmedError
from ..io import write_json_atomic
from .base import ClipModel, ImagePreprocess, Origin, Tower

MARKER = "clipmed_hf.json"


def _features(output) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output holds the projected features; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


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

    @property
    def logit_scale(self) -> torch.nn.Parameter:  # type: ignore[override]
        return self.model.logit_scale

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return _features(self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        encoded = self.processor.tokenizer(list(texts), padding=True, truncation=True, max_length=self.context_length,
                                           pad_to_multiple_of=8, return_tensors="pt")
        # Rounding the padding up to 8 must never exceed the position table.
        ids, mask = encoded["input_ids"][:, : self.context_length], encoded["attention_mask"][:, : self.context_length]
        return {"input_ids": ids, "attention_mask": mask}

    @property
    def context_length(self) -> int:
        return self._context_length

    def count_truncated(self, texts: Sequence[str]) -> int:
        lengths = self.processor.tokenizer(list(texts), truncation=False)["input_ids"]
        return sum(len(ids) > self.context_length for ids in lengths)

    def _tower_and_origin(self, name: str) -> tuple[Tower, Origin]:
        inner = name.removeprefix("model.")
        if inner.startswith("vision_model.") or inner.startswith("visual_projection."):
            return "image", "clip"
        if inner.startswith("text_model.") or inner.startswith("text_projection."):
            return "text", "clip"
        return "head", "clip"

    def towers(self) -> dict[str, torch.nn.Module]:
        return {"image": self.model.vision_model, "text": self.model.text_model}

    def describe(self) -> dict:
        return {**super().describe(), "source": self.source}

    def save(self, directory: str | Path) -> None:
        """What `save_pretrained` writes for model and processor: `CLIPModel.from_pretrained(directory)` opens it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(directory))
        self.processor.save_pretrained(str(directory))
        write_json_atomic(directory / MARKER, {"family": self.family, "source": self.source})

    @classmethod
    def load(cls, source: str, *, trust_remote_code: bool = False) -> "HFCLIP":
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(source, trust_remote_code=trust_remote_code)
            processor = CLIPProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        except OSError as exc:
            where = "folder" if Path(source).exists() else "hub id (needs internet, or a local folder)"
            raise ClipmedError(f"cannot open hf:{source} as a transformers CLIPModel with its processor "
                               f"({where}): {str(exc).splitlines()[0]}") from exc
        return cls(model, processor, source=source)
