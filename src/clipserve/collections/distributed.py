"""`embed-dataset`: batch embedding of image datasets on Ray Data, for datasets that outgrow one machine.

Pipeline: read (image folders: `read_binary_files`; WebDataset tars: `read_webdataset` with raw bytes;
Parquet of paths or URLs: `read_parquet`) -> `map_batches(load_bytes)` in plain tasks (file reads and URL
fetches are I/O, they do not need the model) -> `map_batches(ImageEmbedder, concurrency=N)`: an actor pool,
each actor holding one loaded model -> `write_parquet` shards of (id, source, content_hash, embedding, error).

Unreadable items keep their row, with a null embedding and the error, so a dataset's failures are visible
in the output instead of silently missing; `clipserve collection import` skips and counts them. The model
the shards were embedded with is recorded in `MODEL_FILE` beside them, which `import` reads.

Ray is an optional extra: this module imports it only inside `run_embed_job`, and the rest of
`clipserve.collections` never imports this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from clipserve.collections.embedding import image_hash
from clipserve.collections.ingest import IMAGE_EXTENSIONS, is_url, url_fetcher
from clipserve.collections.parquet import MODEL_FILE
from clipserve.io.images import ImageError, ImageLimits, open_image

INPUT_FORMATS = ("auto", "folder", "webdataset", "parquet")
LOCAL_RAY_CPUS = 2
_WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


@dataclass(frozen=True)
class EmbedJob:
    inputs: tuple[str, ...]
    model_source: str
    output: str
    input_format: str = "auto"
    column: str | None = None  # Parquet input: the column of paths or URLs
    batch_size: int = 64
    concurrency: int = 1
    threads: int = 1
    address: str | None = None
    allow_hosts: tuple[str, ...] = ("*",)
    load_options: dict[str, object] = field(default_factory=dict)  # `clipserve.load` keywords: precision, ...

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("embed-dataset needs at least one input")
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input format must be one of {', '.join(INPUT_FORMATS)}, got {self.input_format!r}")
        for name in ("batch_size", "concurrency", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")

    def resolved_format(self) -> str:
        if self.input_format != "auto":
            return self.input_format
        kinds = {"folder" if Path(p).is_dir() else "webdataset" if p.endswith(".tar") else
                 "parquet" if p.endswith(".parquet") else "?" for p in self.inputs}  # fmt: skip
        if len(kinds) != 1 or "?" in kinds:
            raise ValueError("cannot tell the input format from the inputs (folders, .tar or .parquet, one kind): pass --format")
        return kinds.pop()


@dataclass(frozen=True)
class EmbedResult:
    embedded: int
    failed: int
    shards: list[Path]


class ImageEmbedder:
    """The Ray actor: one loaded model, called on batches of {id, source, data, error}."""

    def __init__(self, model_source: str, threads: int, load_options: dict[str, object]) -> None:
        import torch

        import clipserve

        torch.set_num_threads(threads)
        self.model = clipserve.load(model_source, **load_options)
        self.limits = ImageLimits()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["id"])
        errors: list[str | None] = [e or None for e in batch["error"]]
        hashes: list[str | None] = [None] * n
        images, positions = [], []
        for i in range(n):
            if errors[i]:
                continue
            data = bytes(batch["data"][i])
            try:
                images.append(open_image(data, self.limits))
            except ImageError as exc:
                errors[i] = str(exc)
                continue
            hashes[i] = image_hash(data)
            positions.append(i)
        dim = self.model.embed_dim
        vectors = np.zeros((n, dim), dtype=np.float32)
        if images:
            vectors[positions] = self.model.encode_image(images, normalize=True).numpy()
        missing = np.array([e is not None for e in errors])
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim, mask=pa.array(missing))
        return pa.table({
            "id": pa.array([str(x) for x in batch["id"]], pa.string()),
            "source": pa.array([str(x) for x in batch["source"]], pa.string()),
            "content_hash": pa.array(hashes, pa.string()),
            "embedding": embedding,
            "error": pa.array(errors, pa.string()),
        })  # fmt: skip


def _records(ids: list[str], sources: list[str], data: list[bytes], errors: list[str]) -> dict[str, np.ndarray]:
    return {"id": np.array(ids, dtype=object), "source": np.array(sources, dtype=object),
            "data": np.array(data, dtype=object), "error": np.array(errors, dtype=object)}  # fmt: skip


def folder_records(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`read_binary_files` rows (bytes, path) -> records; the id is the path."""
    paths = [str(p) for p in batch["path"]]
    return _records(paths, paths, [bytes(b) for b in batch["bytes"]], [""] * len(paths))


def webdataset_records(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`read_webdataset(decoder=None)` rows -> records: the first image member of each sample."""
    keys = [str(k) for k in batch["__key__"]]
    urls = [str(u) for u in batch.get("__url__", [""] * len(keys))]
    data, errors = [], []
    for i in range(len(keys)):
        # Samples lacking a member another sample has get a null there (NaN once in numpy).
        member = next((batch[k][i] for k in _WDS_IMAGE_KEYS if k in batch and isinstance(batch[k][i], bytes)), None)
        data.append(bytes(member) if member is not None else b"")
        errors.append("" if member is not None else f"no image member ({', '.join(_WDS_IMAGE_KEYS)})")
    return _records(keys, [f"{u}#{k}" if u else k for u, k in zip(urls, keys, strict=True)], data, errors)


def location_records(batch: dict[str, np.ndarray], column: str | None, allow_hosts: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Parquet rows naming paths or URLs -> records (URLs fetched under the SSRF rules of `io.fetch`)."""
    from clipserve.io.fetch import FetchPolicy

    column = column or next((c for c in ("path", "url") if c in batch), None)
    if column is None or column not in batch:
        raise ValueError(f"Parquet input needs a {column or 'path or url'!r} column, has {sorted(batch)}")
    locations = [str(x) for x in batch[column]]
    ids = [str(x) for x in batch["id"]] if "id" in batch else locations
    urls = [loc for loc in locations if is_url(loc)]
    fetch = url_fetcher(FetchPolicy(enabled=True, allowed_hosts=allow_hosts))
    fetched = dict(zip(urls, fetch(urls), strict=True)) if urls else {}
    data, errors = [], []
    for loc in locations:
        try:
            content = fetched[loc] if is_url(loc) else Path(loc).read_bytes()
            if isinstance(content, Exception):
                raise content
            data.append(content)
            errors.append("")
        except Exception as exc:  # one bad location must not fail the dataset: it is recorded in its row
            data.append(b"")
            errors.append(f"{type(exc).__name__}: {exc}")
    return _records(ids, locations, data, errors)


def _init_ray(address: str | None) -> Any:
    try:
        import ray
    except ImportError:
        raise ValueError("embed-dataset needs Ray: pip install 'clipserve[ray]'") from None
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=LOCAL_RAY_CPUS, include_dashboard=False, log_to_driver=False)
    return ray


def run_embed_job(job: EmbedJob) -> EmbedResult:
    """Run the pipeline of the module doc; shards land in `job.output` (which must not hold shards yet)."""
    import pyarrow.parquet as pq

    import clipserve

    fmt = job.resolved_format()
    output = Path(job.output)
    if output.exists() and any(output.glob("*.parquet")):
        raise ValueError(f"{output} already holds Parquet shards; choose an empty output directory")
    model = clipserve.load(job.model_source, **job.load_options)  # fail fast (and record the model) before starting Ray
    source = str(Path(job.model_source).resolve()) if Path(job.model_source).exists() else job.model_source
    ray = _init_ray(job.address)
    data = ray.data
    if fmt == "folder":
        extensions = sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS)
        ds = data.read_binary_files(list(job.inputs), include_paths=True, file_extensions=extensions)
        ds = ds.map_batches(folder_records, batch_format="numpy")
    elif fmt == "webdataset":
        ds = data.read_webdataset(list(job.inputs), decoder=None).map_batches(webdataset_records, batch_format="numpy")
    else:
        ds = data.read_parquet(list(job.inputs)).map_batches(
            location_records, fn_kwargs={"column": job.column, "allow_hosts": job.allow_hosts}, batch_format="numpy"
        )
    ds = ds.map_batches(
        ImageEmbedder,
        fn_constructor_kwargs={"model_source": source, "threads": job.threads, "load_options": job.load_options},
        batch_size=job.batch_size, batch_format="numpy", concurrency=job.concurrency, num_cpus=job.threads,
    )  # fmt: skip
    output.mkdir(parents=True, exist_ok=True)
    (output / MODEL_FILE).write_text(json.dumps({"source": source, "name": model.info.name, "embed_dim": model.embed_dim}))
    ds.write_parquet(str(output))
    shards = sorted(output.glob("*.parquet"))
    errors = [pq.read_table(s, columns=["error"]).column("error") for s in shards]
    failed = sum(c.length() - c.null_count for c in errors)
    total = sum(c.length() for c in errors)
    return EmbedResult(embedded=total - failed, failed=failed, shards=shards)
