"""Daily use of a model: label images (predict), embed a dataset (embed), build and search an image index.

Embedding is evaluation/embed.py's and class prompts are evaluation/zeroshot.py's; what is added here is pure
arithmetic on their embeddings (probabilities, top-k search), the files (Parquet, an index folder) and a fingerprint
that ties an index to the exact weights that built it.

An index folder holds `index.json` (the model reference and fingerprint, precision, source dataset, the items' id,
path, caption and attribution fields, the rows skipped for an unreadable image, and the name and SHA-256 of its
embeddings file) and that file, `embeddings-<sha256 prefix>.npy` (float32 [N, D], L2-normalised image embeddings,
row i = item i). A rebuild writes a new embeddings file beside the old one, then replaces index.json (one atomic
rename: the commit), then deletes the old file; a rebuild killed at any moment leaves the old index or the new one,
and `load_index` refuses embeddings whose checksum is not the one index.json names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.records import Record
from .data.sources import LoadedSource
from .data.store import ImageStore, StoreOptions, open_store
from .errors import ClipmedError, first_line
from .evaluation.embed import embed_images, embed_store_rows, embed_texts
from .evaluation.zeroshot import class_embeddings, zero_shot_scores
from .io import atomic_write, read_json, sha256_file
from .knowledge.prompts import DEFAULT_TEMPLATE, check_template
from .locking import FileLock
from .models import ClipModel
from .models.base import model_fingerprint
from .processes import release_freed_memory

Kinds = Literal["images", "texts", "both"]
INDEX_JSON = "index.json"
INDEX_FORMAT = 2  # 1: a fixed embeddings.npy without checksum (a killed rebuild could mix two indexes)


# ---- models --------------------------------------------------------------------------------------------

def model_reference(spec: str) -> str:
    """How an index names its model: a folder as an absolute path, a spec string as given."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def image_record(path: str) -> Record:
    """A record for an image file named on the command line (its id is the path as given)."""
    return Record(id=path, image_path=os.path.abspath(path), caption=None)


# ---- predict -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    image: str
    labels: list[str]          # the top-k labels, most probable first
    probabilities: list[float]


def label_probabilities(image_embeddings: torch.Tensor, class_weights: torch.Tensor, scale: float,
                        bias: float | None = None) -> torch.Tensor:
    """[N, C] zero-shot probabilities: CLIP's softmax over the labels of scale * cosine similarity or, for a model
    trained with SigLIP's loss (it has a `bias`), each label's own sigmoid(scale * cosine + bias)."""
    logits = scale * zero_shot_scores(image_embeddings, class_weights)
    return torch.softmax(logits, dim=-1) if bias is None else torch.sigmoid(logits + bias)


def predict(model: ClipModel, image_paths: Sequence[str], labels: Sequence[str], *,
            templates: Sequence[str] = (DEFAULT_TEMPLATE,), top_k: int = 3, precision: str = "bf16") -> list[Prediction]:
    """The `top_k` most probable of `labels` for each image. Each label's text embedding is the mean over
    `templates` (the label goes into each as {label}): one template is a single prompt, several a prompt ensemble."""
    labels = list(labels)
    if not labels or len(set(labels)) != len(labels):
        raise ClipmedError(f"labels must be distinct and at least one, got {labels}")
    if not templates:
        raise ClipmedError("no prompt template given: pass --template or --templates FILE")
    for template in templates:
        check_template(template, "--template")
    if top_k < 1:
        raise ClipmedError(f"--top-k must be at least 1, not {top_k}")
    images = embed_images(model, [image_record(p) for p in image_paths], precision=precision, store=None)
    weights = class_embeddings(model, labels, list(templates), precision=precision)
    bias = None if model.logit_bias is None else model.logit_bias.item()
    top = label_probabilities(images, weights, model.scale().item(), bias).topk(min(top_k, len(labels)), dim=-1)
    return [Prediction(path, [labels[i] for i in index.tolist()], values.tolist())
            for path, values, index in zip(image_paths, top.values, top.indices)]


def format_predictions(predictions: Sequence[Prediction]) -> str:
    """A plain-text table: one line per (image, label), the image named on its first line."""
    width = max([len("label")] + [len(label) for p in predictions for label in p.labels])
    lines = [f"{'label':<{width}}  probability  image"]
    for prediction in predictions:
        for rank, (label, probability) in enumerate(zip(prediction.labels, prediction.probabilities)):
            lines.append(f"{label:<{width}}  {probability:>11.3f}  {prediction.image if rank == 0 else ''}".rstrip())
    return "\n".join(lines)


# ---- embed ---------------------------------------------------------------------------------------------

# Rows embedded and written per Parquet row group: memory holds one chunk, whatever the dataset's size. Small
# enough that even a small dataset passes several chunks (so its memory is the same steady state as a large one's)
# and the heap is trimmed (after each chunk) before freed activations pile up.
EMBED_CHUNK = 1024


@dataclass
class Embedded:
    """What `write_embeddings` or `build_index` wrote, and what could not be embedded."""

    images: int = 0
    texts: int = 0
    skipped_images: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    skipped_texts: int = 0      # rows without a caption


def _record_chunks(source: LoadedSource) -> Iterator[list[Record]]:
    """The readable rows of `source` in order, EMBED_CHUNK at a time (one streaming pass per call)."""
    chunk: list[Record] = []
    for row in source.rows():
        if row.record is not None:
            chunk.append(row.record)
            if len(chunk) == EMBED_CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _image_store(model: ClipModel, source: LoadedSource, store: StoreOptions, progress: bool) -> ImageStore | None:
    """The image store entry of every image `source` names (one streaming pass; the images it lacks are stored),
    None when no row names an image."""
    paths = [r.image_path for chunk in _record_chunks(source) for r in chunk if r.image_path is not None]
    return open_store(paths, model.preprocess.size, model.preprocess.interpolation, store,
                      progress=progress) if paths else None


def _usable_chunks(source: LoadedSource, image_store: ImageStore | None
                   ) -> Iterator[tuple[list[Record], np.ndarray, list[tuple[str, str]]]]:
    """Per chunk of rows: those whose image is in the store, their store rows, and (id, reason) of the others."""
    for chunk in _record_chunks(source):
        rows, failures = (image_store.lookup([r.image_path or "" for r in chunk]) if image_store is not None
                          else (np.full(len(chunk), -1), {}))
        usable = rows >= 0
        yield ([r for r, ok in zip(chunk, usable.tolist()) if ok], rows[usable],
               [(r.id, "no image" if r.image_path is None else failures[r.image_path])
                for r, ok in zip(chunk, usable.tolist()) if not ok])


def _usable_rows(source: LoadedSource, image_store: ImageStore | None) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """One pass: the store rows of every usable image in source order (8 bytes each), and (id, reason) of the rows
    that cannot be embedded."""
    rows, skipped = [], []
    for _, chunk_rows, chunk_skipped in _usable_chunks(source, image_store):
        rows.append(chunk_rows)
        skipped += chunk_skipped
    return (np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)), skipped


def _embedded_chunks(model: ClipModel, source: LoadedSource, image_store: ImageStore | None, rows: np.ndarray, *,
                     precision: str, loader_workers: int | None) -> Iterator[tuple[list[Record], torch.Tensor]]:
    """Per chunk of rows: the usable ones and their image embeddings. One loader streams every usable row
    (`rows`, from `_usable_rows`) through the same workers; a pass over the source hands each chunk its share."""
    stream = (embed_store_rows(model, image_store, rows, precision=precision, loader_workers=loader_workers)
              if len(rows) else iter(()))
    pending: list[torch.Tensor] = []  # embeddings streamed but not yet handed out
    for usable, _, _ in _usable_chunks(source, image_store):
        have = sum(len(t) for t in pending)
        while have < len(usable):
            pending.append(next(stream))
            have += len(pending[-1])
        joined = torch.cat(pending) if pending else torch.empty(0, 0)
        # A copy of the tail, so that the whole joined buffer is freed with the chunk, not kept by a view.
        pending = [joined[len(usable):].clone()] if have > len(usable) else []
        yield usable, joined[:len(usable)]
        del joined
        release_freed_memory()  # the chunk is written: its buffers go back to the OS (`processes`)


def write_embeddings(model: ClipModel, source: LoadedSource, path: str | Path, *, what: Kinds = "both",
                     precision: str = "bf16", progress: bool = False, store: StoreOptions = StoreOptions(),
                     loader_workers: int | None = None) -> Embedded:
    """Image and/or caption embeddings of `source` into a Parquet file (columns id, kind, embedding: string, string,
    list<float32>), images first; unreadable images and missing captions skipped and counted.

    The source is streamed: one pass stores the images the store lacks, then each chunk of rows is embedded and
    written as a row group, so memory does not grow with the dataset. The file appears atomically when complete.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if what not in ("images", "texts", "both"):
        raise ClipmedError(f"what must be images, texts or both, not {what!r}")
    done = Embedded()

    def write_chunk(writer: "pq.ParquetWriter", ids: list[str], kind: str, embeddings: torch.Tensor) -> None:
        n, dim = embeddings.shape
        vectors = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * dim),
                                           pa.array(embeddings.numpy().reshape(-1), type=pa.float32()))
        writer.write_table(pa.table({"id": pa.array(ids, type=pa.string()),
                                     "kind": pa.array([kind] * n, type=pa.string()), "embedding": vectors}))

    def write(tmp: str) -> None:
        schema = pa.schema([("id", pa.string()), ("kind", pa.string()), ("embedding", pa.list_(pa.float32()))])
        with pq.ParquetWriter(tmp, schema) as writer:
            if what in ("images", "both"):
                image_store = _image_store(model, source, store, progress)
                bar = tqdm(desc="embed images", unit="row", disable=None if progress else True)
                rows, done.skipped_images = _usable_rows(source, image_store)
                bar.update(len(done.skipped_images))
                for usable, embeddings in _embedded_chunks(model, source, image_store, rows, precision=precision,
                                                           loader_workers=loader_workers):
                    if usable:
                        write_chunk(writer, [r.id for r in usable], "image", embeddings)
                        done.images += len(usable)
                    bar.update(len(usable))
                bar.close()
            if what in ("texts", "both"):
                bar = tqdm(desc="embed texts", unit="row", disable=None if progress else True)
                for chunk in _record_chunks(source):
                    with_text = [r for r in chunk if r.caption is not None]
                    done.skipped_texts += len(chunk) - len(with_text)
                    if with_text:
                        write_chunk(writer, [r.id for r in with_text], "text",
                                    embed_texts(model, [r.caption for r in with_text], precision=precision))
                        done.texts += len(with_text)
                    bar.update(len(chunk))
                    release_freed_memory()  # as after each image chunk: each chunk's text shapes differ
                bar.close()

    atomic_write(path, write)
    return done


# ---- index and search ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Index:
    directory: Path
    embeddings: np.ndarray  # float32 [N, D]
    meta: dict              # index.json


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float            # cosine similarity
    id: str
    path: str
    caption: str | None
    attribution: dict


def build_index(model: ClipModel, model_ref: str, source: LoadedSource, out: str | Path, *,
                precision: str = "bf16", progress: bool = False, store: StoreOptions = StoreOptions(),
                loader_workers: int | None = None) -> Embedded:
    """Embed the images of `source` into the index folder `out` (read from the image store; locked while it is
    written; an index already there is replaced in one step, see the module docstring); returns how many images
    it holds and which rows were skipped.

    The source is streamed a chunk of rows at a time: embeddings are appended to the .npy file, items to a staging
    file, so memory does not grow with the dataset."""
    out = Path(out)
    with FileLock(out, what="index"):
        image_store = _image_store(model, source, store, progress)
        rows, skipped = _usable_rows(source, image_store)  # also sizes the embeddings file
        done = Embedded(images=len(rows), skipped_images=skipped)
        if not done.images:
            raise ClipmedError(f"{source.path}: no readable image among {len(done.skipped_images)} rows, nothing to "
                               "index")
        staged, staged_items = out / ".embeddings.staged.npy", out / ".items.staged.jsonl"
        dim = 0

        def write_embeddings(tmp: str) -> None:
            # Appended in row order with plain writes (a memory map would keep every written page in this process).
            nonlocal dim
            with open(tmp, "wb") as matrix, open(staged_items, "w", encoding="utf-8") as items:
                for usable, embeddings in _embedded_chunks(model, source, image_store, rows, precision=precision,
                                                           loader_workers=loader_workers):
                    if not usable:
                        continue
                    if not dim:
                        dim = embeddings.shape[1]
                        np.lib.format.write_array_header_1_0(matrix, {"descr": np.lib.format.dtype_to_descr(
                            np.dtype(np.float32)), "fortran_order": False, "shape": (done.images, dim)})
                    matrix.write(np.ascontiguousarray(embeddings.numpy(), dtype=np.float32).data)
                    items.writelines(json.dumps({"attribution": r.extra, "caption": r.caption, "id": r.id,
                                                 "path": r.image_path}, ensure_ascii=False, sort_keys=True) + "\n"
                                     for r in usable)

        atomic_write(staged, write_embeddings)
        checksum = sha256_file(staged)
        name = f"embeddings-{checksum[:16]}.npy"
        os.replace(staged, out / name)
        head = {"format": INDEX_FORMAT, "model": model_ref, "model_fingerprint": model_fingerprint(model),
                "family": model.family, "precision": precision, "dim": int(dim),
                "embeddings": {"file": name, "sha256": checksum},
                "source": {"path": source.path, "format": source.format, "fingerprint": source.fingerprint},
                "skipped": [{"id": i, "reason": reason} for i, reason in done.skipped_images]}

        write_index_json(out / INDEX_JSON, head, staged_items)  # the commit: from here on the folder is the new index
        staged_items.unlink()
        for old in out.glob("embeddings*.npy"):
            if old.name != name:
                old.unlink()
    return done


def write_index_json(path: Path, head: dict, items_file: Path) -> None:
    """index.json atomically: `head` with the items copied line by line from `items_file` (never all in memory)."""
    text = json.dumps({**head, "items": []}, indent=2, sort_keys=True, ensure_ascii=False)
    before, after = text.split('"items": []', 1)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as meta, open(items_file, encoding="utf-8") as items:
            meta.write(before + '"items": [\n')
            for number, line in enumerate(items):
                meta.write((",\n" if number else "") + "    " + line.rstrip("\n"))
            meta.write("\n  ]" + after + "\n")

    atomic_write(path, write)


def load_index(directory: str | Path) -> Index:
    """Open an index folder, checking that its embeddings are the ones its index.json describes."""
    directory = Path(directory)
    rebuild = f"build it again with `clipmed index --out {directory}`"
    if not (directory / INDEX_JSON).is_file():
        raise ClipmedError(f"{directory} is not an index folder (no {INDEX_JSON}): build one with `clipmed index`")
    try:
        meta = read_json(directory / INDEX_JSON)
    except ValueError as exc:
        raise ClipmedError(f"{directory / INDEX_JSON} is not valid JSON ({first_line(exc)}): {rebuild}") from exc
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise ClipmedError(f"{directory} was written by another version of clipmed, and its embeddings cannot be "
                           f"verified: {rebuild}")
    path = directory / Path(meta["embeddings"]["file"]).name
    if not path.is_file() or sha256_file(path) != meta["embeddings"]["sha256"]:
        raise ClipmedError(f"{directory}: the embeddings file {path.name} is missing or does not match index.json "
                           f"(an interrupted rebuild, or an edited file): {rebuild}")
    embeddings = np.load(path, allow_pickle=False)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(meta["items"]):
        raise ClipmedError(f"{directory}: {embeddings.shape[0]} embeddings for {len(meta['items'])} items: {rebuild}")
    return Index(directory, embeddings, meta)


def check_model(index: Index, model: ClipModel, model_ref: str) -> None:
    """Refuse a model other than the one that built the index: its embeddings live in another space."""
    if model_fingerprint(model) != index.meta["model_fingerprint"]:
        raise ClipmedError(f"{index.directory} was built with model {index.meta['model']}, and {model_ref} has "
                           f"other weights: search with that model, or build the index again with --model {model_ref}")


def top_k(embeddings: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(row, cosine) of the k rows most similar to the normalised `query`, best first (ties: lower row first)."""
    scores = embeddings @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(row), float(scores[row])) for row in order]


def search(model: ClipModel, index: Index, *, text: str | None = None, image: str | None = None,
           k: int = 5) -> list[Hit]:
    """The k indexed images nearest to a text query (text-to-image) or to an image file (image-to-image)."""
    if (text is None) == (image is None):
        raise ClipmedError("search needs a query text or --image PATH (one of them)")
    if k < 1:
        raise ClipmedError(f"--top-k must be at least 1, not {k}")
    precision = index.meta["precision"]
    if text is not None:
        query = embed_texts(model, [text], precision=precision)[0]
    else:
        query = embed_images(model, [image_record(image)], precision=precision, store=None)[0]
    items = index.meta["items"]
    return [Hit(rank, score, items[row]["id"], items[row]["path"], items[row]["caption"], items[row]["attribution"])
            for rank, (row, score) in enumerate(top_k(index.embeddings, query.numpy(), k), start=1)]


def format_hits(hits: Sequence[Hit], caption_width: int = 60) -> str:
    """A plain-text table: rank, cosine, id, image path and the start of the caption."""
    width = max([len("id")] + [len(h.id) for h in hits])
    lines = [f"rank   score  {'id':<{width}}  image  caption"]
    for h in hits:
        caption = h.caption or ""
        caption = caption if len(caption) <= caption_width else caption[:caption_width - 3] + "..."
        lines.append(f"{h.rank:>4}  {h.score:6.3f}  {h.id:<{width}}  {h.path}  {caption}".rstrip())
    return "\n".join(lines)
