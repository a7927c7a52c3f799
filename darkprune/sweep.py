"""`darkprune sweep`: one sensitivity analysis, then prune + transform + evaluate + time at several thresholds.

For each threshold the transformed (physically smaller) pair is written to WORKSPACE/sweep/t<threshold>.cfg/.weights
and loaded back through OpenCV's Darknet importer (a pair no one else can load is worthless). The table, a JSON file
(WORKSPACE/sweep.json) and a PNG plot of the metric against BFLOPs (WORKSPACE/sweep.png) sum it up.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import DarkpruneError


def _latency_ms(model, repeats: int = 10) -> tuple[float, float | None]:
    """Median latency at batch 1 of our engine and of OpenCV's importer on the same model."""
    from .bench import _median_ms, _opencv_net
    from .engine.network import Network
    c, h, w = model.input_shape
    x = np.random.default_rng(0).random((1, c, h, w), dtype=np.float32)
    network = Network(model)
    ours = _median_ms(lambda: network.forward(x), repeats, 2)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            net = _opencv_net(model, Path(tmp))
            names = net.getUnconnectedOutLayersNames()

            def run():
                net.setInput(x)
                net.forward(names)
            theirs = _median_ms(run, repeats, 2)
    except DarkpruneError:
        theirs = None
    return ours, theirs


def _opencv_loads(cfg: Path, weights: Path) -> bool:
    import cv2
    try:
        cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
        return True
    except cv2.error:
        return False


def sweep(cfg, weights, data, workspace, thresholds, rates=None, criterion="l1", limit=None, exclude=(),
          divisible=1, batch=16, progress=True, log=print) -> dict:
    from .darknet import load
    from .evaluate import evaluate
    from .prune.analysis import DEFAULT_RATES, analyze, resolve_exclude
    from .prune.masks import apply_masks, live_stats, structure_fingerprint
    from .prune.plan import masks_for_plan, plan_by_threshold
    from .prune.workspace import Workspace
    from .cli_prune import transform_and_check

    thresholds = sorted({float(t) for t in thresholds})
    if not thresholds:
        raise DarkpruneError("--thresholds: give at least one threshold, e.g. 0.005,0.01,0.02,0.05")
    model = load(cfg, weights)
    ws = Workspace(workspace)
    ws.bind_model(model, structure_fingerprint(model.graph))
    ws.save_config("sweep", {"cfg": cfg, "weights": weights, "data": data, "thresholds": thresholds,
                             "rates": rates, "criterion": criterion, "limit": limit, "exclude": list(exclude),
                             "divisible": divisible})
    started = time.perf_counter()
    log(f"sensitivity analysis of {cfg} on {data} (saved after each group; rerun to resume)")
    sens = analyze(model, data, rates=rates or DEFAULT_RATES, criterion=criterion, limit=limit, divisible=divisible,
                   exclude=exclude, out_path=ws.file("sensitivity.json"), batch=batch, progress=progress)
    sens.plot(ws.file("sensitivity.png"))
    excluded = resolve_exclude(model, exclude)
    log(f"analysis: {len(sens.curves)} groups in {sens.seconds:.0f} s; baseline {sens.metric} {sens.baseline:.4f}")

    ours, theirs = _latency_ms(model)
    rows = [{"threshold": None, "label": "original", sens.metric: sens.baseline,
             "params": model.graph.total_params, "bflops": round(model.graph.total_bflops, 6),
             "ours_ms": round(ours, 2), "opencv_ms": round(theirs, 2) if theirs else None,
             "cfg": str(cfg), "weights": str(weights), "opencv_loads": True}]
    out_dir = ws.file("sweep")
    out_dir.mkdir(exist_ok=True)
    for t in thresholds:
        plan = plan_by_threshold(sens, t, divisible, excluded)
        masks = masks_for_plan(model, plan)
        masked = apply_masks(model, masks)
        small, _ = transform_and_check(masked, masks)
        stem = out_dir / f"t{t:g}"
        cfg_out, weights_out = Path(f"{stem}.cfg"), Path(f"{stem}.weights")    # (t0.005: not with_suffix)
        small.save(cfg_out, weights_out)
        measured = evaluate(small, data, limit=limit, batch=batch, progress=progress)
        stats = live_stats(model, masks)
        ours, theirs = _latency_ms(small)
        row = {"threshold": t, "label": f"t={t:g}", sens.metric: float(measured[sens.metric]),
               "loss": sens.baseline - float(measured[sens.metric]), "predicted_loss": plan.predicted_loss,
               "params": small.graph.total_params, "bflops": round(small.graph.total_bflops, 6),
               "bflops_live_stats": round(stats["total_bflops"], 6),
               "channels_pruned": masks.total_pruned, "groups_pruned": len(masks.pruned),
               "ours_ms": round(ours, 2), "opencv_ms": round(theirs, 2) if theirs else None,
               "cfg": str(cfg_out), "weights": str(weights_out), "opencv_loads": _opencv_loads(cfg_out, weights_out)}
        rows.append(row)
        log(f"threshold {t:g}: {sens.metric} {row[sens.metric]:.4f} (loss {row['loss']:+.4f}), "
            f"{row['bflops']:.3f} BFLOPs, {row['params']:,} params, {row['ours_ms']:.1f} ms")
    result = {"metric": sens.metric, "baseline": sens.baseline, "images": sens.images, "rows": rows,
              "sensitivity": str(ws.file("sensitivity.json")), "plot": str(ws.file("sweep.png")),
              "json": str(ws.file("sweep.json")), "seconds": round(time.perf_counter() - started, 1)}
    _plot(result, ws.file("sweep.png"))
    ws.write_json("sweep.json", result)
    ws.update_summary("sweep", {"rows": rows})
    return result


def _plot(result: dict, path) -> None:
    from .plot import line_chart
    m = result["metric"]
    rows = result["rows"]
    pruned = [r for r in rows if r["threshold"] is not None]
    series = [
        {"label": "pruned (threshold)", "x": [r["bflops"] for r in pruned], "y": [r[m] for r in pruned],
         "point_labels": [r["label"] for r in pruned]},
        {"label": "original", "x": [rows[0]["bflops"]], "y": [rows[0][m]], "highlight": True,
         "point_labels": ["original"]},
    ]
    line_chart(path, series, f"{m} against BFLOPs, one point per threshold", "BFLOPs (Darknet's count)", m)


def format_sweep(result: dict) -> str:
    m = result["metric"]
    head = f"{'model':<12}{m:>9}{'loss':>9}{'BFLOPs':>9}{'params':>11}{'ours ms':>9}{'OpenCV ms':>11}  files"
    lines = [f"sweep over {result['images']} images ({m}; threshold = accuracy loss each layer may cost)", head]
    for r in result["rows"]:
        loss = f"{r['loss']:+.4f}" if "loss" in r else ""
        cv = f"{r['opencv_ms']:.1f}" if r.get("opencv_ms") else "-"
        lines.append(f"{r['label']:<12}{r[m]:9.4f}{loss:>9}{r['bflops']:9.3f}{r['params']:11,}{r['ours_ms']:9.1f}"
                     f"{cv:>11}  {Path(r['cfg']).name if r['threshold'] is not None else ''}")
    lines.append(f"written: {result['json']}, {result['plot']}, pruned pairs in {Path(result['json']).parent / 'sweep'}")
    return "\n".join(lines)
