"""`darkprune compress` and `darkprune decompress`.

compress: Deep Compression (prune by magnitude with finetuning, k-means weight sharing, centroid finetuning, Huffman
coding) into a `.dcz` file, with a per-layer size report and the accuracy before and after.
decompress: a `.dcz` back to a Darknet `.cfg`/`.weights` pair, weights equal to the quantised model's bit for bit.
"""
from __future__ import annotations

import argparse

from .common import add_common, command, given, logger, parsers, progress

KEYS = ["config", "sparsity", "clusters", "index_bits", "schedule", "finetune_iters", "centroid_iters", "init",
        "seed", "cfg", "weights", "data", "out", "workspace", "limit", "lr", "centroid_lr", "centroid_gradient",
        "batch", "keep_dead", "strip_comments"]


@command("compress")
def cmd_compress(args) -> tuple[dict, str]:
    from ..workflow.compress_step import compress_settings, run_compress
    settings = compress_settings(given(args, KEYS))
    return run_compress(settings, progress=progress(args), log=logger(args))


@command("decompress")
def cmd_decompress(args) -> tuple[dict, str]:
    from ..workflow.compress_step import run_decompress
    return run_decompress(args.model, args.out)


@parsers
def add_parsers(sub) -> None:
    p = sub.add_parser(
        "compress", help="Deep Compression: prune weights, share them by k-means, Huffman-code -> .dcz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Deep Compression (Han, Mao, Dally 2015) of a Darknet model into a .dcz file:\n"
                    "1. fine-grained magnitude pruning per layer, on a schedule, with finetuning between steps\n"
                    "   (masks held: a pruned weight never comes back);\n"
                    "2. k-means weight sharing of each layer's surviving weights;\n"
                    "3. centroid finetuning (a centroid's gradient is the sum of its weights' gradients);\n"
                    "4. relative indices + codebooks + cluster indices, Huffman-coded, with a checksum.\n"
                    "Layers are named as `darkprune info` prints them (conv0, connected4, or an index); conv= and\n"
                    "fc= set every layer of a type. Defaults: no pruning; 256 clusters and 8-bit indices for conv,\n"
                    "32 clusters and 5-bit indices for connected layers. Prints a per-layer size report and the\n"
                    "accuracy (top-1 or mAP@0.5 on the .data file's valid list) before and after.",
        epilog="example (the Caffe implementation's LeNet-5 schedule):\n"
               "  darkprune compress cfg/lenet.cfg weights/lenet.weights --data mnist.data \\\n"
               "    --sparsity conv0=0.33,conv2=0.8,connected4=0.9,connected5=0.8 --clusters conv=256,fc=32 \\\n"
               "    --finetune-iters 1000 --centroid-iters 1000 -o lenet.dcz")
    p.add_argument("cfg", nargs="?", help="Darknet .cfg")
    p.add_argument("weights", nargs="?", help="Darknet .weights")
    p.add_argument("--data", help="Darknet .data file: accuracy on its valid= list, finetuning on its train= list")
    p.add_argument("--sparsity", help="LAYER=RATIO,... share of each layer's weights to zero (0..1)")
    p.add_argument("--clusters", help="LAYER=K,... k-means clusters per layer (default conv=256,fc=32)")
    p.add_argument("--index-bits", dest="index_bits",
                   help="LAYER=BITS,... relative-index bits (default conv=8,fc=5); BITS may be auto: the width that "
                        "codes the layer smallest")
    p.add_argument("--schedule", help="layerwise (default: one layer per step, in --sparsity order, finetuning "
                                      "after each) | oneshot | explicit steps 'conv2=0.5@1000;conv2=0.8@2000'")
    p.add_argument("--finetune-iters", dest="finetune_iters", type=int,
                   help="finetuning iterations after each pruning step (default 0)")
    p.add_argument("--centroid-iters", dest="centroid_iters", type=int,
                   help="centroid finetuning iterations after quantisation (default 0)")
    p.add_argument("--init", choices=["linear", "density", "random"], help="k-means initialisation (default linear)")
    p.add_argument("--seed", type=int, help="seed of every random choice (default 0)")
    p.add_argument("--lr", type=float, help="finetuning learning rate (default: the cfg's learning_rate / 10)")
    p.add_argument("--centroid-lr", dest="centroid_lr", type=float,
                   help="centroid learning rate (default: the finetuning rate / 10)")
    p.add_argument("--centroid-gradient", dest="centroid_gradient", choices=["sum", "mean"],
                   help="a centroid's gradient: sum over its weights (the paper, default) or their mean")
    p.add_argument("--batch", type=int, help="images per training iteration (default: the cfg's batch)")
    p.add_argument("--keep-dead", dest="keep_dead", action="store_true",
                   help="do not prune the weights of neurons no kept weight reads any more (by default they go: "
                        "the outputs do not change, the file gets smaller)")
    p.add_argument("--strip-comments", dest="strip_comments", action="store_true",
                   help="store the cfg without its comment and blank lines (the same network, a smaller file)")
    p.add_argument("--limit", type=int, help="measure accuracy on the first N validation images only")
    p.add_argument("-o", "--out", help="the .dcz to write (default WORKSPACE/model.dcz, or ./WEIGHTS-NAME.dcz)")
    p.add_argument("-w", "--workspace", help="folder for the run's files: config, masks, pruned and quantised "
                                             "pairs, report.json")
    p.add_argument("--config", help="a file of key=value settings (the flags' names, e.g. sparsity=conv0=0.33,...), "
                                    "and/or [LAYER] sections with sparse_ratio=, class_num=, index_bits=")
    add_common(p)

    p = sub.add_parser(
        "decompress", help="a .dcz back to a Darknet .cfg/.weights pair",
        description="Decode a .dcz (refused if truncated or corrupt: checksum) and write OUT_PREFIX.cfg and "
                    "OUT_PREFIX.weights atomically. The weights equal the quantised model's bit for bit; Darknet "
                    "and OpenCV load the pair.")
    p.add_argument("model", help="the .dcz file")
    p.add_argument("-o", "--out", required=True, help="output prefix: writes OUT_PREFIX.cfg and OUT_PREFIX.weights")
    add_common(p)

