"""Importers of other projects' weights into our stages: name maps, architecture checks and parity checks.

    python -m dalle2.convert karlo src=<diffusers-format unCLIP dir> out=<dir> [check=true] [force=true]

* :mod:`dalle2.convert.diffusers_dir` reads a diffusers-format directory (``model_index.json``, each component's
  ``config.json`` and weights: ``.safetensors``, or ``.bin`` through the weights-only loader; nothing unpickles code).
* :mod:`dalle2.convert.clip_text` maps a ``transformers`` CLIP text tower and its tokenizer files onto ours.
* :mod:`dalle2.convert.karlo` maps Karlo's prior, decoder (with its text projection) and super-resolution pair onto
  :mod:`dalle2.prior.karlo` / :mod:`dalle2.decoder.karlo` and writes our exports (``python -m dalle2.export``'s
  format) plus ``pipeline.json``, so the directory loads as a whole (``UnCLIPPipeline.from_dir``).
* :mod:`dalle2.convert.karlo_check` compares a converted directory with diffusers' ``UnCLIPPipeline`` (module by
  module and end to end); it needs ``diffusers`` and ``transformers`` (test-only dependencies, imported there only).
"""
