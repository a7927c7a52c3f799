"""Deep Compression's LeNet-5 result (Han, Mao, Dally 2015, Table 1/2), reproduced on Darknet's LeNet-5.

    .venv/bin/python scripts/deep_compression_lenet.py [--data ~/.cache/darkprune/mnist/mnist.data]
                                                       [--weights weights/lenet.weights] [--out-dir DIR]

Starts from the bundled weights/lenet.weights (scripts/train_lenet.py) and runs two rows, each a full pipeline of
darkprune.compress.pipeline.compress: prune layer by layer (finetuning after each layer, pruned weights held at zero),
k-means weight sharing of every layer (linear initialisation), centroid finetuning, Huffman-coded `.dcz`.
    A: the Caffe implementation's schedule: sparse ratios conv1 0.33, conv2 0.8, ip1 0.9, ip2 0.8 with 256, 256, 32,
       32 clusters (8-bit conv, 5-bit fc weights), one layer per step, 4000 iterations of finetuning after each.
    B: the paper's Table 2 per-layer rates: 66%, 12%, 8%, 19% of the weights kept, 8-bit conv and 5-bit fc weights,
       pruned iteratively (three rounds over all layers, then ip1's last step, retraining after each).
    C: as B with 4-bit fc weights (16 clusters): one way to reach 39x on the whole file.
    D: as B (8-bit conv, 5-bit fc) with ip1 pruned one step further, to 7% kept: the other way to reach 39x on the
       whole file, keeping the paper's bits (B's file carries 2.3 KB of float32 biases the paper's count leaves out).
Every row: relative indices of the width that codes each layer smallest (`--index-bits auto`; Table 2 lists 5 bits,
chosen before Huffman coding: after it, wider indices cost less on sparse layers, fewer filler entries), and the cfg
stored without its comments (`--strip-comments`).
Both rows also prune the weights of dead neurons (those no kept weight reads any more, e.g. ip1 neurons whose ip2
weights are all pruned), as Han et al. (2015) do: the outputs do not change, so the kept shares can end below the
rates asked for. Finetuning runs at learning rate 0.01 (the training rate) on the cfg's steps policy compressed to
each step's iterations; centroid finetuning at 0.0001 with the paper's summed gradients.
Darknet names the layers conv0, conv2, connected4, connected5 (Caffe's conv1, conv2, ip1, ip2).
Each row's accuracy is measured on the 10,000 MNIST test images, on the model decoded back from its `.dcz` file.
The table compares with the paper's figures (12x pruning, 33x + quantisation, 39x + Huffman, 0.74% error) and goes
to DIR/deep_compression_lenet.md and .json.

Compression ratios, over the weights alone as the paper counts them: "pruning" = weights / weights kept (the
paper's 12x); "+ quant." = 32-bit weights against fixed-width cluster indices, 5-bit relative indices (fillers
included) and the codebooks (the paper's 33x); "+ Huffman" = 32-bit weights against the bytes their Huffman-coded
streams and codebooks take in the `.dcz` (the paper's 39x). The last ratio is the target's: the original `.weights`
file against the whole `.dcz` file (cfg text, header, biases and checksum included).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path.home() / ".cache" / "darkprune" / "mnist" / "mnist.data"
CAFFE_NAMES = {"conv0": "conv1", "conv2": "conv2", "connected4": "ip1", "connected5": "ip2"}

# Iterative pruning (Han et al. 2015) to the paper's rates: all layers in three rounds, then ip1's last step,
# retraining after each.
PAPER_SCHEDULE = [({"conv0": 0.34, "conv2": 0.6, "connected4": 0.6, "connected5": 0.5}, 3000),
                  ({"conv2": 0.8, "connected4": 0.8, "connected5": 0.7}, 3000),
                  ({"conv2": 0.88, "connected4": 0.9, "connected5": 0.81}, 3000),
                  ({"connected4": 0.92}, 6000)]
PAPER_SPARSITY = {"conv0": 0.34, "conv2": 0.88, "connected4": 0.92, "connected5": 0.81}
FURTHER_SCHEDULE = PAPER_SCHEDULE[:-1] + [({"connected4": 0.93}, 6000)]
ROWS = {
    "A": {"title": "Caffe implementation's schedule",
          "sparsity": {"conv0": 0.33, "conv2": 0.8, "connected4": 0.9, "connected5": 0.8},
          "schedule": "layerwise", "step_iters": 4000, "clusters": {"conv": 256, "fc": 32}},
    "B": {"title": "paper's rates and bits", "sparsity": PAPER_SPARSITY, "schedule": PAPER_SCHEDULE,
          "clusters": {"conv": 256, "fc": 32}},
    "C": {"title": "paper's rates, 4-bit fc", "sparsity": PAPER_SPARSITY, "schedule": PAPER_SCHEDULE,
          "clusters": {"conv": 256, "fc": 16}},
    "D": {"title": "paper's bits, ip1 at 7%", "sparsity": dict(PAPER_SPARSITY, connected4=0.93),
          "schedule": FURTHER_SCHEDULE, "clusters": {"conv": 256, "fc": 32}},
}
PAPER = {"kept": {"conv1": 66, "conv2": 12, "ip1": 8, "ip2": 19, "total": 8}, "pruning": 12, "quantized": 33,
         "huffman": 39, "error": 0.74, "baseline_error": 0.80}


def run_row(key: str, model, data: str, out_dir: Path, args) -> dict:
    import darkprune as dp
    from darkprune.compress.pipeline import compress, decompress, format_report
    row = ROWS[key]
    folder = out_dir / f"row-{key}"
    started = time.perf_counter()
    if row["schedule"] == "layerwise":
        schedule = "layerwise"
        iters = int(round(row["step_iters"] * args.iters_scale))
    else:
        schedule = [(ratios, int(round(n * args.iters_scale))) for ratios, n in row["schedule"]]
        iters = 0
    result = compress(model, sparsity=row["sparsity"], clusters=row["clusters"],
                      index_bits={"conv": "auto", "fc": "auto"}, strip_cfg_comments=True,
                      schedule=schedule, data=data, finetune_iters=iters,
                      centroid_iters=args.centroid_iters, finetune_lr=args.lr, centroid_lr=args.centroid_lr,
                      centroid_gradient=args.centroid_gradient, seed=args.seed, workspace=folder,
                      out=folder / "lenet.dcz", evaluate_steps=args.evaluate_steps, progress=args.progress,
                      log=lambda text: print(f"[{time.perf_counter() - started:6.0f} s] row {key}: {text}", flush=True))
    seconds = time.perf_counter() - started
    print(f"\nrow {key} ({row['title']}), {seconds:.0f} s:\n{format_report(result.report)}\n", flush=True)
    # The figure that counts: the model decoded from the file, on all 10,000 test digits.
    decoded = decompress(result.path)
    top1 = dp.evaluate(decoded, data, progress=False)["top1"]
    total = result.report["total"]
    kept, index_bits = {}, {}
    for layer in result.report["layers"]:
        if layer["name"] in CAFFE_NAMES:
            kept[CAFFE_NAMES[layer["name"]]] = 100 * layer["weights_kept_share"]
            index_bits[CAFFE_NAMES[layer["name"]]] = layer["index_bits"]
    # The paper's count: the weights alone (no biases, cfg or header) against their coded size.
    from darkprune.compress.dcz import size_report
    from darkprune.compress.pipeline import dcz_layer_list
    weights_only = [{"index": entry["index"], "name": entry["name"],
                     "arrays": [a for a in entry["arrays"] if a[0] == "weights"]}
                    for entry in dcz_layer_list(result.model, result.codebooks)]
    coded = sum(r["bytes_after"] for r in size_report(weights_only, "")["layers"])
    weights = sum(int(spec["mask"].size) for spec in result.codebooks.values())
    # The paper's "+ quantisation" (before Huffman): fixed-width cluster indices and 5-bit relative indices (its
    # LeNet-5 choice, fillers included) plus the codebooks.
    five_bit = [{"index": entry["index"], "name": entry["name"],
                 "arrays": [(name, array, dict(spec, index_bits=5)) for name, array, spec in entry["arrays"]]}
                for entry in weights_only]
    fixed_width = size_report(five_bit, "")["total"]["bytes_quantized"]
    kept["total"] = 100 * total["weights_kept_share"]
    return {"row": key, "title": row["title"], "kept": kept, "sparsity": row["sparsity"],
            "schedule": result.report["config"]["schedule"],
            "clusters": row["clusters"], "index_bits": index_bits, "ratio_weights_only": 4 * weights / coded,
            "ratio_pruning": total["ratio_weight_count"], "ratio_quantized": 4 * weights / fixed_width,
            "ratio_huffman": total["bytes_dense"] / sum(r["bytes_after"] for r in result.report["layers"]),
            "ratio_file": total["ratio_weights_file"], "dcz_bytes": total["bytes_after"],
            "weights_bytes": total["weights_file_bytes"], "top1": top1, "error": 100 * (1 - top1),
            "accuracy_stages": result.report["accuracy"], "seconds": round(seconds, 1), "dcz": result.path,
            "history": result.report["history"]}


def table(rows: list[dict], baseline: float) -> str:
    lines = ["| row | kept % conv1 / conv2 / ip1 / ip2 (total) | weight bits conv / fc | index bits | pruning | "
             "+ quant. | + Huffman, weights only | .weights / .dcz file | top-1 error |",
             "|---|---|---|---|---|---|---|---|---|"]
    k = PAPER["kept"]
    lines.append(f"| paper (Table 1/2) | {k['conv1']} / {k['conv2']} / {k['ip1']} / {k['ip2']} ({k['total']}) | 8 / 5 | "
                 f"5 | {PAPER['pruning']}x | {PAPER['quantized']}x | {PAPER['huffman']}x | - | "
                 f"{PAPER['error']}% (baseline {PAPER['baseline_error']}%) |")
    for row in rows:
        kept, bits = row["kept"], row["index_bits"]
        weight_bits = f"{int(row['clusters']['conv']).bit_length() - 1} / {int(row['clusters']['fc']).bit_length() - 1}"
        lines.append(
            f"| {row['row']}: {row['title']} | {kept['conv1']:.0f} / {kept['conv2']:.0f} / {kept['ip1']:.0f} / "
            f"{kept['ip2']:.0f} ({kept['total']:.1f}) | {weight_bits} | "
            f"{bits['conv1']}/{bits['conv2']}/{bits['ip1']}/{bits['ip2']} | "
            f"{row['ratio_pruning']:.1f}x | {row['ratio_quantized']:.1f}x | {row['ratio_weights_only']:.1f}x | "
            f"**{row['ratio_file']:.1f}x** ({row['weights_bytes']:,} B / {row['dcz_bytes']:,} B) | "
            f"{row['error']:.2f}% (baseline {100 * (1 - baseline):.2f}%) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", type=Path, default=ROOT / "cfg" / "lenet.cfg")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "lenet.weights")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out-dir", type=Path, default=Path("deep_compression_lenet"))
    parser.add_argument("--rows", default="A,B,C,D")
    parser.add_argument("--iters-scale", type=float, default=1.0,
                        help="scales every pruning step's finetuning iterations (A: 4000 per layer; B, C and D: 3000, "
                             "3000, 3000, 6000)")
    parser.add_argument("--centroid-iters", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.01, help="finetuning learning rate")
    parser.add_argument("--centroid-lr", type=float, default=0.0001)
    parser.add_argument("--centroid-gradient", choices=["sum", "mean"], default="sum")
    parser.add_argument("--evaluate-steps", action="store_true", help="measure after every pruning step too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    parser.add_argument("--threads", type=int, default=1, help="numba threads (1 is fastest on a busy machine)")
    args = parser.parse_args(argv)

    import numba
    numba.set_num_threads(max(1, min(args.threads, numba.config.NUMBA_NUM_THREADS)))
    import darkprune as dp
    if not args.data.exists():
        print(f"error: {args.data}: no such file (run scripts/mnist_to_darknet.py)", file=sys.stderr)
        return 1
    if not args.weights.exists():
        print(f"error: {args.weights}: no such file (run scripts/train_lenet.py)", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model = dp.load(args.cfg, args.weights)
    baseline = dp.evaluate(model, str(args.data), progress=False)["top1"]
    print(f"baseline: {args.weights}: top-1 {baseline:.4f} on the 10,000 test digits", flush=True)
    rows = [run_row(key.strip(), model, str(args.data), args.out_dir, args) for key in args.rows.split(",")]
    text = table(rows, baseline)
    print(text)
    (args.out_dir / "deep_compression_lenet.md").write_text(text + "\n")
    (args.out_dir / "deep_compression_lenet.json").write_text(json.dumps(
        {"baseline_top1": baseline, "rows": rows, "paper": PAPER,
         "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}},
        indent=1, default=str) + "\n")
    print(f"written: {args.out_dir / 'deep_compression_lenet.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
