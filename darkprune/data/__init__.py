"""Darknet datasets (``.data`` files, lists, labels), Darknet-exact preprocessing and the preprocessed-input cache.

See :mod:`darkprune.data.darknet_data`, :mod:`darkprune.data.preprocess` and :mod:`darkprune.data.cache`.
"""

from darkprune.data.cache import CachedInputs, cache_key, cache_root, cached_inputs, clear_cache, iter_input_batches
from darkprune.data.darknet_data import DataWarning, Dataset, load_data, read_data_config, read_names
from darkprune.data.preprocess import (
    RESIZE_MODES,
    darknet_resize,
    image_to_chw,
    letterbox,
    load_image,
    preprocess_batch,
    preprocess_image,
)

__all__ = [
    "RESIZE_MODES",
    "CachedInputs",
    "DataWarning",
    "Dataset",
    "cache_key",
    "cache_root",
    "cached_inputs",
    "clear_cache",
    "darknet_resize",
    "image_to_chw",
    "iter_input_batches",
    "letterbox",
    "load_data",
    "load_image",
    "preprocess_batch",
    "preprocess_image",
    "read_data_config",
    "read_names",
]
