"""Retrieval collections: durable, searchable image and text indexes (SQLite + FAISS), one model each.

`CollectionStore` manages the collections under a root directory; `Collection` stores, deletes and searches
items; `ingest` embeds files, folders, globs, URLs and texts into one. `clipserve.collections.parquet` exports
and imports Parquet, `clipserve.collections.distributed` embeds datasets on Ray (imported on demand, since
Ray is an optional extra).
"""

from clipserve.collections.embedding import check_model, manifest_for, query_vector
from clipserve.collections.filters import FilterError, compile_filter
from clipserve.collections.ingest import IngestReport, Skipped, Source, expand, ingest, url_fetcher
from clipserve.collections.store import (
    Collection,
    CollectionError,
    CollectionExists,
    CollectionNotFound,
    CollectionStore,
    Hit,
    Item,
    Manifest,
    NewItem,
    default_root,
)

__all__ = [
    "Collection",
    "CollectionError",
    "CollectionExists",
    "CollectionNotFound",
    "CollectionStore",
    "FilterError",
    "Hit",
    "IngestReport",
    "Item",
    "Manifest",
    "NewItem",
    "Skipped",
    "Source",
    "check_model",
    "compile_filter",
    "default_root",
    "expand",
    "ingest",
    "manifest_for",
    "query_vector",
    "url_fetcher",
]
