"""Rebuild the shipped vocabulary ``bpe_builtin.txt.gz`` (deterministic; needs no network).

Training text = captions of the built-in synthetic data (``dalle2.data.synthetic.random_captions``) plus
a generic English word list counted from text every Python install holds (the ``pydoc`` topics, the
docstrings of the standard library, ``this``), so that prompts beyond the synthetic captions still split
into sensible pieces::

    python scripts/make_builtin_vocab.py [--vocab-size 8192] [--out dalle2/clip/assets/bpe_builtin.txt.gz]

(A script beside the package, not in it: it reads the synthetic data's captions, and dalle2.clip must not import
dalle2.data.)
"""

from __future__ import annotations

import argparse
import ast
import codecs
import collections
import contextlib
import io
import os
import re
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "dalle2", "clip", "assets")
sys.path.insert(0, ROOT)  # run from a checkout without installing
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


# Common words of image prompts that Python's docs rarely use (each counted as a word seen 20 times).
PROMPT_WORDS = """
photo photograph picture image painting drawing sketch illustration render art artwork digital oil watercolor
portrait landscape close up view scene style cartoon anime realistic detailed high quality cinematic lighting
person people man woman men women child children boy girl baby face hand hands eyes hair smiling standing
sitting walking running riding holding wearing looking flying swimming sleeping eating playing
cat cats dog dogs horse horses bird birds fish cow sheep lion tiger bear elephant monkey rabbit fox wolf
car cars bus truck train bicycle bike motorcycle boat ship plane airplane rocket astronaut robot
house building city street road bridge tower castle room kitchen table chair bed window door wall floor
tree trees flower flowers grass forest garden park field mountain mountains hill river lake sea ocean beach
sky cloud clouds sun sunset sunrise moon star stars night day morning evening rain snow fog winter summer
water fire ice sand stone rock wood metal glass gold silver paper food fruit apple banana pizza cake cup
bowl plate bottle book phone computer clock lamp ball hat shirt dress shoe shoes bag umbrella
orange pink brown gray grey dark light bright colorful pale vivid golden
circle square triangle cross rectangle star hexagon shape shapes line lines dot dots pattern
small large big tiny huge tall short long wide round flat old new young beautiful cute happy sad
left right center centre middle top bottom front back behind above below near next inside outside over under
on in at of with and the a an two three several many background foreground
"""


def stdlib_text() -> list[str]:
    """English prose found locally: pydoc topics, ``this`` (rot13 in its source), stdlib docstrings."""
    import pydoc_data.topics

    with contextlib.redirect_stdout(io.StringIO()):
        import this  # noqa: F401  (prints the Zen on import; its text is rot13 in this.s)

    texts = list(pydoc_data.topics.topics.values())
    texts.append(codecs.decode(sys.modules["this"].s, "rot13"))
    stdlib = sysconfig.get_paths()["stdlib"]
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(
            d for d in dirs if d not in {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
        )
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        texts.append(doc)
    return texts


def generic_words(texts: list[str], *, min_count: int = 2, max_repeat: int = 20) -> list[str]:
    """Lower-case words seen ``min_count`` times or more, each repeated min(count, max_repeat) times."""
    counts = collections.Counter(w for t in texts for w in _WORD.findall(t.lower()) if len(w) >= 2)
    return [w for w, n in sorted(counts.items()) if n >= min_count for _ in range(min(n, max_repeat))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--num-captions", type=int, default=20000)
    parser.add_argument("--out", default=os.path.join(ASSETS, "bpe_builtin.txt.gz"))
    args = parser.parse_args(argv)

    from dalle2.clip.bpe_train import train_bpe
    from dalle2.clip.tokenizer import Tokenizer, write_merges
    from dalle2.data.synthetic import random_captions

    start = time.time()
    words = generic_words(stdlib_text()) + [w for w in PROMPT_WORDS.split() for _ in range(20)]
    captions = random_captions(args.num_captions, seed=0)
    merges = train_bpe(captions + words, vocab_size=args.vocab_size)
    write_merges(merges, args.out)
    tok = Tokenizer(merges=merges)
    print(
        f"{len(captions)} captions + {len(words)} words ({len(set(words))} distinct) -> {len(merges)} merges, "
        f"vocab_size={tok.vocab_size}, {os.path.getsize(args.out)} bytes in {args.out} ({time.time() - start:.1f}s)"
    )


if __name__ == "__main__":
    main()
