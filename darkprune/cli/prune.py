"""The pruning workflow's sub-commands: `ana`, `prune`, `transform`, `sweep`.

Each step reads and writes the workspace (see `darkprune.workflow.workspace`), prints a summary table (or one JSON
object with --json) and writes it as JSON. Settings come from the flags, else from `--config FILE` (key=value lines
with the flags' names, or a Vitis AI pruner main cfg, which may also stand in place of CFG as vai_p_darknet takes
it), else from the defaults. Every input is checked before the workspace is created or written to, so a refused run
leaves nothing behind; every output is written to a temp file and renamed, never over an input.
"""
from __future__ import annotations

import argparse

from .. import DarkpruneError
from .common import add_common, command, given, logger, option_keys, parsers, progress

COMMON_KEYS = ["cfg", "weights", "data", "workspace", "config"]


def _settings(args, keys):
    from ..workflow.settings import pruning_settings
    return pruning_settings(args.command, given(args, COMMON_KEYS + keys), keys, option_keys())


@command("ana")
def cmd_ana(args) -> tuple[dict, str]:
    from ..workflow.steps import ANA_KEYS, run_ana
    return run_ana(_settings(args, ANA_KEYS), progress=progress(args), log=logger(args))


@command("prune")
def cmd_prune(args) -> tuple[dict, str]:
    from ..workflow.steps import PRUNE_KEYS, format_summary, run_prune
    s = _settings(args, PRUNE_KEYS)
    threshold, rate = s.number("threshold"), s.number("rate")
    if (threshold is None) == (rate is None):
        raise DarkpruneError("darkprune prune: give exactly one of --threshold LOSS or --rate FRACTION")
    summary = run_prune(s, progress=progress(args))
    by = "" if threshold is not None or s.get("by") in (None, "bflops") else f" --by {s['by']}"
    what = f"--threshold {threshold:g}" if threshold is not None else f"--rate {rate:g}{by}"
    metric, files = summary["metric"], summary["files"]
    text = format_summary(f"prune {what}: {summary['groups_pruned']} groups, {summary['channels_pruned']} channels "
                          f"masked (predicted {metric} loss {summary['predicted_loss']:.4f}, measured "
                          f"{summary['measured_loss']:.4f} on {summary['images']} images"
                          f"{_recovery(summary)})", summary)
    for step in summary.get("gradual") or ():
        text += (f"\nstep {step['step']}: {step['bflops']:.4f} BFLOPs, {step['channels_pruned']} channels pruned, "
                 f"{metric} {step['metric_before_finetune']:.4f} after the cut, {step['metric_after_finetune']:.4f} "
                 f"after {summary['step_iters']} iterations")
    return summary, text + f"\nwritten: {files['cfg']}, {files['weights']}, {files['masks']}"


def _recovery(summary: dict) -> str:
    if summary.get("reconstructed"):
        took = f" in {summary['reconstruct_seconds']:.1f} s" if "reconstruct_seconds" in summary else " at each step"
        return f"; compensated and reconstructed on {summary['calib_images']} calibration images{took}"
    return "; bias compensation applied" if summary.get("compensated") else ""


@command("transform")
def cmd_transform(args) -> tuple[dict, str]:
    from ..workflow.steps import TRANSFORM_KEYS, run_transform
    return run_transform(_settings(args, TRANSFORM_KEYS))


@command("sweep")
def cmd_sweep(args) -> tuple[dict, str]:
    from ..workflow.sweep import format_sweep, sweep
    s = _settings(args, ["thresholds", "rates", "criterion", "limit", "exclude", "divisible", "batch",
                         "no_prefix_cache", "cluster", "input_sizes"])
    if not s.get("weights"):
        raise DarkpruneError("darkprune sweep needs trained weights: give WEIGHTS (or weights= in the config)")
    result = sweep(s["cfg"], s["weights"], s.get("data"), s["workspace"], s.numbers("thresholds"),
                   rates=s.numbers("rates"), criterion=s["criterion"], limit=s.whole("limit"),
                   exclude=s.names("exclude"), divisible=s.whole("divisible") or 1, batch=s.whole("batch") or 16,
                   progress=progress(args), prefix_cache=not s["no_prefix_cache"], log=logger(args),
                   timing_repeats=_repeats(args), cluster=s.get("cluster") or None,
                   input_sizes=s.get("input_sizes") or ())
    return result, format_sweep(result)


def _repeats(args):
    from ..workflow.settings import parse_whole
    return parse_whole(args.timing_repeats, "timing_repeats")


def _analysis_flags(p) -> None:
    """The sensitivity analysis' settings (ana, and sweep's one analysis)."""
    p.add_argument("--rates", help="comma-separated pruning rates to try, each in (0, 1) (default 0.1,...,0.9)")
    p.add_argument("--criterion", choices=["l1", "bn"], help="channel importance: filter L1 norm (default) or "
                                                             "batch-norm |gamma|")
    p.add_argument("--limit", type=int, help="evaluate on the first N validation images only")
    p.add_argument("--exclude", help="comma list of layers never pruned (names as `info` prints them, or indexes)")
    p.add_argument("--divisible", type=int, help="round kept channels up to a multiple of N (default 1)")
    p.add_argument("--batch", type=int, help="images per forward pass (default 16)")
    p.add_argument("--no-prefix-cache", dest="no_prefix_cache", action="store_true",
                   help="recompute every layer for every evaluation (slower; for comparison)")


def _cluster_flag(p) -> None:
    p.add_argument("--cluster", help="measure the groups as Dask tasks: on the scheduler at tcp://HOST:8786, or on "
                                     "local:N, N worker processes started for the run (pip install darkprune[dask])")


def _prune_flags(p) -> None:
    """`prune`'s own settings: the plan, the recovery of each cut, the gradual steps."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, help="accuracy loss each layer may cost")
    group.add_argument("--rate", type=float, help="share of BFLOPs (or, with --by params, of parameters) to remove "
                                                  "(0..1)")
    p.add_argument("--by", choices=["bflops", "params"],
                   help="what --rate is a share of: Darknet's BFLOPs (default) or the parameter count")
    p.add_argument("--exclude", help="comma list of layers never pruned")
    p.add_argument("--divisible", type=int, help="round kept channels up to a multiple of N (default: as analysed)")
    p.add_argument("--limit", type=int, help="images to measure the masked model on (default: as the analysis)")
    p.add_argument("--batch", type=int, help="images per forward pass (default 16)")
    p.add_argument("--compensate", action="store_true",
                   help="fold each pruned channel's constant output (act of its batch-norm shift or bias) into the "
                        "biases / batch-norm means of the layers reading it (default: off)")
    p.add_argument("--steps", type=int, help="reach the target in K cuts, each followed by a short finetune on the "
                                             ".data file's train= images (default 1: one cut)")
    p.add_argument("--step-iters", dest="step_iters", type=int,
                   help="finetuning iterations after each cut (required with --steps > 1)")
    p.add_argument("--step-lr", dest="step_lr", type=float,
                   help="learning rate of those finetunes (default: the cfg's, as finetune takes it; a cfg's "
                        "from-scratch rate is often too high: Yolo-Fastest keeps its mAP at 0.0001, not 0.001)")
    p.add_argument("--seed", type=int, help="seed of the steps' finetunes (default 0)")
    p.add_argument("--teacher", choices=["original"], help="distil the steps' finetunes from the unpruned model")
    p.add_argument("--distill-weight", dest="distill_weight", type=float,
                   help="weight of the distillation term of those finetunes (default 1)")
    p.add_argument("--reconstruct", action="store_true",
                   help="after compensation, refit the layers reading pruned channels so that their outputs match "
                        "the unpruned model's on calibration images of the .data file's train= list (no labels "
                        "needed; never the valid= list)")
    p.add_argument("--calib-images", dest="calib_images", type=int,
                   help="calibration images for --reconstruct (default 256; mirrored copies fill a shorter list)")
    p.add_argument("--plan-curves", dest="plan_curves", choices=["auto", "plain", "reconstructed"],
                   help="which sensitivity curves to plan on: plain (default; measured better, see README), "
                        "reconstructed (those `ana --reconstruct` measured) or auto (the reconstructed ones when "
                        "--reconstruct is given and they exist)")


@parsers
def add_parsers(sub) -> None:
    def base(name, help_text, description):
        p = sub.add_parser(name, help=help_text, description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("cfg", nargs="?", help="Darknet .cfg (or a Vitis AI pruner main cfg with a [pruning] section)")
        p.add_argument("weights", nargs="?", help="Darknet .weights")
        p.add_argument("-w", "--workspace", help="workspace folder (default: ./workspace)")
        p.add_argument("--config", help="a file of key=value settings (the flags' names), or a Vitis AI main cfg")
        add_common(p)
        return p

    p = base("ana", "step 1: per-layer sensitivity analysis",
             "Mask a share of each channel group's least important channels at each rate, evaluate on the .data\n"
             "file's validation images, record the metric loss. Saved after every group; an interrupted run\n"
             "resumes where it stopped. --shard I/N analyses every N-th group only (for N processes or machines\n"
             "sharing the work on one workspace); --merge then joins the shard files. --cluster runs the groups\n"
             "as tasks on a Dask cluster instead and streams their curves into the same file.")
    p.add_argument("--data", help="Darknet .data file (its valid= list is measured)")
    _analysis_flags(p)
    p.add_argument("--shard", help="I/N: analyse only the I-th of N shares of the groups")
    p.add_argument("--merge", action="store_true", help="join the shard files into sensitivity.json")
    p.add_argument("--reconstruct", action="store_true",
                   help="also measure a second curve set with each variant compensated and reconstructed on "
                        "calibration images of the train= list (prune --reconstruct then plans on it)")
    p.add_argument("--calib-images", dest="calib_images", type=int,
                   help="calibration images for --reconstruct (default 256)")
    _cluster_flag(p)

    p = base("prune", "step 2: choose per-layer rates and mask the pruned channels",
             "--threshold LOSS: each channel group gets the largest analysed rate whose own accuracy loss (and that\n"
             "of every smaller rate) is at most LOSS: absolute, in the model's metric (mAP@0.5 or top-1; 0.01 = one\n"
             "point). It must lie in [0, the model's metric).\n"
             "--rate F: remove a share F (0 < F < 1) of the BFLOPs (--by params: of the parameters) with the least\n"
             "predicted loss.\n"
             "Writes the masked pair (same shapes, pruned channels output exactly zero) and the masks, and measures\n"
             "the masked model's metric.")
    p.add_argument("--data", help="Darknet .data file (default: the one the analysis used)")
    _prune_flags(p)

    p = base("transform", "step 4: remove the masked channels for real -> a smaller .cfg/.weights",
             "Remove the channels masked in the workspace (and the inputs of every layer reading them) from WEIGHTS\n"
             "(default: the workspace's finetuned or pruned weights) and write a smaller pair that Darknet and\n"
             "OpenCV load. Its outputs equal the masked model's (checked).")
    p.add_argument("-o", "--out", help="output prefix: writes PREFIX.cfg and PREFIX.weights "
                                       "(default WORKSPACE/transformed)")
    p.add_argument("--input-size", dest="input_size", metavar="W[xH]",
                   help="write the pair at this input size ([net] width/height; e.g. 256): a smaller input is a "
                        "second way to fewer BFLOPs, combined with the channels removed")

    p = base("sweep", "analysis once, then prune + transform + evaluate at several thresholds",
             "One sensitivity analysis, then for each threshold: prune, transform, evaluate, time; a table, a JSON\n"
             "file and a PNG plot of the metric against BFLOPs, and one pruned pair per threshold.\n"
             "A threshold is the accuracy loss each channel group may cost on its own. Each row shows the measured\n"
             "loss of the pruned model, the loss predicted by adding up its groups' own losses, and the promise:\n"
             "loss <= groups x (threshold + noise), noise being the largest gain any group showed when pruned alone.")
    p.add_argument("--data", help="Darknet .data file (its valid= list is measured)")
    p.add_argument("--thresholds", help="comma-separated thresholds (default 0.005,0.01,0.02,0.05)")
    _analysis_flags(p)
    _cluster_flag(p)
    p.add_argument("--input-sizes", dest="input_sizes", metavar="WxH,...",
                   help="also measure the unpruned model at these input sizes (e.g. 288x256,256x256): the other "
                        "way to fewer BFLOPs, in the same table")
    p.add_argument("--timing-repeats", type=int, default=15,
                   help="interleaved rounds when timing the models (default 15; the median counts)")

