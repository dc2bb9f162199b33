"""Every config in conf/ composes (each stage x each experiment x each option group), and the CLI rejects typos."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict, read_write

from conftest import REPO_ROOT

CONF = Path(REPO_ROOT) / "conf"


def options(group: str) -> list[str]:
    root = Path(REPO_ROOT) / "dalle2" / "presets" / "model" if group == "model" else CONF / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def compose_resolved(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg), read_write(cfg):
        cfg.hydra.runtime.output_dir = "/tmp/dalle2-compose-test"
    HydraConfig.instance().set_config(cfg)
    job_cfg = cfg.copy()
    with open_dict(job_cfg):
        del job_cfg["hydra"]  # the sweep dir needs a job number; ${hydra:...} still resolves via HydraConfig
    container = OmegaConf.to_container(job_cfg, resolve=True)  # raises on any broken interpolation
    return cfg, container


STAGES = options("stage")


def test_stage_options_exist():
    assert set(STAGES) >= {"clip", "prior", "decoder", "upsampler"}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("experiment", [None, *options("experiment")])
def test_stage_x_experiment_composes(stage, experiment):
    overrides = [f"stage={stage}"] + ([f"experiment={experiment}"] if experiment else [])
    cfg, c = compose_resolved(overrides)
    assert c["module"]["_target_"].startswith("dalle2.lit.")
    assert c["data"]["_target_"] == "dalle2.data.datamodule.WebDataModule"
    assert c["stage_name"] in {"clip", "prior", "decoder", "upsampler"}
    assert isinstance(c["module"]["network"], dict) and c["module"]["network"]


@pytest.mark.parametrize("group", ["data", "trainer", "logger", "callbacks", "debug", "hparams_search", "model"])
def test_every_option_of_each_group_composes(group):
    for option in options(group):
        if group == "model":
            stage = option.split("/")[0]
            overrides = [f"stage={stage}", f"model={option}"]
        elif group in ("debug", "hparams_search"):
            overrides = [f"{group}={option}"]
        else:
            overrides = [f"{group}={option}"]
        compose_resolved(overrides)


def run_train(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=REPO_ROOT)
    return subprocess.run(
        [sys.executable, "train/train.py", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_unknown_override_is_a_clear_error():
    out = run_train("stage=clip", "trainer.max_stepz=3", "--cfg", "job")
    assert out.returncode != 0
    assert "max_stepz" in out.stderr


def test_unknown_stage_is_a_clear_error():
    out = run_train("stage=nope", "--cfg", "job")
    assert out.returncode != 0
    assert "nope" in out.stderr


@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_hydra_launchers_compose(launcher):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert ("SlurmLauncher" in target) if launcher == "slurm" else ("BasicLauncher" in target)


def test_a_stage_sets_data_defaults():
    """conf/stage/upsampler.yaml sets data.image_size to its output size (data/*.yaml comes first); overrides win."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(REPO_ROOT, "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["stage=upsampler", "module.image_size=128", "module.lowres_size=64"])
        assert cfg.data.image_size == cfg.module.image_size == 128
        assert compose("config", overrides=["stage=upsampler", "data.image_size=96"]).data.image_size == 96


def test_presets_are_defined_once_and_compose_as_the_model_group():
    """The model group is dalle2/presets (no conf/model), and Python's preset dicts are those same files."""
    from dalle2.clip.model import CLIP_PRESETS
    from dalle2.decoder.unet import UNET_PRESETS
    from dalle2.prior.network import PRIOR_PRESETS

    assert not (CONF / "model").exists()
    for kind, presets in (("clip", CLIP_PRESETS), ("prior", PRIOR_PRESETS), ("decoder", UNET_PRESETS)):
        for name in options("model"):
            k, n = name.split("/")
            if k == kind:
                _, cfg = compose_resolved([f"stage={kind}", f"model={name}"])
                assert cfg["model"] == {key: (list(v) if isinstance(v, tuple) else v) for key, v in presets[n].items()}
