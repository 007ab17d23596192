"""One optimisation step's forward and backward: encoding a batch (with locked-tower caches and data-parallel
shards), and the loss, either in one pass or with gradient caching (GradCache) so that accumulated
micro-batches still see every negative of the effective batch. The objective made the batch and the loss."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from ..data.records import Record
from ..machine import Choices, apply_to_model, resolve
from ..machine import facts as machine_facts
from ..models.base import ClipModel
from ..objectives import Batch
from ..precision import autocast
from .config import TrainConfig
from .distributed import World
from .features import LockedFeatures


class StepRunner:
    """Forward + backward of one batch; leaves averaged gradients on the parameters and returns the loss."""

    def __init__(self, model: ClipModel, loss_fn: torch.nn.Module, config: TrainConfig, world: World = World(),
                 locked_images: LockedFeatures | None = None, locked_texts: LockedFeatures | None = None,
                 choices: Choices | None = None) -> None:
        """`choices`: the run's speed choices (clipmed.machine); None resolves them for this machine."""
        self.model, self.loss_fn, self.config, self.world = model, loss_fn, config, world
        self.locked_images, self.locked_texts = locked_images, locked_texts
        self.device = torch.device(config.device)
        self.choices = choices or resolve(config.speed(), machine_facts(self.device),
                                          image_tower=model.image_tower_kind)[0]
        apply_to_model(model, self.choices)
        # All of them: which ones train can change between epochs (LP-FT); those without a gradient are skipped.
        self.parameters = list(model.parameters())

    # ---- encoders -----------------------------------------------------------------------------------------

    def encode_images(self, records: Sequence[Record], pixels: torch.Tensor | None) -> torch.Tensor:
        """Embeddings of `records` from their pixels, or from the locked tower's cached features."""
        model = self.model
        with autocast(self.choices.image_precision, self.device):
            if self.locked_images is not None:
                features = self.locked_images.lookup([r.id for r in records]).to(self.device)
            else:
                if pixels is None or len(pixels) != len(records):
                    raise ValueError(f"batch of {len(records)} images came with "
                                     f"{'no' if pixels is None else len(pixels)} pixel rows")
                features = model.image_features(model.normalize_pixels(pixels.to(self.device, non_blocking=True)))
            return F.normalize(model.project_image(features).float(), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        model = self.model
        with autocast(self.choices.text_precision, self.device):
            if self.locked_texts is not None:
                features = self.locked_texts.lookup(texts).to(self.device)
            else:
                features = model.text_features_by_length(texts, self.device, self.config.text_bucket)
            return F.normalize(model.project_text(features).float(), dim=-1)

    # ---- the step -----------------------------------------------------------------------------------------

    def __call__(self, batch: Batch) -> float:
        if self.config.accum_steps > 1:
            loss = self._grad_cache_step(batch)
        else:
            world = self.world
            image = world.gather(self.encode_images(world.shard(batch.images), batch.pixels), len(batch.images))
            texts = world.shard(batch.texts) if batch.texts_sharded else batch.texts
            text = self.encode_texts(texts)
            text = world.gather(text, len(batch.texts)) if batch.texts_sharded else text
            if self.config.local_loss and world.distributed:
                rows = world.shard_rows(len(batch.images))
                # Weighted by the shard's share so that averaging over ranks (the gradient all-reduce) gives the
                # global mean; 1 when shards are equal, as training's batch sizes make them.
                share = (rows.stop - rows.start) * world.size / len(batch.images)
                loss = self.loss_fn(image, text, self.model.scale(), rows=rows) * share
                loss.backward()
                loss = world.mean(loss)
            else:
                loss = self._loss(image, text, batch)
                loss.backward()
        self.world.average_gradients(self.parameters)
        return loss.item()

    def _loss(self, image: torch.Tensor, text: torch.Tensor, batch: Batch) -> torch.Tensor:
        inputs = {k: v.to(image.device) for k, v in batch.loss_inputs.items()}
        return self.loss_fn(image, text, self.model.scale(), **inputs)

    def _grad_cache_step(self, batch: Batch) -> torch.Tensor:
        """GradCache: embed micro-batches without a graph, take the loss and its gradient with respect to the
        embeddings of the whole batch, then re-embed each micro-batch with a graph and backpropagate its slice
        of that gradient. Gradients equal the full batch's; activation memory is one micro-batch's."""
        steps = self.config.accum_steps
        image_chunks = [list(c) for c in _chunks(batch.images, steps)]
        pixel_chunks = _chunks(batch.pixels, steps) if batch.pixels is not None else [None] * len(image_chunks)
        image_chunks = list(zip(image_chunks, pixel_chunks))
        text_chunks = [list(c) for c in _chunks(batch.texts, steps)]
        rng_states: list[torch.Tensor] = []
        encode_images = lambda chunk: self.encode_images(*chunk)  # noqa: E731
        with torch.no_grad():
            image_parts = [self._remember(rng_states, encode_images, chunk) for chunk in image_chunks]
            text_parts = [self._remember(rng_states, self.encode_texts, chunk) for chunk in text_chunks]
        after = torch.get_rng_state()
        image = torch.cat(image_parts).requires_grad_()
        text = torch.cat(text_parts).requires_grad_()
        loss = self._loss(image, text, batch)
        loss.backward()  # the temperature's gradient lands directly; the embeddings' is cached below
        image_grads = image.grad.split([len(records) for records, _ in image_chunks])
        text_grads = text.grad.split([len(c) for c in text_chunks])
        encoders = [encode_images] * len(image_chunks) + [self.encode_texts] * len(text_chunks)
        # Replay each micro-batch with the RNG state of its first pass, so dropout masks match.
        for encode, chunk, grad, state in zip(encoders, image_chunks + text_chunks, image_grads + text_grads, rng_states):
            torch.set_rng_state(state)
            encode(chunk).backward(grad)
        torch.set_rng_state(after)
        return loss.detach()

    @staticmethod
    def _remember(states: list[torch.Tensor], encode, chunk) -> torch.Tensor:
        states.append(torch.get_rng_state())
        return encode(chunk)


def _chunks(items: Sequence, n: int) -> list[Sequence]:
    """n contiguous, nearly equal chunks (empty ones dropped)."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        if end > start:
            out.append(items[start:end])
        start = end
    return out
