"""The inference API: `/v1/models`, `/v1/embeddings`, `/v1/classifications`, `/v1/rankings` and the
multipart upload variants.

Usage (`usage.prompt_tokens`) counts, honestly, what the model processed: for text the real token count
of each input (start and end tokens included, after truncation to the context length); for an image the
tokens its vision transformer attends over, `(image_size / patch_size)^2 + 1` (50 for ViT-B/32 at 224 px).
For classification, label prompts are not charged per image (they are encoded once and cached): the
labels' own token counts are charged once per request. Quotas count images and text tokens separately.
"""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse

from clipserve.api.auth import Caller, seconds_to_next_utc_day, utc_day
from clipserve.api.deps import ServerState, authorize, server_state
from clipserve.api.errors import INFERENCE_ERRORS, APIError
from clipserve.api.inputs import ImageItem, Item, TextItem, image_bytes, parse_item, parse_items
from clipserve.api.pool import ServedModel
from clipserve.api.schemas import (
    ClassificationRequest,
    ClassificationResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    RankingRequest,
    RankingResponse,
)
from clipserve.engine.batching import BatcherStopped, ItemError, QueueFull
from clipserve.engine.model import format_prompt
from clipserve.eval.prompts import imagenet_templates

router = APIRouter()

T = TypeVar("T")

# multi_label: each label is scored against this neutral label, through the same templates.
BACKGROUND_LABEL = "object"


@dataclass(frozen=True)
class Cost:
    images: int
    text_tokens: int
    image_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return self.text_tokens + self.image_tokens

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens}


def image_tokens(served: ServedModel) -> int:
    """Tokens the vision transformer processes per image: the patch grid plus the class token."""
    return served.model.config.vision.grid_size ** 2 + 1


async def guarded(state: ServerState, work: Awaitable[T]) -> T:
    """The per-request timeout, and batching's refusals as HTTP statuses."""
    try:
        return await asyncio.wait_for(work, state.settings.limits.request_timeout_s)
    except asyncio.TimeoutError:
        raise APIError(
            504, f"request took longer than {state.settings.limits.request_timeout_s:g}s", code="timeout"
        ) from None
    except QueueFull as exc:
        raise APIError(429, f"server busy: {exc}", code="queue_full", headers={"Retry-After": "1"}) from None
    except BatcherStopped as exc:
        raise APIError(503, f"model unavailable: {exc}", code="model_unavailable",
                       headers={"Retry-After": "5"}) from None


def lookup(state: ServerState, request: Request, name: str) -> ServedModel:
    served = state.pool.get(name)
    request.state.model = served.alias
    return served


def check_count(state: ServerState, n: int, param: str) -> None:
    limit = state.settings.limits.max_items
    if n > limit:
        raise APIError(413, f"{param}: {n} items, limit {limit} per request", param=param, code="too_many_items")


async def encode_items(
    state: ServerState, caller: Caller, served: ServedModel, items: Sequence[Item], params: Sequence[str],
    extra_text_tokens: int = 0,
) -> tuple[torch.Tensor, Cost]:
    """Embeddings [N, D] (L2-normalised) for mixed items, in order, charged to the caller's usage before
    inference (refused with 429 past a daily quota) and refunded if they cannot be computed."""
    text_at = [k for k, item in enumerate(items) if isinstance(item, TextItem)]
    image_at = [k for k, item in enumerate(items) if isinstance(item, ImageItem)]
    datas = await image_bytes(
        [items[k] for k in image_at],  # type: ignore[misc]
        [params[k] for k in image_at],
        state.settings.fetch,
        state.settings.limits.max_image_bytes,
    )
    batched = served.batched
    try:
        pixels = await batched.prepare_images(datas)
    except ItemError as exc:
        param = params[image_at[exc.position]]
        raise APIError(400, f"{param}: {exc}", param=param, code="invalid_image") from None
    texts = await batched.prepare_texts([items[k].text for k in text_at])  # type: ignore[union-attr]
    cost = Cost(len(image_at), sum(texts.counts) + extra_text_tokens, len(image_at) * image_tokens(served))
    day = utc_day()
    refusal = state.keys.charge(caller.key_id, caller.limits, cost.images, cost.text_tokens, day)
    if refusal is not None:
        raise APIError(429, refusal, code="quota_exceeded", headers={"Retry-After": str(seconds_to_next_utc_day())})
    try:
        image_vectors, text_vectors = await asyncio.gather(
            batched.encode_images(pixels), batched.encode_texts(texts.tokens)
        )
    except BaseException:  # errors, and the request timeout's cancellation
        state.keys.refund(caller.key_id, cost.images, cost.text_tokens, day)
        raise
    out = torch.empty(len(items), served.model.embed_dim)
    if image_at:
        out[image_at] = image_vectors
    if text_at:
        out[text_at] = text_vectors
    return out, cost


def _vector(row: torch.Tensor, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(row.numpy().astype("<f4").tobytes()).decode("ascii")
    return row.tolist()


def embedding_payload(alias: str, vectors: torch.Tensor, cost: Cost, encoding: str) -> dict[str, object]:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _vector(row, encoding)} for i, row in enumerate(vectors)],
        "model": alias,
        "usage": cost.usage(),
    }


# -- models --------------------------------------------------------------------------------------------


def model_card(served: ServedModel) -> ModelCard:
    info = served.model.info
    return ModelCard(
        id=served.alias, created=served.created, name=info.name, architecture=info.architecture,
        embed_dim=info.embed_dim, image_size=info.image_size, context_length=info.context_length,
        logit_scale=served.model.logit_scale, device=info.device, precision=info.precision,
        classifiers=sorted(served.classifiers),
    )


@router.get("/v1/models", response_model=ModelList, responses=INFERENCE_ERRORS)
async def list_models(request: Request, caller: Caller = Depends(authorize)) -> ModelList:
    """The loaded models (OpenAI list shape), with embedding dimension, image size and context length."""
    return ModelList(data=[model_card(s) for s in server_state(request).pool.served()])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=INFERENCE_ERRORS)
async def retrieve_model(model_id: str, request: Request, caller: Caller = Depends(authorize)) -> ModelCard:
    return model_card(lookup(server_state(request), request, model_id))


# -- embeddings ----------------------------------------------------------------------------------------


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=INFERENCE_ERRORS)
async def create_embeddings(
    body: EmbeddingRequest, request: Request, caller: Caller = Depends(authorize)
) -> JSONResponse:
    """OpenAI embeddings for texts and images (one L2-normalised vector per input item)."""
    state = server_state(request)
    served = lookup(state, request, body.model)
    if body.dimensions is not None and body.dimensions != served.model.embed_dim:
        raise APIError(
            400, f"dimensions={body.dimensions} is not supported: {served.alias} has {served.model.embed_dim} "
            "dimensions and is not a Matryoshka model", param="dimensions", code="unsupported_dimensions",
        )
    items = parse_items(body.input, "input", body.modality)
    check_count(state, len(items), "input")
    params = [f"input[{i}]" for i in range(len(items))] if isinstance(body.input, list) else ["input"]
    vectors, cost = await guarded(state, encode_items(state, caller, served, items, params))
    return JSONResponse(embedding_payload(served.alias, vectors, cost, body.encoding_format))


async def read_uploads(files: Sequence[UploadFile], state: ServerState) -> list[Item]:
    limit = state.settings.limits.max_image_bytes
    items: list[Item] = []
    for i, upload in enumerate(files):
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise APIError(413, f"files[{i}]: larger than the {limit}-byte image limit", param=f"files[{i}]",
                           code="image_too_large")
        items.append(ImageItem(i, data=data))
    return items


@router.post("/v1/embeddings/upload", response_model=EmbeddingResponse, responses=INFERENCE_ERRORS)
async def upload_embeddings(
    request: Request,
    model: str = Form(...),
    files: list[UploadFile] = File(..., description="Image files."),
    encoding_format: Literal["float", "base64"] = Form("float"),
    caller: Caller = Depends(authorize),
) -> JSONResponse:
    """Image embeddings for raw uploaded files (multipart/form-data)."""
    state = server_state(request)
    served = lookup(state, request, model)
    check_count(state, len(files), "files")
    items = await read_uploads(files, state)
    params = [f"files[{i}]" for i in range(len(items))]
    vectors, cost = await guarded(state, encode_items(state, caller, served, items, params))
    return JSONResponse(embedding_payload(served.alias, vectors, cost, encoding_format))


# -- classifications -----------------------------------------------------------------------------------


def resolve_templates(state: ServerState, templates: list[str] | str | None) -> tuple[str, ...] | None:
    if templates is None:
        return None
    if templates == "imagenet":
        return tuple(imagenet_templates("en"))
    if isinstance(templates, str):
        raise APIError(400, "templates: a list of strings, or 'imagenet'", param="templates")
    if not templates:
        raise APIError(400, "templates: empty list (omit it for the default)", param="templates")
    if len(templates) > state.settings.limits.max_templates:
        raise APIError(413, f"templates: {len(templates)} given, limit {state.settings.limits.max_templates}",
                       param="templates", code="too_many_templates")
    for i, template in enumerate(templates):
        if "{}" not in template and "{c}" not in template:
            raise APIError(400, f"templates[{i}]: needs '{{}}' where the label goes", param=f"templates[{i}]")
        try:
            format_prompt(template, "label")
        except (IndexError, KeyError, ValueError):
            raise APIError(400, f"templates[{i}]: only one '{{}}' placeholder is allowed (other braces: "
                           "double them)", param=f"templates[{i}]") from None
    return tuple(templates)


def check_labels(state: ServerState, labels: Sequence[str]) -> None:
    if len(labels) > state.settings.limits.max_labels:
        raise APIError(413, f"labels: {len(labels)} given, limit {state.settings.limits.max_labels}",
                       param="labels", code="too_many_labels")
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        if not label.strip():
            raise APIError(400, f"labels[{i}]: empty label", param=f"labels[{i}]")
        if label in seen:
            raise APIError(400, f"labels[{i}]: duplicate of labels[{seen[label]}]", param=f"labels[{i}]")
        seen[label] = i


async def classify(
    state: ServerState, caller: Caller, served: ServedModel, items: Sequence[Item], params: Sequence[str],
    labels: list[str], templates: tuple[str, ...] | None, multi_label: bool, top_k: int | None,
) -> dict[str, object]:
    for item, param in zip(items, params, strict=True):
        if not isinstance(item, ImageItem):
            raise APIError(400, f"{param}: classification needs images, this item is text", param=param,
                           code="invalid_input")
    label_tokens = sum(served.model.tokenizer.count_tokens(labels))
    classifier = await served.batched.text_classifier(labels, templates)
    images, cost = await encode_items(state, caller, served, items, params, extra_text_tokens=label_tokens)
    cosine = images @ classifier.T
    scale = math.exp(served.model.logit_scale)
    if multi_label:
        background = await served.batched.text_classifier([BACKGROUND_LABEL], templates)
        probabilities = torch.sigmoid(scale * (cosine - images @ background.T))
    else:
        probabilities = (scale * cosine).softmax(dim=-1)
    data = ranked(probabilities, cosine, labels, top_k)
    return {"object": "list", "data": data, "model": served.alias, "usage": cost.usage()}


def ranked(probabilities: torch.Tensor, scores: torch.Tensor, labels: Sequence[str], top_k: int | None) -> list[dict]:
    k = min(top_k or len(labels), len(labels))
    data = []
    for i in range(probabilities.shape[0]):
        order = torch.argsort(probabilities[i], descending=True, stable=True)[:k]
        data.append({
            "object": "classification",
            "index": i,
            "labels": [{"label": labels[j], "probability": float(probabilities[i, j]), "score": float(scores[i, j])}
                       for j in order.tolist()],
        })
    return data


async def classify_with_probe(
    state: ServerState, caller: Caller, served: ServedModel, items: Sequence[Item], params: Sequence[str],
    name: str, top_k: int | None,
) -> dict[str, object]:
    """A fixed-class classifier: the linear probe `name` on the model's normalised image features."""
    probe = served.classifiers.get(name)
    if probe is None:
        known = ", ".join(sorted(served.classifiers)) or "none"
        raise APIError(404, f"model {served.alias!r} has no classifier {name!r} (served: {known})",
                       param="classifier", code="classifier_not_found")
    for item, param in zip(items, params, strict=True):
        if not isinstance(item, ImageItem):
            raise APIError(400, f"{param}: classification needs images, this item is text", param=param,
                           code="invalid_input")
    images, cost = await encode_items(state, caller, served, items, params)
    logits = images @ probe.weight.T + probe.bias  # features are already L2-normalised
    data = ranked(logits.softmax(dim=-1), logits, probe.classes, top_k)
    return {"object": "list", "data": data, "model": served.alias, "usage": cost.usage()}


@router.post("/v1/classifications", response_model=ClassificationResponse, responses=INFERENCE_ERRORS)
async def create_classifications(
    body: ClassificationRequest, request: Request, caller: Caller = Depends(authorize)
) -> JSONResponse:
    """Zero-shot classification of images against candidate labels.

    Single-label (default): probabilities are one softmax over all labels of exp(logit_scale) * cosine.
    multi_label: each label on its own, P(label) = sigmoid(exp(logit_scale) * (cos(image, label) -
    cos(image, background))), i.e. a two-way softmax between the label and a neutral 'object' prompt built
    with the same templates; probabilities do not sum to 1. Label embeddings are cached per (model, labels,
    templates).
    """
    state = server_state(request)
    served = lookup(state, request, body.model)
    if (body.labels is None) == (body.classifier is None):
        raise APIError(400, "give either labels (zero-shot) or classifier (a served linear probe)", param="labels")
    items = parse_items(body.input, "input", "image")
    check_count(state, len(items), "input")
    params = [f"input[{i}]" for i in range(len(items))] if isinstance(body.input, list) else ["input"]
    if body.classifier is not None:
        payload = await guarded(state, classify_with_probe(
            state, caller, served, items, params, body.classifier, body.top_k
        ))
        return JSONResponse(payload)
    check_labels(state, body.labels)
    templates = resolve_templates(state, body.templates)
    payload = await guarded(state, classify(
        state, caller, served, items, params, body.labels, templates, body.multi_label, body.top_k
    ))
    return JSONResponse(payload)


@router.post("/v1/classifications/upload", response_model=ClassificationResponse, responses=INFERENCE_ERRORS)
async def upload_classifications(
    request: Request,
    model: str = Form(...),
    files: list[UploadFile] = File(..., description="Image files."),
    labels: list[str] = Form(..., description="Candidate labels (repeat the field)."),
    templates: list[str] | None = Form(None, description="Templates (repeat the field), or one 'imagenet'."),
    multi_label: bool = Form(False),
    top_k: int | None = Form(None, ge=1),
    caller: Caller = Depends(authorize),
) -> JSONResponse:
    """Zero-shot classification of uploaded image files (multipart/form-data); rules as the JSON route."""
    state = server_state(request)
    served = lookup(state, request, model)
    check_labels(state, labels)
    resolved = resolve_templates(state, "imagenet" if templates == ["imagenet"] else templates)
    check_count(state, len(files), "files")
    items = await read_uploads(files, state)
    params = [f"files[{i}]" for i in range(len(items))]
    payload = await guarded(state, classify(
        state, caller, served, items, params, labels, resolved, multi_label, top_k
    ))
    return JSONResponse(payload)


# -- rankings ------------------------------------------------------------------------------------------


async def rank(
    state: ServerState, caller: Caller, served: ServedModel, body: RankingRequest
) -> dict[str, object]:
    items = [parse_item(body.query, 0, "query")] + [
        parse_item(c, i + 1, f"candidates[{i}]") for i, c in enumerate(body.candidates)
    ]
    params = ["query"] + [f"candidates[{i}]" for i in range(len(body.candidates))]
    vectors, cost = await encode_items(state, caller, served, items, params)
    scores = vectors[1:] @ vectors[0]
    probabilities = (math.exp(served.model.logit_scale) * scores).softmax(dim=0)
    order = torch.argsort(scores, descending=True, stable=True).tolist()[: body.top_n]
    return {
        "object": "list",
        "data": [{"index": i, "score": float(scores[i]), "probability": float(probabilities[i])} for i in order],
        "model": served.alias,
        "usage": cost.usage(),
    }


@router.post("/v1/rankings", response_model=RankingResponse, responses=INFERENCE_ERRORS)
async def create_rankings(body: RankingRequest, request: Request, caller: Caller = Depends(authorize)) -> JSONResponse:
    """Score one query (text or image) against candidates (texts and/or images), best first: cosine score,
    and probability = softmax over the candidates of exp(logit_scale) * cosine."""
    state = server_state(request)
    served = lookup(state, request, body.model)
    check_count(state, len(body.candidates) + 1, "candidates")
    return JSONResponse(await guarded(state, rank(state, caller, served, body)))


__all__ = ["BACKGROUND_LABEL", "router"]
