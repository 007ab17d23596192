"""Embeddings computed once per model and split, reused by zero-shot, probe and retrieval."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..data.datasets import pixel_batches, store_batches
from ..data.store import ImageStore, StoreOptions
from ..data.records import Record
from ..machine import ready_for_inference
from ..models.base import ClipModel
from ..precision import autocast


def _device(model: ClipModel) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """eval() for the block, then every module's own mode back (frozen BatchNorm stays frozen)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def embed_images(model: ClipModel, records: Sequence[Record], *, batch_size: int = 64, precision: str = "bf16",
                 progress: bool = False, store: StoreOptions | ImageStore | None = StoreOptions(),
                 loader_workers: int | None = None) -> torch.Tensor:
    """L2-normalised float32 image embeddings [N, D] in record order.

    Pixels come from the image store (`store`; images it lacks are stored first; or an opened ImageStore holding
    them all) through a DataLoader with `loader_workers` processes; `store=None` decodes the files in this process
    (a few images named by a user, whose unreadable file raises its one-line ImageError).
    """
    device = _device(model)
    batches = pixel_batches([r.image_path for r in records], model.preprocess.size, model.preprocess.interpolation,
                            batch_size=batch_size, store=store, device=device,
                            workers=0 if store is None and loader_workers is None else loader_workers)
    batches = tqdm(batches, total=-(-len(records) // batch_size), desc="embed images",
                   disable=None if progress else True, leave=False)
    chunks = list(encode_pixel_batches(model, batches, precision=precision))
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


# Images per forward pass of a long streaming pass (`embed`, `index`): its memory is one batch's activations, so
# half the evaluation batch holds about half of them, for a small loss of speed (README, Scale).
STREAM_BATCH = 32


def embed_store_rows(model: ClipModel, store: ImageStore, rows: np.ndarray, *, batch_size: int = STREAM_BATCH,
                     precision: str = "bf16", loader_workers: int | None = None) -> Iterator[torch.Tensor]:
    """L2-normalised float32 image embeddings of these store rows, a batch at a time, in order: one DataLoader
    for the whole pass, so a dataset of any size streams through the same workers in constant memory."""
    batches = store_batches(store, rows, batch_size=batch_size, workers=loader_workers, device=_device(model))
    return encode_pixel_batches(model, batches, precision=precision)


@torch.no_grad()
def encode_pixel_batches(model: ClipModel, batches: Iterable[torch.Tensor], *, precision: str
                         ) -> Iterator[torch.Tensor]:
    """L2-normalised float32 embeddings [B, D] of each uint8 pixel batch (on the CPU)."""
    device = _device(model)
    ready_for_inference(model, device)
    with evaluating(model):
        for pixels in batches:
            pixels = model.normalize_pixels(pixels.to(device, non_blocking=True))
            with autocast(precision, device):
                embeddings = F.normalize(model.encode_image(pixels).float(), dim=-1).cpu()
            yield embeddings


# Real tokens per text forward pass, at most (short texts still go `batch_size` at a time): a batch's activations
# grow with its texts x their length, and a full batch of the longest captions held several times the memory of the
# same texts in smaller batches, for no gain in speed.
TEXT_TOKENS_PER_BATCH = 4096


def text_batches(lengths: Sequence[int], batch_size: int, max_tokens: int = TEXT_TOKENS_PER_BATCH
                 ) -> list[list[int]]:
    """Positions of the texts of each forward pass, in order of token length (each batch pads only to its own
    longest): at most `batch_size` texts, and texts x the batch's longest length at most `max_tokens` (a text
    longer than that goes alone)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if not batches or len(batches[-1]) == batch_size or (len(batches[-1]) + 1) * lengths[i] > max_tokens:
            batches.append([])
        batches[-1].append(i)
    return batches


@torch.no_grad()
def embed_texts(model: ClipModel, texts: Sequence[str], *, batch_size: int = 128, precision: str = "bf16",
                progress: bool = False) -> torch.Tensor:
    """L2-normalised float32 text embeddings [N, D] in input order."""
    device = _device(model)
    ready_for_inference(model, device)
    lengths = [min(n, model.context_length) for n in model.token_counts(texts)]
    batches = text_batches(lengths, batch_size, TEXT_TOKENS_PER_BATCH)
    chunks = []
    with evaluating(model):
        for batch in tqdm(batches, desc="embed texts", disable=None if progress else True, leave=False):
            tokens = {k: v.to(device) for k, v in model.tokenize([texts[i] for i in batch]).items()}
            with autocast(precision, device):
                chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    order = torch.tensor([i for batch in batches for i in batch])
    return torch.cat(chunks)[torch.argsort(order)] if chunks else torch.empty(0, 0)
