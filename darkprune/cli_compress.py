"""`darkprune compress` and `darkprune decompress` (registered into `darkprune.cli`).

compress: Deep Compression (prune by magnitude with finetuning, k-means weight sharing, centroid finetuning, Huffman
coding) into a `.dcz` file, with a per-layer size report and the accuracy before and after.
decompress: a `.dcz` back to a Darknet `.cfg`/`.weights` pair, weights equal to the quantised model's bit for bit.
"""
from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

from .cli import _EXTRA_PARSERS, _common, command, emit, log
from .cli_prune import _int, _number
from .errors import DarkpruneError

# Settings a compress config file may hold beyond compress.magnitude's keys (paths and training options).
EXTRA_KEYS = {"cfg", "weights", "data", "out", "workspace", "limit", "lr", "centroid_lr", "centroid_gradient",
              "batch", "keep_dead", "strip_comments"}
AUTO = "auto"


def _parse_index_bits(text: str, where: str = "--index-bits") -> dict:
    """LAYER=BITS pairs as compress.magnitude reads them, plus LAYER=auto (the best width for the layer)."""
    from .compress.magnitude import parse_index_bits
    auto = []
    items = []
    for item in text.split(","):
        name, _, value = item.partition("=")
        if value.strip().lower() == AUTO:
            auto.append(name.strip())
            item = f"{name}=16"
        items.append(item)
    out = parse_index_bits(",".join(items), where)
    for name in auto:
        out[name] = AUTO
    return out


def _read_config(path: str):
    """compress.magnitude.read_compress_config, also accepting `auto` as index bits (globally or in a [LAYER])."""
    import re
    import tempfile

    from .compress.magnitude import read_compress_config
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return read_compress_config(path)  # reports the problem
    if not re.search(r"index[_-]bits\s*=.*auto", text, re.IGNORECASE):
        return read_compress_config(path)
    auto, lines, section = [], [], None
    for line in text.splitlines():
        bare = line.split("#", 1)[0].strip()
        if bare.startswith("[") and bare.endswith("]"):
            section = bare[1:-1].strip()
            section = None if section in ("compress", "deep_compression") else section
        elif "=" in bare:
            key, value = (part.strip() for part in bare.split("=", 1))
            if key.replace("-", "_").lower() == "index_bits" and AUTO in value.lower():
                if section is not None and value.lower() == AUTO:
                    auto.append(section)
                    line = "index_bits=16"
                elif section is None:
                    pairs = []
                    for item in value.split(","):
                        name, _, bits = item.partition("=")
                        if bits.strip().lower() == AUTO:
                            auto.append(name.strip())
                            bits = "16"
                        pairs.append(f"{name}={bits}")
                    line = "index_bits=" + ",".join(pairs)
        lines.append(line)
    handle = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8")
    try:
        with handle:
            handle.write("\n".join(lines) + "\n")
        try:
            conf = read_compress_config(handle.name)
        except DarkpruneError as exc:
            raise DarkpruneError(str(exc).replace(handle.name, str(path))) from None
    finally:
        os.unlink(handle.name)
    conf.unknown = [item.replace(handle.name, str(path)) for item in conf.unknown]
    for name in auto:
        conf.index_bits[name] = AUTO
    return conf


def _flag(value, where: str) -> bool:
    if isinstance(value, str):
        if value.strip().lower() not in ("0", "1", "true", "false", "yes", "no"):
            raise DarkpruneError(f"{where}: {value!r}: expected 0 or 1")
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _read_raw(path: str) -> dict:
    """{key: (value, "FILE:LINE")} of the global (section-less) key=value lines of a compress config file."""
    out = {}
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError):
        return out
    section = None
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            section = None if section in ("compress", "deep_compression") else section
            continue
        if section is None and "=" in line:
            key, value = (part.strip() for part in line.split("=", 1))
            out.setdefault(key.replace("-", "_").lower(), (value, f"{path}:{number}"))
    return out


def compress_settings(args) -> dict:
    """Flags win over the config file, which wins over the defaults."""
    from .compress.magnitude import build_compress_config, parse_clusters, parse_sparsity
    settings: dict = {"sparsity": {}, "clusters": {}, "index_bits": {}, "schedule": "layerwise",
                      "finetune_iters": 0, "centroid_iters": 0, "init": "linear", "seed": 0}
    extra: dict = {}
    if args.config:
        conf = _read_config(args.config)
        raw = _read_raw(args.config)
        extra = {key: value for key, value in raw.items() if key in EXTRA_KEYS}
        unknown = [item for item in conf.unknown if item.rsplit(": ", 1)[-1] not in EXTRA_KEYS]
        for item in unknown:
            warnings.warn(f"{item}: not a darkprune compress setting, ignored")
        raw_schedule = raw.get("schedule", (None,))[0]
        settings.update(sparsity=conf.sparsity, clusters=conf.clusters, index_bits=conf.index_bits,
                        schedule=raw_schedule if raw_schedule else "layerwise",
                        finetune_iters=conf.finetune_iters, centroid_iters=conf.centroid_iters, init=conf.init,
                        seed=conf.seed)
    if args.sparsity is not None:
        settings["sparsity"] = parse_sparsity(args.sparsity)
    if args.clusters is not None:
        settings["clusters"] = parse_clusters(args.clusters)
    if args.index_bits is not None:
        settings["index_bits"] = _parse_index_bits(args.index_bits)
    for key in ("schedule", "finetune_iters", "centroid_iters", "init", "seed"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if settings["schedule"] not in ("layerwise", "oneshot"):
        # Explicit steps: checked here so the message names the flag (layer names are checked against the model).
        build_compress_config(schedule=settings["schedule"], finetune_iters=int(settings["finetune_iters"]),
                              where="--schedule")
    for key in EXTRA_KEYS:
        flag = getattr(args, key, None)
        if flag not in (None, ""):
            settings[key] = flag
        elif key in extra:
            settings[key] = extra[key][0]
            settings.setdefault("_where", {})[key] = extra[key][1]
        else:
            settings[key] = None
    where = settings.get("_where", {})

    def named(key: str) -> str:
        """How a message names the setting: `--key`, or `FILE:LINE: key=` when the config file gave it."""
        return f"{where[key]}: {key}=" if key in where else "--" + key.replace("_", "-")
    settings["limit"] = _int(settings["limit"], named("limit"), 1)
    settings["batch"] = _int(settings["batch"], named("batch"), 1)
    settings["lr"] = _number(settings["lr"], named("lr"), 0.0)
    settings["centroid_lr"] = _number(settings["centroid_lr"], named("centroid_lr"), 0.0)
    settings["finetune_iters"] = _int(settings["finetune_iters"], "--finetune-iters", 0)
    settings["centroid_iters"] = _int(settings["centroid_iters"], "--centroid-iters", 0)
    settings["seed"] = _int(settings["seed"], "--seed", 0)
    for key in ("keep_dead", "strip_comments"):
        settings[key] = _flag(settings[key], f"{where.get(key, '--' + key.replace('_', '-'))}: {key}")
    if not settings.get("cfg") or not settings.get("weights"):
        raise DarkpruneError("darkprune compress: give CFG and WEIGHTS (or cfg= and weights= in the config file)")
    return settings


@command("compress")
def cmd_compress(args) -> int:
    from .compress.pipeline import compress, format_report
    from .darknet import load
    s = compress_settings(args)
    model = load(s["cfg"], s["weights"])
    out = s["out"]
    if out is None and not s["workspace"]:
        out = Path(Path(s["weights"]).name).with_suffix(".dcz")
    show = not args.quiet and not args.json
    result = compress(model, sparsity=s["sparsity"], clusters=s["clusters"], index_bits=s["index_bits"],
                      schedule=s["schedule"], data=s["data"], finetune_iters=s["finetune_iters"],
                      centroid_iters=s["centroid_iters"], init=s["init"], seed=s["seed"], workspace=s["workspace"],
                      out=out, eval_limit=s["limit"], finetune_lr=s["lr"], centroid_lr=s["centroid_lr"],
                      centroid_gradient=s["centroid_gradient"] or "sum", batch=s["batch"],
                      remove_dead=not s["keep_dead"], strip_cfg_comments=s["strip_comments"], progress=show,
                      log=lambda message: log(args, message))
    report = dict(result.report)
    report["files"] = {"dcz": result.path, "workspace": s["workspace"]}
    emit(args, report, format_report(report))
    return 0


@command("decompress")
def cmd_decompress(args) -> int:
    from .compress.pipeline import read_compressed
    from .darknet.cfg import atomic_write_bytes
    source = Path(args.model)
    model, specs = read_compressed(source)
    prefix = Path(args.out)
    cfg_out, weights_out = prefix.with_name(prefix.name + ".cfg"), prefix.with_name(prefix.name + ".weights")
    if cfg_out.resolve() == weights_out.resolve():
        raise DarkpruneError(f"{args.out}: cfg and weights outputs must be different files")
    for target in (cfg_out, weights_out):  # checked before writing either, so nothing is left half done
        if target.exists() and os.path.samefile(target, source):
            raise DarkpruneError(f"{target}: refusing to overwrite the input .dcz; choose another output prefix")
    data = model.weights_bytes()
    atomic_write_bytes(cfg_out, model.cfg.text().encode("ascii", "replace"), [source])
    atomic_write_bytes(weights_out, data, [source])
    params = sum(int(array.size) for arrays in model.params.values() for array in arrays.values())
    quantized = sum(int(spec["mask"].size) for spec in specs.values())
    kept = sum(int(spec["mask"].sum()) for spec in specs.values())
    payload = {"cfg": str(cfg_out), "weights": str(weights_out), "dcz": str(source),
               "dcz_bytes": source.stat().st_size, "weights_bytes": len(data), "params": params,
               "quantized_layers": len(specs), "quantized_params": quantized, "kept": kept,
               "sparsity": 1 - kept / quantized if quantized else 0.0,
               "layers": [{"index": index, "name": model.graph[index].name, "clusters": int(spec["codebook"].size),
                           "kept": int(spec["mask"].sum()), "params": int(spec["mask"].size),
                           "index_bits": int(spec["index_bits"])} for index, spec in sorted(specs.items())]}
    lines = [f"{'layer':>5} {'name':<14} {'weights':>10} {'kept%':>6} {'k used':>6} {'idx':>3}"]
    for row in payload["layers"]:
        lines.append(f"{row['index']:>5} {row['name']:<14} {row['params']:>10} "
                     f"{100 * row['kept'] / max(row['params'], 1):>6.1f} {row['clusters']:>6} {row['index_bits']:>3}")
    lines.append(f"{source} ({payload['dcz_bytes']} B) -> {weights_out} ({len(data)} B, "
                 f"{len(data) / max(payload['dcz_bytes'], 1):.1f}x larger), {100 * payload['sparsity']:.1f}% of "
                 f"the quantised weights are zero")
    lines.append(f"written: {cfg_out}, {weights_out}")
    emit(args, payload, "\n".join(lines))
    return 0


def _add_parsers(sub) -> None:
    p = sub.add_parser(
        "compress", help="Deep Compression: prune weights, share them by k-means, Huffman-code -> .dcz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Deep Compression (Han, Mao, Dally 2015) of a Darknet model into a .dcz file:\n"
                    "1. fine-grained magnitude pruning per layer, on a schedule, with finetuning between steps\n"
                    "   (masks held: a pruned weight never comes back);\n"
                    "2. k-means weight sharing of each layer's surviving weights;\n"
                    "3. centroid finetuning (a centroid's gradient is the sum of its weights' gradients);\n"
                    "4. relative indices + codebooks + cluster indices, Huffman-coded, with a checksum.\n"
                    "Layers are named as `darkprune info` prints them (conv0, connected4, or an index); conv= and\n"
                    "fc= set every layer of a type. Defaults: no pruning; 256 clusters and 8-bit indices for conv,\n"
                    "32 clusters and 5-bit indices for connected layers. Prints a per-layer size report and the\n"
                    "accuracy (top-1 or mAP@0.5 on the .data file's valid list) before and after.",
        epilog="example (the Caffe implementation's LeNet-5 schedule):\n"
               "  darkprune compress cfg/lenet.cfg weights/lenet.weights --data mnist.data \\\n"
               "    --sparsity conv0=0.33,conv2=0.8,connected4=0.9,connected5=0.8 --clusters conv=256,fc=32 \\\n"
               "    --finetune-iters 1000 --centroid-iters 1000 -o lenet.dcz")
    p.add_argument("cfg", nargs="?", help="Darknet .cfg")
    p.add_argument("weights", nargs="?", help="Darknet .weights")
    p.add_argument("--data", help="Darknet .data file: accuracy on its valid= list, finetuning on its train= list")
    p.add_argument("--sparsity", help="LAYER=RATIO,... share of each layer's weights to zero (0..1)")
    p.add_argument("--clusters", help="LAYER=K,... k-means clusters per layer (default conv=256,fc=32)")
    p.add_argument("--index-bits", dest="index_bits",
                   help="LAYER=BITS,... relative-index bits (default conv=8,fc=5); BITS may be auto: the width that "
                        "codes the layer smallest")
    p.add_argument("--schedule", help="layerwise (default: one layer per step, in --sparsity order, finetuning "
                                      "after each) | oneshot | explicit steps 'conv2=0.5@1000;conv2=0.8@2000'")
    p.add_argument("--finetune-iters", dest="finetune_iters", type=int,
                   help="finetuning iterations after each pruning step (default 0)")
    p.add_argument("--centroid-iters", dest="centroid_iters", type=int,
                   help="centroid finetuning iterations after quantisation (default 0)")
    p.add_argument("--init", choices=["linear", "density", "random"], help="k-means initialisation (default linear)")
    p.add_argument("--seed", type=int, help="seed of every random choice (default 0)")
    p.add_argument("--lr", type=float, help="finetuning learning rate (default: the cfg's learning_rate / 10)")
    p.add_argument("--centroid-lr", dest="centroid_lr", type=float,
                   help="centroid learning rate (default: the finetuning rate / 10)")
    p.add_argument("--centroid-gradient", dest="centroid_gradient", choices=["sum", "mean"],
                   help="a centroid's gradient: sum over its weights (the paper, default) or their mean")
    p.add_argument("--batch", type=int, help="images per training iteration (default: the cfg's batch)")
    p.add_argument("--keep-dead", dest="keep_dead", action="store_true",
                   help="do not prune the weights of neurons no kept weight reads any more (by default they go: "
                        "the outputs do not change, the file gets smaller)")
    p.add_argument("--strip-comments", dest="strip_comments", action="store_true",
                   help="store the cfg without its comment and blank lines (the same network, a smaller file)")
    p.add_argument("--limit", type=int, help="measure accuracy on the first N validation images only")
    p.add_argument("-o", "--out", help="the .dcz to write (default WORKSPACE/model.dcz, or ./WEIGHTS-NAME.dcz)")
    p.add_argument("-w", "--workspace", help="folder for the run's files: config, masks, pruned and quantised "
                                             "pairs, report.json")
    p.add_argument("--config", help="a file of key=value settings (the flags' names, e.g. sparsity=conv0=0.33,...), "
                                    "and/or [LAYER] sections with sparse_ratio=, class_num=, index_bits=")
    _common(p)

    p = sub.add_parser(
        "decompress", help="a .dcz back to a Darknet .cfg/.weights pair",
        description="Decode a .dcz (refused if truncated or corrupt: checksum) and write OUT_PREFIX.cfg and "
                    "OUT_PREFIX.weights atomically. The weights equal the quantised model's bit for bit; Darknet "
                    "and OpenCV load the pair.")
    p.add_argument("model", help="the .dcz file")
    p.add_argument("-o", "--out", required=True, help="output prefix: writes OUT_PREFIX.cfg and OUT_PREFIX.weights")
    _common(p)


_EXTRA_PARSERS.append(_add_parsers)
