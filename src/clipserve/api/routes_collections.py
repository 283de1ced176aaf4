"""The collections API: `/v1/collections` CRUD, adding items, searching, getting and deleting items.

Same rules as the inference routes: every route needs an API key (`authorize`, with its rate limit);
embedding work goes through the served model's batcher (`encode_items`), so it is charged to the key's
quota and usage like `/v1/embeddings`; errors are OpenAI-shaped `APIError`s; URLs are fetched only as the
server's fetch policy allows. A collection is searched and filled with the served model it was made with
(matched by model name); raw-vector search needs no model.

Collections live in `CollectionStore(default_root())` (`$CLIPSERVE_COLLECTIONS`, else
~/.local/share/clipserve/collections), the same place the CLI uses, unless the app sets
`app.state.collections` to another `CollectionStore` before serving.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from clipserve.api.auth import Caller
from clipserve.api.deps import ServerState, authorize, server_state
from clipserve.api.errors import INFERENCE_ERRORS, APIError
from clipserve.api.inputs import ImageItem, Item, TextItem, image_bytes, image_from_string
from clipserve.api.pool import ServedModel
from clipserve.api.routes import check_count, encode_items, guarded, lookup, read_uploads
from clipserve.collections import (
    Collection,
    CollectionError,
    CollectionExists,
    CollectionNotFound,
    CollectionStore,
    FilterError,
    Manifest,
    NewItem,
    default_root,
)
from clipserve.collections.embedding import image_hash, pair_hash, text_hash

router = APIRouter(prefix="/v1/collections", tags=["collections"])
MAX_TOP_K = 1000
T = TypeVar("T")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateCollection(_Strict):
    name: str = Field(description="1-64 letters, digits, '_', '-' or '.'")
    model: str = Field(description="A served model id or alias; the collection belongs to it.")
    dtype: Literal["float32", "float16"] = "float32"
    index: Literal["auto", "flat", "ivf", "ivfpq"] = "auto"


class ItemIn(_Strict):
    """An image (data URL, raw base64 or http(s) URL), a text, or both (an image with its caption)."""

    image: str | None = Field(default=None, min_length=1)
    text: str | None = Field(default=None, min_length=1)
    metadata: dict[str, Any] = Field(default_factory=dict)


class AddItems(_Strict):
    items: list[ItemIn] = Field(min_length=1)


class SearchRequest(_Strict):
    """Exactly one of `text`, `image` or `vector`."""

    text: str | None = Field(default=None, min_length=1)
    image: str | None = Field(default=None, min_length=1)
    vector: list[float] | None = None
    top_k: int = Field(default=10, ge=1, le=MAX_TOP_K)
    filter: dict[str, Any] | None = None
    min_score: float | None = None


class DeleteItems(_Strict):
    ids: list[int] | None = None
    filter: dict[str, Any] | None = None


def collection_store(request: Request) -> CollectionStore:
    store = getattr(request.app.state, "collections", None)
    if store is None:
        store = request.app.state.collections = CollectionStore(default_root())
    return store


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Collection work (SQLite fsyncs, FAISS) off the event loop, its errors as 4xx."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except CollectionNotFound as exc:
        raise APIError(404, str(exc), param="name", code="collection_not_found") from None
    except CollectionExists as exc:
        raise APIError(409, str(exc), param="name", code="collection_exists") from None
    except (CollectionError, FilterError) as exc:
        raise APIError(400, str(exc), code="invalid_collection_request") from None


def _collection_card(collection: Collection) -> dict[str, Any]:
    m = collection.manifest
    return {"id": m.name, "object": "collection", "model": m.model_name, "embed_dim": m.embed_dim,
            "dtype": m.dtype, "index": m.index, "created": int(m.created), "items": collection.count()}  # fmt: skip


async def _open(request: Request, name: str) -> Collection:
    return await _call(collection_store(request).open, name)


def _served_for(state: ServerState, request: Request, collection: Collection) -> ServedModel:
    m = collection.manifest
    try:
        served = lookup(state, request, m.model_name)
    except APIError:
        raise APIError(400, f"collection {m.name!r} belongs to model {m.model_name!r}, which this server does not serve",
                       param="name", code="model_not_served") from None  # fmt: skip
    if served.model.embed_dim != m.embed_dim:
        raise APIError(400, f"served model {served.alias!r} is {served.model.embed_dim}-d, collection {m.name!r} "
                       f"holds {m.embed_dim}-d vectors", param="name", code="model_not_served")  # fmt: skip
    return served


@router.post("", status_code=201, responses=INFERENCE_ERRORS)
async def create_collection(body: CreateCollection, request: Request, caller: Caller = Depends(authorize)) -> dict:
    served = lookup(server_state(request), request, body.model)
    info = served.model.info

    def create() -> Collection:
        manifest = Manifest(name=body.name, model_source=info.source, model_name=info.name,
                            embed_dim=served.model.embed_dim, dtype=body.dtype, index=body.index)  # fmt: skip
        return collection_store(request).create(manifest)

    return _collection_card(await _call(create))


@router.get("", responses=INFERENCE_ERRORS)
async def list_collections(request: Request, caller: Caller = Depends(authorize)) -> dict:
    store = collection_store(request)

    def cards() -> list[dict[str, Any]]:
        return [_collection_card(store.open(name)) for name in store.names()]

    return {"object": "list", "data": await _call(cards)}


@router.get("/{name}", responses=INFERENCE_ERRORS)
async def retrieve_collection(name: str, request: Request, caller: Caller = Depends(authorize)) -> dict:
    return _collection_card(await _open(request, name))


@router.delete("/{name}", responses=INFERENCE_ERRORS)
async def delete_collection(name: str, request: Request, caller: Caller = Depends(authorize)) -> dict:
    await _call(collection_store(request).drop, name)
    return {"id": name, "object": "collection.deleted", "deleted": True}


def _new_item(item: Item, caption: str | None, metadata: dict[str, Any]) -> NewItem:
    """The stored form of an entry, embedding still empty (filled after the duplicate check)."""
    if isinstance(item, TextItem):
        return NewItem(kind="text", content_hash=text_hash(item.text), embedding=None, text=item.text, metadata=metadata)
    data = item.data or b""
    return NewItem(
        kind="image" if caption is None else "both",
        content_hash=image_hash(data) if caption is None else pair_hash(data, caption),
        embedding=None, source=item.url or "upload", text=caption, metadata=metadata,
    )  # fmt: skip


async def _add(
    request: Request, caller: Caller, collection: Collection, entries: list[tuple[Item, str | None, dict[str, Any]]]
) -> dict:
    """Embed and store (item, caption, metadata) entries. Content already stored (or repeated in the request)
    is neither embedded nor charged. A bad item fails the request, naming it; nothing is stored then."""
    state = server_state(request)
    served = _served_for(state, request, collection)
    rows = [_new_item(*entry) for entry in entries]
    stored = await _call(collection.existing_hashes, [r.content_hash for r in rows])
    fresh: list[int] = []
    for k, row in enumerate(rows):
        if row.content_hash not in stored:
            stored.add(row.content_hash)
            fresh.append(k)
    ids: list[int | None] = [None] * len(rows)
    usage = {"prompt_tokens": 0, "total_tokens": 0}
    if fresh:
        items, params = [entries[k][0] for k in fresh], [f"items[{k}]" for k in fresh]
        vectors, cost = await guarded(state, encode_items(state, caller, served, items, params))
        embedded = [replace(rows[k], embedding=v) for k, v in zip(fresh, vectors.numpy(), strict=True)]
        for k, item_id in zip(fresh, await _call(collection.add, embedded), strict=True):
            ids[k] = item_id
        await _call(collection.maybe_save_index)
        usage = cost.usage()
    data = [{"index": i, "id": item_id, "status": "added" if item_id is not None else "duplicate"}
            for i, item_id in enumerate(ids)]  # fmt: skip
    return {"object": "list", "data": data, "usage": usage}


async def _fetched(state: ServerState, items: list[ImageItem]) -> list[ImageItem]:
    """URL items replaced by their bytes (so that their content hash is known), under the fetch policy."""
    urls = [i for i in items if i.url is not None]
    datas = await image_bytes(urls, [f"items[{i.index}].image" for i in urls], state.settings.fetch,
                              state.settings.limits.max_image_bytes)  # fmt: skip
    fetched = {i.index: ImageItem(i.index, data=d, url=i.url) for i, d in zip(urls, datas, strict=True)}
    return [fetched.get(i.index, i) for i in items]


@router.post("/{name}/items", responses=INFERENCE_ERRORS)
async def add_items(name: str, body: AddItems, request: Request, caller: Caller = Depends(authorize)) -> dict:
    """Add a batch of items: images as data URLs or http(s) URLs, texts, or images with captions."""
    state = server_state(request)
    check_count(state, len(body.items), "items")
    collection = await _open(request, name)
    entries: list[tuple[Item, str | None, dict[str, Any]]] = []
    for i, entry in enumerate(body.items):
        if entry.image is None and entry.text is None:
            raise APIError(400, f"items[{i}]: give an image, a text, or both", param=f"items[{i}]", code="invalid_input")
        if entry.image is None:
            entries.append((TextItem(i, entry.text or ""), None, entry.metadata))
        else:
            image = image_from_string(entry.image, i, f"items[{i}].image", raw_base64=True)
            entries.append((image, entry.text, entry.metadata))
    fetched = await _fetched(state, [e[0] for e in entries if isinstance(e[0], ImageItem)])
    by_index = {item.index: item for item in fetched}
    entries = [(by_index.get(item.index, item), caption, meta) for item, caption, meta in entries]
    return await _add(request, caller, collection, entries)


@router.post("/{name}/items/upload", responses=INFERENCE_ERRORS)
async def upload_items(
    name: str,
    request: Request,
    files: list[UploadFile] = File(..., description="Image files."),
    metadata: str | None = Form(None, description="A JSON object stored with every uploaded image."),
    caller: Caller = Depends(authorize),
) -> dict:
    """Add uploaded image files (multipart/form-data)."""
    state = server_state(request)
    check_count(state, len(files), "files")
    try:
        meta = json.loads(metadata) if metadata else {}
    except json.JSONDecodeError as exc:
        raise APIError(400, f"metadata: not valid JSON: {exc.msg}", param="metadata", code="invalid_input") from None
    if not isinstance(meta, dict):
        raise APIError(400, "metadata: must be a JSON object", param="metadata", code="invalid_input")
    collection = await _open(request, name)
    items = await read_uploads(files, state)
    entries = [(item, None, {**meta, "filename": f.filename} if f.filename else meta)
               for item, f in zip(items, files, strict=True)]  # fmt: skip
    return await _add(request, caller, collection, entries)


@router.post("/{name}/search", responses=INFERENCE_ERRORS)
async def search(name: str, body: SearchRequest, request: Request, caller: Caller = Depends(authorize)) -> dict:
    state = server_state(request)
    collection = await _open(request, name)
    if sum(x is not None for x in (body.text, body.image, body.vector)) != 1:
        raise APIError(400, "give exactly one of text, image or vector", code="invalid_input")
    usage = {"prompt_tokens": 0, "total_tokens": 0}
    if body.vector is not None:
        vector = body.vector
    else:
        served = _served_for(state, request, collection)
        query: Item = (TextItem(0, body.text) if body.text is not None
                       else image_from_string(body.image or "", 0, "image", raw_base64=True))  # fmt: skip
        param = "text" if body.text is not None else "image"
        vectors, cost = await guarded(state, encode_items(state, caller, served, [query], [param]))
        vector, usage = vectors[0].numpy(), cost.usage()
    hits = await _call(collection.search, vector, top_k=body.top_k, filter=body.filter, min_score=body.min_score)
    data = [{"object": "search.result", "score": hit.score, **hit.item.as_dict()} for hit in hits]
    return {"object": "list", "data": data, "usage": usage}


@router.get("/{name}/items/{item_id}", responses=INFERENCE_ERRORS)
async def retrieve_item(
    name: str, item_id: int, request: Request, embedding: bool = Query(False), caller: Caller = Depends(authorize)
) -> dict:
    collection = await _open(request, name)
    item = await _call(collection.get, item_id, with_embedding=embedding)
    if item is None:
        raise APIError(404, f"no item {item_id} in collection {name!r}", param="item_id", code="item_not_found")
    return {"object": "collection.item", **item.as_dict()}


@router.delete("/{name}/items/{item_id}", responses=INFERENCE_ERRORS)
async def delete_item(name: str, item_id: int, request: Request, caller: Caller = Depends(authorize)) -> dict:
    collection = await _open(request, name)
    if await _call(collection.delete, ids=[item_id]) == 0:
        raise APIError(404, f"no item {item_id} in collection {name!r}", param="item_id", code="item_not_found")
    return {"id": item_id, "object": "collection.item.deleted", "deleted": True}


@router.post("/{name}/items/delete", responses=INFERENCE_ERRORS)
async def delete_items(name: str, body: DeleteItems, request: Request, caller: Caller = Depends(authorize)) -> dict:
    """Delete by ids, by metadata filter, or the items matching both."""
    if body.ids is None and not body.filter:
        raise APIError(400, "give ids and/or a filter", code="invalid_input")
    collection = await _open(request, name)
    return {"object": "collection.items.deleted", "deleted": await _call(collection.delete, ids=body.ids, filter=body.filter)}
