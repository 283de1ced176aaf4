"""clipserve.io.tokenizers: ids identical to open_clip's SimpleTokenizer and to tokenizer.json (XLM-R).

Oracles (test-only): open_clip 3.3.0's SimpleTokenizer for the CLIP BPE, transformers'
XLMRobertaTokenizerFast(tokenizer_file=...) for XLM-R. There is no network, so the XLM-R test writes its own
tokenizer.json in the XLM-R layout (Unigram model, a normalizer that really changes text, Metaspace,
<s> $A </s>, <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> with lstrip) from a small trained Unigram model.
"""

from __future__ import annotations

import gzip
import html
import json
import random
import threading
import time
import unicodedata
from pathlib import Path

import pytest
import torch
from checkpoint_factory import write_xlmr_tokenizer_json
from oracles import open_clip

from clipserve.io.tokenizers import (
    CLIPTokenizer,
    Tokenizer,
    TokenizerError,
    XLMRobertaTokenizer,
    clean_whitespace,
)

torch.set_num_threads(1)

CONTEXT = 77

# --------------------------------------------------------------------------------------------------
# Deterministic corpus

_WORDS = (
    "a photo of the cat dog car bird tree house person people man woman child city street forest beach "
    "mountain river sky cloud sunset night rendering painting sketch drawing close-up blurry bright dark "
    "small large red blue green yellow black white old new beautiful ugly famous tiny big cute scary "
    "quality high low resolution cropped jpeg picture image art style origami tattoo sculpture plushie toy"
).split()
_TEMPLATES = [
    "a photo of a {}.",
    "a bad photo of the {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a pixelated photo of the {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "itap of a {}.",
    "art of the {}.",
    "a close-up photo of a {}.",
    "a origami {}.",
    "a {} in a video game.",
    "a cartoon {}.",
    "{}",
]
_CLASSES = [
    "tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray", "cock",
    "hen", "ostrich", "brambling", "goldfinch", "house finch", "junco", "indigo bunting", "American robin",
    "bulbul", "jay", "magpie", "chickadee", "American dipper", "kite (bird of prey)", "bald eagle",
    "T-shirt", "jack-o'-lantern", "potter's wheel", "St. Bernard", "three-toed sloth", "yo-yo",
    "Granny Smith apple", "crème brûlée", "carbonara", "CD player", "airliner", "Model T", "4x4 truck",
    "iPod", "ping-pong ball", "pencil sharpener", "Windsor tie", "Pembroke Welsh Corgi", "e-reader",
]  # fmt: skip
_PUNCT = ["!", "!!", "!!!", "?", "?!?", "...", "…", "--", "---", "***", "@#$%^&*()", "((()))", ":-)", ";)",
          "<3", ">>>", "~~", "__", "\\", "/", "|", "[]", "{}", '"', "''", "``", "“", "”", "‘", "’", "«»",
          "¿", "¡", "·", "•", "§", "©", "®", "™", "°", "±", "×", "÷", "€", "£", "¥", "¢",
          "$", "%", "#"]  # fmt: skip
_CONTRACTIONS = ["it's", "don't", "you're", "we've", "I'm", "they'll", "he'd", "IT'S", "DON'T", "You'RE",
                 "WE'VE", "I'M", "THEY'LL", "HE'D", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d",
                 "rock'n'roll", "o'clock", "y'all'd've", "'''s", "'sss", "'tis", "can't", "won't", "shan't",
                 "it’s", "don’t", "cat's", "cats'", "'S", "'LL", "l'homme", "aujourd'hui", "'ſ", "it'ſ", "'K",
                 "'\u212a"]  # fmt: skip
_ACCENTED = ["café", "naïve", "résumé", "über", "straße", "STRASSE", "niño", "façade", "Ærøskøbing",
             "Łódź", "São Paulo", "Zürich", "Ångström", "crème brûlée", "piñata", "jalapeño", "Dvořák",
             "Kraków", "Ελληνικά", "İstanbul", "ǅemal", "ﬁsh ﬂour", "ŉ", "ǰ", "ẞ", "cafe\u0301",
             "nai\u0308ve", "A\u030a", "\u1e9b\u0323"]  # fmt: skip
_SCRIPTS = {
    "cyrillic": ["привет мир", "Фотография кошки", "СОБАКА", "ёжик в тумане", "Київ", "Ђорђе", "щи да каша"],
    "greek": ["γεια σου κόσμε", "ΦΩΤΟΓΡΑΦΙΑ", "ΐ ΰ ς σ Σ", "φιλοσοφία", "ᾳ ᾼ ᾀ", "Ωmega µ"],
    "arabic": ["مرحبا بالعالم", "صورة قطة", "العربية ١٢٣٤", "ﻻ ﷺ", "كِتَابٌ"],
    "hebrew": ["שלום עולם", "תמונה של חתול"],
    "cjk": ["日本語のテキスト", "猫の写真", "一只猫的照片", "東京タワー", "한국어 텍스트",
            "고양이 사진", "ｶﾀｶﾅ", "中文，标点。", "「引用」", "〇一二三"],
    "hindi": ["नमस्ते दुनिया", "बिल्ली की तस्वीर", "हिन्दी ०१२३", "क्षत्रिय"],
    "thai": ["สวัสดีชาวโลก", "ภาพถ่ายแมว"],
    "other": ["ሰላም", "Հայերեն", "ქართული", "ᏣᎳᎩ", "ꦗꦮ", "𐌰𐌱𐌲", "𝔣𝔯𝔞𝔨𝔱𝔲𝔯", "𝟙𝟚𝟛", "ⅫⅣ", "①②", "½ ¾",
              "²³", "ℌℍ", "Ⓐⓑ"],
}  # fmt: skip
_EMOJI = ["😀", "😂", "👍", "👍🏽", "👍🏿", "👨‍👩‍👧‍👦", "👩🏽‍💻", "🏳️‍🌈", "🇫🇷", "🇯🇵", "1️⃣",
          "❤️", "♥", "🐱", "🐶🐶🐶", "🍕🍔", "🤷‍♂️", "🧑🏻‍🤝‍🧑🏿", "✨", "🔥🔥", "™️", "🫠"]  # fmt: skip
_ENTITIES = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&#x27;", "&nbsp;", "&amp;amp;", "&amp;amp;amp;",
             "&eacute;", "&hellip;", "&lt;b&gt;bold&lt;/b&gt;", "&copy;", "&#8217;", "&#128512;", "&bogus;",
             "&amp", "AT&T", "&#0;", "&#x110000;"]  # fmt: skip
_SPACES = ["\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000", "\u200b", "\x0b", "\x0c", "\x1c", "\x1f",
           "\u0085", "\u2028", "\u2029", "\ufeff", "\u180e", "  ", " \t \n "]  # fmt: skip
_ODD = ["<start_of_text>", "<end_of_text>", "a <end_of_text> b", "x!<start_of_text>", "<START_OF_TEXT>",
        "foo<start_of_text>bar", "<start_of_text><end_of_text>", "<<start_of_text>>", "'<end_of_text>",
        "<ſtart_of_text>", "<ﬆart_of_text>", "<start_of_text", "start_of_text>", "<end_of_text>" * 50,
        "a\u0345b", "\u0345", "x\u0558y", "\u0558", "꟎a", "a\U000323b0b", "\U0003d000", "𮯰", "\U000e0001",
        "\ud800 x", "\ud83d\ude00 x", "a\x00b", "\x1b[31mred\x1b[0m", "\ufffd",
        "\U0010ffff", "\ue000"]  # fmt: skip


def _mojibake(s: str, rng: random.Random) -> str:
    enc = rng.choice(["cp1252", "latin-1"])
    try:
        return s.encode("utf-8").decode(enc)
    except UnicodeDecodeError:
        return s.encode("utf-8").decode("latin-1")


def _random_unicode(rng: random.Random, n: int) -> str:
    """Code points from everywhere (surrogates excluded), weighted towards assigned blocks."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            out.append(chr(rng.randrange(0x20, 0x7F)))
        elif r < 0.6:
            out.append(chr(rng.randrange(0xA0, 0x3000)))
        elif r < 0.8:
            out.append(chr(rng.randrange(0x3000, 0xD800)))
        elif r < 0.9:
            out.append(chr(rng.randrange(0xE000, 0x10000)))
        else:
            out.append(chr(rng.randrange(0x10000, 0x110000)))
    return "".join(out)


def _fragment(rng: random.Random) -> str:
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice(_TEMPLATES).format(rng.choice(_CLASSES))
    if kind == 1:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 12)))
    if kind == 2:
        return rng.choice(_PUNCT) * rng.randint(1, 3)
    if kind == 3:
        number = rng.choice([rng.randrange(10 ** rng.randint(1, 12)), round(rng.uniform(-1e4, 1e4), 3)])
        return rng.choice(["", "-", "+", "$", "#"]) + str(number)
    if kind == 4:
        return rng.choice(_CONTRACTIONS)
    if kind == 5:
        return rng.choice(_ACCENTED)
    if kind == 6:
        return rng.choice(rng.choice(list(_SCRIPTS.values())))
    if kind == 7:
        return "".join(rng.choice(_EMOJI) for _ in range(rng.randint(1, 4)))
    if kind == 8:
        return rng.choice(_ENTITIES)
    if kind == 9:
        return _mojibake(rng.choice(_ACCENTED + _PUNCT[20:] + _SCRIPTS["cjk"] + _EMOJI), rng)
    if kind == 10:
        return rng.choice(_SPACES)
    return rng.choice(_ODD)


def _case(s: str, rng: random.Random) -> str:
    return rng.choice([str, str, str.upper, str.title, str.swapcase, str.lower])(s)


def make_corpus(seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = ["", " ", "   ", "\t\n", "\u3000\u00a0 \n", "a photo of a cat.", "A Photo Of A CAT!!",
                      "  hello   world  ", "&amp; test", "word " * 100]  # fmt: skip
    # Fixed families, each element once.
    out += [t.format(c) for t in _TEMPLATES for c in _CLASSES[:12]]
    for group in (_PUNCT, _CONTRACTIONS, _ACCENTED, _EMOJI, _ENTITIES, _ODD, *_SCRIPTS.values()):
        out += list(group)
        out += [f"a {g} b" for g in group]
    out += [f"x{s}y" for s in _SPACES] + [s * 3 for s in _SPACES]
    out += [_mojibake(s, rng) for s in _ACCENTED + _SCRIPTS["cyrillic"] + _EMOJI]
    out += [html.escape(html.escape(t)) for t in _TEMPLATES[:10]]
    # Random mixtures of fragments, with random case and separators.
    while len(out) < 2200:
        parts = [_case(_fragment(rng), rng) for _ in range(rng.randint(1, 8))]
        out.append("".join(p + rng.choice([" ", " ", "", "\t", "\n", "  ", ","]) for p in parts))
    out += [_random_unicode(rng, rng.randint(1, 40)) for _ in range(300)]
    # Long texts: past 77 tokens, thousands of characters.
    for n in (60, 76, 80, 200, 500, 1500):
        out.append(" ".join(rng.choice(_WORDS) for _ in range(n)))
    out.append(" ".join(_fragment(rng) for _ in range(400)))
    out.append(_random_unicode(rng, 3000))
    out.append("".join(rng.choice(_EMOJI) for _ in range(300)))
    out.append("x" * 5000)
    out.append("!" * 2000)
    out.append("supercalifragilisticexpialidocious" * 40)
    return out


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    texts = make_corpus()
    assert len(texts) >= 2000
    assert make_corpus() == texts  # deterministic
    return texts


@pytest.fixture(scope="module")
def oc_ref():
    oc = open_clip()
    return oc.tokenizer.SimpleTokenizer()


@pytest.fixture(scope="module")
def clip_tok() -> CLIPTokenizer:
    return CLIPTokenizer()


def _first_diffs(texts: list[str], got: torch.Tensor, want: torch.Tensor, k: int = 5) -> str:
    rows = (got != want).any(dim=1).nonzero().flatten().tolist()
    lines = [f"{len(rows)} of {len(texts)} rows differ; first ones:"]
    for i in rows[:k]:
        lines.append(f"  [{i}] {texts[i][:80]!r}\n     got  {got[i].tolist()}\n     want {want[i].tolist()}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# CLIPTokenizer


def test_protocol_and_constants(clip_tok: CLIPTokenizer) -> None:
    assert isinstance(clip_tok, Tokenizer)
    assert (clip_tok.sot_id, clip_tok.eot_id, clip_tok.pad_id, clip_tok.context_length) == (
        49406,
        49407,
        0,
        77,
    )
    assert clip_tok.vocab_size == 49408


def test_documented_examples(clip_tok: CLIPTokenizer) -> None:
    cases = {
        "a photo of a cat.": [49406, 320, 1125, 539, 320, 2368, 269, 49407],
        "A Photo Of A CAT!!": [49406, 320, 1125, 539, 320, 2368, 748, 49407],
        "  hello   world  ": [49406, 3306, 1002, 49407],
        "&amp; test": [49406, 261, 1628, 49407],
        "": [49406, 49407],
    }
    for text, ids in cases.items():
        out = clip_tok(text)
        assert out.shape == (1, 77) and out.dtype == torch.long
        assert out[0, : len(ids)].tolist() == ids, text
        assert out[0, len(ids) :].eq(0).all(), text
    long = clip_tok("word " * 100)[0].tolist()
    assert long == [49406] + [2653] * 75 + [49407]


def test_merges_well_formed() -> None:
    """The BPE library's priority-queue merging equals open_clip's loop when every merge's parts exist
    before it (new pairs then always rank after the merge that created them). Check the bundled file."""
    path = Path(__file__).resolve().parents[1] / "src/clipserve/io/bpe_simple_vocab_16e6.txt.gz"
    merges = [
        tuple(m.split()) for m in gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    ]
    oc = open_clip()
    base = list(oc.tokenizer.bytes_to_unicode().values())
    known = set(base) | {c + "</w>" for c in base}
    for a, b in merges:
        assert a in known and b in known, (a, b)
        known.add(a + b)
    assert len(known) == 512 + len(merges)  # no duplicate tokens, so ids are unambiguous


def test_identical_to_open_clip(corpus: list[str], oc_ref, clip_tok: CLIPTokenizer) -> None:
    want = oc_ref(corpus)
    got = clip_tok(corpus)
    assert got.shape == want.shape == (len(corpus), 77) and got.dtype == torch.long
    assert torch.equal(got, want), _first_diffs(corpus, got, want)
    # The batch path and the single-string path agree, and a fresh (cold-cache) instance too.
    fresh = CLIPTokenizer()
    for i in range(0, len(corpus), 97):
        assert torch.equal(fresh(corpus[i]), want[i : i + 1]), corpus[i]


def test_other_context_lengths(corpus: list[str]) -> None:
    oc = open_clip()
    sample = corpus[::7]
    for n in (2, 5, 16, 100):
        ref = oc.tokenizer.SimpleTokenizer(context_length=n)
        got, want = CLIPTokenizer(context_length=n)(sample), ref(sample)
        assert torch.equal(got, want), _first_diffs(sample, got, want)


def test_count_tokens(corpus: list[str], oc_ref, clip_tok: CLIPTokenizer) -> None:
    want = [min(len(oc_ref.encode(t)) + 2, 77) for t in corpus]
    assert clip_tok.count_tokens(corpus) == want
    assert clip_tok.count_tokens([]) == []
    assert clip_tok.count_tokens(["a photo of a cat.", "", "word " * 100]) == [8, 2, 77]


def test_inputs(clip_tok: CLIPTokenizer) -> None:
    assert clip_tok([]).shape == (0, 77)
    assert torch.equal(clip_tok(("a", "b")), clip_tok(["a", "b"]))
    with pytest.raises(TypeError):
        clip_tok(["a", None])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        clip_tok(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TokenizerError):
        CLIPTokenizer(context_length=1)


def test_small_cache_and_threads(corpus: list[str], oc_ref) -> None:
    """Concurrent callers with a cache small enough to be swapped out many times give the same ids."""
    tok = CLIPTokenizer()
    tok.cache_size = 300
    want = oc_ref(corpus)
    chunks = [list(range(i, len(corpus), 6)) for i in range(6)]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for _ in range(2):
                results[k] = tok([corpus[i] for i in chunks[k]])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(chunks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(tok._cache) <= tok.cache_size + 2 + max(len(c) for c in chunks) * 80
    for k, idx in enumerate(chunks):
        assert torch.equal(results[k], want[idx]), k


def test_ftfy_ascii_shortcut_is_exact(corpus: list[str]) -> None:
    """Texts the cleaner hands past ftfy/html.unescape must be ones those calls leave unchanged."""
    import ftfy

    from clipserve.io import tokenizers as mod

    assert all(mod._FTFY_INERT.fullmatch(p) for p in mod._FTFY_PROBES)
    assert mod._ftfy_inert_ok()
    rng = random.Random(7)
    alphabet = [chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n", "\n", "\r", "\x1b", "\x00", "\x7f", "&"]
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    fuzz += ["&" + t for t in ("amp;", "lt;", "#39;")] + ["\x1b[31mx", "a\r\nb", "<b>x</b>", "\\u00e9"]
    inert = [t for t in corpus + fuzz if mod._FTFY_INERT.fullmatch(t)]
    assert len(inert) > 1000 and mod._FTFY_INERT.fullmatch("A photo of a cat's toy, 3 of them (#2)!\n")
    for t in inert:
        assert ftfy.fix_text(t) == t and html.unescape(t) == t, repr(t)
    oc = open_clip()
    for t in fuzz:  # and the cleaners agree with open_clip's on both sides of the shortcut
        assert mod.clean_lower(t) == oc.tokenizer._clean_lower(t), repr(t)
        assert mod.clean_whitespace(t) == oc.tokenizer._clean_whitespace(t), repr(t)


def test_throughput(corpus: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Print (not assert) texts/s against open_clip's SimpleTokenizer, both from a cold cache."""
    oc = open_clip()
    prompts = [t.format(c) for c in _CLASSES for t in _TEMPLATES]
    lines = []
    for label, texts in (("corpus[:2000]", corpus[:2000]), ("zero-shot prompts", prompts)):
        rows = []
        for name, make in (
            ("open_clip SimpleTokenizer", oc.tokenizer.SimpleTokenizer),
            ("CLIPTokenizer", CLIPTokenizer),
        ):
            tok = make()
            t0 = time.perf_counter()
            tok(texts)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            tok(texts)
            warm = time.perf_counter() - t0
            rows.append((name, cold, warm))
        lines.append(f"  {label}: {len(texts)} texts, {sum(map(len, texts))} chars")
        for name, cold, warm in rows:
            lines.append(
                f"    {name:26s} cold {len(texts) / cold:8.0f} texts/s"
                f"   warm {len(texts) / warm:8.0f} texts/s"
            )
        lines.append(
            f"    speed-up: cold {rows[0][1] / rows[1][1]:.2f}x, warm {rows[0][2] / rows[1][2]:.2f}x"
        )
    with capsys.disabled():
        print("\n[tokenizer throughput, 1 thread]\n" + "\n".join(lines))


# --------------------------------------------------------------------------------------------------
# XLM-R


def _fullwidth(s: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else ("\u3000" if c == " " else c) for c in s)


def _xlmr_corpus(base: list[str]) -> list[str]:
    rng = random.Random(99)
    out = list(base[:1800])
    plain = (
        [t.format(c) for t in _TEMPLATES for c in _CLASSES[:6]] + _ACCENTED + ["Hello World 123", "ABC xyz"]
    )
    out += [_fullwidth(s) for s in plain[:150]]
    out += [unicodedata.normalize(rng.choice(["NFD", "NFC", "NFKD"]), s) for s in plain[:150]]
    out += ["``quoted''", "a  ``b''  c", "<s>", "</s>", "<pad>", "<unk>", "<mask>", "a <mask> b", "x<mask>",
            "<s> hi </s>", "ｈｅｌｌｏ　ｗｏｒｌｄ", "ＡＢＣ１２３", "ﬁ ﬂ", "㎏ ㍿ ㈱", "Ⅻ", "①", "ｶﾞ",
            "\u00a0x\u3000y"]  # fmt: skip
    out += [" ".join(rng.choice(_WORDS + _ACCENTED) for _ in range(n)) for n in (74, 75, 76, 77, 200, 1000)]
    out += [_fullwidth(" ".join(rng.choice(_WORDS) for _ in range(150)))]
    assert len(out) >= 2000
    return out


@pytest.fixture(scope="module")
def xlmr_file(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    path = tmp_path_factory.mktemp("xlmr") / "tokenizer.json"
    rng = random.Random(5)
    # Not the random-code-point texts: their characters stay out of the vocabulary and exercise <unk>.
    train = [clean_whitespace(t) for t in corpus[:2000] if len(t) < 300] + [
        " ".join(rng.choice(_WORDS + _CLASSES + _ACCENTED) for _ in range(12)) for _ in range(2000)
    ]
    write_xlmr_tokenizer_json(path, train)
    spec = json.loads(path.read_text())
    assert spec["model"]["type"] == "Unigram" and spec["model"]["unk_id"] == 3
    assert [spec["model"]["vocab"][i][0] for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    return path


def test_xlmr_identical_to_transformers(xlmr_file: Path, corpus: list[str]) -> None:
    from oracles import transformers

    tf = transformers()
    texts = _xlmr_corpus(corpus)
    ref = tf.XLMRobertaTokenizerFast(tokenizer_file=str(xlmr_file))
    # Pre-cleaned with open_clip's own clean='whitespace' function (HFTokenizer's), not ours.
    oc_clean = open_clip().tokenizer._clean_whitespace
    enc = ref([oc_clean(t) for t in texts], max_length=77, padding="max_length", truncation=True)
    want = torch.tensor(enc["input_ids"])
    tok = XLMRobertaTokenizer.from_file(xlmr_file)
    assert isinstance(tok, Tokenizer) and tok.pad_id == 1 and tok.context_length == 77
    got = tok(texts)
    assert got.shape == (len(texts), 77) and got.dtype == torch.long
    assert torch.equal(got, want), _first_diffs(texts, got, want)
    assert (got[:, 0] == 0).all()
    assert tok.count_tokens(texts) == [sum(m) for m in enc["attention_mask"]]
    # Shapes of the result: <s> ... </s> then <pad>=1; truncation keeps <s> + 75 pieces + </s>.
    one = tok("")
    assert one.shape == (1, 77) and one[0, :2].tolist() == [0, 2] and one[0, 2:].eq(1).all()
    long = tok(" ".join(["photo"] * 300))[0]
    assert long[0] == 0 and long[-1] == 2 and not (long[1:-1] == 1).any()
    assert tok.count_tokens(["", " ".join(["photo"] * 300)]) == [2, 77]
    # Non-default context length.
    tok16 = XLMRobertaTokenizer.from_file(xlmr_file, context_length=16)
    enc16 = ref([oc_clean(t) for t in texts[:300]], max_length=16, padding="max_length", truncation=True)
    assert torch.equal(tok16(texts[:300]), torch.tensor(enc16["input_ids"]))


def test_xlmr_normalizer_applied(xlmr_file: Path) -> None:
    import tokenizers

    tok = XLMRobertaTokenizer.from_file(xlmr_file)
    # Full-width forms (ftfy's fix_character_width folds these too, before the normalizer sees them).
    width = [("ａ ｐｈｏｔｏ ｏｆ ａ ｃａｔ", "a photo of a cat"), ("ＣＡＴ　ＤＯＧ１２", "CAT DOG12")]
    # Forms ftfy leaves alone, which only the file's normalizer (NFKC, ``/'' -> ") folds.
    compat = [("①②③ ㎏", "123 kg"), ("ℍ𝕖𝕝𝕝𝕠 x²", "Hello x2"), ("Ⅻ", "XII"), ("``quoted''", '"quoted"')]
    for folded, plain in width + compat + [("cafe\u0301 nai\u0308ve", "café naïve")]:
        assert torch.equal(tok(folded), tok(plain)), folded
    # ...and that is the normalizer's doing: without it those forms tokenize differently.
    raw = tokenizers.Tokenizer.from_file(str(xlmr_file))
    raw.normalizer = None
    bare = XLMRobertaTokenizer(raw)
    for folded, plain in compat:
        assert not torch.equal(bare(folded), bare(plain)), folded
    # The caller's Tokenizer object is copied, not reconfigured.
    assert raw.padding is None and raw.truncation is None


def test_xlmr_pre_clean(xlmr_file: Path) -> None:
    tok = XLMRobertaTokenizer.from_file(xlmr_file)
    assert torch.equal(tok("  a \t photo\n\nof &amp;amp; a CAT "), tok("a photo of & a CAT"))
    assert not torch.equal(tok("CAT"), tok("cat"))  # no lowercasing


def test_xlmr_threads(xlmr_file: Path, corpus: list[str]) -> None:
    tok = XLMRobertaTokenizer.from_file(xlmr_file)
    texts = corpus[:600]
    want = tok(texts)
    out: dict[int, torch.Tensor] = {}

    def work(k: int) -> None:
        out[k] = tok(texts[k::4])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        assert torch.equal(out[k], want[k::4])


def test_xlmr_file_errors(tmp_path: Path, xlmr_file: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(TokenizerError, match="nope"):
        XLMRobertaTokenizer.from_file(missing)
    for name, content in (
        ("corrupt.json", '{"version": "1.0", "model": '),
        ("empty.json", ""),
        ("obj.json", "{}"),
    ):
        bad = tmp_path / name
        bad.write_text(content)
        with pytest.raises(TokenizerError) as info:
            XLMRobertaTokenizer.from_file(bad)
        assert str(bad) in str(info.value)
    # A valid tokenizer.json that is not laid out like XLM-R (<pad> is not 1).
    spec = json.loads(xlmr_file.read_text())
    spec["model"]["vocab"][0], spec["model"]["vocab"][1] = (
        spec["model"]["vocab"][1],
        spec["model"]["vocab"][0],
    )
    for t in spec["added_tokens"]:
        t["id"] = {0: 1, 1: 0}.get(t["id"], t["id"])
    other = tmp_path / "other.json"
    other.write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match="other.json"):
        XLMRobertaTokenizer.from_file(other)
    assert issubclass(TokenizerError, ValueError)
