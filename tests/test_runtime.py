"""The native runtime against open_clip 3.3.0 and transformers, on checkpoints the tests write themselves."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_factory import (
    SMALL_BIGG,
    open_clip_model,
    randomize,
    write_open_clip_dir,
    write_xlmr_tokenizer_json,
)
from oracles import open_clip, transformers
from PIL import Image

import clipserve
from clipserve.config import ConfigError
from clipserve.engine.loading import build_module, resolve
from clipserve.io.checkpoints import CheckpointError, read_state_dict
from clipserve.io.hub import HubError

PROMPTS = [
    "a photo of a cat.",
    "an astronaut in a white suit",
    "Ein Foto von einem Hund 🐶 &amp; a très long sentence " * 12,  # truncated at 77 tokens
    "",
    "coffee",
]


def photos() -> list[Image.Image]:
    from skimage import data

    images = [Image.fromarray(data.astronaut()), Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())]
    images.append(images[1].transpose(Image.Transpose.TRANSPOSE))  # portrait
    images.append(Image.fromarray(data.camera()))  # grayscale
    return images


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| relative to the largest reference feature norm."""
    return float((ours - ref).abs().max() / ref.norm(dim=-1).max())


def open_clip_config(name: str) -> dict:
    import importlib.resources

    return json.loads((importlib.resources.files("open_clip") / "model_configs" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def vit_b32(tmp_path_factory: pytest.TempPathFactory):
    """(open_clip reference model, open_clip-layout directory) for ViT-B-32 with random weights."""
    ref = open_clip_model("ViT-B-32", seed=1)
    directory = write_open_clip_dir(tmp_path_factory.mktemp("b32") / "vit-b-32", ref, open_clip_config("ViT-B-32"))
    return ref, directory


def check_against_open_clip(model: clipserve.Model, ref: torch.nn.Module, tokens: torch.Tensor | None = None) -> None:
    oc = open_clip()
    transform = oc.image_transform(model.info.image_size, is_train=False)
    images = photos()
    with torch.no_grad():
        ref_images = ref.encode_image(torch.stack([transform(im) for im in images]))
        ref_texts = ref.encode_text(tokens if tokens is not None else oc.tokenize(PROMPTS))
    assert relative_error(model.encode_image(images), ref_images) < 1e-5
    assert relative_error(model.encode_text(PROMPTS), ref_texts) < 1e-5


def test_vit_b32_open_clip_layout_safetensors(vit_b32) -> None:
    ref, directory = vit_b32
    model = clipserve.load(str(directory), precision="fp32")
    assert model.info.architecture == "ViT-B-32"
    assert model.info.parameters == 151_277_313
    check_against_open_clip(model, ref)


def test_vit_b16_open_clip_layout_bin(tmp_path: Path) -> None:
    ref = open_clip_model("ViT-B-16", seed=2)
    directory = write_open_clip_dir(tmp_path / "b16", ref, open_clip_config("ViT-B-16"), fmt="bin")
    model = clipserve.load(str(directory), precision="fp32")
    assert model.info.architecture == "ViT-B-16" and model.info.parameters == 149_620_737
    check_against_open_clip(model, ref)


def test_bigg_reduced_depth_through_config(tmp_path: Path) -> None:
    """ViT-bigG-14's widths (head width 104, MLP ratio 4.9231 -> 8192, embed 1280) at 2 layers per tower."""
    ref = open_clip_model(SMALL_BIGG, seed=3)
    directory = write_open_clip_dir(tmp_path / "bigg", ref, SMALL_BIGG)
    model = clipserve.load(str(directory), precision="fp32")
    assert model.module.visual.transformer.resblocks[0].mlp.c_fc.out_features == 8192
    assert model.module.visual.transformer.resblocks[0].attn.heads == 16
    check_against_open_clip(model, ref)


def test_xlm_roberta_bare_state_dict(tmp_path: Path) -> None:
    """A bare open_clip state dict (with the stray position_ids buffer) loaded by architecture name."""
    tf = transformers()
    from open_clip.model import CustomTextCLIP

    hf_dir = tmp_path / "xlm-roberta-base-config"
    tf.XLMRobertaConfig(
        vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        layer_norm_eps=1e-5,
    ).save_pretrained(hf_dir)  # open_clip builds the tower from this config; it is never fetched
    cfg = open_clip_config("xlm-roberta-base-ViT-B-32")
    cfg["text_cfg"] = {**cfg["text_cfg"], "hf_model_name": str(hf_dir), "hf_model_pretrained": False}
    ref = randomize(CustomTextCLIP(**cfg), seed=4).eval()
    state = dict(ref.state_dict())
    state["text.transformer.embeddings.position_ids"] = torch.arange(514)[None]  # as the published file has
    weights = tmp_path / "ckpt" / "open_clip_pytorch_model.bin"
    weights.parent.mkdir()
    torch.save(state, weights)
    write_xlmr_tokenizer_json(weights.parent / "tokenizer.json")

    model = clipserve.load("xlm-roberta-base-ViT-B-32", checkpoint=weights, precision="fp32")
    assert model.info.parameters == 366_121_473
    tokens = model.tokenize(PROMPTS)
    assert tokens.shape == (len(PROMPTS), 77) and tokens[0, 0] == 0 and (tokens == 1).any()
    check_against_open_clip(model, ref, tokens)


def test_hf_layout_matches_transformers(vit_b32, tmp_path: Path) -> None:
    _, directory = vit_b32
    from clipserve.cli.main import main

    hf_dir = tmp_path / "hf"
    assert main(["convert", str(directory), str(hf_dir), "--format", "hf"]) == 0
    tf = transformers()
    ref = tf.CLIPModel.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
    model = clipserve.load(str(hf_dir), precision="fp32")
    pixels = torch.stack([model.preprocess(im) for im in photos()])
    tokens = model.tokenize(PROMPTS)
    with torch.no_grad():
        ref_images = ref.get_image_features(pixel_values=pixels)
        ref_texts = ref.get_text_features(input_ids=tokens)
    ref_images = getattr(ref_images, "pooler_output", ref_images)
    ref_texts = getattr(ref_texts, "pooler_output", ref_texts)
    assert relative_error(model.encode_image(pixels), ref_images) < 1e-5
    assert relative_error(model.encode_text(PROMPTS), ref_texts) < 1e-5

    # The same weights as sharded pickles with an index, as large HF repos ship them.
    sharded = tmp_path / "hf-sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((hf_dir / "config.json").read_text())
    state = read_state_dict(hf_dir / "model.safetensors")
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k].clone() for k in part}, sharded / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert relative_error(clipserve.load(str(sharded), precision="fp32").encode_text(PROMPTS), ref_texts) < 1e-5


def test_convert_round_trip_is_lossless(vit_b32, tmp_path: Path) -> None:
    _, directory = vit_b32
    from clipserve.cli.main import main

    assert main(["convert", str(directory), str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--format", "open_clip"]) == 0
    original = read_state_dict(directory / "open_clip_model.safetensors")
    back = read_state_dict(tmp_path / "back" / "open_clip_model.safetensors")
    assert set(original) == set(back)
    for key in original:
        assert torch.equal(original[key], back[key]), key
    assert json.loads((tmp_path / "back" / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]["patch_size"] == 32


def test_strict_key_report(vit_b32, tmp_path: Path) -> None:
    _, directory = vit_b32
    state = dict(read_state_dict(directory / "open_clip_model.safetensors"))
    del state["visual.ln_post.bias"]
    state["visual.extra.weight"] = torch.zeros(1)
    state["text.transformer.embeddings.position_ids"] = torch.arange(3)  # accepted, as open_clip drops it
    torch.save(state, tmp_path / "broken.bin")
    with pytest.raises(CheckpointError) as excinfo:
        clipserve.load("ViT-B-32", checkpoint=tmp_path / "broken.bin")
    message = str(excinfo.value)
    assert "missing keys (1)" in message and "visual.ln_post.bias" in message
    assert "unexpected keys (1)" in message and "visual.extra.weight" in message
    assert "position_ids" not in message


def test_bin_loads_with_weights_only(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"logit_scale": Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.bin"):
        clipserve.load("ViT-B-32", checkpoint=path)


def test_safetensors_are_memory_mapped(vit_b32) -> None:
    """Building the module adopts the mapped tensors: anonymous memory grows far less than the checkpoint's
    size. fp32 on CPU then repacks the Linear weights for oneDNN once: at most one copy, never two."""
    _, directory = vit_b32

    def rss_anon() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no RssAnon")

    size = (directory / "open_clip_model.safetensors").stat().st_size
    before = rss_anon()
    resolved = resolve(str(directory))
    module = build_module(resolved.model_cfg, resolved.state, resolved.source, torch.float32)
    grown = rss_anon() - before
    assert grown < 0.25 * size, f"anonymous memory grew by {grown / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"
    del module, resolved
    model = clipserve.load(str(directory), precision="fp32")
    grown = rss_anon() - before
    assert grown < 1.15 * size, f"anonymous memory grew by {grown / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"
    del model


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_cosine(vit_b32, precision: str) -> None:
    _, directory = vit_b32
    exact = clipserve.load(str(directory), precision="fp32")
    fast = clipserve.load(str(directory), precision=precision)
    assert fast.module.visual.conv1.weight.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    for a, b in ((exact.encode_image(photos()), fast.encode_image(photos())),
                 (exact.encode_text(PROMPTS), fast.encode_text(PROMPTS))):
        assert b.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(a, b).min() >= 0.999
        # Random weights make all embeddings nearly parallel; remove the batch mean to compare what differs.
        a0, b0 = a - a.mean(0), b - b.mean(0)
        assert torch.nn.functional.cosine_similarity(a0, b0).min() >= 0.99


def test_model_api(tiny_model: clipserve.Model, tmp_path: Path) -> None:
    image = photos()[1]
    path = tmp_path / "cat.png"
    image.save(path)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    from_pil = tiny_model.encode_image([image])
    assert torch.equal(tiny_model.encode_image([str(path)]), from_pil)
    assert torch.equal(tiny_model.encode_image([buffer.getvalue()]), from_pil)
    assert torch.allclose(tiny_model.encode_image(tiny_model.preprocess(image)[None]), from_pil)
    assert from_pil.shape == (1, tiny_model.embed_dim) and from_pil.dtype == torch.float32
    normalized = tiny_model.encode_text(["a", "b"], normalize=True)
    assert torch.allclose(normalized.norm(dim=-1), torch.ones(2))
    probs = tiny_model.classify([image, image], ["cat", "dog", "car"], templates=["a photo of a {}.", "a {c}"])
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(-1), torch.ones(2))
    hits = tiny_model.label_cache.hits
    tiny_model.classify([image], ["cat", "dog", "car"], templates=["a photo of a {}.", "a {c}"])
    assert tiny_model.label_cache.hits == hits + 1
    assert tiny_model.tokenize("hi").shape == (1, 77)
    info = tiny_model.info.as_dict()
    assert {"name", "architecture", "parameters", "image_size", "context_length"} <= set(info)
    assert isinstance(tiny_model.logit_scale, float)


def test_text_trimming_is_exact(tiny_model: clipserve.Model) -> None:
    """Running only up to the batch's last EOT gives the same features as all 77 positions."""
    tokens = tiny_model.tokenize(["short", "a somewhat longer prompt about a cat on a mat"])
    trimmed = tiny_model.encode_tokens(tokens)
    with torch.no_grad():
        text = tiny_model.module.text
        eot = tokens.argmax(-1)
        x = text.token_embedding(tokens) + text.positional_embedding
        x = text.ln_final(text.transformer(x, causal=True))
        full = x[torch.arange(2), eot] @ text.text_projection
    assert torch.allclose(trimmed, full, atol=1e-6)


def test_last_block_for_the_class_token_alone_is_exact(tiny_model: clipserve.Model) -> None:
    """The image tower's last block computes only the class token (`pooled_tokens=1`): the same as every token."""
    torch.manual_seed(0)
    transformer = tiny_model.module.visual.transformer
    x = torch.randn(3, 17, transformer.resblocks[0].ln_1.normalized_shape[0])
    with torch.no_grad():
        every_token, pooled = transformer(x), transformer(x, pooled_tokens=1)
        assert pooled.shape == (3, 1, x.shape[2])
        torch.testing.assert_close(pooled, every_token[:, :1], atol=1e-6, rtol=1e-6)
        with pytest.raises(ValueError, match="bidirectional"):
            transformer(x, causal=True, pooled_tokens=1)


def test_hub_download_through_local_endpoint(fake_hub, tiny_checkpoint: Path) -> None:
    fake_hub.add_repo("acme/tiny-clip", tiny_checkpoint)
    model = clipserve.load("hf-hub:acme/tiny-clip")
    assert model.info.source == "hf-hub:acme/tiny-clip"
    assert "acme/tiny-clip/resolve/main/open_clip_model.safetensors" in fake_hub.downloads()
    downloads = len(fake_hub.downloads())
    clipserve.load("hf-hub:acme/tiny-clip")  # cached: nothing fetched again
    assert len(fake_hub.downloads()) == downloads
    with pytest.raises(HubError, match="no Hub repository acme/missing"):
        clipserve.load("hf-hub:acme/missing")


def test_hub_offline_and_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(HubError) as excinfo:
        clipserve.load("ViT-B-32/datacomp_xl_s13b_b90k")
    message = str(excinfo.value)
    assert "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K" in message and "open_clip_model.safetensors" in message
    assert "HF_HUB_OFFLINE" in message


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "clipserve.cli.main", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )


def test_cli_downloads_with_hf_endpoint(fake_hub, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The real environment-variable path: a fresh process pointed at the local Hub by HF_ENDPOINT."""
    fake_hub.add_repo("acme/tiny-clip", tiny_checkpoint)
    env = {"HF_ENDPOINT": fake_hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "0"}
    result = run_cli("info", "hf-hub:acme/tiny-clip", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["embed_dim"] == 64
    offline = run_cli("info", "hf-hub:acme/other", env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 2 and "Traceback" not in offline.stderr
    assert offline.stderr.count("\n") == 1 and "acme/other" in offline.stderr


def test_cli_commands(tiny_checkpoint: Path, tmp_path: Path) -> None:
    image = tmp_path / "cat.jpg"
    photos()[1].save(image)
    result = run_cli("classify", str(tiny_checkpoint), str(image), "--labels", "cat,dog", "--json")
    assert result.returncode == 0, result.stderr
    ranked = json.loads(result.stdout)[0]["labels"]
    assert {r["label"] for r in ranked} == {"cat", "dog"}
    assert abs(sum(r["probability"] for r in ranked) - 1) < 1e-5
    result = run_cli("embed", str(tiny_checkpoint), "--text", "hello", "world", "-o", str(tmp_path / "e.npy"))
    assert result.returncode == 0, result.stderr
    embeddings = np.load(tmp_path / "e.npy")
    assert embeddings.shape == (2, 64) and np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    lines = run_cli("embed", str(tiny_checkpoint), "--image", str(image)).stdout.splitlines()
    assert len(json.loads(lines[0])["embedding"]) == 64
    fast = run_cli("embed", str(tiny_checkpoint), "--image", str(image), "--fast-decode").stdout.splitlines()
    model = clipserve.load(str(tiny_checkpoint))
    expected = model.encode_image([str(image)], normalize=True, fast_decode=True)[0]
    assert np.allclose(json.loads(fast[0])["embedding"], expected.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["info", "NoSuchArch/tag"], "neither a local path nor a pretrained name"),
        (["info", "ViT-B-32"], "architecture without weights"),
        (["classify", "ViT-B-32/datacomp_xl_s13b_b90k", "/nonexistent.jpg", "--labels", "a,b"], "no such image file"),
        (["info", "ViT-B-32", "--checkpoint", "/nonexistent.safetensors"], "no such checkpoint file"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], expected: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_unreadable_image_is_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    result = run_cli("classify", str(tiny_checkpoint), str(bad), "--labels", "a,b")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "bad.jpg" in result.stderr


def test_config_errors_name_file_and_field(tmp_path: Path, tiny_checkpoint: Path) -> None:
    directory = tmp_path / "odd"
    directory.mkdir()
    config = json.loads((tiny_checkpoint / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["timm_model_name"] = "convnext_base"
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as excinfo:
        clipserve.load(str(directory), precision="fp32")
    assert str(directory / "open_clip_config.json") in str(excinfo.value)
    assert "vision_cfg.timm_model_name" in str(excinfo.value)
    (directory / "open_clip_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        clipserve.load(str(directory))
