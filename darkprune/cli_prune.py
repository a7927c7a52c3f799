"""The pruning workflow's sub-commands: `ana`, `prune`, `transform`, `sweep` (registered into `darkprune.cli`).

Each step reads and writes the workspace (see `darkprune.prune.workspace`), prints a summary table (or one JSON
object with --json) and writes it as JSON. Settings come from the flags, else from `--config FILE` (key=value lines
with the flags' names, or a Vitis AI pruner main cfg, which may also stand in place of CFG as vai_p_darknet takes
it), else from the defaults. Every input is checked before the workspace is created or written to, so a refused run
leaves nothing behind; every output is written to a temp file and renamed, never over an input.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import time
import warnings
from pathlib import Path

from .cli import _EXTRA_PARSERS, _common, command, emit, log
from .errors import DarkpruneError

DEFAULTS = {
    "rates": "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", "criterion": "l1", "limit": None, "shard": None,
    "exclude": "", "divisible": None, "batch": 16, "workspace": "workspace", "threshold": None, "rate": None,
    "out": None, "thresholds": "0.005,0.01,0.02,0.05", "no_prefix_cache": False, "merge": False,
}
PATH_KEYS = ("cfg", "weights", "data", "workspace", "out", "ana_out_file", "prune_out_weights", "out_cfg")
# Settings a pruning config may hold for any of the steps (each step takes its own, ignores the others').
PRUNING_KEYS = {"cfg", "weights", "data", "workspace", "config", "rates", "criterion", "limit", "shard", "exclude",
                "divisible", "batch", "no_prefix_cache", "merge", "threshold", "rate", "out", "thresholds",
                "ana_out_file", "prune_out_weights", "out_cfg"}
BOOLEAN_KEYS = {"no_prefix_cache", "merge"}


# ----------------------------------------------------------------------------------------------------------------
# settings: defaults < config file < flags given on the command line

def settings(args, keys: list[str]) -> dict:
    from .prune.workspace import read_config
    conf: dict = {}
    config_path = getattr(args, "config", None)
    cfg_arg = getattr(args, "cfg", None)
    if cfg_arg and _has_pruning_section(cfg_arg):
        if config_path:
            raise DarkpruneError(f"{cfg_arg}: a Vitis AI main cfg given as CFG, and --config {config_path} too; "
                                 f"give one of them")
        config_path, args.cfg = cfg_arg, None          # `darkprune ana MAINCFG WEIGHTS`, as vai_p_darknet takes it
    if config_path:
        conf = read_config(config_path)
        unknown = sorted(k for k in conf if k not in PRUNING_KEYS and k not in _other_commands_keys())
        if unknown:
            warnings.warn(f"{config_path}: setting(s) {', '.join(unknown)} are not darkprune options and are "
                          f"ignored (known for `darkprune {args.command}`: {', '.join(sorted(keys))})")
    out = {"config": config_path, "_from": {}}
    for key in ["cfg", "weights", "data", "workspace"] + keys:
        flag = getattr(args, key, None)
        if flag is not None and flag is not False and flag != "":
            out[key] = flag
        elif key in conf:
            out[key] = _config_value(conf, key)
            out["_from"][key] = f"{conf.where(key)}: {key}="
        else:
            out[key] = DEFAULTS.get(key)
    if conf.get("out_cfg") and "out" in keys and not getattr(args, "out", None):
        out["out"] = str(Path(conf["out_cfg"]).with_suffix(""))
    for key in ("ana_out_file", "prune_out_weights"):
        if key in conf and key not in out:
            out[key] = conf[key]
    if not out.get("cfg"):
        raise DarkpruneError(f"darkprune {args.command}: no model cfg given (the CFG argument, or modelcfg/cfg in "
                             f"the config)")
    return out


def _what(where: str, value) -> str:
    return f"{where}{value}" if where.endswith("=") else f"{where} {value}"


def flag(s: dict, key: str) -> str:
    """How to name a setting in a message: `--key` or `FILE:LINE: key=` when it came from a config file."""
    return s.get("_from", {}).get(key) or f"--{key.replace('_', '-')}"


def _config_value(conf, key: str):
    value = conf[key]
    if key in BOOLEAN_KEYS:
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise DarkpruneError(f"{conf.where(key)}: {key}={value}: expected 1 or 0")
    return value


def _other_commands_keys() -> set[str]:
    """Option names of every darkprune command (a shared config may hold finetune or compress settings too)."""
    from .cli import build_parser
    names: set[str] = set()
    parser = build_parser()
    for action in parser._actions:
        for sub in getattr(action, "choices", None) or {}:
            sub_parser = action.choices[sub]
            if isinstance(sub_parser, argparse.ArgumentParser):
                names |= {a.dest for a in sub_parser._actions}
    return names


def _has_pruning_section(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return any(line.strip().lower() == "[pruning]" for line in fh)
    except OSError:
        return False


def _floats(text, flag: str) -> list[float]:
    if isinstance(text, (list, tuple)):
        return [float(v) for v in text]
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise DarkpruneError(f"{_what(flag, text)}: expected comma-separated numbers like 0.1,0.2,0.5") from None
    if not values:
        raise DarkpruneError(f"{_what(flag, text)}: expected comma-separated numbers like 0.1,0.2,0.5")
    return values


def _number(value, flag: str, low: float | None = None) -> float | None:
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DarkpruneError(f"{_what(flag, value)}: expected a number") from None
    if math.isnan(number) or math.isinf(number):
        raise DarkpruneError(f"{_what(flag, value)}: expected a finite number")
    if low is not None and number < low:
        raise DarkpruneError(f"{_what(flag, value)}: must be at least {low:g}")
    return number


def _int(value, flag: str, low: int = 1) -> int | None:
    if value in (None, ""):
        return None
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        raise DarkpruneError(f"{_what(flag, value)}: expected a whole number") from None
    if number < low:
        raise DarkpruneError(f"{_what(flag, value)}: must be at least {low}")
    return number


def _shard(text) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise DarkpruneError(f"--shard {text}: expected I/N, e.g. 2/4") from None
    if not 1 <= i <= n:
        raise DarkpruneError(f"--shard {text}: expected 1 <= I <= N")
    return i, n


def _exclude(text) -> list[str]:
    return [v.strip() for v in str(text or "").split(",") if v.strip()]


def _load(s: dict):
    from .darknet import load
    if not s.get("weights"):
        raise DarkpruneError("the pruning workflow needs trained weights: give WEIGHTS (or weights= in the config)")
    return load(s["cfg"], s["weights"])


def _dataset(path, limit):
    from .evaluate import load_dataset
    if not path:
        raise DarkpruneError("--data F.data is required (the validation images to measure on)")
    return load_dataset(path, limit)


def check_workspace_path(path) -> None:
    """Refuse, before any work, a workspace that cannot be created: a file, or a path under a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DarkpruneError(f"{path}: the workspace must be a folder, this is a file")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DarkpruneError(f"{path}: cannot create the workspace folder ({parent} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DarkpruneError(f"{path}: the workspace folder is not writable")


def _workspace(s: dict, create: bool = True):
    from .prune.workspace import Workspace
    return Workspace(s["workspace"], create=create)


def _absolute(s: dict, keys) -> dict:
    """The settings to record in the workspace, with absolute paths (so the file reruns from anywhere)."""
    out = {}
    for k in keys:
        v = s.get(k)
        if v not in (None, "", False) and k in PATH_KEYS:
            v = os.path.abspath(str(v))
        out[k] = v
    return out


def _not_an_input(target, inputs, what: str) -> None:
    for src in inputs:
        try:
            if src and Path(target).exists() and os.path.samefile(target, src):
                raise DarkpruneError(f"{target}: {what} would overwrite an input file; choose another name")
        except FileNotFoundError:
            pass


def _write_text(path, text: str, inputs=()) -> None:
    from .darknet.cfg import atomic_write_bytes
    atomic_write_bytes(path, text.encode("utf-8"), inputs)


# ----------------------------------------------------------------------------------------------------------------
@command("ana")
def cmd_ana(args) -> int:
    from .prune.analysis import _check_rates, analyze, merge_shards, resolve_exclude
    from .prune.criteria import CRITERIA
    from .prune.masks import structure_fingerprint
    s = settings(args, ["rates", "criterion", "limit", "shard", "exclude", "divisible", "batch", "no_prefix_cache",
                        "merge", "ana_out_file"])
    model = _load(s)
    inputs = [s["cfg"], s["weights"], s.get("data"), s.get("config")]
    if s["merge"]:
        ws = _workspace(s, create=False)
        ws.check_model(model, structure_fingerprint(model.graph))
        files = sorted(glob.glob(str(ws.file("sensitivity.shard-*-of-*.json"))))
        sens = merge_shards(files, model)
        ws.bind_model(model, structure_fingerprint(model.graph))
        sens.save(ws.file("sensitivity.json"))
        name = "sensitivity.json"
        log(args, f"merged {len(files)} shards: {ws.file(name)}")
    else:
        # every input is checked before the workspace is created or touched
        dataset = _dataset(s.get("data"), _int(s["limit"], flag(s, "limit")))
        rates = _check_rates(_floats(s["rates"], flag(s, "rates")))
        if s["criterion"] not in CRITERIA:
            raise DarkpruneError(f"--criterion {s['criterion']}: expected one of {', '.join(CRITERIA)}")
        exclude = _exclude(s["exclude"])
        resolve_exclude(model, exclude)
        shard = _shard(s["shard"])
        divisible = _int(s["divisible"], flag(s, "divisible")) or 1
        batch = _int(s["batch"], flag(s, "batch")) or 16
        if s.get("ana_out_file"):
            _not_an_input(s["ana_out_file"], inputs, "ana_out_file")
        fingerprint = structure_fingerprint(model.graph)
        check_workspace_path(s["workspace"])
        if Path(s["workspace"]).is_dir():
            _workspace(s, create=False).check_model(model, fingerprint)
        name = f"sensitivity.shard-{shard[0]}-of-{shard[1]}.json" if shard else "sensitivity.json"

        def prepare():      # the baseline was measured: every input is fine, now the workspace may be written
            ws = _workspace(s)
            ws.bind_model(model, fingerprint)
            ws.save_config("ana" if not shard else f"ana.shard-{shard[0]}-of-{shard[1]}",
                           _absolute(s, ("cfg", "weights", "data", "rates", "criterion", "limit", "shard", "exclude",
                                         "divisible", "batch")))
        started = time.perf_counter()
        sens = analyze(model, dataset, rates=rates, criterion=s["criterion"], divisible=divisible, exclude=exclude,
                       shard=shard, out_path=Path(s["workspace"]) / name, batch=batch,
                       prefix_cache=not s["no_prefix_cache"], progress=not args.quiet and not args.json,
                       prepare=prepare)
        ws = _workspace(s, create=False)
        log(args, f"analysis done in {time.perf_counter() - started:.1f} s: {ws.file(name)}")
    png = ws.file("sensitivity.png" if not sens.shard else f"sensitivity.shard-{sens.shard[0]}-of-{sens.shard[1]}.png")
    sens.plot(png)
    written = [str(ws.file(name)), str(png)]
    if s.get("ana_out_file"):
        _write_text(s["ana_out_file"], sens.table() + "\n", inputs)
        written.append(str(s["ana_out_file"]))
    if not sens.shard:
        ws.update_summary("ana", {"baseline": sens.baseline, "metric": sens.metric, "groups": len(sens.curves),
                                  "images": sens.images, "seconds": sens.seconds})
    payload = {"sensitivity": str(ws.file(name)), "plot": str(png), "files": written, **sens.to_json()}
    emit(args, payload, sens.table() + f"\n\nwritten: {', '.join(written)}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
def _sensitivity(ws, model):
    from .prune.analysis import Sensitivity, merge_shards
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
    from .prune.masks import live_stats
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


@command("prune")
def cmd_prune(args) -> int:
    from .evaluate import evaluate
    from .prune.analysis import data_digest, resolve_exclude
    from .prune.masks import apply_masks, structure_fingerprint
    from .prune.plan import masks_for_plan, plan_by_rate, plan_by_threshold
    s = settings(args, ["threshold", "rate", "exclude", "divisible", "limit", "batch", "prune_out_weights"])
    threshold = _number(s["threshold"], flag(s, "threshold"))
    rate = _number(s["rate"], flag(s, "rate"))
    if (threshold is None) == (rate is None):
        raise DarkpruneError("darkprune prune: give exactly one of --threshold LOSS or --rate FRACTION")
    model = _load(s)
    ws = _workspace(s, create=False)
    ws.check_model(model, structure_fingerprint(model.graph))
    sens = _sensitivity(ws, model)
    excluded = resolve_exclude(model, _exclude(s["exclude"]))
    divisible = _int(s["divisible"], flag(s, "divisible")) or sens.divisible
    if divisible != sens.divisible:
        warnings.warn(f"{flag(s, 'divisible')} {divisible}: the analysis was measured with divisible="
                      f"{sens.divisible}, so its losses are for slightly different channel counts")
    if threshold is not None:
        plan = plan_by_threshold(sens, threshold, divisible, excluded)
    else:
        plan = plan_by_rate(model, sens, rate, divisible, excluded)
    inputs = [s["cfg"], s["weights"], s.get("data"), s.get("config")]
    weights_out = Path(s.get("prune_out_weights") or ws.file("pruned.weights"))
    cfg_out = ws.file("pruned.cfg")
    for target in (weights_out, cfg_out):
        _not_an_input(target, inputs, "the pruned model")
    dataset = _dataset(s.get("data") or sens.data, _int(s["limit"], flag(s, "limit")) or sens.images)
    batch = _int(s["batch"], flag(s, "batch")) or 16
    masks = masks_for_plan(model, plan)
    masked = apply_masks(model, masks)
    show = not args.quiet and not args.json
    same_images = data_digest(dataset) == sens.data_digest
    before = {sens.metric: sens.baseline} if same_images else evaluate(model, dataset, batch=batch, progress=show)
    after = evaluate(masked, dataset, batch=batch, progress=show)
    # everything is computed: now write
    ws.bind_model(model, structure_fingerprint(model.graph))
    ws.write_json("plan.json", plan.to_json())
    masks.save(ws.file("masks.json"))
    masked.save(cfg_out, weights_out)
    ws.save_config("prune", _absolute(s, ("cfg", "weights", "data", "threshold", "rate", "exclude", "divisible",
                                          "limit", "prune_out_weights")))
    summary = summary_rows(model, masks, before, after, sens.metric)
    summary.update({"mode": plan.mode, "target": plan.target, "predicted_loss": plan.predicted_loss,
                    "measured_loss": before[sens.metric] - after[sens.metric], "images": len(dataset),
                    "groups_pruned": len(masks.pruned), "channels_pruned": masks.total_pruned,
                    "files": {"cfg": str(cfg_out), "weights": str(weights_out),
                              "masks": str(ws.file("masks.json")), "plan": str(ws.file("plan.json"))}})
    ws.update_summary("prune", summary)
    what = f"--threshold {threshold:g}" if threshold is not None else f"--rate {rate:g}"
    text = format_summary(f"prune {what}: {summary['groups_pruned']} groups, {summary['channels_pruned']} channels "
                          f"masked (predicted {sens.metric} loss {plan.predicted_loss:.4f}, measured "
                          f"{summary['measured_loss']:.4f} on {len(dataset)} images)", summary)
    emit(args, summary, text + f"\nwritten: {cfg_out}, {weights_out}, {ws.file('masks.json')}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
def transform_and_check(masked_model, masks):
    """Physically remove the masked channels; verify on a random batch that no output changed."""
    import numpy as np
    from .engine.network import Network
    from .prune.transform import transform
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


@command("transform")
def cmd_transform(args) -> int:
    from .darknet import load
    from .prune.masks import Masks, apply_masks
    s = settings(args, ["out", "out_cfg"])
    ws = _workspace(s, create=False)
    if not ws.exists("masks.json"):
        raise DarkpruneError(f"{ws.path}: no masks in this workspace (masks.json); run `darkprune prune` first")
    weights = s.get("weights") or _pruned_weights(ws)
    model = load(s["cfg"], weights)
    masks = Masks.load(ws.file("masks.json"), model)
    prefix = Path(s["out"]) if s.get("out") else ws.file("transformed")
    cfg_out, weights_out = prefix.with_name(prefix.name + ".cfg"), prefix.with_name(prefix.name + ".weights")
    inputs = [s["cfg"], weights, s.get("config"), ws.file("masks.json")]
    for target in (cfg_out, weights_out):
        _not_an_input(target, inputs, "the transformed model")
    if not cfg_out.parent.is_dir():
        raise DarkpruneError(f"{cfg_out}: output folder {cfg_out.parent} does not exist")
    masked = apply_masks(model, masks)
    small, worst = transform_and_check(masked, masks)
    small.save(cfg_out, weights_out)
    ws.save_config("transform", _absolute(s, ("cfg", "weights", "out")))
    summary = summary_rows(model, masks, None, None, "")
    summary.update({"files": {"cfg": str(cfg_out), "weights": str(weights_out)}, "max_output_change": worst,
                    "weights_in": str(weights), "channels_removed": masks.total_pruned})
    ws.update_summary("transform", summary)
    text = format_summary(f"transform: {masks.total_pruned} channels removed from {weights}", summary)
    emit(args, summary, text + f"\noutputs unchanged (max difference {worst:.1e} of their scale)"
                               f"\nwritten: {cfg_out}, {weights_out}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
@command("sweep")
def cmd_sweep(args) -> int:
    from .sweep import format_sweep, sweep
    s = settings(args, ["thresholds", "rates", "criterion", "limit", "exclude", "divisible", "batch",
                        "no_prefix_cache"])
    if not s.get("weights"):
        raise DarkpruneError("darkprune sweep needs trained weights: give WEIGHTS (or weights= in the config)")
    result = sweep(s["cfg"], s["weights"], s.get("data"), s["workspace"], _floats(s["thresholds"], "--thresholds"),
                   rates=_floats(s["rates"], "--rates"), criterion=s["criterion"], limit=_int(s["limit"], "--limit"),
                   exclude=_exclude(s["exclude"]), divisible=_int(s["divisible"], "--divisible") or 1,
                   batch=_int(s["batch"], "--batch") or 16, progress=not args.quiet and not args.json,
                   prefix_cache=not s["no_prefix_cache"], log=lambda m: log(args, m),
                   timing_repeats=_int(args.timing_repeats, "--timing-repeats"))
    emit(args, result, format_sweep(result))
    return 0


# ----------------------------------------------------------------------------------------------------------------
def _add_parsers(sub) -> None:
    def base(name, help_text, description):
        p = sub.add_parser(name, help=help_text, description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("cfg", nargs="?", help="Darknet .cfg (or a Vitis AI pruner main cfg with a [pruning] section)")
        p.add_argument("weights", nargs="?", help="Darknet .weights")
        p.add_argument("-w", "--workspace", help="workspace folder (default: ./workspace)")
        p.add_argument("--config", help="a file of key=value settings (the flags' names), or a Vitis AI main cfg")
        _common(p)
        return p

    p = base("ana", "step 1: per-layer sensitivity analysis",
             "Mask a share of each channel group's least important channels at each rate, evaluate on the .data\n"
             "file's validation images, record the metric loss. Saved after every group; an interrupted run\n"
             "resumes where it stopped. --shard I/N analyses every N-th group only (for N processes or machines\n"
             "sharing the work on one workspace); --merge then joins the shard files.")
    p.add_argument("--data", help="Darknet .data file (its valid= list is measured)")
    p.add_argument("--rates", help="comma-separated pruning rates to try, each in (0, 1) (default 0.1,...,0.9)")
    p.add_argument("--criterion", choices=["l1", "bn"], help="channel importance: filter L1 norm (default) or "
                                                             "batch-norm |gamma|")
    p.add_argument("--limit", type=int, help="evaluate on the first N validation images only")
    p.add_argument("--shard", help="I/N: analyse only the I-th of N shares of the groups")
    p.add_argument("--merge", action="store_true", help="join the shard files into sensitivity.json")
    p.add_argument("--exclude", help="comma list of layers never pruned (names as `info` prints them, or indexes)")
    p.add_argument("--divisible", type=int, help="round kept channels up to a multiple of N (default 1)")
    p.add_argument("--batch", type=int, help="images per forward pass (default 16)")
    p.add_argument("--no-prefix-cache", dest="no_prefix_cache", action="store_true",
                   help="recompute every layer for every evaluation (slower; for comparison)")

    p = base("prune", "step 2: choose per-layer rates and mask the pruned channels",
             "--threshold LOSS: each channel group gets the largest analysed rate whose own accuracy loss (and that\n"
             "of every smaller rate) is at most LOSS: absolute, in the model's metric (mAP@0.5 or top-1; 0.01 = one\n"
             "point). It must lie in [0, the model's metric).\n"
             "--rate F: remove a share F (0 < F < 1) of the BFLOPs with the least predicted loss.\n"
             "Writes the masked pair (same shapes, pruned channels output exactly zero) and the masks, and measures\n"
             "the masked model's metric.")
    p.add_argument("--data", help="Darknet .data file (default: the one the analysis used)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, help="accuracy loss each layer may cost")
    group.add_argument("--rate", type=float, help="share of BFLOPs to remove (0..1)")
    p.add_argument("--exclude", help="comma list of layers never pruned")
    p.add_argument("--divisible", type=int, help="round kept channels up to a multiple of N (default: as analysed)")
    p.add_argument("--limit", type=int, help="images to measure the masked model on (default: as the analysis)")
    p.add_argument("--batch", type=int, help="images per forward pass (default 16)")

    p = base("transform", "step 4: remove the masked channels for real -> a smaller .cfg/.weights",
             "Remove the channels masked in the workspace (and the inputs of every layer reading them) from WEIGHTS\n"
             "(default: the workspace's finetuned or pruned weights) and write a smaller pair that Darknet and\n"
             "OpenCV load. Its outputs equal the masked model's (checked).")
    p.add_argument("-o", "--out", help="output prefix: writes PREFIX.cfg and PREFIX.weights "
                                       "(default WORKSPACE/transformed)")

    p = base("sweep", "analysis once, then prune + transform + evaluate at several thresholds",
             "One sensitivity analysis, then for each threshold: prune, transform, evaluate, time; a table, a JSON\n"
             "file and a PNG plot of the metric against BFLOPs, and one pruned pair per threshold.\n"
             "A threshold is the accuracy loss each channel group may cost on its own. Each row shows the measured\n"
             "loss of the pruned model, the loss predicted by adding up its groups' own losses, and the promise:\n"
             "loss <= groups x (threshold + noise), noise being the largest gain any group showed when pruned alone.")
    p.add_argument("--data", help="Darknet .data file")
    p.add_argument("--thresholds", help="comma-separated thresholds (default 0.005,0.01,0.02,0.05)")
    p.add_argument("--rates", help="rates the analysis tries (default 0.1,...,0.9)")
    p.add_argument("--criterion", choices=["l1", "bn"], help="channel importance (default l1)")
    p.add_argument("--limit", type=int, help="use the first N validation images only")
    p.add_argument("--exclude", help="comma list of layers never pruned")
    p.add_argument("--divisible", type=int, help="round kept channels up to a multiple of N (default 1)")
    p.add_argument("--batch", type=int, help="images per forward pass (default 16)")
    p.add_argument("--no-prefix-cache", dest="no_prefix_cache", action="store_true",
                   help="recompute every layer in the analysis (slower; for comparison)")
    p.add_argument("--timing-repeats", type=int, default=15,
                   help="interleaved rounds when timing the models (default 15; the median counts)")


_EXTRA_PARSERS.append(_add_parsers)
