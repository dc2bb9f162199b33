"""dalle2.decoder: the cascaded decoder's networks (base UNet and super-resolution UNets)."""

from dalle2.decoder.unet import PRESET_IMAGE_SIZES, UNET_PRESETS, UNet, count_parameters, unet_from_preset

__all__ = ["PRESET_IMAGE_SIZES", "UNET_PRESETS", "UNet", "count_parameters", "unet_from_preset"]
