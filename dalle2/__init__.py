"""dalle2: a from-scratch research framework for DALL-E 2 (unCLIP).

The library never imports hydra; configs live in ``conf/`` and are instantiated by ``train/`` and ``eval/``.
"""

__version__ = "0.1.0"
