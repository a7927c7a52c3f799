"""The finetune loop (darkprune.train.finetune) on tiny models: bit-identical resume after a crash, masks held
exactly (channel masks and fine-grained zeros), corrupt checkpoints refused, a classifier that actually learns, the
schedule compressed to the chosen iterations, callbacks."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from darkprune.darknet.cfg import parse_cfg_text
from darkprune.darknet.model import Model
from darkprune.errors import DarkpruneError
from darkprune.prune.groups import build_grouping
from darkprune.prune.masks import Masks, apply_masks
from darkprune.train.finetune import (checkpoint_paths, finetune, finetune_schedule, parameter_masks)

ROOT = Path(__file__).resolve().parents[1]
VAL_DATA = ROOT / "data" / "coco128-val" / "coco128-val.data"    # bundled: 128 labelled COCO images

TINY_YOLO = """
[net]
width=32
height=32
channels=3
batch=4
subdivisions=2
momentum=0.9
decay=0.0005
learning_rate=0.0005
burn_in=2
max_batches=6
policy=steps
steps=4
scales=.1
hue=.1
saturation=1.5
exposure=1.5

[convolutional]
filters=8
size=3
stride=2
pad=1
batch_normalize=1
activation=leaky

[convolutional]
filters=8
groups=8
size=3
stride=1
pad=1
batch_normalize=1
activation=leaky

[convolutional]
filters=16
size=1
stride=1
pad=1
batch_normalize=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
filters=16
size=3
stride=1
pad=1
batch_normalize=1
activation=leaky

[shortcut]
from=-2
activation=linear

[dropout]
probability=0.1

[convolutional]
filters=255
size=1
stride=1
pad=1
activation=linear

[yolo]
mask=0,1,2
anchors=10,14, 23,27, 37,58
classes=80
num=3
jitter=.2
ignore_thresh=.5
truth_thresh=1
"""


def tiny_yolo(seed: int = 0) -> Model:
    model = Model.from_cfg(parse_cfg_text(TINY_YOLO.strip() + "\n", "tiny-yolo.cfg"), seed=seed)
    model.cfg_path = None
    return model


def params_equal(a: Model, b: Model) -> bool:
    return all(np.array_equal(a.params[i][k], b.params[i][k]) for i in a.params for k in a.params[i])


def channel_masks(model: Model, share: float = 0.5) -> Masks:
    grouping = build_grouping(model.graph)
    pruned = {g.id: np.arange(int(g.channels * share)) for g in grouping.groups if g.prunable and g.channels > 1}
    assert pruned, "the tiny model must have prunable groups"
    return Masks.for_model(model, pruned)


class Crash(Exception):
    pass


# ----------------------------------------------------------------------------------------------------------------
def test_resume_after_a_crash_is_bit_identical(tmp_path):
    common = dict(iters=6, learning_rate=0.001, checkpoint_every=3, seed=1, progress=False)
    straight = finetune(tiny_yolo(), VAL_DATA, workspace=tmp_path / "a", **common)
    assert straight.iterations == 6 and len(straight.losses) == 6
    assert all(np.isfinite(straight.losses))

    def crash_at_4(state):
        if state.iteration == 4:           # after the checkpoint of iteration 3, before the one of 6
            raise Crash()

    with pytest.raises(Crash):
        finetune(tiny_yolo(), VAL_DATA, workspace=tmp_path / "b", callbacks={"on_iteration": crash_at_4}, **common)
    assert [p.name for p in checkpoint_paths(tmp_path / "b" / "finetune")] == ["checkpoint-0000003.npz"]
    resumed = finetune(tiny_yolo(), VAL_DATA, workspace=tmp_path / "b", resume=True, **common)
    assert resumed.start_iteration == 3 and resumed.iterations == 6
    assert resumed.losses == straight.losses and resumed.avg_losses == straight.avg_losses
    assert params_equal(resumed.model, straight.model)
    assert (tmp_path / "a" / "finetuned.weights").read_bytes() == (tmp_path / "b" / "finetuned.weights").read_bytes()

    other = finetune(tiny_yolo(), VAL_DATA, iters=2, learning_rate=0.001, seed=2, progress=False)
    assert other.losses[0] != straight.losses[0]      # another seed draws other images


def test_corrupt_or_truncated_checkpoint_is_refused(tmp_path):
    finetune(tiny_yolo(), VAL_DATA, iters=2, workspace=tmp_path, checkpoint_every=2, progress=False)
    ckpt = checkpoint_paths(tmp_path / "finetune")[-1]
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(DarkpruneError, match="checksum mismatch.*corrupt or truncated"):
        finetune(tiny_yolo(), VAL_DATA, iters=4, workspace=tmp_path, resume=True, progress=False)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0x40
    ckpt.write_bytes(bytes(flipped))
    with pytest.raises(DarkpruneError, match="checksum mismatch"):
        finetune(tiny_yolo(), VAL_DATA, iters=4, workspace=tmp_path, resume=True, progress=False)
    # settings that differ from the checkpoint's are refused too
    ckpt.write_bytes(data)
    with pytest.raises(DarkpruneError, match="other settings.*learning_rate"):
        finetune(tiny_yolo(), VAL_DATA, iters=4, learning_rate=0.1, workspace=tmp_path, resume=True,
                 progress=False)


def test_channel_masks_stay_exactly_zero(tmp_path):
    from darkprune.workflow.steps import transform_and_check
    model = tiny_yolo(3)
    masks = channel_masks(model)
    masked = apply_masks(model, masks)
    before = masked.copy()
    result = finetune(masked, VAL_DATA, iters=4, learning_rate=0.01, progress=False)
    keep, stats = parameter_masks(before, masks)
    assert keep and stats
    for (i, name), mask in keep.items():
        arr = result.model.params[i][name]
        assert not arr[~mask].any(), f"layer {i} {name}: a pruned entry came back"
        assert not np.array_equal(arr[mask], before.params[i][name][mask]), f"layer {i} {name} did not train"
    for i, channels in stats.items():
        assert not result.model.params[i]["rolling_mean"][channels].any()
        assert (result.model.params[i]["rolling_variance"][channels] == 1).all()
    # the finetuned masked model still transforms without changing its outputs
    small, worst = transform_and_check(result.model, masks)
    assert worst < 1e-4 and small.graph.total_params < model.graph.total_params


def test_fine_grained_zeros_stay_zero():
    model = tiny_yolo(4)
    rng = np.random.default_rng(0)
    for i in (2, 4, 7):
        w = model.params[i]["weights"]
        w[rng.random(w.shape) < 0.6] = 0
    zeros = {i: model.params[i]["weights"] == 0 for i in (2, 4, 7)}
    result = finetune(model, VAL_DATA, iters=3, masks="zeros", learning_rate=0.01, progress=False)
    for i, dead in zeros.items():
        w = result.model.params[i]["weights"]
        assert not w[dead].any()
        assert np.count_nonzero(w) == np.count_nonzero(~dead)


# ----------------------------------------------------------------------------------------------------------------
COLOR_CLASSIFIER = """
[net]
width=16
height=16
channels=3
batch=12
subdivisions=1
momentum=0.9
decay=0.0005
learning_rate=0.05
max_batches=40
policy=constant
min_crop=16
max_crop=20
flip=1

[convolutional]
filters=8
size=3
stride=1
pad=1
batch_normalize=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
filters=3
size=1
stride=1
pad=1
activation=linear

[avgpool]

[softmax]
groups=1
"""

COLORS = {"red": (40, 40, 220), "green": (40, 200, 40), "blue": (220, 60, 30)}   # BGR


def color_dataset(folder: Path, per_class: int = 8) -> Path:
    """Squares of one colour on a noisy background; the class name is in the file name (Darknet's rule)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    lists = {"train": [], "valid": []}
    for split, count in (("train", per_class), ("valid", per_class // 2)):
        for name, bgr in COLORS.items():
            for k in range(count):
                img = rng.integers(60, 190, (20, 20, 3)).astype(np.uint8)
                x, y = rng.integers(0, 8, 2)
                img[y:y + 12, x:x + 12] = np.clip(np.array(bgr) + rng.integers(-20, 20, 3), 0, 255)
                path = folder / f"{split}_{k:02d}_{name}.png"
                cv2.imwrite(str(path), img)
                lists[split].append(path.name)
    for split, names in lists.items():
        (folder / f"{split}.txt").write_text("".join(n + "\n" for n in names))
    (folder / "labels.txt").write_text("red\ngreen\nblue\n")
    data = folder / "colors.data"
    data.write_text("classes=3\ntrain=train.txt\nvalid=valid.txt\nlabels=labels.txt\ntop=2\n")
    return data


def test_classifier_learns_and_keeps_the_best(tmp_path):
    data = color_dataset(tmp_path / "colors")
    model = Model.from_cfg(parse_cfg_text(COLOR_CLASSIFIER.strip() + "\n", "colors.cfg"), seed=0)
    seen = {"iterations": [], "evaluations": []}

    class Watch:
        def on_iteration(self, state):
            seen["iterations"].append((state.iteration, state.loss, state.learning_rate))

        def on_evaluation(self, state, metrics):
            seen["evaluations"].append((state.iteration, metrics["top1"]))

    result = finetune(model, data, iters=40, eval_every=20, workspace=tmp_path / "ws", callbacks=Watch(),
                      progress=False)
    assert result.metric == "top1" and result.kept == "best"
    assert [e["iteration"] for e in result.evaluations] == [0, 20, 40]
    assert [k for k, _ in seen["evaluations"]] == [20, 40]
    assert len(seen["iterations"]) == 40 and all(lr == pytest.approx(0.05) for _, _, lr in seen["iterations"])
    assert np.mean(result.losses[-10:]) < 0.6 * np.mean(result.losses[:5])
    assert result.metric_after >= 0.9 > result.metric_before
    assert result.metric_after == max(e["top1"] for e in result.evaluations)
    for name in ("finetuned.cfg", "finetuned.weights", "finetune_loss.png", "finetune_metric.png"):
        assert (tmp_path / "ws" / name).is_file()


def test_stop_from_a_callback():
    def stop_at_2(state):
        state.stop = state.iteration == 2
    result = finetune(tiny_yolo(), VAL_DATA, iters=5, callbacks={"on_iteration": stop_at_2}, progress=False)
    assert result.iterations == 2 and len(result.losses) == 2


def test_schedule_is_compressed_to_the_iterations():
    from darkprune.darknet import load
    model = load(ROOT / "cfg" / "yolo-fastest-1.1.cfg")     # burn_in 4000, steps 400000,450000 of 500000
    s = finetune_schedule(model.graph, 300)
    assert (s.burn_in, s.steps, s.max_batches) == (2, (240, 270), 300)
    assert s.rate(1) == pytest.approx(0.001 * 0.5 ** 4)
    assert s.rate(100) == pytest.approx(0.001)
    assert s.rate(250) == pytest.approx(0.0001)
    assert finetune_schedule(model.graph, 500000, 0.01).steps == (400000, 450000)
