"""darkprune: make Darknet (YOLO) networks smaller and faster without losing accuracy.

    import darkprune as dp
    model = dp.load("yolo.cfg", "yolo.weights")
    data = dp.load_data("coco.data", split="valid")
    print(dp.evaluate(model, data))
    boxes = dp.detect(model, ["dog.jpg"])
    sens = dp.analyze(model, data, rates=[0.25, 0.5, 0.75])   # per-group loss curves
    masked = dp.prune(model, sens.plan(threshold=0.01))       # or sens.plan(rate=0.5); compensate=True folds
                                                              # the pruned channels' constants into their readers;
                                                              # reconstruct=256, data="coco.data" also refits them
                                                              # on 256 images of its train= list
    dp.transform(masked).save("small.cfg", "small.weights")
"""
__version__ = "0.1.0"

import importlib as _importlib  # noqa: E402
import sys as _sys  # noqa: E402
import types as _types  # noqa: E402

from .darknet import Model, load          # noqa: E402
from .errors import DarkpruneError, SettingError  # noqa: E402

__all__ = ["__version__", "Model", "load", "DarkpruneError", "SettingError", "load_data", "evaluate", "detect",
           "finetune", "analyze", "prune", "prune_gradually", "transform", "with_input_size"]

# Loaded on first use: they pull in the numba engine, OpenCV and tqdm (~2 s), which `import darkprune` (and so
# `darkprune info`/`--help`) need not pay. `detect` and `evaluate` are also the names of submodules; when Python
# first imports such a submodule it binds it as a package attribute, which would hide the function. Properties on
# the package's class keep the functions in place (the setter drops that binding; other values override).
_LAZY = {"load_data": ("darkprune.data", "load_data"), "evaluate": ("darkprune.evaluate", "evaluate"),
         "detect": ("darkprune.detect", "detect"), "finetune": ("darkprune.train.finetune", "finetune"),
         "analyze": ("darkprune.prune.analysis", "analyze"), "transform": ("darkprune.prune.transform", "transform"),
         "prune_gradually": ("darkprune.prune.gradual", "prune_gradually"),
         "with_input_size": ("darkprune.darknet.resize", "with_input_size")}


def _lazy_property(name: str, module: str, attr: str) -> property:
    def get(package):
        override = package.__dict__.get("_overrides", {})
        if name in override:
            return override[name]
        return getattr(_importlib.import_module(module), attr)

    def put(package, value):
        if isinstance(value, _types.ModuleType):
            return  # the submodule binding made by the import system
        package.__dict__.setdefault("_overrides", {})[name] = value

    def drop(package):
        package.__dict__.get("_overrides", {}).pop(name, None)

    return property(get, put, drop)


class _Package(_types.ModuleType):
    pass


class _CallablePackage(_types.ModuleType):
    """`darkprune.prune` is both the pruning subpackage (`import darkprune.prune.masks as m` must keep working) and
    the API's `dp.prune(model, plan)`: calling the package calls `darkprune.prune.plan.prune`."""

    def __call__(self, model, plan, exclude=(), compensate=False, reconstruct=None, data=None, progress=False):
        return _importlib.import_module("darkprune.prune.plan").prune(model, plan, exclude, compensate=compensate,
                                                                      reconstruct=reconstruct, data=data,
                                                                      progress=progress)


def _prune_package(package):
    module = _importlib.import_module("darkprune.prune")
    if not isinstance(module, _CallablePackage):
        module.__class__ = _CallablePackage
    return module


for _name, (_module, _attr) in _LAZY.items():
    setattr(_Package, _name, _lazy_property(_name, _module, _attr))
_Package.prune = property(_prune_package, lambda package, value: None)
_sys.modules[__name__].__class__ = _Package
