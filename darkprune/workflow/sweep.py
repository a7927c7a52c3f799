"""`darkprune sweep`: one sensitivity analysis, then prune + transform + evaluate + time at several thresholds.

For each threshold the transformed (physically smaller) pair is written to WORKSPACE/sweep/t<threshold>.cfg/.weights,
evaluated for real on the same images as the analysis, and loaded back through OpenCV's Darknet importer (a pair no
one else can load is worthless). Latencies (batch 1, median and fastest of interleaved runs, our engine and OpenCV on the
same thread count) come last, all models timed round-robin so that a change in the machine's load hits them alike;
speedups are ratios of the fastest runs. Rerunning a sweep resumes the finished analysis and times again. The
table, a JSON file (WORKSPACE/sweep.json) and a PNG plot of the metric against BFLOPs (WORKSPACE/sweep.png) sum it up.

What a threshold promises. A threshold is the accuracy loss each channel group may cost on its own: every pruned group,
pruned alone at its chosen rate, measured a loss of at most the threshold on the analysed images (that is how its
rate was chosen, see plan.py). Each such measurement is itself uncertain: on a finite image set a harmless change
moves the metric by chance, and a group is chosen precisely because its measurement came out low. We estimate that
uncertainty from the analysis itself as `noise`, the largest metric *gain* any group showed when pruned alone (pruning
the least important channels does not make a model better, so a gain is a chance swing). For the pruned model as a
whole, with n groups pruned, the promise is

    measured loss <= n x (threshold + noise)             (`promise`; `within_promise` says whether it held)

i.e. each group costs at most the threshold, give or take one measurement's noise, and the costs add up. Each row
also reports `predicted_loss`, the sum of the chosen groups' own measured losses (what an additive model predicts;
interactions between groups and the selection effect make the real loss larger), and `loss_bound` = n x threshold.
The promise is checked on the analysed images and reported, not enforced; finetuning then recovers accuracy.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from ..darknet.resize import parse_input_sizes, with_input_size
from ..errors import SettingError
from .steps import transform_and_check, validation_set
from .timing import latencies
from .workspace import Workspace, check_workspace_path


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _opencv_loads(cfg: Path, weights: Path) -> bool:
    import cv2
    try:
        cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
        return True
    except cv2.error:
        return False


def check_thresholds(thresholds) -> list[float]:
    try:
        values = sorted({float(t) for t in thresholds})
    except (TypeError, ValueError):
        raise SettingError("thresholds", f"thresholds {thresholds}: expected numbers like 0.005,0.01,0.02") from None
    if not values:
        raise SettingError("thresholds", "thresholds: give at least one threshold, e.g. 0.005,0.01,0.02,0.05")
    bad = [t for t in values if math.isnan(t) or math.isinf(t) or t < 0]
    if bad:
        raise SettingError("thresholds", f"thresholds {','.join(f'{t:g}' for t in bad)}: a threshold is the "
                                         f"accuracy loss a layer may cost, a number >= 0")
    return values


def measurement_noise(sens) -> float:
    """The largest metric gain any group showed when pruned alone (0 if none did)."""
    gains = [metric - sens.baseline for curve in sens.curves.values() for metric in curve.values()]
    return max([0.0] + gains)


def sweep(cfg, weights, data, workspace, thresholds, rates=None, criterion="l1", limit=None, exclude=(),
          divisible=1, batch=16, progress=True, prefix_cache=True, log=_log_stderr, timing_repeats=15,
          cluster=None, input_sizes=()) -> dict:
    """Analyse once, then for each threshold prune, transform, evaluate, write the pair and time it. Returns the
    table as a dict: {"metric", "baseline", "images", "noise", "rows": [...], "json", "plot", ...}. `cluster`: run
    the analysis' groups on a Dask cluster, as `analyze(..., cluster=)` takes it (the same curves). `input_sizes`:
    [(width, height), ...] or text ("288x256,256") at which the unpruned model is measured too (the other way to
    fewer BFLOPs), each pair written, evaluated, loaded in OpenCV and timed as the pruned ones."""
    from ..darknet import load
    from ..prune.analysis import DEFAULT_RATES, _check_rates, resolve_exclude
    from ..prune.masks import structure_fingerprint
    from ..prune.plan import check_threshold
    from .steps import check_criterion

    # every input is checked before anything is written
    thresholds = check_thresholds(thresholds)
    rates = _check_rates(rates or DEFAULT_RATES)
    check_criterion(criterion)
    input_sizes = _sizes(input_sizes)
    model = load(cfg, weights)
    resized = [with_input_size(model, w, h) for w, h in input_sizes]     # a size the network refuses fails here
    dataset = validation_set(data, limit)
    excluded = resolve_exclude(model, exclude)
    fingerprint = structure_fingerprint(model.graph)
    check_workspace_path(workspace)
    if Path(workspace).is_dir():
        Workspace(workspace, create=False).check_model(model, fingerprint)
    started = time.perf_counter()
    settings = {"cfg": os.path.abspath(cfg), "weights": os.path.abspath(weights), "data": os.path.abspath(data),
                "thresholds": thresholds, "rates": rates, "criterion": criterion, "limit": limit,
                "exclude": list(exclude), "divisible": divisible,
                "input_sizes": [f"{w}x{h}" for w, h in input_sizes]}
    log(f"sensitivity analysis of {cfg} on {len(dataset)} images of {data} (saved after each group; rerun to "
        f"resume)")
    sens = _analyse_once(model, dataset, workspace, fingerprint, settings, batch, progress, prefix_cache, cluster)
    ws = Workspace(workspace, create=False)
    sens.plot(ws.file("sensitivity.png"))
    for t in thresholds:
        check_threshold(t, sens)
    noise = measurement_noise(sens)
    log(f"analysis: {len(sens.curves)} groups in {sens.seconds:.0f} s; baseline {sens.metric} {sens.baseline:.4f}; "
        f"largest gain of a group pruned alone (noise) {noise:.4f}")

    rows = [{"threshold": None, "label": "original", sens.metric: sens.baseline,
             "params": model.graph.total_params, "bflops": round(model.graph.total_bflops, 6),
             "cfg": str(cfg), "weights": str(weights), "opencv_loads": True}]
    models = [model]
    out_dir = ws.file("sweep")
    out_dir.mkdir(exist_ok=True)
    for t in thresholds:
        row, small = _prune_at(model, sens, dataset, t, noise, divisible, excluded, out_dir, batch, progress)
        rows.append(row)
        models.append(small)
        log(f"threshold {t:g}: {sens.metric} {row[sens.metric]:.4f} (loss {row['loss']:+.4f}; predicted "
            f"{row['predicted_loss']:.4f}; promise <= {row['promise']:.4f} for {row['groups_pruned']} groups: "
            f"{'kept' if row['within_promise'] else 'NOT kept'}), {row['bflops']:.3f} BFLOPs, {row['params']:,} params")
    for small in resized:
        row = _at_input_size(small, sens, dataset, out_dir, batch, progress)
        rows.append(row)
        models.append(small)
        log(f"input {row['label']}: {sens.metric} {row[sens.metric]:.4f} (loss {row['loss']:+.4f}), "
            f"{row['bflops']:.3f} BFLOPs")
    log(f"timing {len(models)} models (batch 1, our engine and OpenCV, {timing_repeats} interleaved rounds)")
    _add_timings(rows, latencies(models, repeats=timing_repeats))
    result = {"metric": sens.metric, "baseline": sens.baseline, "images": sens.images, "noise": noise,
              "rates": sens.rates, "rows": rows, "sensitivity": str(ws.file("sensitivity.json")),
              "plot": str(ws.file("sweep.png")), "json": str(ws.file("sweep.json")),
              "seconds": round(time.perf_counter() - started, 1)}
    _plot(result, ws.file("sweep.png"))
    ws.write_json("sweep.json", result)
    ws.update_summary("sweep", {"rows": rows, "noise": noise})
    return result


def _analyse_once(model, dataset, workspace, fingerprint, settings, batch, progress, prefix_cache, cluster):
    from ..prune.analysis import analyze

    def prepare():          # the baseline was measured: every input is fine, now the workspace may be written
        ws = Workspace(workspace)
        ws.bind_model(model, fingerprint)
        ws.save_config("sweep", settings)
    return analyze(model, dataset, rates=settings["rates"], criterion=settings["criterion"],
                   divisible=settings["divisible"], exclude=settings["exclude"],
                   out_path=Path(workspace) / "sensitivity.json", batch=batch, progress=progress,
                   prefix_cache=prefix_cache, prepare=prepare, cluster=cluster)


def _prune_at(model, sens, dataset, t, noise, divisible, excluded, out_dir, batch, progress):
    """Prune at threshold t, transform, write the pair, evaluate it: (the table row, the small model)."""
    from ..evaluate import evaluate
    from ..prune.masks import apply_masks, live_stats
    from ..prune.plan import masks_for_plan, plan_by_threshold
    plan = plan_by_threshold(sens, t, divisible, excluded)
    masks = masks_for_plan(model, plan)
    masked = apply_masks(model, masks)
    small, _ = transform_and_check(masked, masks)
    stem = out_dir / f"t{t:g}"
    cfg_out, weights_out = Path(f"{stem}.cfg"), Path(f"{stem}.weights")    # (t0.005: not with_suffix)
    small.save(cfg_out, weights_out)
    measured = float(evaluate(small, dataset, batch=batch, progress=progress)[sens.metric])
    stats = live_stats(model, masks)
    loss = sens.baseline - measured
    row = {"threshold": t, "label": f"t={t:g}", sens.metric: measured, "loss": loss,
           "predicted_loss": plan.predicted_loss, "loss_bound": len(masks.pruned) * t,
           "promise": len(masks.pruned) * (t + noise),
           "within_promise": loss <= len(masks.pruned) * (t + noise) + 1e-12,
           "params": small.graph.total_params, "bflops": round(small.graph.total_bflops, 6),
           "bflops_live_stats": round(stats["total_bflops"], 6), "params_live_stats": stats["total_params"],
           "channels_pruned": masks.total_pruned, "groups_pruned": len(masks.pruned),
           "group_rates": {str(g): r for g, r in sorted(plan.rates.items())},
           "cfg": str(cfg_out), "weights": str(weights_out),
           "opencv_loads": _opencv_loads(cfg_out, weights_out)}
    return row, small


def _sizes(sizes) -> list[tuple[int, int]]:
    if isinstance(sizes, str):
        return parse_input_sizes(sizes)
    return [(int(w), int(h)) for w, h in sizes]


def _at_input_size(small, sens, dataset, out_dir, batch, progress) -> dict:
    """The unpruned model at another input size: its pair written, evaluated, loaded in OpenCV (the table row)."""
    from ..evaluate import evaluate
    c, h, w = small.input_shape
    cfg_out, weights_out = out_dir / f"input{w}x{h}.cfg", out_dir / f"input{w}x{h}.weights"
    small.save(cfg_out, weights_out)
    measured = float(evaluate(small, dataset, batch=batch, progress=progress)[sens.metric])
    return {"threshold": None, "input_size": [w, h], "label": f"{w}x{h}", sens.metric: measured,
            "loss": sens.baseline - measured, "params": small.graph.total_params,
            "bflops": round(small.graph.total_bflops, 6), "cfg": str(cfg_out), "weights": str(weights_out),
            "opencv_loads": _opencv_loads(cfg_out, weights_out)}


def _add_timings(rows: list[dict], timings: list[dict]) -> None:
    for row, timing in zip(rows, timings):
        for key, value in timing.items():
            row[key] = round(value, 3) if value is not None else None
    base = rows[0]
    for row in rows[1:]:          # from the fastest runs: the least disturbed by other processes
        row["speedup_ours"] = round(base["ours_min_ms"] / row["ours_min_ms"], 3)
        row["speedup_opencv"] = round(base["opencv_min_ms"] / row["opencv_min_ms"], 3) \
            if base["opencv_min_ms"] and row["opencv_min_ms"] else None


def _plot(result: dict, path) -> None:
    from ..util.plot import line_chart
    m = result["metric"]
    rows = result["rows"]
    pruned = [r for r in rows if r["threshold"] is not None]
    sizes = [r for r in rows if r.get("input_size")]
    series = [
        {"label": "pruned (threshold)", "x": [r["bflops"] for r in pruned], "y": [r[m] for r in pruned],
         "point_labels": [r["label"] for r in pruned]},
    ] + ([{"label": "unpruned, smaller input", "x": [r["bflops"] for r in sizes], "y": [r[m] for r in sizes],
           "point_labels": [r["label"] for r in sizes]}] if sizes else []) + [
        {"label": "original", "x": [rows[0]["bflops"]], "y": [rows[0][m]], "highlight": True,
         "point_labels": ["original"]},
    ]
    title = f"{m} against BFLOPs, one point per threshold" + (" or input size" if sizes else "")
    line_chart(path, series, title, "BFLOPs (Darknet's count)", m)


def format_sweep(result: dict) -> str:
    m = result["metric"]
    head = (f"{'model':<10}{m:>8}{'loss':>9}{'predicted':>10}{'promise':>9}{'groups':>7}{'BFLOPs':>8}{'params':>10}"
            f"{'ours ms':>9}{'OpenCV ms':>10}  file")
    lines = [f"sweep over {result['images']} images ({m}; threshold = accuracy loss each layer may cost on its own; "
             f"noise of one measurement ~{result['noise']:.4f}; promise: loss <= groups x (threshold + noise))", head]
    for r in result["rows"]:
        loss = f"{r['loss']:+.4f}" if "loss" in r else ""
        predicted = f"{r['predicted_loss']:.4f}" if "predicted_loss" in r else ""
        promise = (f"<={r['promise']:.3f}" + ("" if r["within_promise"] else "!")) if "promise" in r else ""
        groups = f"{r['groups_pruned']}" if "groups_pruned" in r else ""
        cv = f"{r['opencv_ms']:.1f}" if r.get("opencv_ms") else "-"
        lines.append(f"{r['label']:<10}{r[m]:8.4f}{loss:>9}{predicted:>10}{promise:>9}{groups:>7}{r['bflops']:8.3f}"
                     f"{r['params']:10,}{r['ours_ms']:9.1f}{cv:>10}  "
                     f"{Path(r['cfg']).name if r['threshold'] is not None or r.get('input_size') else ''}")
    folder = Path(result["json"]).parent / "sweep"
    lines.append(f"written: {result['json']}, {result['plot']}, pruned pairs in {folder}")
    return "\n".join(lines)
