"""dalle2.data: built-in synthetic shards, WebDataset reading, the LightningDataModule."""

from dalle2.data.datamodule import SkippedSamplesLogger, WebDataModule
from dalle2.data.synthetic import (
    ATTRIBUTES,
    check_images,
    make_caption,
    parse_caption,
    random_captions,
    render,
    sample_attributes,
    write_shards,
)
from dalle2.data.webdataset import expand_urls, load_rgb, make_dataset

__all__ = [
    "ATTRIBUTES",
    "SkippedSamplesLogger",
    "WebDataModule",
    "check_images",
    "expand_urls",
    "load_rgb",
    "make_caption",
    "make_dataset",
    "parse_caption",
    "random_captions",
    "render",
    "sample_attributes",
    "write_shards",
]
