"""dalle2.diffusion: schedules, Gaussian diffusion (losses), samplers, guidance, low-res augmentation.

Knows nothing of networks: everything takes a ``model_fn(x_t, t, **model_kwargs)`` callable.
"""

from .gaussian import Denoised, GaussianDiffusion, build_diffusion
from .guidance import cfg_model_fn, drop_all_conditioning, dynamic_threshold, static_clip
from .lowres_aug import LowResAugmentation, gaussian_blur
from .samplers import (
    ddim_invert,
    make_timesteps,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
)
from .schedules import Schedule, karras_timesteps, make_betas, respace_timesteps
from .unclip import sample_unclip, unclip_timesteps

__all__ = [
    "Denoised",
    "GaussianDiffusion",
    "LowResAugmentation",
    "Schedule",
    "build_diffusion",
    "cfg_model_fn",
    "ddim_invert",
    "drop_all_conditioning",
    "dynamic_threshold",
    "gaussian_blur",
    "karras_timesteps",
    "make_betas",
    "make_timesteps",
    "respace_timesteps",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
    "sample_unclip",
    "static_clip",
    "unclip_timesteps",
]
