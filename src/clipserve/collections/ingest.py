"""Adding things to a collection: expand paths, folders, globs and URLs into sources, then read, hash,
de-duplicate, decode, embed and store them in batches.

Each batch is one SQLite transaction, so every item reported through `on_added` is durable. Items whose
content hash is already stored are skipped *before* decoding and embedding, which is what makes re-running an
interrupted `add` a cheap resume. Nothing is dropped silently: every source that is not stored ends up in
`IngestReport.skipped` with a reason (`SKIP_REASONS`) and a one-line detail.
"""

from __future__ import annotations

import asyncio
import glob
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from clipserve.collections.embedding import check_model, image_hash, pair_hash, text_hash
from clipserve.collections.store import Collection, NewItem
from clipserve.engine.model import Model
from clipserve.io.images import ImageError, ImageLimits, open_image

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".tga", ".avif"}
)
SKIP_REASONS = ("duplicate", "unreadable", "too large", "fetch failed", "not an image file", "not found")
DEFAULT_BATCH_SIZE = 32

Fetcher = Callable[[Sequence[str]], list["bytes | Exception"]]


@dataclass(frozen=True)
class Source:
    """One thing to add. Images come from `path`, `url` or `data` (an upload); `text` alone is a text item,
    `text` with an image is an image with its caption ("both"; the image embedding is what gets indexed)."""

    path: str | None = None
    url: str | None = None
    data: bytes | None = None
    text: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None  # how an upload is reported and recorded as `source`

    def __post_init__(self) -> None:
        images = sum(x is not None for x in (self.path, self.url, self.data))
        if images > 1 or (images == 0 and self.text is None):
            raise ValueError("a source is one image (path, URL or data) and/or one text")

    @property
    def label(self) -> str:
        """The item's `source` column and how reports name it."""
        return self.path or self.url or self.name or ("upload" if self.data is not None else "text")

    @property
    def kind(self) -> str:
        has_image = self.path is not None or self.url is not None or self.data is not None
        return ("both" if self.text is not None else "image") if has_image else "text"


@dataclass(frozen=True)
class Skipped:
    source: str
    reason: str
    detail: str = ""


@dataclass
class IngestReport:
    added: list[int] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def skip_counts(self) -> dict[str, int]:
        counts = Counter(s.reason for s in self.skipped)
        return {reason: counts[reason] for reason in SKIP_REASONS if counts[reason]}

    def merge(self, other: IngestReport) -> None:
        self.added += other.added
        self.skipped += other.skipped


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def expand(
    patterns: Iterable[str], metadata: Mapping[str, Any] | None = None
) -> tuple[list[Source], list[Skipped]]:
    """Files, folders (recursively, image extensions only), globs (`*`, `?`, `[`, `**`) and http(s) URLs ->
    sources, sorted within each folder/glob so that re-runs visit them in the same order."""
    metadata = dict(metadata or {})
    sources: list[Source] = []
    skipped: list[Skipped] = []

    def add_file(path: Path, explicit: bool) -> None:
        if explicit or path.suffix.lower() in IMAGE_EXTENSIONS:
            sources.append(Source(path=str(path), metadata=metadata))
        else:
            skipped.append(Skipped(str(path), "not an image file", f"extension {path.suffix or '(none)'!r}"))

    for pattern in patterns:
        if is_url(pattern):
            sources.append(Source(url=pattern, metadata=metadata))
            continue
        path = Path(pattern).expanduser()
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                add_file(child, explicit=False)
        elif path.is_file():
            add_file(path, explicit=True)
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                skipped.append(Skipped(pattern, "not found", "the pattern matches no file"))
            for match in files:
                add_file(match, explicit=False)
        else:
            skipped.append(Skipped(pattern, "not found", "no such file, folder or URL"))
    return sources, skipped


def url_fetcher(policy: Any) -> Fetcher:
    """Fetch a batch of URLs concurrently under `policy` (a `clipserve.io.fetch.FetchPolicy`: the server's
    SSRF rules). Call it from a thread without a running event loop."""
    from clipserve.io.fetch import fetch_url

    async def fetch_all(urls: Sequence[str]) -> list[bytes | Exception]:
        return await asyncio.gather(*(fetch_url(u, policy) for u in urls), return_exceptions=True)

    return lambda urls: asyncio.run(fetch_all(urls))


def _skip_reason(exc: Exception) -> str:
    text = str(exc)
    return "too large" if text.startswith(("too large", "too many pixels", "image too large")) or "too large" in text else "unreadable"


def _read_images(batch: Sequence[Source], limits: ImageLimits, fetch: Fetcher | None) -> list[bytes | Skipped | None]:
    """Each source's image bytes (None for text items), or why it cannot be read. Files over the byte limit
    are refused from their size, before reading."""
    urls = [s.url for s in batch if s.url is not None]
    fetched: dict[str, bytes | Exception] = {}
    if urls:
        if fetch is None:
            fetched = {u: RuntimeError("URL ingestion is not enabled here") for u in urls}
        else:
            fetched = dict(zip(urls, fetch(urls), strict=True))
    out: list[bytes | Skipped | None] = []
    for source in batch:
        if source.path is not None:
            try:
                size = os.stat(source.path).st_size
                if size > limits.max_bytes:
                    out.append(Skipped(source.label, "too large", f"{size} bytes > limit {limits.max_bytes}"))
                    continue
                out.append(Path(source.path).read_bytes())
            except OSError as exc:
                out.append(Skipped(source.label, "unreadable", exc.strerror or str(exc)))
        elif source.url is not None:
            result = fetched[source.url]
            if isinstance(result, Exception):
                reason = "too large" if "too large" in str(result) else "fetch failed"
                out.append(Skipped(source.label, reason, str(result) or type(result).__name__))
            else:
                out.append(result)
        else:
            out.append(source.data)
    return out


def ingest_batch(
    collection: Collection,
    model: Model,
    batch: Sequence[Source],
    *,
    limits: ImageLimits = ImageLimits(),
    fetch: Fetcher | None = None,
) -> tuple[IngestReport, list[tuple[int, Source]]]:
    """Read, hash, de-duplicate, decode, embed and store one batch in one transaction.

    Returns the report and the (id, source) pairs that were stored."""
    report = IngestReport()
    contents = _read_images(batch, limits, fetch)
    hashed: list[tuple[Source, bytes | None, str]] = []
    for source, content in zip(batch, contents, strict=True):
        if isinstance(content, Skipped):
            report.skipped.append(content)
            continue
        if content is None:
            digest = text_hash(source.text or "")
        else:
            digest = image_hash(content) if source.text is None else pair_hash(content, source.text)
        hashed.append((source, content, digest))
    stored = collection.existing_hashes([h for _, _, h in hashed])
    fresh: list[tuple[Source, bytes | None, str]] = []
    for source, content, digest in hashed:
        if digest in stored:
            report.skipped.append(Skipped(source.label, "duplicate", "same content is already in the collection"))
            continue
        stored.add(digest)  # a second copy within the batch is a duplicate too
        fresh.append((source, content, digest))

    images: list[Image.Image] = []
    decoded: list[tuple[Source, str, int | None]] = []  # (source, hash, position in `images` or None for text)
    for source, content, digest in fresh:
        if content is None:
            decoded.append((source, digest, None))
            continue
        try:
            images.append(open_image(content, limits))
        except ImageError as exc:
            report.skipped.append(Skipped(source.label, _skip_reason(exc), str(exc)))
            continue
        decoded.append((source, digest, len(images) - 1))
    if not decoded:
        return report, []

    image_vectors = model.encode_image(images, normalize=True, limits=limits).numpy() if images else None
    texts = [source.text or "" for source, _, position in decoded if position is None]
    text_vectors = iter(model.encode_text(texts, normalize=True).numpy()) if texts else iter(())
    new_items = []
    for source, digest, position in decoded:
        vector = next(text_vectors) if position is None else image_vectors[position]
        new_items.append(NewItem(
            kind=source.kind, content_hash=digest, embedding=vector,
            source=source.label if source.kind != "text" else None, text=source.text, metadata=source.metadata,
        ))  # fmt: skip
    ids = collection.add(new_items)
    added = []
    for (source, _, _), item_id in zip(decoded, ids, strict=True):
        if item_id is None:  # another writer stored the same content since we looked
            report.skipped.append(Skipped(source.label, "duplicate", "same content is already in the collection"))
        else:
            report.added.append(item_id)
            added.append((item_id, source))
    return report, added


def _batches(sources: Iterable[Source], size: int) -> Iterator[list[Source]]:
    batch: list[Source] = []
    for source in sources:
        batch.append(source)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def ingest(
    collection: Collection,
    model: Model,
    sources: Iterable[Source],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limits: ImageLimits = ImageLimits(),
    fetch: Fetcher | None = None,
    on_batch: Callable[[int, list[tuple[int, Source]]], None] | None = None,
) -> IngestReport:
    """Add `sources` batch by batch. `on_batch(n_sources_done, [(id, source) stored])` runs after each
    batch is committed. The index is caught up and saved when enough has changed (and on close)."""
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    check_model(collection.manifest, model)
    report = IngestReport()
    for batch in _batches(sources, batch_size):
        batch_report, added = ingest_batch(collection, model, batch, limits=limits, fetch=fetch)
        report.merge(batch_report)
        if on_batch is not None:
            on_batch(len(batch), added)
        collection.maybe_save_index()
    return report
