"""train/train_all.py's plain logic: the whole unCLIP stack as one run of nine stages.

Each stage is a subprocess of the command a researcher would type; train/train_all.py (Hydra) turns its config into
those commands and hands them here.

- :mod:`.commands`  the stages' command lines: Hydra override text, stage overrides, embedding-shard paths, prompts
- :mod:`.identity`  what a stage's run is (its overrides, out_dir-relative), its markers (STARTED.json, DONE.json)
- :mod:`.planning`  what to do with each stage (skip / resume / run / refuse) and why, decided before anything runs
- :mod:`.runner`    running a stage's commands, moving old outputs aside
"""

from __future__ import annotations

STAGES = ("clip", "retrieval", "embeddings", "prior", "decoder", "upsampler", "sample", "score_clip", "evaluate")
# stages that end in checkpoints/last.ckpt; score_clip: an independent CLIP for the CLIP score (another seed, the
# other half of the train shards), optional like the upsampler
TRAINED = ("clip", "prior", "decoder", "upsampler", "score_clip")
# Which earlier stages' outputs a stage reads (a stage that reruns makes these dependents rerun too).
DEPENDS = {
    "clip": (),
    "retrieval": ("clip",),
    "embeddings": ("clip",),
    "prior": ("clip", "embeddings"),
    "decoder": ("clip", "embeddings"),
    "upsampler": (),
    "sample": ("clip", "prior", "decoder", "upsampler"),
    "score_clip": (),
    "evaluate": ("clip", "sample", "score_clip"),
}
# The config groups of train/train.py's config (conf/<group>/, and model from dalle2/presets): `<stage>.<group>=x`
