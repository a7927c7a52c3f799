"""Deep Compression (Han, Mao, Dally 2015) for Darknet models, on plain numpy arrays.

magnitude: fine-grained pruning masks and the user's iterative schedule; kmeans: per-layer weight sharing and centroid
finetuning; sparse: the relative-index format with padding fillers; huffman: canonical Huffman coding; dcz: the
compressed model file and its size report.
"""

from darkprune.compress.dcz import WeightsHeader, format_size_report, read_dcz, size_report, write_dcz
from darkprune.compress.huffman import huffman_decode, huffman_encode
from darkprune.compress.kmeans import CentroidFinetuner, centroid_gradients, kmeans_1d, share_weights
from darkprune.compress.magnitude import (DEFAULT_CLUSTERS, DEFAULT_INDEX_BITS, CompressConfig, PruneStep,
                                          build_compress_config, magnitude_mask, read_compress_config)
from darkprune.compress.sparse import decode_relative_index, encode_relative_index

__all__ = ["WeightsHeader", "format_size_report", "read_dcz", "size_report", "write_dcz", "huffman_decode",
           "huffman_encode", "CentroidFinetuner", "centroid_gradients", "kmeans_1d", "share_weights",
           "DEFAULT_CLUSTERS", "DEFAULT_INDEX_BITS", "CompressConfig", "PruneStep", "build_compress_config",
           "magnitude_mask", "read_compress_config", "decode_relative_index", "encode_relative_index"]
