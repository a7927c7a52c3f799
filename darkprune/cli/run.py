"""The `run` and `eval` sub-commands.

`darkprune run CFG WEIGHTS IMAGE...`: detectors print each image's detections as Darknet's `detector test
-ext_output` does (name, confidence %, left/top/width/height in original pixels) and, with `--out`, draw them into
`--out/<image name>`; classifiers print the top-5 classes. `darkprune eval CFG WEIGHTS --data F.data`: mAP as
`darknet detector map` prints it, or top-1/top-k as `darknet classifier valid`.
"""
from __future__ import annotations

import time

from .. import DarkpruneError
from .common import add_common, check_positive, command, log, logger, parsers


@command("run")
def cmd_run(args) -> tuple[dict, str]:
    from ..workflow.images import run_images
    check_positive(args.batch, "--batch")
    if not 0 <= args.thresh <= 1:
        raise DarkpruneError(f"--thresh must be between 0 and 1, not {args.thresh}")
    started = time.perf_counter()
    records = []
    for record, lines in run_images(args.cfg, args.weights, args.images, args.names, thresh=args.thresh,
                                    nms=args.nms, out=args.out, letterbox=True if args.letterbox else None,
                                    resize=args.resize, batch=args.batch, log=logger(args)):
        records.append(record)
        if not args.json:
            print("\n".join(lines), flush=True)
    count = len(records)
    log(args, f"{count} image{'s' if count != 1 else ''} in {time.perf_counter() - started:.2f} s")
    return {"images": records}, ""      # the text was printed image by image


@command("eval")
def cmd_eval(args) -> tuple[dict, str]:
    from ..workflow.inspect import measure
    check_positive(args.batch, "--batch")
    check_positive(args.limit, "--limit")
    if not 0 <= args.thresh <= 1:
        raise DarkpruneError(f"--thresh must be between 0 and 1, not {args.thresh}")
    if not 0 < args.iou_thresh <= 1:
        raise DarkpruneError(f"--iou-thresh must be in (0, 1], not {args.iou_thresh}")
    return measure(args.cfg, args.weights, args.data, args.limit, batch=args.batch, thresh=args.thresh,
                   iou_thresh=args.iou_thresh, points=args.points, letterbox=True if args.letterbox else None,
                   resize=args.resize, cache=not args.no_cache, progress=not args.quiet,
                   input_size=args.input_size)


@parsers
def add_parsers(sub) -> None:
    p = sub.add_parser(
        "run", help="detect objects (boxes drawn with OpenCV) or classify images (top-5)",
        description="Run a Darknet model on images. Detectors print each detection as Darknet's `detector test "
                    "-ext_output` does (class, confidence, left/top/width/height in pixels of the original image) "
                    "and, with --out, draw the boxes into OUT/<image name>; classifiers print their top-5 classes.")
    p.add_argument("cfg", help="Darknet .cfg file")
    p.add_argument("weights", help="Darknet .weights file")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, BMP, ...; grey and RGBA work)")
    p.add_argument("--names", metavar="FILE",
                   help="class names, one a line (default: a .names/labels.txt file beside the cfg with as many "
                        "names as the model has classes, else class numbers)")
    p.add_argument("--thresh", type=float, default=0.25, help="report detections above this confidence (0.25)")
    p.add_argument("--nms", type=float, default=0.45, help="NMS IoU threshold (0.45; 0 = no NMS)")
    p.add_argument("--out", metavar="DIR", help="draw the detections into DIR/<image name> (created if missing)")
    p.add_argument("--letterbox", action="store_true", help="letterbox the input (default: the cfg's letter_box)")
    p.add_argument("--resize", choices=("darknet", "opencv"), default="darknet",
                   help="Darknet's own bilinear resize (default) or OpenCV's cv2.resize")
    p.add_argument("--batch", type=int, default=8, help="images per forward pass (8)")
    add_common(p)

    p = sub.add_parser(
        "eval", help="accuracy on a Darknet dataset: mAP@0.5, mAP@0.5:0.95, per class; or top-1/top-k",
        description="Detectors: `darknet detector map` (detections at 0.005, NMS 0.45 of the cfg's nms_kind, "
                    "per-class AP with TP/FP, precision/recall/F1 and TP/FP/FN/average IoU at --thresh, mAP at "
                    "--iou-thresh, plus mAP@0.5:0.95). Classifiers: top-1 and top-k (k = `top` in the .data "
                    "file) as `darknet classifier valid`.")
    p.add_argument("cfg", help="Darknet .cfg file")
    p.add_argument("weights", help="Darknet .weights file")
    p.add_argument("--data", required=True, metavar="F.data", help="Darknet .data file (its `valid` list is used)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images of the list")
    p.add_argument("--thresh", type=float, default=0.25,
                   help="confidence for precision/recall/F1/TP/FP/average IoU (0.25; mAP does not depend on it)")
    p.add_argument("--iou-thresh", type=float, default=0.5, help="IoU a detection needs to match a truth (0.5)")
    p.add_argument("--points", type=int, choices=(0, 11, 101), default=0,
                   help="AP interpolation: 0 = area under the curve at every recall (default), 11 = VOC2007, "
                        "101 = COCO")
    p.add_argument("--letterbox", action="store_true", help="letterbox the inputs (default: the cfg's letter_box)")
    p.add_argument("--resize", choices=("darknet", "opencv"), default="darknet",
                   help="Darknet's own bilinear resize (default) or OpenCV's cv2.resize")
    p.add_argument("--batch", type=int, default=16, help="images per forward pass (16)")
    p.add_argument("--no-cache", action="store_true",
                   help="preprocess on the fly instead of through the preprocessed-input cache")
    p.add_argument("--input-size", dest="input_size", metavar="W[xH]",
                   help="run the network at this input size instead of the cfg's width/height (e.g. 256)")
    add_common(p)

