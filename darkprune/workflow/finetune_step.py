"""Step 3 of the pruning workflow: finetune. With a workspace made by `prune` (it holds masks.json), the weights
default to WORKSPACE/pruned.weights (and the cfg to WORKSPACE/pruned.cfg) and the masks are held: pruned channels
stay exactly zero. The numba engine trains on this machine's CPU; the darknet engine hands the job to a Darknet build
(GPUs), see darknet_handoff.py.

Distillation (numba engine): `teacher=original` is the workspace's unpruned model (the cfg and weights model.json
records, checked against the sha256 recorded there); any other value is a teacher cfg, with `teacher_weights`.
`distill_weight` (default 1) and `distill_temperature` (classifiers, default 4) as train/distill.py says. With a
teacher, train= may list images without labels (they get the distillation term only).
"""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import DarkpruneError, SettingError
from .settings import DEFAULTS, Settings, pruning_settings
from .workspace import Workspace

KEYS = ["iters", "lr", "batch", "subdivisions", "checkpoint_every", "eval_every", "limit", "resume", "seed",
        "bn_momentum", "engine", "darknet", "gpus", "transformed", "threads", "teacher", "teacher_weights",
        "distill_weight", "distill_temperature"]
# `batch` unset means the cfg's batch here (not `ana`'s forward batch).
FINETUNE_DEFAULTS = {**DEFAULTS, "batch": None, "checkpoint_every": 100, "engine": "numba", "seed": 0,
                     "resume": False, "transformed": False}


def _quiet(line: str) -> None:
    pass


def finetune_settings(given: dict, known_keys: set[str] = frozenset()) -> Settings:
    """The finetune settings; without a cfg, the workspace's pruned.cfg when there is one."""
    given = dict(given)
    ws_path = given.get("workspace") or (None if given.get("config") else DEFAULTS["workspace"])
    if not given.get("cfg") and not given.get("config") and ws_path and (Path(ws_path) / "pruned.cfg").is_file():
        given["cfg"] = str(Path(ws_path) / "pruned.cfg")
    s = pruning_settings("finetune", given, KEYS, known_keys, FINETUNE_DEFAULTS)
    for key in ("resume", "transformed"):
        s[key] = s.boolean(key)
    if not s.get("data"):
        raise SettingError("data", "data F.data is required (its train= list is trained on, its valid= list "
                                   "measured)")
    return s


def _masked_model(s: Settings, ws: Workspace, log):
    from ..darknet import load
    from ..prune.masks import Masks, apply_masks
    weights = s.get("weights")
    if not weights:
        if not ws.exists("pruned.weights"):
            raise DarkpruneError(f"darkprune finetune: give WEIGHTS ({ws.path} holds no pruned.weights from "
                                 f"`darkprune prune`)")
        weights = str(ws.file("pruned.weights"))
        s["weights"] = weights
    model = load(s["cfg"], weights)
    masks = None
    if ws.exists("masks.json"):
        masks = Masks.load(ws.file("masks.json"), model)
        model = apply_masks(model, masks)
        log(f"holding the masks of {ws.file('masks.json')}: {masks.total_pruned} channels in "
            f"{len(masks.pruned)} groups stay zero")
    return model, masks


def _values(s: Settings) -> dict:
    """The numeric settings, checked before anything is written."""
    return {"iters": s.whole("iters"), "learning_rate": s.number("lr"), "batch": s.whole("batch"),
            "subdivisions": s.whole("subdivisions"), "limit": s.whole("limit"), "threads": s.whole("threads"),
            "checkpoint_every": s.whole("checkpoint_every"), "eval_every": s.whole("eval_every"),
            "seed": s.whole("seed", low=0) or 0, "bn_momentum": s.number("bn_momentum"),
            "distill_weight": 1.0 if s.get("distill_weight") in (None, "") else s.number("distill_weight", low=0),
            "distill_temperature": s.number("distill_temperature")}


def _teacher(s: Settings, ws: Workspace, log):
    """The teacher Model the settings name (None without `teacher`)."""
    from ..darknet import load
    from .workspace import file_sha256
    name, weights = s.get("teacher"), s.get("teacher_weights")
    if not name:
        if weights:
            raise SettingError("teacher_weights", "teacher_weights needs teacher (original, or a cfg)")
        return None
    if s["engine"] != "numba":
        raise SettingError("teacher", "a teacher (distillation) needs the numba engine")
    if name == "original":
        if weights:
            raise SettingError("teacher_weights", "teacher=original takes the workspace's unpruned weights")
        if not ws.exists("model.json"):
            raise DarkpruneError(f"{ws.path}: no model.json, so no original model to use as the teacher (run "
                                 f"`darkprune ana`/`prune` in this workspace, or give a teacher cfg and weights)")
        record = ws.read_json("model.json")
        cfg, weights = record.get("cfg"), record.get("weights")
        if not weights or not Path(weights).is_file() or not cfg or not Path(cfg).is_file():
            raise DarkpruneError(f"{ws.file('model.json')}: the original model's files ({cfg}, {weights}) are gone")
        if record.get("weights_sha256") and file_sha256(weights) != record["weights_sha256"]:
            raise DarkpruneError(f"{weights}: changed since the workspace was made (sha256 differs from "
                                 f"{ws.file('model.json')})")
    else:
        cfg = name
        if not weights:
            raise SettingError("teacher_weights", f"teacher {cfg}: give its weights (teacher_weights)")
    log(f"distilling from the teacher {cfg} / {weights} (weight {s.get('distill_weight') or 1.0})")
    return load(cfg, weights)


def run_finetune(s: Settings, progress: bool = True, log=_quiet, darknet_log=None) -> tuple[dict, str]:
    """Finetune as the settings say; returns the payload and the text the command prints."""
    ws = Workspace(s["workspace"])
    model, masks = _masked_model(s, ws, log)
    v = _values(s)
    if v["threads"]:
        from ..engine.blas import set_threads
        set_threads(v["threads"])
    ws.save_config("finetune", {k: s.get(k) for k in ["cfg", "weights", "data", "workspace"] + KEYS})
    if s["engine"] == "darknet":
        return _darknet(s, v, model, masks, ws, progress, darknet_log)
    if s["engine"] != "numba":
        raise SettingError("engine", f"engine {s['engine']}: expected numba or darknet")
    if s["transformed"]:
        raise SettingError("transformed", "transformed is for the darknet engine (the numba engine holds the masks "
                                          "exactly)")
    from ..train.finetune import finetune
    teacher = _teacher(s, ws, log)
    started = time.perf_counter()
    result = finetune(model, s["data"], iters=v["iters"], batch=v["batch"], subdivisions=v["subdivisions"],
                      learning_rate=v["learning_rate"], workspace=ws.path, checkpoint_every=v["checkpoint_every"],
                      eval_every=v["eval_every"], eval_data=s["data"], eval_limit=v["limit"], resume=s["resume"],
                      seed=v["seed"], progress=progress, bn_momentum=v["bn_momentum"], teacher=teacher,
                      distill_weight=v["distill_weight"], distill_temperature=v["distill_temperature"])
    payload = result.to_json()
    payload.update({"engine": "numba", "masks_held": masks is not None, "teacher": s.get("teacher") or None,
                    "distill_weight": v["distill_weight"] if teacher is not None else None,
                    "channels_pruned": masks.total_pruned if masks is not None else 0,
                    "weights_in": s["weights"], "wall_seconds": round(time.perf_counter() - started, 2)})
    if masks is not None:
        payload["pruned_still_zero"] = _pruned_zero(result.model, masks)
    ws.update_summary("finetune", payload)
    return payload, format_finetune(payload)


def _pruned_zero(model, masks) -> bool:
    from ..train.finetune import parameter_masks
    keep, _ = parameter_masks(model, masks)
    return all(not model.params[i][n][~m].any() for (i, n), m in keep.items())


def _darknet(s: Settings, v: dict, model, masks, ws: Workspace, progress: bool, darknet_log) -> tuple[dict, str]:
    from ..darknet import load
    from ..darknet.heads import metric_name
    from ..evaluate import evaluate
    from .darknet_handoff import darknet_finetune
    limit, iters = v["limit"], v["iters"]
    before = evaluate(model, s["data"], limit=limit, progress=progress)
    result = darknet_finetune(model, s["data"], ws.path, iters=iters, darknet=s.get("darknet"),
                              learning_rate=v["learning_rate"], batch=v["batch"], subdivisions=v["subdivisions"],
                              gpus=s.get("gpus"), masks=masks, transformed=s["transformed"],
                              log=darknet_log or _quiet)
    trained = load(result.files["cfg"], result.files["weights"])
    after = evaluate(trained, s["data"], limit=limit, progress=progress)
    metric = metric_name(model.graph)
    payload = {"engine": "darknet", "metric": metric, "metric_before": before[metric], "metric_after": after[metric],
               "iterations": iters, "masks_held": False, "masks_reapplied": masks is not None and
               not result.transformed, **result.to_json()}
    ws.update_summary("finetune", payload)
    text = [f"finetune with Darknet ({' '.join(result.command[1:3])}): weights from {result.weights_from}"]
    if result.revived:
        text.append(f"masks applied again: {result.revived['weights']} weights Darknet had revived were cleared "
                    f"(largest |w| {result.revived['max_abs']:.3g})")
    text.append(f"{metric:>10}: {before[metric]:.4f} -> {after[metric]:.4f} ({after[metric] - before[metric]:+.4f})")
    text.append("written: " + ", ".join(result.files[k] for k in ("cfg", "weights")))
    return payload, "\n".join(text)


def format_finetune(p: dict) -> str:
    lines = [f"finetune: {p['iterations'] - p['start_iteration']} iterations"
             + (f" (resumed at {p['start_iteration']})" if p["start_iteration"] else "")
             + f", {p['images_seen']} images, {p['images_per_second']:.1f} images/s"
             + (f", {p['channels_pruned']} pruned channels held" if p.get("masks_held") else "")]
    if p.get("distill"):
        d = p["distill"]
        lines.append(f"{'distill':>10}: teacher {p.get('teacher') or d['teacher']} ({d['teacher_weights']}), weight "
                     f"{d['distill_weight']:g}" + (f", temperature {d['distill_temperature']:g}"
                                                    if d.get("distill_temperature") else ""))
    sched = p["schedule"]
    lines.append(f"{'schedule':>10}: lr {sched['learning_rate']:g}, policy {sched['policy']}, burn_in "
                 f"{sched['burn_in']}" + (f", steps {sched['steps']}" if sched["steps"] else ""))
    if p.get("final_loss") is not None:
        lines.append(f"{'loss':>10}: {p['final_loss']:.4f} (avg {p['final_avg_loss']:.4f})")
    m = p.get("metric")
    if m and p.get("metric_before") is not None and p.get("metric_after") is not None:
        lines.append(f"{m:>10}: {p['metric_before']:.4f} -> {p['metric_after']:.4f} "
                     f"({p['metric_after'] - p['metric_before']:+.4f}; kept the {p['kept']} weights"
                     + (f", iteration {p['best_iteration']}" if p["kept"] == "best" else "") + ")")
    if p.get("pruned_still_zero") is not None:
        lines.append(f"{'masks':>10}: pruned weights still exactly zero: {'yes' if p['pruned_still_zero'] else 'NO'}")
    files = p.get("files", {})
    if files:
        lines.append("written: " + ", ".join(str(files[k]) for k in ("cfg", "weights", "loss_plot") if k in files)
                     + f" (checkpoints in {files.get('checkpoints')})")
    return "\n".join(lines)
