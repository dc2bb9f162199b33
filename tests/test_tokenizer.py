"""CLIP BPE tokenizer: parity with OpenAI's ids, cleaning, padding/truncation, merges files, BPE training."""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import random
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch

from dalle2.clip.bpe_train import iter_texts, train_bpe
from dalle2.clip.tokenizer import (
    BUILTIN_VOCAB,
    CLIP_NUM_MERGES,
    Tokenizer,
    clean_text,
    get_tokenizer,
    main,
    read_merges,
    write_merges,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO_ROOT, ".cache")
OPENAI_BPE = os.path.join(CACHE, "bpe_simple_vocab_16e6.txt.gz")
REFERENCE_DIR = os.path.join(CACHE, "open_clip_reference")

# Strings covering the cleaning and pre-tokenizing paths: unicode, emoji, HTML entities, whitespace,
# numbers, punctuation, contractions, mojibake (ftfy), mixed case, very long words.
TEXTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "",
    "   ",
    "a diagram",
    "a red circle on the left of a white background",
    "Hello, world!",
    "it's a dog's life, isn't it? we'll see; they'd've",
    "café crème brûlée à la carte",
    "naïve façade, Ærøskøbing, Straße",
    "日本語のテキスト",
    "中文 文本 测试",
    "한국어 문장",
    "Привет, мир",
    "emoji 😀🐱‍👤🚀 party 🎉🎉",
    "fish &amp; chips",
    "&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot;",
    "double escaped &amp;amp; ampersand",
    "triple escaped &amp;amp;amp; and &amp;lt;tag&amp;gt;",
    "<i>tagged</i> &amp;amp; escaped",
    "tabs\tand\nnew lines\r\n and   many    spaces  ",
    "3.14159 is pi, 2024-01-31, 1,000,000 and 42nd",
    "version v1.2.3-rc4 of model_x",
    "!!! ??? ... --- *** ### $$$ %%% @user #hashtag",
    "https://example.com/path?q=1&x=y",
    "(parentheses) [brackets] {braces} <angles>",
    "The café’s “smart quotes” — and an ellipsis…",
    "mojibake: cafÃ© and donâ€™t",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "x" * 300,
    "ÀÉÎÕÜ upper accents",
    "\u00a0non\u00a0breaking\u2003spaces",
    "zero\u200bwidth joiner",
    "math ∑ ∫ √ ≠ ≤ ∞ and arrows → ←",
    "greek αβγ δ and hebrew שלום and arabic مرحبا",
    "snake_case camelCase kebab-case",
]


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def openai_bpe_path() -> str:
    """OpenAI's merges file, taken from the open_clip_torch wheel (downloaded once into .cache/)."""
    if os.path.isfile(OPENAI_BPE) and os.path.isfile(os.path.join(REFERENCE_DIR, "tokenizer.py")):
        return OPENAI_BPE
    wheel_dir = os.path.join(CACHE, "wheels")
    os.makedirs(wheel_dir, exist_ok=True)
    wheels = [f for f in os.listdir(wheel_dir) if f.startswith("open_clip_torch") and f.endswith(".whl")]
    if not wheels:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "open_clip_torch",
            "-d",
            wheel_dir,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            error = proc.stderr.strip()[-300:] if proc.returncode != 0 else ""
        except (OSError, subprocess.TimeoutExpired) as e:
            error = f"{type(e).__name__}: {e}"
        wheels = [f for f in os.listdir(wheel_dir) if f.startswith("open_clip_torch") and f.endswith(".whl")]
        if error or not wheels:
            reason = f"cannot download the open_clip_torch wheel (for OpenAI's BPE merges): {error or 'no wheel saved'}"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(reason)
            pytest.skip(reason)
    with zipfile.ZipFile(os.path.join(wheel_dir, sorted(wheels)[-1])) as whl:
        os.makedirs(REFERENCE_DIR, exist_ok=True)
        for name, dest in [
            ("open_clip/bpe_simple_vocab_16e6.txt.gz", OPENAI_BPE),
            ("open_clip/bpe_simple_vocab_16e6.txt.gz", os.path.join(REFERENCE_DIR, "bpe_simple_vocab_16e6.txt.gz")),
            ("open_clip/tokenizer.py", os.path.join(REFERENCE_DIR, "tokenizer.py")),
        ]:
            tmp = f"{dest}.{os.getpid()}.tmp"  # other test sessions may extract at the same time
            with open(tmp, "wb") as f:
                f.write(whl.read(name))
            os.replace(tmp, dest)
    return OPENAI_BPE


@pytest.fixture(scope="session")
def openai_tok(openai_bpe_path) -> Tokenizer:
    return Tokenizer.from_file(openai_bpe_path)


@pytest.fixture(scope="session")
def reference_tok(openai_bpe_path):
    """open_clip's own tokenizer, imported from the wheel's file (an independent reference, tests only)."""
    path = os.path.join(REFERENCE_DIR, "tokenizer.py")
    try:
        spec = importlib.util.spec_from_file_location("_open_clip_reference_tokenizer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.SimpleTokenizer(os.path.join(REFERENCE_DIR, "bpe_simple_vocab_16e6.txt.gz"))
    except Exception as e:  # its imports may need packages we do not have
        pytest.skip(f"open_clip's tokenizer module does not import here: {type(e).__name__}: {e}")


def _captions(n: int, seed: int) -> list[str]:
    """Synthetic captions from a few templates (independent of dalle2.data)."""
    rng = random.Random(seed)
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    shapes = ["circle", "square", "triangle", "cross", "star", "hexagon"]
    places = ["on the left", "on the right", "in the center", "at the top", "at the bottom"]
    templates = [
        "a {s} {c} {sh} {p} of a {b} background",
        "an image of a {c} {sh} {p}, {s}",
        "{b} background with a {s} {c} {sh} {p}",
        "a photo showing a {c} {sh} that is {s}, placed {p}",
    ]
    return [
        rng.choice(templates).format(
            s=rng.choice(["small", "large", "tiny", "huge"]),
            c=rng.choice(colors),
            sh=rng.choice(shapes),
            p=rng.choice(places),
            b=rng.choice(colors),
        )
        for _ in range(n)
    ]


# --------------------------------------------------------------------------------------------- OpenAI parity


@pytest.mark.network
def test_published_ids_a_photo_of_a_cat(openai_tok):
    ids = openai_tok("a photo of a cat")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[0, 7:].eq(0).all()
    assert openai_tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


@pytest.mark.network
def test_openai_vocab_layout(openai_tok, openai_bpe_path):
    assert openai_tok.vocab_size == 49408
    assert (openai_tok.sot_token, openai_tok.eot_token) == (49406, 49407)
    assert len(openai_tok.merges) == CLIP_NUM_MERGES
    # The file holds far more merges than CLIP uses; an explicit cap overrides the default.
    assert Tokenizer.from_file(openai_bpe_path, max_merges=1000).vocab_size == 512 + 1000 + 2
    # argmax(ids) finds the end token, as the text tower expects.
    ids = openai_tok(TEXTS)
    lengths = torch.tensor([min(len(openai_tok.encode(t)) + 2, 77) for t in TEXTS])
    assert torch.equal(ids.argmax(dim=-1), lengths - 1)


@pytest.mark.network
def test_matches_open_clip_reference(openai_tok, reference_tok):
    for text in TEXTS:
        assert openai_tok.encode(text) == reference_tok.encode(text), text
    assert torch.equal(openai_tok(TEXTS), reference_tok(TEXTS, context_length=77))
    assert torch.equal(openai_tok(TEXTS, context_length=16), reference_tok(TEXTS, context_length=16))
    ids = openai_tok.encode(" ".join(TEXTS))
    assert openai_tok.decode(ids) == reference_tok.decode(ids).strip()


@pytest.mark.network
def test_truncation_keeps_end_token(openai_tok):
    text = "a very long caption " * 40
    ids = openai_tok(text)
    assert ids.shape == (1, 77)
    assert ids[0, 0] == openai_tok.sot_token and ids[0, 76] == openai_tok.eot_token
    assert (ids[0] != 0).all()
    assert ids[0, 1:76].tolist() == openai_tok.encode(text)[:75]
    short = openai_tok([text, "cat"], context_length=5)
    assert short.tolist()[0] == [49406, *openai_tok.encode(text)[:3], 49407]
    assert short.tolist()[1] == [49406, 2368, 49407, 0, 0]


@pytest.mark.network
def test_decode_round_trip(openai_tok):
    for text in TEXTS:
        decoded = openai_tok.decode(openai_tok(text)[0])
        assert "".join(decoded.split()) == "".join(clean_text(text).split()), text
    assert openai_tok.decode([]) == ""


@pytest.mark.network
def test_cleaning(openai_tok):
    assert clean_text("  Fish &amp;amp; CHIPS\t\n ") == "fish & chips"
    # ftfy unescapes entities unless the text holds HTML tags; then CLIP's two HTML unescapes do it.
    assert clean_text("R&amp;amp;amp;D") == "r&d"
    assert clean_text("<b>R&amp;amp;D</b>") == "<b>r&d</b>"
    assert openai_tok.encode("fish &amp; chips") == openai_tok.encode("FISH   &   chips")
    # Literal specials in the text become the special tokens, as in OpenAI's CLIP.
    assert openai_tok.encode("a <|endoftext|> b") == [320, openai_tok.eot_token, 321]


# --------------------------------------------------------------------------------------------- default vocab


def test_default_vocab():
    tok = Tokenizer.default()
    assert os.path.isfile(BUILTIN_VOCAB) and os.path.getsize(BUILTIN_VOCAB) < 200_000
    assert 4096 <= tok.vocab_size <= 8192
    assert tok.eot_token == tok.vocab_size - 1 and tok.sot_token == tok.vocab_size - 2
    assert repr(get_tokenizer(None)) == repr(tok)
    # Caption words of the built-in data are single tokens; arbitrary English still splits sensibly.
    for word in [
        "red",
        "green",
        "blue",
        "yellow",
        "purple",
        "circle",
        "square",
        "triangle",
        "cross",
        "small",
        "large",
        "left",
        "right",
        "center",
        "background",
        "black",
        "white",
        "gray",
    ]:
        assert len(tok.encode(word)) == 1, word
    text = "an astronaut riding a horse on the moon, digital art"
    assert tok.decode(tok.encode(text)) == "an astronaut riding a horse on the moon , digital art"
    for sentence in [
        text,
        "the quick brown fox jumps over the lazy dog near a quiet village",
        "a bowl of ramen, studio style",
    ]:
        assert len(tok.encode(sentence)) < 0.5 * len(sentence.replace(" ", "")), sentence
    batch = tok(["a red circle", "日本 😀"])
    assert torch.equal(
        batch.argmax(dim=-1), torch.tensor([len(tok.encode(t)) + 1 for t in ["a red circle", "日本 😀"]])
    )


def test_pickle_and_bad_inputs():
    tok = Tokenizer.default(context_length=32)
    tok2 = pickle.loads(pickle.dumps(tok))
    assert tok2.context_length == 32 and torch.equal(tok2(TEXTS), tok(TEXTS))
    with pytest.raises(TypeError, match="int"):
        tok(5)
    with pytest.raises(TypeError, match="list of str"):
        tok(["ok", None])
    with pytest.raises(ValueError, match="context_length=1"):
        tok("a", context_length=1)
    with pytest.raises(ValueError, match="id 999999"):
        tok.decode([1, 999999])


# --------------------------------------------------------------------------------------------- merges files


def test_bad_path_and_malformed_files(tmp_path):
    missing = str(tmp_path / "nope" / "bpe.txt.gz")
    with pytest.raises(FileNotFoundError, match="nope/bpe.txt.gz"):
        Tokenizer.from_file(missing)
    with pytest.raises(FileNotFoundError, match="nope/bpe.txt.gz"):
        get_tokenizer(missing)
    bad = tmp_path / "bad.txt"
    bad.write_text("#version: 0.2\ni n\nt h e\nt h\n")
    with pytest.raises(ValueError, match=r"line 3.*'t h e'"):
        Tokenizer.from_file(bad)
    headerless = tmp_path / "headerless.txt"
    headerless.write_text("i n\nt h\n")
    with pytest.raises(ValueError, match=r"line 1.*version header"):
        read_merges(headerless)
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("#version: 0.2\ni n\nxy z\n")
    with pytest.raises(ValueError, match=r"merge 1.*'xy'"):
        Tokenizer.from_file(unknown)
    with pytest.raises(ValueError, match="without spaces"):
        write_merges([("a b", "c")], tmp_path / "x.txt")


def test_train_write_read_round_trip(tmp_path):
    merges = train_bpe(_captions(300, seed=0), vocab_size=600)
    assert 0 < len(merges) <= 600 - 514
    for path in [tmp_path / "m.txt", tmp_path / "m.txt.gz"]:
        write_merges(merges, path)
        assert read_merges(path) == merges
        tok = Tokenizer.from_file(path)
        assert tok.merges == merges and tok.vocab_size == 514 + len(merges)
    direct = Tokenizer(merges=merges)
    assert torch.equal(tok(TEXTS), direct(TEXTS))
    with gzip.open(tmp_path / "m.txt.gz", "rt") as f:
        assert f.readline().startswith("#version")
    # Deterministic.
    assert train_bpe(_captions(300, seed=0), vocab_size=600) == merges
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe(["a"], vocab_size=100)


def _naive_bpe(texts: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Textbook BPE: recount every pair after every merge; most frequent first, ties to the smaller pair."""
    from collections import Counter

    from dalle2.clip.tokenizer import pretokenize

    words = Counter(tuple([*w[:-1], w[-1] + "</w>"]) for t in texts for w in pretokenize(t))
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        count, best = min((-n, p) for p, n in pairs.items())
        if -count < 2:
            break
        merges.append(best)
        new_words = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += n
        words = new_words
    return merges


def test_training_matches_textbook_bpe():
    texts = _captions(150, seed=5) + ["aaaa aaa banana bandana", "mississippi missing", "x1 x2 x3 ..."] * 3
    assert train_bpe(texts, vocab_size=514 + 120) == _naive_bpe(texts, 120)
    # Pairs seen fewer than min_frequency times are not merged.
    assert train_bpe(["abc"], vocab_size=600) == []
    assert train_bpe(["abc"], vocab_size=600, min_frequency=1) == [("a", "b"), ("ab", "c</w>")]


def test_training_shortens_held_out_captions():
    train, held_out = _captions(2000, seed=1), _captions(200, seed=2)
    merges = train_bpe(train, vocab_size=1024)
    assert len(merges) > 50
    bytes_only, learned = Tokenizer(merges=[]), Tokenizer(merges=merges)
    n_bytes = sum(len(bytes_only.encode(t)) for t in held_out)
    n_bpe = sum(len(learned.encode(t)) for t in held_out)
    assert n_bpe < 0.4 * n_bytes
    # Every merge is applied while encoding a training word: the most frequent words are single tokens.
    assert len(learned.encode("background")) == 1
    for text in held_out[:20]:
        assert learned.decode(learned.encode(text)) == " ".join(bytes_only.decode(bytes_only.encode(text)).split())


def test_cli_train_from_shards_and_text(tmp_path, capsys):
    shards = []
    captions = _captions(120, seed=3)
    for s in range(2):
        path = tmp_path / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for k, cap in enumerate(captions[s * 60 : (s + 1) * 60]):
                for name, data in [(f"{s:04d}{k:05d}.txt", cap.encode()), (f"{s:04d}{k:05d}.jpg", b"\xff\xd8")]:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    txt = tmp_path / "caps.txt"
    txt.write_text("\n".join(_captions(50, seed=4)) + "\n\n")
    url = str(tmp_path / "{00000..00001}.tar")
    assert list(iter_texts([url])) == captions
    assert len(list(iter_texts([url, str(txt)], max_texts=130))) == 130
    out = tmp_path / "bpe.txt.gz"
    main(["train", "--urls", url, str(txt), "--vocab-size", "700", "--out", str(out)])
    assert "170 captions" in capsys.readouterr().out
    tok = Tokenizer.from_file(out)
    assert tok.merges == train_bpe(captions + _captions(50, seed=4), vocab_size=700)
    main(["encode", "--merges", str(out), "a red circle"])
    assert capsys.readouterr().out.split() == [str(i) for i in tok.encode("a red circle")]
    with pytest.raises(FileNotFoundError, match="00002.tar"):
        list(iter_texts([str(tmp_path / "{00000..00002}.tar")]))
    other = tmp_path / "meta.json"
    other.write_text("{}")
    with pytest.raises(ValueError, match="meta.json: expected a .tar shard or a .txt file"):
        list(iter_texts([str(other)]))
