"""The pruning workflow's steps as functions that read and write a workspace: `ana` (sensitivity analysis), `prune`
(choose rates, mask channels), `transform` (remove them). Each takes the step's Settings (workflow/settings.py),
checks every input before the workspace is created or written to (a refused run leaves nothing behind), writes its
results atomically (never over an input) and returns the payload the command prints (as a table or JSON).
"""
from __future__ import annotations

import glob
import time
import warnings
from pathlib import Path

from ..errors import DarkpruneError, SettingError
from ..util.files import atomic_write_text, refuse_overwrite
from .gradual_step import gradual_values
from .settings import Settings
from .workspace import Workspace, absolute_settings, check_workspace_path

ANA_KEYS = ["rates", "criterion", "limit", "shard", "exclude", "divisible", "batch", "no_prefix_cache", "merge",
            "ana_out_file", "cluster", "reconstruct", "calib_images"]
PRUNE_KEYS = ["threshold", "rate", "by", "exclude", "divisible", "limit", "batch", "prune_out_weights", "compensate",
              "reconstruct", "calib_images", "steps", "step_iters", "step_lr", "seed", "teacher", "distill_weight",
              "plan_curves"]
TRANSFORM_KEYS = ["out", "out_cfg", "input_size"]


def _quiet(message: str) -> None:
    pass


def load_trained(s: Settings):
    from ..darknet import load
    if not s.get("weights"):
        raise DarkpruneError("the pruning workflow needs trained weights: give WEIGHTS (or weights= in the config)")
    return load(s["cfg"], s["weights"])


def validation_set(path, limit):
    from ..evaluate import load_dataset
    if not path:
        raise SettingError("data", "data F.data is required (the validation images to measure on)")
    return load_dataset(path, limit)


# ----------------------------------------------------------------------------------------------------------------
# ana

def run_ana(s: Settings, progress: bool = True, log=_quiet) -> tuple[dict, str]:
    """Sensitivity analysis (or, with `merge`, joining the shard files) into the workspace."""
    model = load_trained(s)
    inputs = [s["cfg"], s["weights"], s.get("data"), s.get("config")]
    if s["merge"]:
        sens, name = _merge_ana(s, model, log)
    else:
        sens, name = _analyse(s, model, inputs, progress, log)
    ws = Workspace(s["workspace"], create=False)
    png = ws.file("sensitivity.png" if not sens.shard else f"sensitivity.shard-{sens.shard[0]}-of-{sens.shard[1]}.png")
    sens.plot(png)
    written = [str(ws.file(name)), str(png)]
    if s.get("ana_out_file"):
        atomic_write_text(s["ana_out_file"], sens.table() + "\n", inputs)
        written.append(str(s["ana_out_file"]))
    if not sens.shard:
        ws.update_summary("ana", {"baseline": sens.baseline, "metric": sens.metric, "groups": len(sens.curves),
                                  "images": sens.images, "seconds": sens.seconds})
    payload = {"sensitivity": str(ws.file(name)), "plot": str(png), "files": written, **sens.to_json()}
    return payload, sens.table() + f"\n\nwritten: {', '.join(written)}"


def _merge_ana(s: Settings, model, log):
    from ..prune.analysis import merge_shards
    from ..prune.masks import structure_fingerprint
    ws = Workspace(s["workspace"], create=False)
    ws.check_model(model, structure_fingerprint(model.graph))
    files = sorted(glob.glob(str(ws.file("sensitivity.shard-*-of-*.json"))))
    sens = merge_shards(files, model)
    ws.bind_model(model, structure_fingerprint(model.graph))
    sens.save(ws.file("sensitivity.json"))
    log(f"merged {len(files)} shards: {ws.file('sensitivity.json')}")
    return sens, "sensitivity.json"


def check_criterion(criterion: str) -> str:
    from ..prune.criteria import check_criterion as check
    return check(criterion)


def _analyse(s: Settings, model, inputs, progress, log):
    from ..prune.analysis import _check_rates, analyze, resolve_exclude
    from ..prune.masks import structure_fingerprint
    # every input is checked before the workspace is created or touched
    dataset = validation_set(s.get("data"), s.whole("limit"))
    rates = _check_rates(s.numbers("rates"))
    check_criterion(s["criterion"])
    exclude = s.names("exclude")
    resolve_exclude(model, exclude)
    shard = s.shard()
    divisible = s.whole("divisible") or 1
    batch = s.whole("batch") or 16
    if s.get("ana_out_file"):
        refuse_overwrite(s["ana_out_file"], inputs, "ana_out_file")
    calibration, info = None, None
    if s["reconstruct"]:        # the second curve set: calibration images of the train= list
        from ..prune.calibration import calibration_inputs
        paths = calibration_paths(s, s.get("data"))
        calibration = calibration_inputs(model, paths, s.whole("calib_images"))
        info = {"calib_images": len(calibration), "calib_files": len(paths)}
    fingerprint = structure_fingerprint(model.graph)
    check_workspace_path(s["workspace"])
    if Path(s["workspace"]).is_dir():
        Workspace(s["workspace"], create=False).check_model(model, fingerprint)
    name = f"sensitivity.shard-{shard[0]}-of-{shard[1]}.json" if shard else "sensitivity.json"

    def prepare():      # the baseline was measured: every input is fine, now the workspace may be written
        ws = Workspace(s["workspace"])
        ws.bind_model(model, fingerprint)
        ws.save_config("ana" if not shard else f"ana.shard-{shard[0]}-of-{shard[1]}",
                       absolute_settings(s, ("cfg", "weights", "data", "rates", "criterion", "limit", "shard",
                                             "exclude", "divisible", "batch", "reconstruct", "calib_images")))
    started = time.perf_counter()
    sens = analyze(model, dataset, rates=rates, criterion=s["criterion"], divisible=divisible, exclude=exclude,
                   shard=shard, out_path=Path(s["workspace"]) / name, batch=batch,
                   prefix_cache=not s["no_prefix_cache"], progress=progress, prepare=prepare,
                   cluster=s.get("cluster") or None, reconstruct=calibration, reconstruct_info=info)
    log(f"analysis done in {time.perf_counter() - started:.1f} s: {Path(s['workspace']) / name}")
    return sens, name


# ----------------------------------------------------------------------------------------------------------------
# prune

def _sensitivity(ws, model):
    from ..prune.analysis import Sensitivity, merge_shards
    path = ws.file("sensitivity.json")
    if path.exists():
        sens = Sensitivity.load(path, model)
    else:
        shards = sorted(glob.glob(str(ws.file("sensitivity.shard-*-of-*.json"))))
        if not shards:
            raise DarkpruneError(f"{ws.path}: no sensitivity analysis in this workspace; run `darkprune ana` first")
        sens = merge_shards(shards, model, path)
    if not sens.complete:
        left = [g for g in (sens.assigned or []) if g not in sens.curves]
        raise DarkpruneError(f"{path}: the analysis is not finished ({len(left)} of {len(sens.assigned or [])} groups "
                             f"left); rerun `darkprune ana` to resume it")
    return sens


def summary_rows(model, masks, before: dict | None, after: dict | None, metric: str) -> dict:
    from ..prune.masks import live_stats
    stats = live_stats(model, masks)
    layers = [r for r in stats["layers"] if r["out_channels"] != r["out_channels_before"]
              or r["params"] != r["params_before"]]
    out = {
        "metric": metric,
        "metric_before": before.get(metric) if before else None,
        "metric_after": after.get(metric) if after else None,
        "params_before": stats["total_params_before"], "params_after": stats["total_params"],
        "bflops_before": round(stats["total_bflops_before"], 6), "bflops_after": round(stats["total_bflops"], 6),
        "layers": [{k: r[k] for k in ("index", "name", "type", "out_channels_before", "out_channels",
                                       "params_before", "params", "bflops_before", "bflops")} for r in layers],
    }
    out["params_ratio"] = round(out["params_after"] / max(out["params_before"], 1), 4)
    out["bflops_ratio"] = round(out["bflops_after"] / max(out["bflops_before"], 1e-12), 4)
    return out


def format_summary(title: str, s: dict) -> str:
    lines = [title, f"{'layer':>6} {'name':<12}{'type':<15}{'channels':>15}{'params':>20}{'BFLOPs':>18}"]
    for r in s["layers"]:
        lines.append(f"{r['index']:6d} {r['name']:<12}{r['type']:<15}"
                     f"{r['out_channels_before']:>7} -> {r['out_channels']:<5}"
                     f"{r['params_before']:>9} -> {r['params']:<8}{r['bflops_before']:8.4f} -> {r['bflops']:.4f}")
    m = s["metric"]
    if s.get("metric_before") is not None:
        change = s["metric_after"] - s["metric_before"] if s.get("metric_after") is not None else None
        lines.append(f"{m:>10}: {s['metric_before']:.4f} -> " +
                     (f"{s['metric_after']:.4f} ({change:+.4f})" if change is not None else "(not measured)"))
    lines.append(f"{'params':>10}: {s['params_before']:,} -> {s['params_after']:,} (x{s['params_ratio']:.3f})")
    lines.append(f"{'BFLOPs':>10}: {s['bflops_before']:.4f} -> {s['bflops_after']:.4f} (x{s['bflops_ratio']:.3f})")
    return "\n".join(lines)


def run_prune(s: Settings, progress: bool = True) -> dict:
    """Choose the per-group rates (by threshold or by rate) and write the masked pair, the masks and the plan."""
    from ..prune.analysis import resolve_exclude
    from ..prune.masks import structure_fingerprint
    threshold, rate = s.number("threshold"), s.number("rate")
    if (threshold is None) == (rate is None):
        raise DarkpruneError("darkprune prune: give exactly one of a threshold (the loss each layer may cost) or a "
                             "rate (the share of BFLOPs to remove)")
    model = load_trained(s)
    ws = Workspace(s["workspace"], create=False)
    ws.check_model(model, structure_fingerprint(model.graph))
    sens = _sensitivity(ws, model)
    if _plan_on_reconstructed(s, sens, ws):     # plan on the curves measured after reconstruction
        sens = sens.with_reconstructed()
        sens.planned_on = "reconstructed"
    excluded = resolve_exclude(model, s.names("exclude"))
    divisible = s.whole("divisible") or sens.divisible
    if divisible != sens.divisible:
        where = s.where("divisible")
        warnings.warn(f"{where + ': divisible=' if where else 'divisible '}{divisible}: the analysis was measured "
                      f"with divisible={sens.divisible}, so its losses are for slightly different channel counts")
    gradual = gradual_values(s)
    plan = _plan(model, sens, threshold, rate, divisible, excluded, s.get("by")) if gradual["steps"] == 1 else None
    inputs = [s["cfg"], s["weights"], s.get("data"), s.get("config")]
    files = {"cfg": ws.file("pruned.cfg"), "weights": Path(s.get("prune_out_weights") or ws.file("pruned.weights")),
             "masks": ws.file("masks.json"), "plan": ws.file("plan.json")}
    for target in (files["weights"], files["cfg"]):
        refuse_overwrite(target, inputs, "the pruned model")
    dataset = validation_set(s.get("data") or sens.data, s.whole("limit") or sens.images)
    calibration = calibration_paths(s, s.get("data") or sens.data) if s["reconstruct"] else None
    return _mask_and_measure(s, model, ws, sens, plan, dataset, files, progress, gradual, excluded, divisible,
                             calibration)


def _plan_on_reconstructed(s: Settings, sens, ws) -> bool:
    """plan_curves: "plain" (the default: planning on the reconstructed curves measured worse, README), "auto" (the
    reconstructed curves with --reconstruct when `ana --reconstruct` measured them) or "reconstructed"."""
    which = str(s.get("plan_curves") or "plain").strip().lower()
    if which not in ("auto", "plain", "reconstructed"):
        where = s.where("plan_curves")
        raise DarkpruneError(f"{where + ': ' if where else ''}plan_curves={s.get('plan_curves')}: expected auto, "
                             f"plain or reconstructed")
    if which == "reconstructed" and not sens.complete_reconstructed:
        raise DarkpruneError(f"{ws.file('sensitivity.json')}: no complete reconstructed curves to plan on; run "
                             f"`darkprune ana --reconstruct` first")
    return which == "reconstructed" or (which == "auto" and s["reconstruct"] and sens.complete_reconstructed)


def calibration_paths(s: Settings, data) -> list[str]:
    """The calibration images of `--reconstruct`: `calib_images` of the .data file's train= list (mirrored copies
    fill a shorter list), refused when the list shares images with the valid= list the model is measured on."""
    import os

    from ..data import load_data
    from ..prune.calibration import train_list
    count = s.whole("calib_images")
    if count is None:
        raise SettingError("calib_images", "calib_images: give the number of calibration images (default 256)")
    paths = train_list(data)
    valid = {os.path.realpath(p) for p in load_data(data, "valid").image_paths}
    shared = [p for p in paths if os.path.realpath(p) in valid]
    if shared:
        raise DarkpruneError(f"{data}: {len(shared)} of the train= list's images are in the valid= list too "
                             f"({shared[0]}); reconstruction calibrates on train= images only, never on the images "
                             f"the model is measured on")
    return paths[:count] if len(paths) >= count else paths


def _plan(model, sens, threshold, rate, divisible, excluded, by=None):
    from ..prune.plan import check_cost, plan_by_rate, plan_by_threshold
    cost = check_cost(by)               # checked with a threshold too: a typo is refused, not ignored
    if threshold is not None:
        return plan_by_threshold(sens, threshold, divisible, excluded)
    return plan_by_rate(model, sens, rate, divisible, excluded, cost=cost)


def _cut(s, model, ws, sens, plan, dataset, progress, gradual, excluded, divisible, calibration):
    """(the masked model, its masks, its plan, the gradual steps' records or None, the reconstruction's
    record)."""
    from ..prune.masks import apply_masks
    from ..prune.plan import masks_for_plan
    if gradual["steps"] > 1:
        from .gradual_step import run_gradual
        result = run_gradual(s, model, ws, sens, dataset, gradual, divisible, excluded, progress, _quiet,
                             calibration=calibration, compensate=bool(s.get("compensate") or calibration is not None))
        return result.model, result.masks, result.plans[-1], [r.to_json() for r in result.steps], {}
    masks = masks_for_plan(model, plan)
    masked = apply_masks(model, masks)
    if s.get("compensate") or calibration is not None:     # fold the pruned channels' constants into their readers
        from ..prune.compensate import compensate
        masked = compensate(model, masked, masks)
    recon = {}
    if calibration is not None:     # then refit the readers to the unpruned outputs on the calibration images
        from ..prune.reconstruct import reconstruct
        started = time.perf_counter()
        masked = reconstruct(model, masked, calibration, masks, progress=progress)
        recon = {"reconstruct_seconds": round(time.perf_counter() - started, 2)}
    return masked, masks, plan, None, recon


def _mask_and_measure(s, model, ws, sens, plan, dataset, files, progress, gradual, excluded, divisible,
                      calibration=None) -> dict:
    from ..evaluate import evaluate
    from ..prune.analysis import data_digest
    from ..prune.masks import structure_fingerprint
    batch = s.whole("batch") or 16
    if calibration is not None:
        from ..prune.calibration import calibration_inputs
        count = s.whole("calib_images")
        calib_record = {"calib_images": count, "calib_files": len(calibration)}
        calibration = calibration_inputs(model, calibration, count)
    masked, masks, plan, steps, recon = _cut(s, model, ws, sens, plan, dataset, progress, gradual, excluded,
                                             divisible, calibration)
    if calibration is not None:
        recon.update(calib_record)
    same_images = data_digest(dataset) == sens.data_digest
    before = {sens.metric: sens.baseline} if same_images else evaluate(model, dataset, batch=batch, progress=progress)
    after = evaluate(masked, dataset, batch=batch, progress=progress)
    # everything is computed: now write
    ws.bind_model(model, structure_fingerprint(model.graph))
    ws.write_json("plan.json", plan.to_json())
    masks.save(files["masks"])
    masked.save(files["cfg"], files["weights"])
    ws.save_config("prune", absolute_settings(s, ("cfg", "weights", "data", "threshold", "rate", "by", "exclude",
                                                  "divisible", "limit", "prune_out_weights", "compensate",
                                                  "steps", "step_iters", "step_lr", "seed", "reconstruct",
                                                  "calib_images", "teacher", "distill_weight", "plan_curves")))
    summary = summary_rows(model, masks, before, after, sens.metric)
    summary.update({"mode": plan.mode, "target": plan.target, "predicted_loss": plan.predicted_loss,
                    "measured_loss": before[sens.metric] - after[sens.metric], "images": len(dataset),
                    "groups_pruned": len(masks.pruned), "channels_pruned": masks.total_pruned,
                    "compensated": bool(s.get("compensate") or calibration is not None),
                    "reconstructed": calibration is not None, **recon,
                    "planned_on": getattr(sens, "planned_on", "plain"),
                    "files": {k: str(v) for k, v in files.items()}})
    if steps is not None:
        summary.update({"steps": gradual["steps"], "step_iters": gradual["step_iters"], "gradual": steps})
    ws.update_summary("prune", summary)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# transform

def transform_and_check(masked_model, masks):
    """Physically remove the masked channels; verify on a random batch that no output changed."""
    import numpy as np
    from ..engine.network import Network
    from ..prune.transform import transform
    small = transform(masked_model, masks)
    c, h, w = masked_model.input_shape
    x = np.random.default_rng(0).random((2, c, h, w), dtype=np.float32)
    a = Network(masked_model).forward(x)
    b = Network(small).forward(x)
    worst = 0.0
    for k in a:
        scale = max(float(np.abs(a[k]).max()), 1e-6)
        worst = max(worst, float(np.abs(a[k] - b[k]).max()) / scale)
    if worst > 1e-4:
        raise DarkpruneError(f"transform changed the model's outputs by {worst:.2e} of their scale; the masks do not "
                             f"match the weights (were the weights finetuned without holding the masks?)")
    return small, worst


def _pruned_weights(ws) -> str:
    """The weights transform starts from by default: the finetuned ones, else those `prune` wrote."""
    if ws.exists("finetuned.weights"):
        return str(ws.file("finetuned.weights"))
    if ws.exists("summary.json"):
        try:
            written = ws.read_json("summary.json").get("prune", {}).get("files", {}).get("weights")
        except DarkpruneError:
            written = None
        if written and Path(written).exists():
            return written
    return str(ws.file("pruned.weights"))


def run_transform(s: Settings) -> tuple[dict, str]:
    """Remove the workspace's masked channels from the weights: a smaller pair with the masked model's outputs."""
    from ..darknet import load
    from ..darknet.resize import parse_input_size, with_input_size
    from ..prune.masks import Masks, apply_masks
    ws = Workspace(s["workspace"], create=False)
    if not ws.exists("masks.json"):
        raise DarkpruneError(f"{ws.path}: no masks in this workspace (masks.json); run `darkprune prune` first")
    weights = s.get("weights") or _pruned_weights(ws)
    model = load(s["cfg"], weights)
    masks = Masks.load(ws.file("masks.json"), model)
    prefix = Path(s["out"]) if s.get("out") else ws.file("transformed")
    cfg_out, weights_out = prefix.with_name(prefix.name + ".cfg"), prefix.with_name(prefix.name + ".weights")
    inputs = [s["cfg"], weights, s.get("config"), ws.file("masks.json")]
    for target in (cfg_out, weights_out):
        refuse_overwrite(target, inputs, "the transformed model")
    if not cfg_out.parent.is_dir():
        raise DarkpruneError(f"{cfg_out}: output folder {cfg_out.parent} does not exist")
    size = parse_input_size(s["input_size"]) if s.get("input_size") else None
    if size is not None:        # refused before anything is written if the network does not take that size
        with_input_size(model, *size)
    masked = apply_masks(model, masks)
    small, worst = transform_and_check(masked, masks)
    summary = summary_rows(model, masks, None, None, "")
    note = ""
    if size is not None:        # the outputs were checked at the cfg's size; the pair is written at the new one
        small = with_input_size(small, *size)
        summary.update({"input_size": list(size), "bflops_after": round(small.graph.total_bflops, 6)})
        summary["bflops_ratio"] = round(summary["bflops_after"] / max(summary["bflops_before"], 1e-12), 4)
        note = (f"\ninput size {model.graph.net['width']}x{model.graph.net['height']} -> {size[0]}x{size[1]} "
                f"(the layer rows above are at the cfg's size; the BFLOPs total is at the new one)")
    small.save(cfg_out, weights_out)
    ws.save_config("transform", absolute_settings(s, ("cfg", "weights", "out", "input_size")))
    summary.update({"files": {"cfg": str(cfg_out), "weights": str(weights_out)}, "max_output_change": worst,
                    "weights_in": str(weights), "channels_removed": masks.total_pruned})
    ws.update_summary("transform", summary)
    text = format_summary(f"transform: {masks.total_pruned} channels removed from {weights}", summary)
    return summary, text + note + (f"\noutputs unchanged (max difference {worst:.1e} of their scale)"
                                   f"\nwritten: {cfg_out}, {weights_out}")
