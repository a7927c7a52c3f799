"""`info` and `eval`: a model's layer table, and its accuracy on a Darknet dataset."""
from __future__ import annotations

import time


def describe(cfg, weights=None, lenient: bool = False) -> tuple[dict, str]:
    """The layer table Darknet prints when it loads a cfg, plus parameter counts (and with weights, each layer's
    sparsity): (the dict, the text)."""
    from ..darknet import load
    from ..darknet.summary import info_dict, info_text
    model = load(cfg, weights, lenient=lenient)
    info = info_dict(model, with_weights=weights is not None)
    return info, info_text(info)


def measure(cfg, weights, data, limit=None, batch: int = 16, thresh: float = 0.25, iou_thresh: float = 0.5,
            points: int = 0, letterbox: bool | None = None, resize: str = "darknet", cache: bool = True,
            progress: bool = True, input_size: str | None = None) -> tuple[dict, str]:
    """mAP as `darknet detector map` prints it, or top-1/top-k as `darknet classifier valid`: (metrics, text).
    `input_size` ('W' or 'WxH'): evaluate the network at that input size instead of its cfg's."""
    from ..darknet import load
    from ..darknet.resize import parse_input_size, with_input_size
    from ..evaluate import evaluate, load_dataset
    from ..metrics import format_report
    size = parse_input_size(input_size) if input_size else None
    dataset = load_dataset(data, limit)  # a bad .data fails before the model is read
    model = load(cfg, weights)
    if size is not None:
        model = with_input_size(model, *size)
    started = time.perf_counter()
    metrics = evaluate(model, dataset, batch=batch, thresh=thresh, iou_thresh=iou_thresh, points=points,
                       letterbox=letterbox, mode=resize, cache=cache, progress=progress)
    seconds = time.perf_counter() - started
    metrics["seconds"] = round(seconds, 3)
    text = format_report(metrics) + f" Total evaluation time: {seconds:.1f} seconds ({len(dataset)} images)\n"
    return metrics, text
