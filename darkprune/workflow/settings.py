"""The one settings reader: defaults < a config file < the values given on the command line.

A config file (`--config FILE`) holds `key=value` lines with the settings' keys (the command line's option names with
`_` for `-`; one file may hold the settings of every step, each step takes its own). A Vitis AI Darknet pruner main cfg
(a `[pruning]` section with workspace, datacfg, modelcfg, prunedcfg, ana_out_file, prune_out_weights, criteria,
kernel_batch, ignore_layer, threshold) is read too, and can stand in place of the model cfg as vai_p_darknet takes it;
keys we do not support (yolov3, gpus, ...) are named in a warning. Paths in a config are taken relative to the current
folder, as vai_p_darknet does.

Values are checked by one number parser, one whole-number parser and one boolean parser. A bad value from a config
file is refused naming FILE:LINE: key=value; a bad value given directly raises SettingError(key, ...), which the
command line reports under its own option name.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

from ..errors import DarkpruneError, SettingError
from ..util.textio import read_input_bytes

# The pruning steps' defaults (ana, prune, transform, sweep; finetune adds its own).
DEFAULTS = {
    "rates": "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", "criterion": "l1", "limit": None, "shard": None,
    "exclude": "", "divisible": None, "batch": 16, "workspace": "workspace", "threshold": None, "rate": None,
    "out": None, "thresholds": "0.005,0.01,0.02,0.05", "no_prefix_cache": False, "merge": False,
    "compensate": False, "reconstruct": False, "calib_images": 256, "steps": 1, "step_iters": None,
    "step_lr": None, "seed": 0, "teacher": None, "distill_weight": None,
    "plan_curves": "plain", "by": "bflops", "input_size": None, "input_sizes": None,
}
# Settings a pruning config may hold for any of the steps (each step takes its own, ignores the others').
PRUNING_KEYS = {"cfg", "weights", "data", "workspace", "config", "rates", "criterion", "limit", "shard", "exclude",
                "divisible", "batch", "no_prefix_cache", "merge", "threshold", "rate", "out", "thresholds",
                "ana_out_file", "prune_out_weights", "out_cfg", "compensate", "reconstruct",
                "calib_images", "steps", "step_iters", "step_lr", "seed", "teacher", "distill_weight",
                "plan_curves", "by", "input_size", "input_sizes"}
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


# ----------------------------------------------------------------------------------------------------------------
# the parsers: `where` is "FILE:LINE" when the value came from a config file, None when it was given directly

def _refuse(key: str, value, where: str | None, problem: str):
    if where:
        return DarkpruneError(f"{where}: {key}={value}: {problem}")
    return SettingError(key, f"{key} {value}: {problem}")


def parse_number(value, key: str, where: str | None = None, low: float | None = None) -> float | None:
    """A finite number (at least `low`), or None for an empty value."""
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _refuse(key, value, where, "expected a number") from None
    if math.isnan(number) or math.isinf(number):
        raise _refuse(key, value, where, "expected a finite number")
    if low is not None and number < low:
        raise _refuse(key, value, where, f"must be at least {low:g}")
    return number


def parse_whole(value, key: str, where: str | None = None, low: int = 1) -> int | None:
    """A whole number (at least `low`), or None for an empty value."""
    if value in (None, ""):
        return None
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        raise _refuse(key, value, where, "expected a whole number") from None
    if number < low:
        raise _refuse(key, value, where, f"must be at least {low}")
    return number


def parse_numbers(value, key: str, where: str | None = None) -> list[float]:
    """Comma-separated numbers (a list passes through)."""
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    try:
        numbers = [float(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        numbers = []
    if not numbers:
        raise _refuse(key, value, where, "expected comma-separated numbers like 0.1,0.2,0.5")
    return numbers


def parse_boolean(value, key: str, where: str | None = None) -> bool:
    """True/False, or one of 1/true/yes/on and 0/false/no/off; anything else is refused (never read as False)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise _refuse(key, value, where, "expected 1 or 0")


def parse_shard(value, key: str = "shard", where: str | None = None) -> tuple[int, int] | None:
    """I/N: the I-th of N shares, or None."""
    if not value:
        return None
    try:
        i, n = (int(v) for v in str(value).split("/"))
    except ValueError:
        raise _refuse(key, value, where, "expected I/N, e.g. 2/4") from None
    if not 1 <= i <= n:
        raise _refuse(key, value, where, "expected 1 <= I <= N")
    return i, n


def parse_names(value) -> list[str]:
    """A comma list (layer names or indexes)."""
    return [v.strip() for v in str(value or "").split(",") if v.strip()]


class Settings(dict):
    """{key: value} with, per key read from a config file, the FILE:LINE it came from (for the messages)."""

    def __init__(self, values=None, origin=None):
        super().__init__(values or {})
        self.origin: dict[str, str] = dict(origin or {})

    def where(self, key: str) -> str | None:
        return self.origin.get(key)

    def number(self, key: str, low: float | None = None) -> float | None:
        return parse_number(self.get(key), key, self.where(key), low)

    def whole(self, key: str, low: int = 1) -> int | None:
        return parse_whole(self.get(key), key, self.where(key), low)

    def numbers(self, key: str) -> list[float]:
        return parse_numbers(self.get(key), key, self.where(key))

    def boolean(self, key: str) -> bool:
        return parse_boolean(self.get(key), key, self.where(key))

    def shard(self, key: str = "shard") -> tuple[int, int] | None:
        return parse_shard(self.get(key), key, self.where(key))

    def names(self, key: str) -> list[str]:
        return parse_names(self.get(key))


# ----------------------------------------------------------------------------------------------------------------
# config files

# Vitis AI's [pruning] keys -> our option names.
VITIS_KEYS = {
    "workspace": "workspace", "datacfg": "data", "modelcfg": "cfg", "prunedcfg": "out_cfg",
    "ana_out_file": "ana_out_file", "prune_out_weights": "prune_out_weights", "criteria": "criterion",
    "kernel_batch": "divisible", "ignore_layer": "exclude", "threshold": "threshold",
}
# Vitis' criteria codes (0 = filter L1 norm, 1 = batch-norm scale); names pass through.
VITIS_CRITERIA = {"0": "l1", "1": "bn"}


class ConfigValues(dict):
    """Settings read from a config file: {key: value text}, remembering where each came from."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.lines: dict[str, int] = {}
        self.vitis = False

    def where(self, key: str) -> str:
        return f"{self.path}:{self.lines[key]}" if key in self.lines else self.path


def read_config(path: str | os.PathLike) -> ConfigValues:
    """key=value lines (`#` comments), or a cfg with a [pruning] section (Vitis AI's main cfg)."""
    path = str(path)
    try:
        text = read_input_bytes(path, "config", "not a config file").decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DarkpruneError(f"{path}: cannot read config: {exc}") from None
    if any(line.strip().lower() == "[pruning]" for line in text.splitlines()):
        return _read_vitis(path, text)
    out = ConfigValues(path)
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#")[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise DarkpruneError(f"{path}:{number}: expected key=value, got '{raw.strip()}'")
        key, value = (part.strip() for part in line.split("=", 1))
        key = key.lstrip("-").replace("-", "_")
        if not key:
            raise DarkpruneError(f"{path}:{number}: expected key=value, got '{raw.strip()}'")
        if key in out:
            raise DarkpruneError(f"{path}:{number}: '{key}' is set twice")
        out[key] = value
        out.lines[key] = number
    return out


def _read_vitis(path: str, text: str) -> ConfigValues:
    # Darknet's cfg reader refuses unknown sections such as [pruning]: read the block by hand, keeping line numbers.
    out = ConfigValues(path)
    out.vitis = True
    inside = False
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("["):
            inside = line.lower() == "[pruning]"
            continue
        if not inside:
            continue
        if "=" not in line:
            raise DarkpruneError(f"{path}:{number}: expected key=value in [pruning], got '{raw.strip()}'")
        key, value = (part.strip() for part in line.split("=", 1))
        if key not in VITIS_KEYS:
            warnings.warn(f"{path}:{number}: [pruning] key '{key}' is not supported by darkprune and is ignored")
            continue
        ours = VITIS_KEYS[key]
        if ours in out:
            raise DarkpruneError(f"{path}:{number}: '{key}' is set twice")
        if ours == "criterion":
            value = VITIS_CRITERIA.get(value, value)
        out[ours] = value
        out.lines[ours] = number
    return out



def has_pruning_section(path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return any(line.strip().lower() == "[pruning]" for line in fh)
    except OSError:
        return False


def pruning_settings(command: str, given: dict, keys: list[str], known_keys: set[str] = frozenset(),
                     defaults: dict = DEFAULTS) -> Settings:
    """The settings of one pruning step: `given` holds the values set on the command line (None/False/"" for not
    set), `keys` the step's own settings, `known_keys` every key some darkprune command takes (a shared config may
    hold them; others are named in a warning)."""
    config_path, cfg_arg = given.get("config"), given.get("cfg")
    given = dict(given)
    if cfg_arg and has_pruning_section(cfg_arg):
        if config_path:
            raise DarkpruneError(f"{cfg_arg}: a Vitis AI main cfg given as the model cfg, and the config file "
                                 f"{config_path} too; give one of them")
        config_path, given["cfg"] = cfg_arg, None       # `darkprune ana MAINCFG WEIGHTS`, as vai_p_darknet takes it
    conf = read_config(config_path) if config_path else {}
    unknown = sorted(k for k in conf if k not in PRUNING_KEYS and k not in known_keys)
    if unknown:
        warnings.warn(f"{config_path}: setting(s) {', '.join(unknown)} are not darkprune options and are "
                      f"ignored (known for `darkprune {command}`: {', '.join(sorted(keys))})")
    out = Settings({"config": config_path})
    for key in ["cfg", "weights", "data", "workspace"] + keys:
        value = given.get(key)
        if value is not None and value is not False and value != "":
            out[key] = value
        elif key in conf:
            out[key] = conf[key]
            out.origin[key] = conf.where(key)
        else:
            out[key] = defaults.get(key)
    for key in ("no_prefix_cache", "merge", "compensate", "reconstruct"):
        if key in out:
            out[key] = out.boolean(key)
    if conf.get("out_cfg") and "out" in keys and not given.get("out"):
        out["out"] = str(Path(conf["out_cfg"]).with_suffix(""))
    for key in ("ana_out_file", "prune_out_weights"):
        if key in conf and key not in out:
            out[key] = conf[key]
    if not out.get("cfg"):
        raise DarkpruneError(f"darkprune {command}: no model cfg given (the CFG argument, or modelcfg/cfg in "
                             f"the config)")
    return out
