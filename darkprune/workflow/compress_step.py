"""Deep Compression as the `compress` and `decompress` commands run it: the settings (defaults < a config file <
the values given directly), the run into a `.dcz`, and a `.dcz` back to a Darknet pair.

A compress config file holds key=value lines (the settings' keys, e.g. sparsity=conv0=0.33,...) and/or [LAYER]
sections with sparse_ratio=, class_num=, index_bits= (read by compress.magnitude); index bits may be `auto` (the
width that codes the layer smallest).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..errors import DarkpruneError, SettingError
from ..util.files import atomic_write_bytes
from .settings import parse_boolean, parse_number, parse_whole

# Settings a compress config file may hold beyond compress.magnitude's keys (paths and training options).
EXTRA_KEYS = {"cfg", "weights", "data", "out", "workspace", "limit", "lr", "centroid_lr", "centroid_gradient",
              "batch", "keep_dead", "strip_comments"}
AUTO = "auto"


def _as_setting(key: str, parse, text):
    """A library parser's refusal ("KEY: ...") as the setting's error."""
    try:
        return parse(text, key)
    except SettingError:
        raise
    except DarkpruneError as exc:
        raise SettingError(key, str(exc)) from None


def _parse_index_bits(text: str, where: str = "index_bits") -> dict:
    """LAYER=BITS pairs as compress.magnitude reads them, plus LAYER=auto (the best width for the layer)."""
    from ..compress.magnitude import parse_index_bits
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

    from ..compress.magnitude import read_compress_config
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

def compress_settings(given: dict) -> dict:
    """Flags win over the config file, which wins over the defaults. `given`: the values set directly (None: not)."""
    settings: dict = {"sparsity": {}, "clusters": {}, "index_bits": {}, "schedule": "layerwise",
                      "finetune_iters": 0, "centroid_iters": 0, "init": "linear", "seed": 0}
    extra: dict = {}
    if given.get("config"):
        extra = _from_config(given["config"], settings)
    _given_layer_settings(given, settings)
    for key in EXTRA_KEYS:
        value = given.get(key)
        if value not in (None, ""):
            settings[key] = value
        elif key in extra:
            settings[key] = extra[key][0]
            settings.setdefault("_where", {})[key] = extra[key][1]
        else:
            settings[key] = None
    _check_values(settings)
    if not settings.get("cfg") or not settings.get("weights"):
        raise DarkpruneError("darkprune compress: give CFG and WEIGHTS (or cfg= and weights= in the config file)")
    return settings


def _from_config(path, settings: dict) -> dict:
    """Read the config file into `settings`; returns {key: (value, FILE:LINE)} of the EXTRA_KEYS it sets."""
    conf = _read_config(path)
    raw = _read_raw(path)
    for item in conf.unknown:
        if item.rsplit(": ", 1)[-1] not in EXTRA_KEYS:
            warnings.warn(f"{item}: not a darkprune compress setting, ignored")
    raw_schedule = raw.get("schedule", (None,))[0]
    settings.update(sparsity=conf.sparsity, clusters=conf.clusters, index_bits=conf.index_bits,
                    schedule=raw_schedule if raw_schedule else "layerwise", finetune_iters=conf.finetune_iters,
                    centroid_iters=conf.centroid_iters, init=conf.init, seed=conf.seed)
    return {key: value for key, value in raw.items() if key in EXTRA_KEYS}


def _given_layer_settings(given: dict, settings: dict) -> None:
    from ..compress.magnitude import build_compress_config, parse_clusters, parse_sparsity
    if given.get("sparsity") is not None:
        settings["sparsity"] = _as_setting("sparsity", parse_sparsity, given["sparsity"])
    if given.get("clusters") is not None:
        settings["clusters"] = _as_setting("clusters", parse_clusters, given["clusters"])
    if given.get("index_bits") is not None:
        settings["index_bits"] = _as_setting("index_bits", _parse_index_bits, given["index_bits"])
    for key in ("schedule", "finetune_iters", "centroid_iters", "init", "seed"):
        if given.get(key) is not None:
            settings[key] = given[key]
    if settings["schedule"] not in ("layerwise", "oneshot"):
        # Explicit steps: checked here (layer names are checked against the model).
        _as_setting("schedule", lambda text, where: build_compress_config(
            schedule=text, finetune_iters=int(settings["finetune_iters"]), where=where), settings["schedule"])


def _check_values(settings: dict) -> None:
    where = settings.get("_where", {})
    settings["limit"] = parse_whole(settings["limit"], "limit", where.get("limit"), 1)
    settings["batch"] = parse_whole(settings["batch"], "batch", where.get("batch"), 1)
    settings["lr"] = parse_number(settings["lr"], "lr", where.get("lr"), 0.0)
    settings["centroid_lr"] = parse_number(settings["centroid_lr"], "centroid_lr", where.get("centroid_lr"), 0.0)
    for key in ("finetune_iters", "centroid_iters", "seed"):
        settings[key] = parse_whole(settings[key], key, None, 0)
    for key in ("keep_dead", "strip_comments"):
        settings[key] = parse_boolean(settings[key], key, where.get(key))


def run_compress(s: dict, progress: bool = True, log=None) -> tuple[dict, str]:
    """Deep Compression of the settings' model into a .dcz: (the report, its text)."""
    from ..compress.pipeline import compress, format_report
    from ..darknet import load
    model = load(s["cfg"], s["weights"])
    out = s["out"]
    if out is None and not s["workspace"]:
        out = Path(Path(s["weights"]).name).with_suffix(".dcz")
    result = compress(model, sparsity=s["sparsity"], clusters=s["clusters"], index_bits=s["index_bits"],
                      schedule=s["schedule"], data=s["data"], finetune_iters=s["finetune_iters"],
                      centroid_iters=s["centroid_iters"], init=s["init"], seed=s["seed"], workspace=s["workspace"],
                      out=out, eval_limit=s["limit"], finetune_lr=s["lr"], centroid_lr=s["centroid_lr"],
                      centroid_gradient=s["centroid_gradient"] or "sum", batch=s["batch"],
                      remove_dead=not s["keep_dead"], strip_cfg_comments=s["strip_comments"], progress=progress,
                      log=log)
    report = dict(result.report)
    report["files"] = {"dcz": result.path, "workspace": s["workspace"]}
    return report, format_report(report)


def run_decompress(dcz, out_prefix) -> tuple[dict, str]:
    """A .dcz back to OUT_PREFIX.cfg/.weights (never over the .dcz): (the payload, its text)."""
    from ..compress.pipeline import read_compressed
    source = Path(dcz)
    model, specs = read_compressed(source)
    prefix = Path(out_prefix)
    cfg_out, weights_out = prefix.with_name(prefix.name + ".cfg"), prefix.with_name(prefix.name + ".weights")
    if cfg_out.resolve() == weights_out.resolve():
        raise DarkpruneError(f"{out_prefix}: cfg and weights outputs must be different files")
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
    return payload, "\n".join(lines)
