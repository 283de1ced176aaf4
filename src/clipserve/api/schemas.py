"""Request and response bodies (pydantic), which also make the OpenAPI schema at `/openapi.json`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- input items ---------------------------------------------------------------------------------------


class ImageObject(_Strict):
    """Jina/Azure style: a data URL, raw base64, or an http(s) URL (if the server fetches URLs)."""

    image: str = Field(min_length=1)


class TextObject(_Strict):
    text: str


class ImageURL(BaseModel):
    url: str = Field(min_length=1)
    detail: str | None = None  # sent by some chat clients; ignored


class ImageURLPart(_Strict):
    """OpenAI chat content part (vLLM, Cohere v2)."""

    type: Literal["image_url"]
    image_url: ImageURL | str


class TextPart(_Strict):
    type: Literal["text"]
    text: str


InputItem = str | ImageObject | TextObject | ImageURLPart | TextPart | list[int] | int
ImageItemInput = str | ImageObject | ImageURLPart
RankItemInput = str | ImageObject | TextObject | ImageURLPart | TextPart


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


# -- /v1/embeddings ------------------------------------------------------------------------------------


class EmbeddingRequest(BaseModel):
    model: str = Field(description="A model id or alias from GET /v1/models.")
    input: str | list[InputItem] = Field(
        description=(
            "One item or a list. Strings are text, except data URLs (data:image/...;base64,...), which are "
            "images; with modality='image' every string is an image (data URL, raw base64 or http(s) URL). "
            "Objects {'image': ...} / {'text': ...} and chat parts {'type': 'image_url', 'image_url': "
            "{'url': ...}} / {'type': 'text', 'text': ...} may be mixed. One embedding per item."
        )
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 bytes, as the openai SDK decodes them."
    )
    dimensions: int | None = Field(None, description="Accepted only when equal to the model's dimension.")
    user: str | None = None
    modality: Literal["text", "image"] | None = Field(
        None, description="Infinity's field: how plain strings are read (default: text unless a data URL)."
    )


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


# -- /v1/classifications -------------------------------------------------------------------------------


class ClassificationRequest(BaseModel):
    model: str
    input: str | list[ImageItemInput] = Field(description="One image or a list (same forms as embeddings).")
    labels: list[str] | None = Field(
        None, min_length=1, description="Candidate labels (zero-shot). Give either labels or classifier."
    )
    classifier: str | None = Field(
        None,
        description="A linear probe served with this model (see /v1/models `classifiers`): a fixed-class "
        "classifier instead of zero-shot labels.",
    )
    templates: list[str] | Literal["imagenet"] | None = Field(
        None,
        description=(
            "Prompt templates with '{}' for the label; default one 'a photo of a {}.'; 'imagenet' = the 80 "
            "OpenAI ImageNet templates. Label embeddings are averaged over templates."
        ),
    )
    multi_label: bool = Field(
        False,
        description=(
            "False: one softmax over all labels (probabilities sum to 1). True: each label scored on its own "
            "by a two-way softmax between the label and a neutral background prompt."
        ),
    )
    top_k: int | None = Field(None, ge=1, description="Return only the k most probable labels per image.")
    user: str | None = None


class LabelScore(BaseModel):
    label: str
    probability: float
    score: float = Field(
        description="Cosine similarity between the image and the label embedding (zero-shot), or the linear "
        "probe's logit (classifier)."
    )


class Classification(BaseModel):
    object: Literal["classification"] = "classification"
    index: int
    labels: list[LabelScore]


class ClassificationResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Classification]
    model: str
    usage: Usage


# -- /v1/rankings --------------------------------------------------------------------------------------


class RankingRequest(BaseModel):
    model: str
    query: RankItemInput = Field(description="Text or image (same forms as embeddings items).")
    candidates: list[RankItemInput] = Field(min_length=1, description="Texts and/or images to score.")
    top_n: int | None = Field(None, ge=1)
    user: str | None = None


class RankResult(BaseModel):
    index: int = Field(description="Position of the candidate in the request.")
    score: float = Field(description="Cosine similarity to the query.")
    probability: float = Field(description="Softmax over candidates of exp(logit_scale) * score.")


class RankingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[RankResult]
    model: str
    usage: Usage


# -- /v1/models ----------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "clipserve"
    name: str
    architecture: str
    embed_dim: int
    image_size: int
    context_length: int
    logit_scale: float
    modalities: list[str] = ["text", "image"]
    device: str
    precision: str
    classifiers: list[str] = Field(default_factory=list, description="Linear probes served with this model.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- operations ----------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    models: dict[str, str] = Field(description="Per model: 'ready' or why not.")


# -- admin ---------------------------------------------------------------------------------------------


class LoadModelRequest(_Strict):
    model: str = Field(min_length=1, description="What `clipserve.load` accepts: a name, hf-hub:REPO or path.")
    alias: str | None = None


class CreateKeyRequest(_Strict):
    name: str = Field(min_length=1, max_length=200)
    rate_limit_rpm: int | None = Field(None, ge=1)
    quota_images: int | None = Field(None, ge=1, description="Images per UTC day.")
    quota_tokens: int | None = Field(None, ge=1, description="Text tokens per UTC day.")


class KeyInfo(BaseModel):
    key_id: str
    name: str
    created: float
    revoked: float | None
    rate_limit_rpm: int | None
    quota_images: int | None
    quota_tokens: int | None


class CreatedKey(KeyInfo):
    key: str = Field(description="The API key; shown once, stored only as a salted hash.")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyInfo]


class UsageEntry(BaseModel):
    key_id: str
    day: str
    requests: int
    images: int
    tokens: int


class UsageList(BaseModel):
    object: Literal["list"] = "list"
    data: list[UsageEntry]
