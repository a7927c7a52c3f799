"""The pruning workflow's sub-commands: `ana`, `prune`, `transform`, `sweep` (registered into `darkprune.cli`).

Each step reads and writes the workspace (see `darkprune.prune.workspace`), prints a summary table and writes it as
JSON; `--config FILE` gives the same settings as `key=value` lines (or a Vitis AI pruner main cfg).
"""
from __future__ import annotations

import argparse
import glob
import time
from pathlib import Path

from .cli import _EXTRA_PARSERS, _common, command, emit, log
from .errors import DarkpruneError

DEFAULTS = {
    "rates": "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", "criterion": "l1", "limit": None, "shard": None,
    "exclude": "", "divisible": 1, "batch": 16, "workspace": "workspace", "threshold": None, "rate": None,
    "out": None, "thresholds": "0.005,0.01,0.02,0.05", "no_prefix_cache": False, "merge": False,
}


# ----------------------------------------------------------------------------------------------------------------
# settings: defaults < config file < flags given on the command line

def settings(args, keys: list[str]) -> dict:
    from .prune.workspace import read_config
    conf: dict = {}
    config_path = getattr(args, "config", None)
    cfg_arg = getattr(args, "cfg", None)
    if config_path is None and cfg_arg and Path(cfg_arg).is_file() and _has_pruning_section(cfg_arg):
        config_path, args.cfg = cfg_arg, None          # `darkprune ana MAINCFG WEIGHTS`, as vai_p_darknet takes it
    if config_path:
        conf = read_config(config_path)
        unknown = sorted(set(conf) - set(keys) - {"cfg", "weights", "data", "workspace"} -
                         {"ana_out_file", "prune_out_weights", "out_cfg"})
        if unknown:
            raise DarkpruneError(f"{config_path}: unknown setting(s) {', '.join(unknown)} for `darkprune "
                                 f"{args.command}` (known: {', '.join(sorted(keys))})")
    out = {}
    for key in ["cfg", "weights", "data", "workspace"] + keys:
        flag = getattr(args, key, None)
        if flag not in (None, False, ""):
            out[key] = flag
        elif key in conf:
            out[key] = conf[key]
        else:
            out[key] = DEFAULTS.get(key)
    if config_path and conf.get("out_cfg") and not out.get("out"):
        out["out"] = str(Path(conf["out_cfg"]).with_suffix(""))
    if not out.get("cfg"):
        raise DarkpruneError(f"darkprune {args.command}: no model cfg given (CFG argument, or modelcfg in the config)")
    return out


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
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise DarkpruneError(f"{flag} {text}: expected comma-separated numbers like 0.1,0.2,0.5") from None


def _int(value, flag: str) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DarkpruneError(f"{flag} {value}: expected a whole number") from None


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


def _workspace(s: dict, create: bool = True):
    from .prune.workspace import Workspace
    return Workspace(s["workspace"], create=create)


# ----------------------------------------------------------------------------------------------------------------
@command("ana")
def cmd_ana(args) -> int:
    from .prune.analysis import analyze, merge_shards
    from .prune.masks import structure_fingerprint
    s = settings(args, ["rates", "criterion", "limit", "shard", "exclude", "divisible", "batch", "no_prefix_cache",
                        "merge"])
    model = _load(s)
    ws = _workspace(s)
    ws.bind_model(model, structure_fingerprint(model.graph))
    if s["merge"]:
        files = sorted(glob.glob(str(ws.file("sensitivity.shard-*-of-*.json"))))
        sens = merge_shards(files, model, ws.file("sensitivity.json"))
    else:
        if not s.get("data"):
            raise DarkpruneError("darkprune ana: --data F.data is required (the validation images to measure on)")
        shard = _shard(s["shard"])
        name = f"sensitivity.shard-{shard[0]}-of-{shard[1]}.json" if shard else "sensitivity.json"
        ws.save_config("ana", {k: s[k] for k in ("cfg", "weights", "data", "rates", "criterion", "limit", "shard",
                                                 "exclude", "divisible", "batch")})
        started = time.perf_counter()
        sens = analyze(model, s["data"], rates=_floats(s["rates"], "--rates"), criterion=s["criterion"],
                       limit=_int(s["limit"], "--limit"), divisible=_int(s["divisible"], "--divisible") or 1,
                       exclude=_exclude(s["exclude"]), shard=shard, out_path=ws.file(name),
                       batch=_int(s["batch"], "--batch") or 16, prefix_cache=not s["no_prefix_cache"],
                       progress=not args.quiet and not args.json)
        log(args, f"analysis done in {time.perf_counter() - started:.1f} s: {ws.file(name)}")
    png = ws.file("sensitivity.png" if not sens.shard else f"sensitivity.shard-{sens.shard[0]}.png")
    sens.plot(png)
    payload = {"sensitivity": str(ws.file("sensitivity.json") if not sens.shard else name), "plot": str(png),
               **sens.to_json()}
    ws.update_summary("ana", {"baseline": sens.baseline, "metric": sens.metric, "groups": len(sens.curves),
                              "seconds": sens.seconds})
    emit(args, payload, sens.table() + f"\n\nwritten: {payload['sensitivity']}, {png}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
def _sensitivity(ws, model):
    from .prune.analysis import Sensitivity, merge_shards
    path = ws.file("sensitivity.json")
    if path.exists():
        return Sensitivity.load(path, model)
    shards = sorted(glob.glob(str(ws.file("sensitivity.shard-*-of-*.json"))))
    if shards:
        return merge_shards(shards, model, path)
    raise DarkpruneError(f"{ws.path}: no sensitivity analysis in this workspace; run `darkprune ana` first")


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
    from .prune.analysis import resolve_exclude
    from .prune.masks import apply_masks, structure_fingerprint
    from .prune.plan import masks_for_plan, plan_by_rate, plan_by_threshold
    s = settings(args, ["threshold", "rate", "exclude", "divisible", "limit", "batch", "prune_out_weights"])
    threshold = float(s["threshold"]) if s["threshold"] not in (None, "") else None
    rate = float(s["rate"]) if s["rate"] not in (None, "") else None
    if (threshold is None) == (rate is None):
        raise DarkpruneError("darkprune prune: give exactly one of --threshold LOSS or --rate FRACTION")
    model = _load(s)
    ws = _workspace(s, create=False)
    ws.bind_model(model, structure_fingerprint(model.graph))
    sens = _sensitivity(ws, model)
    excluded = resolve_exclude(model, _exclude(s["exclude"]))
    divisible = _int(s["divisible"], "--divisible") or sens.divisible
    if threshold is not None:
        plan = plan_by_threshold(sens, threshold, divisible, excluded)
    else:
        plan = plan_by_rate(model, sens, rate, divisible, excluded)
    masks = masks_for_plan(model, plan)
    masked = apply_masks(model, masks)
    data = s.get("data") or sens.data
    limit = _int(s["limit"], "--limit") or sens.images
    show = not args.quiet and not args.json
    before = {sens.metric: sens.baseline} if limit == sens.images else \
        evaluate(model, data, limit=limit, progress=show)
    after = evaluate(masked, data, limit=limit, progress=show)
    ws.write_json("plan.json", plan.to_json())
    masks.save(ws.file("masks.json"))
    weights_out = Path(s.get("prune_out_weights") or ws.file("pruned.weights"))
    masked.save(ws.file("pruned.cfg"), weights_out)
    ws.save_config("prune", {k: s[k] for k in ("cfg", "weights", "data", "threshold", "rate", "exclude",
                                               "divisible", "limit")})
    summary = summary_rows(model, masks, before, after, sens.metric)
    summary.update({"mode": plan.mode, "target": plan.target, "predicted_loss": plan.predicted_loss,
                    "groups_pruned": len(masks.pruned), "channels_pruned": masks.total_pruned,
                    "files": {"cfg": str(ws.file("pruned.cfg")), "weights": str(weights_out),
                              "masks": str(ws.file("masks.json")), "plan": str(ws.file("plan.json"))}})
    ws.update_summary("prune", summary)
    what = f"--threshold {threshold}" if threshold is not None else f"--rate {rate}"
    text = format_summary(f"prune {what}: {summary['groups_pruned']} groups, {summary['channels_pruned']} channels "
                          f"masked (predicted {sens.metric} loss {plan.predicted_loss:.4f})", summary)
    emit(args, summary, text + f"\nwritten: {ws.file('pruned.cfg')}, {weights_out}, {ws.file('masks.json')}")
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


@command("transform")
def cmd_transform(args) -> int:
    from .darknet import load
    from .prune.masks import Masks, apply_masks
    s = settings(args, ["out", "out_cfg"])
    ws = _workspace(s, create=False)
    weights = s.get("weights") or str(ws.file("finetuned.weights") if ws.exists("finetuned.weights")
                                      else ws.file("pruned.weights"))
    model = load(s["cfg"], weights)
    masks = Masks.load(ws.file("masks.json"), model)
    masked = apply_masks(model, masks)
    small, worst = transform_and_check(masked, masks)
    prefix = Path(s["out"]) if s.get("out") else ws.file("transformed")
    cfg_out, weights_out = prefix.with_name(prefix.name + ".cfg"), prefix.with_name(prefix.name + ".weights")
    small.save(cfg_out, weights_out)
    summary = summary_rows(model, masks, None, None, "")
    summary.update({"files": {"cfg": str(cfg_out), "weights": str(weights_out)}, "max_output_change": worst,
                    "weights_in": str(weights)})
    ws.update_summary("transform", summary)
    text = format_summary(f"transform: {masks.total_pruned} channels removed from {weights}", summary)
    emit(args, summary, text + f"\noutputs unchanged (max difference {worst:.1e} of their scale)"
                               f"\nwritten: {cfg_out}, {weights_out}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
@command("sweep")
def cmd_sweep(args) -> int:
    from .sweep import format_sweep, sweep
    s = settings(args, ["thresholds", "rates", "criterion", "limit", "exclude", "divisible", "batch"])
    if not s.get("data"):
        raise DarkpruneError("darkprune sweep: --data F.data is required")
    result = sweep(s["cfg"], s["weights"], s["data"], s["workspace"], _floats(s["thresholds"], "--thresholds"),
                   rates=_floats(s["rates"], "--rates"), criterion=s["criterion"], limit=_int(s["limit"], "--limit"),
                   exclude=_exclude(s["exclude"]), divisible=_int(s["divisible"], "--divisible") or 1,
                   batch=_int(s["batch"], "--batch") or 16, progress=not args.quiet and not args.json,
                   log=lambda m: log(args, m))
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
             "resumes. --shard I/N splits the groups over N processes; --merge joins the shard files.")
    p.add_argument("--data", help="Darknet .data file (its valid= list is measured)")
    p.add_argument("--rates", help="comma-separated pruning rates to try (default 0.1,...,0.9)")
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
             "--threshold LOSS: each channel group gets the largest analysed rate whose own accuracy loss is at most\n"
             "LOSS (absolute, in the model's metric: mAP@0.5 or top-1; 0.01 = one point).\n"
             "--rate F: remove a share F of the BFLOPs with the least predicted loss.\n"
             "Writes the masked pair (same shapes, pruned channels output exactly zero) and the masks.")
    p.add_argument("--data", help="Darknet .data file (default: the one the analysis used)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, help="accuracy loss each layer may cost")
    group.add_argument("--rate", type=float, help="share of BFLOPs to remove (0..1)")
    p.add_argument("--exclude", help="comma list of layers never pruned")
    p.add_argument("--divisible", type=int, help="round kept channels up to a multiple of N")
    p.add_argument("--limit", type=int, help="images to measure the masked model on (default: as the analysis)")

    p = base("transform", "step 4: remove the masked channels for real -> a smaller .cfg/.weights",
             "Remove the channels masked in the workspace (and the inputs of every layer reading them) from WEIGHTS\n"
             "(default: the workspace's finetuned or pruned weights) and write a smaller pair that Darknet and\n"
             "OpenCV load. Its outputs equal the masked model's (checked).")
    p.add_argument("-o", "--out", help="output prefix: writes PREFIX.cfg and PREFIX.weights "
                                       "(default WORKSPACE/transformed)")

    p = base("sweep", "analysis once, then prune + transform + evaluate at several thresholds",
             "One sensitivity analysis, then for each threshold: prune, transform, evaluate, time; a table, a JSON\n"
             "file and a PNG plot of the metric against BFLOPs, and one pruned pair per threshold.")
    p.add_argument("--data", help="Darknet .data file")
    p.add_argument("--thresholds", help="comma-separated thresholds (default 0.005,0.01,0.02,0.05)")
    p.add_argument("--rates", help="rates the analysis tries")
    p.add_argument("--criterion", choices=["l1", "bn"])
    p.add_argument("--limit", type=int)
    p.add_argument("--exclude")
    p.add_argument("--divisible", type=int)
    p.add_argument("--batch", type=int)


_EXTRA_PARSERS.append(_add_parsers)
