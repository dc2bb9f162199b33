"""dalle2: a from-scratch research framework for DALL-E 2 (unCLIP).

The library never imports hydra; configs live in ``conf/`` and are instantiated by ``train/`` and ``eval/``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # lazy, so that `import dalle2` stays light: dalle2.generate(prompt, n=, size=, seed=, pipeline=) -> [PIL.Image]
    if name == "generate":
        from dalle2.serving import generate

        return generate
    raise AttributeError(f"module 'dalle2' has no attribute {name!r}")
