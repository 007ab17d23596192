"""`clipmed export`: a trained model in its own library's format, for tools that never import clipmed.

- hf: what `save_pretrained` writes for model and processor (`CLIPModel.from_pretrained(DIR)`);
- openclip: open_clip's hub layout, `open_clip_config.json` + `open_clip_model.safetensors`
  (`open_clip.create_model_and_transforms("local-dir:DIR")`, or `hf-hub:<repo>` once pushed to the hub);
- dual: the text tower in `save_pretrained` form with its tokenizer (`DIR/text/`), the EfficientNet image tower
  (`DIR/image_tower.safetensors`) and the projections with the temperature (`DIR/projections.safetensors`).

Every export holds a README.md whose Python block loads the model with plain PyTorch and that library and defines
`embed_images(paths)` and `embed_texts(texts)` (L2-normalised); the tests execute exactly that block.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import ClipmedError
from .io import atomic_write, write_text_atomic
from .models import ClipModel, DualEncoderCLIP, HFCLIP, OpenCLIP

README = """# {title}

Exported by clipmed from `{source}`. It loads without clipmed:

```python
{code}```

`embed_images` and `embed_texts` return L2-normalised embeddings: their dot products are cosine similarities,
and `{scale}.exp().clamp(max=100)` scales those into CLIP logits.
"""

HF_CODE = '''import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

DIR = {dir!r}  # this folder
model = CLIPModel.from_pretrained(DIR).eval()
processor = CLIPProcessor.from_pretrained(DIR)


@torch.no_grad()
def embed_images(paths):
    pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    features = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    return torch.nn.functional.normalize(features, dim=-1)


@torch.no_grad()
def embed_texts(texts):
    tokens = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                                 max_length=model.config.text_config.max_position_embeddings)
    output = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return torch.nn.functional.normalize(model.text_projection(output.pooler_output), dim=-1)
'''

OPENCLIP_CODE = '''import open_clip
import torch
from PIL import Image

DIR = {dir!r}  # this folder
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + DIR)
tokenizer = open_clip.get_tokenizer("local-dir:" + DIR)
model.eval()


@torch.no_grad()
def embed_images(paths):
    pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
    return model.encode_image(pixels, normalize=True)


@torch.no_grad()
def embed_texts(texts):
    return model.encode_text(tokenizer(texts), normalize=True)
'''

DUAL_CODE = '''import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

DIR = {dir!r}  # this folder
SIZE, MEAN, STD = {size}, torch.tensor({mean}).view(3, 1, 1), torch.tensor({std}).view(3, 1, 1)
image_tower = EfficientNet.from_name({image_tower!r}, image_size=SIZE{overrides})
del image_tower._fc  # the ImageNet classifier is not part of the encoder
image_tower.load_state_dict(load_file(f"{{DIR}}/image_tower.safetensors"))
image_tower.eval()
text_tower = AutoModel.from_pretrained(f"{{DIR}}/text", add_pooling_layer=False).eval()
tokenizer = AutoTokenizer.from_pretrained(f"{{DIR}}/text")
heads = load_file(f"{{DIR}}/projections.safetensors")  # image_projection.weight, text_projection.weight, logit_scale


def pixels(path):
    """Shorter side to SIZE, centre crop, normalise."""
    image = Image.open(path).convert("RGB")
    scale = SIZE / min(image.size)
    width, height = max(SIZE, round(image.width * scale)), max(SIZE, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.{resample})
    left, top = (width - SIZE) // 2, (height - SIZE) // 2
    image = image.crop((left, top, left + SIZE, top + SIZE))
    return (torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1) - MEAN) / STD


@torch.no_grad()
def embed_images(paths):
    features = image_tower.extract_features(torch.stack([pixels(p) for p in paths])).mean(dim=(2, 3))
    return torch.nn.functional.normalize(features @ heads["image_projection.weight"].T, dim=-1)


@torch.no_grad()
def embed_texts(texts):
    tokens = tokenizer(texts, padding=True, truncation=True, max_length={context_length}, return_tensors="pt")
    hidden = text_tower(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # mean over real tokens
    return torch.nn.functional.normalize(pooled @ heads["text_projection.weight"].T, dim=-1)
'''


def export_model(model: ClipModel, out: str | Path, *, source: str) -> Path:
    """Write `model` into the new or empty folder `out` in its library's format (see the module docstring)."""
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ClipmedError(f"{out} exists and is not an empty folder: export into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, HFCLIP):
        model.model.save_pretrained(str(out))
        model.processor.save_pretrained(str(out))
        title, code, scale = "CLIP model (transformers)", HF_CODE.format(dir=str(out)), "model.logit_scale"
    elif isinstance(model, OpenCLIP):
        model.save_open_clip(out)
        title, code, scale = "CLIP model (open_clip)", OPENCLIP_CODE.format(dir=str(out)), "model.logit_scale"
    elif isinstance(model, DualEncoderCLIP):
        code = _export_dual(model, out)
        title, scale = "Dual-encoder CLIP model (PyTorch)", 'heads["logit_scale"]'
    else:
        raise ClipmedError(f"cannot export a model of family {model.family!r}")
    write_text_atomic(out / "README.md", README.format(title=title, source=source, code=code, scale=scale))
    return out


def _export_dual(model: DualEncoderCLIP, out: Path) -> str:
    """Write the dual model's parts; return the README code that loads them."""
    state = model.state_dict()
    image = {name.removeprefix("image_tower."): tensor for name, tensor in state.items()
             if name.startswith("image_tower.")}
    heads = {name: state[name] for name in ("image_projection.weight", "text_projection.weight", "logit_scale")}
    for name, tensors in (("image_tower.safetensors", image), ("projections.safetensors", heads)):
        _save_safetensors(out / name, tensors)
    model.text_tower.save_pretrained(str(out / "text"))
    model.tokenizer.save_pretrained(str(out / "text"))
    config, preprocess = model.config, model.preprocess
    return DUAL_CODE.format(dir=str(out), size=preprocess.size, mean=list(preprocess.mean), std=list(preprocess.std),
                            resample=preprocess.interpolation.upper(), image_tower=config.image_tower,
                            overrides="".join(f", {key}={value!r}" for key, value in config.image_overrides.items()),
                            context_length=config.context_length)


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    state = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
