"""`darkprune prune --steps K`: reach the target in K cuts, each recovered before the next (prune/gradual.py).

Between cuts the model is finetuned for `--step-iters` iterations on the .data file's train= list (never its
valid= list, on which the steps are measured), with the masks held; with `--teacher original` these finetunes are
distilled from the unpruned model (train/distill.py). With `--compensate` or `--reconstruct` each cut is compensated
(and its readers refitted on the calibration images) before its finetune. The last step's masked pair, masks and plan are
written where a one-cut `prune` writes them, so `finetune` and `transform` follow as usual; every finished step is
kept in WORKSPACE/gradual/step<i>/. Rerunning the same command resumes at the first unfinished step; other settings
start the steps afresh.
"""
from __future__ import annotations

import json
import shutil

from ..errors import DarkpruneError, SettingError
from .settings import Settings

STEP_KEYS = ["steps", "step_iters", "step_lr", "seed", "teacher", "distill_weight"]
GRADUAL_DIR = "gradual"


def gradual_values(s: Settings) -> dict:
    from ..prune.gradual import check_steps
    steps = check_steps(s.get("steps") or 1)
    iters = s.whole("step_iters")
    if steps > 1 and iters is None:
        raise SettingError("step_iters", "step_iters is required with steps > 1: the finetuning iterations after "
                                         "each cut (e.g. 100)")
    teacher = s.get("teacher")
    if teacher not in (None, "", "original"):
        raise SettingError("teacher", f"teacher {teacher}: the steps of `prune` distil from the model being pruned "
                                      f"only: give 'original' (or finetune afterwards with another teacher)")
    if teacher and steps == 1:
        raise SettingError("teacher", "teacher: distillation is for the finetunes between cuts (steps > 1); for one "
                                      "cut, run `darkprune finetune --teacher original` afterwards")
    weight = s.number("distill_weight", low=0)
    return {"steps": steps, "step_iters": iters or 0, "step_lr": s.number("step_lr"),
            "seed": s.whole("seed", low=0) or 0, "teacher": bool(teacher),
            "distill_weight": 1.0 if weight is None else weight}


def _training_data(path):
    """The .data file whose train= list the steps finetune on (the one given, else the analysis'); refused when
    it has none."""
    from ..data import load_data
    if not path:
        raise SettingError("data", "data F.data is required with steps > 1 (its train= list is finetuned on)")
    train = load_data(path, split="train")
    if not len(train):
        raise DarkpruneError(f"{path}: its train= list holds no images; the steps need images to finetune on")
    return path


def _resumable(folder, record: dict) -> bool:
    """True when WORKSPACE/gradual holds steps of a run with the same settings; otherwise it is cleared."""
    marker = folder / "run.json"
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == record:
                return True
        except (OSError, ValueError):
            pass
    if folder.exists():
        shutil.rmtree(folder)
    return False


def run_gradual(s: Settings, model, ws, sens, dataset, values: dict, divisible: int, excluded, progress: bool,
                log, extra_options: dict | None = None, calibration=None, compensate: bool = True):
    """The last step's masked model (its .masks set), its plan and the per-step records."""
    from ..prune.gradual import prune_gradually
    from ..prune.plan import check_cost
    from ..util.jsonio import write_json
    rate, threshold = s.number("rate"), s.number("threshold")
    data = _training_data(s.get("data") or sens.data)
    options = {"seed": values["seed"], "learning_rate": values["step_lr"], **(extra_options or {})}
    if values["teacher"]:           # distil each step's finetune from the unpruned model
        options.update(teacher=model, distill_weight=values["distill_weight"])
    folder = ws.file(GRADUAL_DIR)
    record = {"rate": rate, "threshold": threshold, "by": str(s.get("by") or "bflops"), "steps": values["steps"], "step_iters": values["step_iters"],
              "divisible": divisible, "exclude": sorted(int(g) for g in excluded), "weights": str(model.weights_path),
              "data": str(data), "teacher": values["teacher"], "distill_weight": values["distill_weight"],
              "options": {k: str(v) for k, v in sorted(options.items()) if k != "teacher"},
              "calibration": None if calibration is None else len(calibration), "compensate": compensate}
    resume = _resumable(folder, record)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "run.json", record)
    result = prune_gradually(model, sens, values["steps"], data, values["step_iters"], rate=rate,
                             threshold=threshold, compensate=compensate, calibration=calibration, eval_data=dataset,
                             exclude=excluded, divisible=divisible, finetune_options=options, workspace=folder,
                             resume=resume, progress=progress, log=log, cost=check_cost(s.get("by")))
    return result
