"""Random-weight checkpoints in the exact published formats, written by the tests.

Weights come from open_clip 3.3.0 itself (the oracle), so the key names and shapes are the published ones;
every parameter is randomised (LayerNorm gains and biases too) so that no term of the forward pass hides.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from oracles import open_clip

# Reduced-depth configs keep the suite fast while exercising every code path of the real architectures.
SMALL_BIGG = {
    "embed_dim": 1280,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 1664, "head_width": 104, "mlp_ratio": 4.9231, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20, "layers": 2},
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(4.2)
            elif p.ndim == 1 and ("ln" in name or "LayerNorm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                std = 0.02 if p.ndim == 1 else p.shape[-1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def open_clip_model(model_cfg: dict | str, seed: int = 0) -> torch.nn.Module:
    oc = open_clip()
    if isinstance(model_cfg, str):
        model = oc.create_model(model_cfg)
    else:
        from open_clip.model import CLIP

        model = CLIP(**model_cfg)
    return randomize(model, seed).eval()


def write_open_clip_dir(directory: Path, model: torch.nn.Module, model_cfg: dict, fmt: str = "safetensors") -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(open_clip().OPENAI_DATASET_MEAN), "std": list(open_clip().OPENAI_DATASET_STD)}}
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(directory / "open_clip_model.safetensors"))
    else:
        torch.save(state, directory / "open_clip_pytorch_model.bin")
    return directory


_DEFAULT_XLMR_TRAIN = [
    f"{a} {b} {c}"
    for a in ("a photo of", "une photo de", "ein Foto von", "una foto di", "写真", "café", "naïve", "ｈｅｌｌｏ")
    for b in ("a cat", "un chien", "einem Hund", "una tinca", "猫", "the digit 7", "an astronaut", "coffee")
    for c in ("", "on a mat", "très long", "in the park", "😀", "123")
]


def write_xlmr_tokenizer_json(path: Path, train_texts: list[str] | None = None) -> None:
    """A small tokenizer.json with the structure of xlm-roberta-base's: Unigram model, a normalizer that
    changes text (NFKC stands in for the real file's precompiled sentencepiece charsmap), Metaspace
    pre-tokenizer, `<s> $A </s>` post-processor, `<s>`=0 `<pad>`=1 `</s>`=2 `<unk>`=3."""
    from tokenizers import (
        AddedToken,
        Regex,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from tokenizers import Tokenizer as HFTokenizer

    train_texts = train_texts or _DEFAULT_XLMR_TRAIN
    tok = HFTokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Replace("``", '"'),
            normalizers.Replace("''", '"'),
            normalizers.NFKC(),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=len(set("".join(train_texts))) + 1500,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        max_piece_length=12,
    )
    tok.train_from_iterator(train_texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    tok.save(str(path))
