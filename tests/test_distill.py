"""Distillation finetuning (darkprune.train.distill): the term's value against a closed form written here, its
gradient against central finite differences (at the head's raw outputs and at a conv weight through the whole
backward), 0 when the student equals the teacher, masks held, unlabeled images, resume, the CLI."""
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from darkprune.darknet.cfg import parse_cfg_text
from darkprune.darknet.model import Model
from darkprune.errors import DarkpruneError
from darkprune.prune.groups import build_grouping
from darkprune.prune.masks import Masks, apply_masks
from darkprune.train.backprop import TrainBatch, TrainingNetwork
from darkprune.train.distill import Teacher, softmax_distillation, yolo_distillation
from darkprune.train.finetune import checkpoint_paths, finetune, parameter_masks

YOLO_CFG = """
[net]
width=32
height=32
channels=3
batch=4
subdivisions=1
momentum=0.9
decay=0.0005
learning_rate=0.001
burn_in=1
max_batches=6
policy=constant
jitter=0

[convolutional]
filters=8
size=3
stride=2
pad=1
batch_normalize=1
activation=leaky

[convolutional]
filters=8
size=3
stride=2
pad=1
batch_normalize=1
activation=leaky

[convolutional]
filters={filters}
size=1
stride=1
pad=1
activation=linear

[yolo]
mask=0,1
anchors=6,8, 12,10, 20,24
classes=3
num=3
scale_x_y={scale}
new_coords={new_coords}
ignore_thresh=.5
truth_thresh=1
"""

CLASSIFIER_CFG = """
[net]
width=8
height=8
channels=3
batch=4
subdivisions=1
learning_rate=0.01
momentum=0.9
decay=0.0005
max_batches=4

[convolutional]
filters=6
size=3
stride=2
pad=1
batch_normalize=1
activation=leaky

[connected]
output=5
activation=linear

[softmax]
groups=1
"""


REGION_CFG = YOLO_CFG.split("[yolo]")[0].replace("filters={filters}", "filters=20") + """[region]
anchors=0.5,0.7, 1.2,1.0
classes=5
coords=4
num=2
softmax=1
"""


def region_model(seed=0) -> Model:
    model = Model.from_cfg(parse_cfg_text(REGION_CFG.strip() + "\n", "region.cfg"), seed=seed)
    model.cfg_path = None
    return model


def yolo_model(seed=0, scale=1.05, new_coords=0) -> Model:
    text = YOLO_CFG.format(filters=2 * 8, scale=scale, new_coords=new_coords)
    model = Model.from_cfg(parse_cfg_text(text.strip() + "\n", "tiny.cfg"), seed=seed)
    model.cfg_path = None
    return model


def classifier(seed=0) -> Model:
    model = Model.from_cfg(parse_cfg_text(CLASSIFIER_CFG.strip() + "\n", "cls.cfg"), seed=seed)
    model.cfg_path = None
    return model


def head(model: Model):
    return [layer for layer in model.graph if layer.type == "yolo"][0]


# ------------------------------------------------------------------------------------------------------------
# an independent closed form of the [yolo] term

def sigmoid(v):
    return 1 / (1 + np.exp(-v))


def binary_kl(p, q):
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / q), 0.0)
        b = np.where(p < 1, (1 - p) * np.log(np.where(p < 1, 1 - p, 1) / (1 - q)), 0.0)
    return a + b


def reference_yolo_term(raw, teacher, classes, scale, new_coords):
    """KL(obj) + o * sum KL(classes) + o * 0.5 * |box - teacher's|^2 (centre in grid cells, log sizes), from
    Darknet's get_yolo_box (the anchors and the cell offsets cancel in the differences)."""
    n, _, h, w = raw.shape
    r = raw.reshape(n, -1, 5 + classes, h, w).astype(np.float64)
    t = teacher.reshape(r.shape).astype(np.float64)
    act = (lambda v: v) if new_coords else sigmoid
    s_obj, t_obj = act(r[:, :, 4]), t[:, :, 4]
    total = binary_kl(t_obj, s_obj).sum()
    total += (t_obj[:, :, None] * binary_kl(t[:, :, 5:], act(r[:, :, 5:]))).sum()
    s_xy = act(r[:, :, :2]) * scale - 0.5 * (scale - 1)
    size = (lambda v: np.log(4 * v ** 2)) if new_coords else (lambda v: v)
    err = ((s_xy - t[:, :, :2]) ** 2).sum(2) + ((size(r[:, :, 2:4]) - size(t[:, :, 2:4])) ** 2).sum(2)
    return total + (t_obj * 0.5 * err).sum()


def teacher_activations(rng, shape, classes, scale, new_coords):
    """What a teacher's [yolo] layer outputs: probabilities in x, y (scaled), objectness, classes; raw w, h."""
    t = rng.uniform(0.02, 0.98, shape)
    v = t.reshape(shape[0], -1, 5 + classes, *shape[2:])
    v[:, :, :2] = v[:, :, :2] * scale - 0.5 * (scale - 1)
    v[:, :, 2:4] = rng.uniform(0.2, 0.8, v[:, :, 2:4].shape) if new_coords else rng.normal(0, 0.5, v[:, :, 2:4].shape)
    v[0, 0, 4, 0, 0] = 0.0                 # a hard 0 and a hard 1 objectness target
    v[0, 1, 4, 1, 1] = 1.0
    return t


@pytest.mark.parametrize("new_coords", [0, 1])
def test_yolo_term_matches_closed_form_and_finite_differences(new_coords):
    scale = 1.05
    model = yolo_model(scale=scale, new_coords=new_coords)
    layer = head(model)
    shape = (2,) + tuple(model.graph[layer.inputs[0]].out_shape)
    rng = np.random.default_rng(1)
    raw = rng.uniform(0.1, 0.9, shape) if new_coords else rng.normal(0, 1.5, shape)
    teacher = teacher_activations(rng, shape, 3, scale, new_coords)
    loss, grad, parts = yolo_distillation(raw, teacher, layer)
    scale32 = float(np.float32(scale))
    ref = reference_yolo_term(raw, teacher, 3, scale32, new_coords)
    assert loss == pytest.approx(ref, rel=1e-10)
    assert loss == pytest.approx(sum(parts.values()), rel=1e-12)
    assert min(parts.values()) > 0
    # the loss sums ~2000 terms, so a small step drowns in its rounding: a larger one with the fourth-order
    # central difference (-f(2h) + 8 f(h) - 8 f(-h) + f(-2h)) / 12h
    eps = 1e-4

    def at(idx, step):
        moved = raw.copy()
        moved[idx] += step
        return yolo_distillation(moved, teacher, layer)[0]
    fd = np.empty_like(raw)
    for idx in np.ndindex(raw.shape):
        fd[idx] = (-at(idx, 2 * eps) + 8 * at(idx, eps) - 8 * at(idx, -eps) + at(idx, -2 * eps)) / (12 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=5e-9)


@pytest.mark.parametrize("new_coords", [0, 1])
def test_yolo_term_is_exactly_zero_when_the_student_is_the_teacher(new_coords):
    from darkprune.engine.yolo import yolo_forward
    model = yolo_model(new_coords=new_coords)
    layer = head(model)
    rng = np.random.default_rng(2)
    shape = (3,) + tuple(model.graph[layer.inputs[0]].out_shape)
    raw = (rng.uniform(0.05, 0.95, shape) if new_coords else rng.normal(0, 3, shape)).astype(np.float32)
    raw.reshape(3, 2, 8, 8, 8)[0, 0, 4] = 40.0 if not new_coords else 0.95     # saturated objectness
    teacher = yolo_forward(raw, 2, 3, layer.attrs["scale_x_y"], bool(new_coords))
    loss, grad, parts = yolo_distillation(raw, teacher, layer)
    assert loss == 0.0 and not grad.any() and grad.dtype == np.float32


def test_region_term_matches_closed_form_finite_differences_and_is_zero_at_equality():
    from darkprune.engine.yolo import region_forward
    from darkprune.train.distill import region_distillation
    layer = [x for x in region_model().graph if x.type == "region"][0]
    rng = np.random.default_rng(10)
    shape = (2, 20, 3, 4)
    raw = rng.normal(0, 1.5, shape)
    teacher = region_forward(rng.normal(0, 1.5, shape), 2, 5, 4, True)
    loss, grad, parts = region_distillation(raw, teacher, layer)
    r, t = raw.reshape(2, 2, 10, 3, 4), teacher.reshape(2, 2, 10, 3, 4)
    p_s = np.exp(r[:, :, 5:]) / np.exp(r[:, :, 5:]).sum(2, keepdims=True)
    o = t[:, :, 4]
    ref = binary_kl(o, sigmoid(r[:, :, 4])).sum() + (o * (t[:, :, 5:] * np.log(t[:, :, 5:] / p_s)).sum(2)).sum()
    ref += (o * 0.5 * (((sigmoid(r[:, :, :2]) - t[:, :, :2]) ** 2).sum(2) + ((r[:, :, 2:4] - t[:, :, 2:4]) ** 2)
                       .sum(2))).sum()
    assert loss == pytest.approx(ref, rel=1e-10) and min(parts.values()) > 0
    eps = 1e-4

    def at(idx, step):
        moved = raw.copy()
        moved[idx] += step
        return region_distillation(moved, teacher, layer)[0]
    fd = np.empty_like(raw)
    for idx in np.ndindex(raw.shape):
        fd[idx] = (-at(idx, 2 * eps) + 8 * at(idx, eps) - 8 * at(idx, -eps) + at(idx, -2 * eps)) / (12 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=5e-9)
    same = raw.astype(np.float32)
    zero, g0, _ = region_distillation(same, region_forward(same, 2, 5, 4, True), layer)
    assert zero == 0.0 and not g0.any()


def test_softmax_term_matches_closed_form_finite_differences_and_is_zero_at_equality():
    rng = np.random.default_rng(3)
    logits, teacher = rng.normal(0, 2, (4, 6)), rng.normal(0, 2, (4, 6))
    for temp in (1.0, 4.0):
        loss, grad = softmax_distillation(logits, teacher, temp)
        p_t = np.exp(teacher / temp) / np.exp(teacher / temp).sum(1, keepdims=True)
        p_s = np.exp(logits / temp) / np.exp(logits / temp).sum(1, keepdims=True)
        assert loss == pytest.approx(temp ** 2 * (p_t * np.log(p_t / p_s)).sum(), rel=1e-10)
        eps = 1e-6
        fd = np.zeros_like(logits)
        for idx in np.ndindex(logits.shape):
            plus, minus = logits.copy(), logits.copy()
            plus[idx] += eps
            minus[idx] -= eps
            fd[idx] = (softmax_distillation(plus, teacher, temp)[0] - softmax_distillation(minus, teacher, temp)[0]) \
                / (2 * eps)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
        same, g0 = softmax_distillation(teacher, teacher, temp)
        assert same == 0.0 and not g0.any()


# ------------------------------------------------------------------------------------------------------------
# through the whole backward

def conv_weight_check(student: Model, teacher: Model, images: np.ndarray, layer_index: int, picks: int = 6):
    net = TrainingNetwork(student, np.float64)
    t = Teacher(teacher, student.graph)
    rng_seed = [0, 1, 2]

    def loss_at() -> float:
        net.forward(images, train=True, rng=np.random.default_rng(rng_seed), outputs=[])
        return t.loss(net.output, images)[0]

    net.forward(images, train=True, rng=np.random.default_rng(rng_seed), outputs=[])
    loss, seeds, _ = t.loss(net.output, images)
    assert loss > 0
    net.backward(seeds)
    analytic = net.gradients()[layer_index]["weights"]
    w = student.params[layer_index]["weights"]
    rng = np.random.default_rng(4)
    eps = 1e-6
    for flat in rng.choice(w.size, picks, replace=False):
        idx = np.unravel_index(flat, w.shape)
        keep = w[idx]
        w[idx] = keep + eps
        up = loss_at()
        w[idx] = keep - eps
        down = loss_at()
        w[idx] = keep
        fd = (up - down) / (2 * eps)
        assert analytic[idx] == pytest.approx(fd, rel=1e-5, abs=1e-9), f"weight {idx}"


def test_yolo_distillation_gradient_at_a_conv_weight_matches_finite_differences():
    images = np.random.default_rng(5).random((2, 3, 32, 32))
    conv_weight_check(yolo_model(0), yolo_model(7), images, 0)
    conv_weight_check(yolo_model(0), yolo_model(7), images, 2)


def test_region_distillation_gradient_at_a_conv_weight_matches_finite_differences():
    images = np.random.default_rng(11).random((2, 3, 32, 32))
    conv_weight_check(region_model(0), region_model(8), images, 1)


def test_softmax_distillation_gradient_at_a_conv_weight_matches_finite_differences():
    images = np.random.default_rng(6).random((3, 3, 8, 8))
    conv_weight_check(classifier(0), classifier(9), images, 0)


def test_teacher_must_fit_the_student():
    with pytest.raises(DarkpruneError, match=r"teacher's \[yolo\] head differs"):
        Teacher(yolo_model(scale=1.0), yolo_model().graph)
    with pytest.raises(DarkpruneError, match="temperature"):
        Teacher(yolo_model(), yolo_model().graph, temperature=3.0)
    with pytest.raises(DarkpruneError, match="input"):
        Teacher(classifier(), yolo_model().graph)


# ------------------------------------------------------------------------------------------------------------
# finetuning with a teacher

def shapes_dataset(folder: Path, count: int = 6, labeled=None) -> Path:
    """Bright rectangles on noise; images/ and labels/ as Darknet's rule finds them; `labeled`: which get a label
    file (default all)."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(count):
        img = rng.integers(0, 120, (32, 32, 3)).astype(np.uint8)
        x, y, w, h = rng.integers(2, 12, 4)
        img[y:y + h + 6, x:x + w + 6] = 230
        path = folder / "images" / f"im{k}.png"
        cv2.imwrite(str(path), img)
        names.append(str(path))
        if labeled is None or labeled[k]:
            cx, cy = (x + (w + 6) / 2) / 32, (y + (h + 6) / 2) / 32
            (folder / "labels" / f"im{k}.txt").write_text(f"{k % 3} {cx:.4f} {cy:.4f} {(w + 6) / 32:.4f} "
                                                          f"{(h + 6) / 32:.4f}\n")
    (folder / "train.txt").write_text("\n".join(names) + "\n")
    (folder / "names.txt").write_text("a\nb\nc\n")
    data = folder / "shapes.data"
    data.write_text("classes=3\ntrain=train.txt\nvalid=train.txt\nnames=names.txt\n")
    return data


def test_finetune_with_a_teacher_never_revives_a_pruned_weight(tmp_path):
    data = shapes_dataset(tmp_path / "d")
    teacher = yolo_model(11)
    model = teacher.copy()
    grouping = build_grouping(model.graph)
    masks = Masks.for_model(model, {g.id: np.arange(g.channels // 2) for g in grouping.groups
                                    if g.prunable and g.channels > 1})
    masked = apply_masks(model, masks)
    before = masked.copy()
    result = finetune(masked, data, iters=4, learning_rate=0.01, teacher=teacher, distill_weight=2.0,
                      progress=False)
    keep, _ = parameter_masks(before, masks)
    assert keep
    for (i, name), mask in keep.items():
        arr = result.model.params[i][name]
        assert not arr[~mask].any(), f"layer {i} {name}: a pruned entry came back"
        assert not np.array_equal(arr[mask], before.params[i][name][mask])
    assert result.to_json()["distill"]["distill_weight"] == 2.0


def test_unlabeled_images_get_only_distillation(tmp_path):
    from darkprune.train.loop import LoopSettings, TrainingLoop
    from darkprune.train.yolo_loss import yolo_loss
    model = yolo_model(12)
    net = TrainingNetwork(model)
    images = np.random.default_rng(8).random((3, 3, 32, 32)).astype(np.float32)
    truths = [np.array([[1, 0.5, 0.5, 0.3, 0.4]], np.float32), np.zeros((0, 5), np.float32),
              np.array([[2, 0.3, 0.6, 0.2, 0.2]], np.float32)]
    net.forward(images, train=True, outputs=[])
    loop = TrainingLoop(model, net, None, None, None, LoopSettings(iters=1, mini_batch=3, subdivisions=1))
    src = head(model).inputs[0]
    got = loop._task_loss(TrainBatch(images, truths=truths, labeled=np.array([True, False, True])), 3)
    raw = net.output(src)
    alone = yolo_loss(raw[[0, 2]], [truths[0], truths[2]], head(model), 32, 32)
    np.testing.assert_array_equal(got.seeds[src][[0, 2]], alone.grad)
    assert not got.seeds[src][1].any()
    everything = yolo_loss(raw, truths, head(model), 32, 32)          # without `labeled`: "no objects" in image 1
    assert everything.grad[1].any()
    assert loop._task_loss(TrainBatch(images, truths=truths, labeled=np.zeros(3, bool)), 3) is None


def test_an_unlabeled_train_list_needs_a_teacher(tmp_path):
    data = shapes_dataset(tmp_path / "d", labeled=[False] * 6)
    with pytest.warns(Warning):
        with pytest.raises(DarkpruneError, match="no training image has a label file; give a teacher"):
            finetune(yolo_model(), data, iters=1, progress=False)
    with pytest.warns(Warning, match="6 of 6 images have no label file .with the teacher: distillation only"):
        result = finetune(yolo_model(), data, iters=2, teacher=yolo_model(5), progress=False)
    assert all(math.isfinite(v) and v > 0 for v in result.losses)


class Crash(Exception):
    pass


def test_resume_with_a_teacher_is_bit_identical(tmp_path):
    data = shapes_dataset(tmp_path / "d", labeled=[True, False, True, True, False, True])
    teacher = yolo_model(21)
    common = dict(iters=5, learning_rate=0.005, checkpoint_every=2, seed=3, progress=False, teacher=teacher,
                  distill_weight=0.5)
    straight = finetune(yolo_model(1), data, workspace=tmp_path / "a", **common)

    def crash_at_3(state):
        if state.iteration == 3:
            raise Crash()
    with pytest.raises(Crash):
        finetune(yolo_model(1), data, workspace=tmp_path / "b", callbacks={"on_iteration": crash_at_3}, **common)
    assert [p.name for p in checkpoint_paths(tmp_path / "b" / "finetune")] == ["checkpoint-0000002.npz"]
    resumed = finetune(yolo_model(1), data, workspace=tmp_path / "b", resume=True, **common)
    assert resumed.start_iteration == 2 and resumed.losses == straight.losses
    assert (tmp_path / "a" / "finetuned.weights").read_bytes() == (tmp_path / "b" / "finetuned.weights").read_bytes()
    # another weight, another teacher or none: refused
    for change in ({"distill_weight": 1.0}, {"teacher": yolo_model(22)}, {"teacher": None}):
        with pytest.raises(DarkpruneError, match="other settings"):
            finetune(yolo_model(1), data, workspace=tmp_path / "b", resume=True, **{**common, **change})


def test_cli_finetune_with_the_original_as_teacher(tmp_path, capsys):
    from darkprune.cli import main
    from darkprune.prune.masks import structure_fingerprint
    from darkprune.workflow.workspace import Workspace
    data = shapes_dataset(tmp_path / "d")
    original = yolo_model(31)
    cfg, weights = tmp_path / "orig.cfg", tmp_path / "orig.weights"
    original.save(cfg, weights)
    from darkprune.darknet import load
    original = load(cfg, weights)
    ws = Workspace(tmp_path / "ws", create=True)
    ws.bind_model(original, structure_fingerprint(original.graph))
    student = original.copy()
    student.params[0]["weights"] *= 0.5
    student.save(ws.file("pruned.cfg"), ws.file("pruned.weights"))
    code = main(["finetune", "-w", str(ws.path), "--data", str(data), "--iters", "2", "--teacher", "original",
                 "--distill-weight", "0.25", "--json", "-q"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["teacher"] == "original" and payload["distill_weight"] == 0.25
    assert payload["distill"]["teacher_weights"] == str(weights)
    code = main(["finetune", "-w", str(ws.path), "--data", str(data), "--iters", "1", "--teacher", str(cfg),
                 "-q"])
    assert code != 0
    assert "teacher_weights" in capsys.readouterr().err


def test_classifier_finetunes_towards_its_teacher_on_unlabeled_images(tmp_path):
    rng = np.random.default_rng(9)
    folder = tmp_path / "c"
    folder.mkdir()
    names = []
    for k in range(6):
        path = folder / f"img{k}.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (8, 8, 3)).astype(np.uint8))
        names.append(path.name)
    (folder / "train.txt").write_text("\n".join(names) + "\n")
    (folder / "labels.txt").write_text("zebra\nyak\nwolf\nvole\nurial\n")
    data = folder / "c.data"
    data.write_text("classes=5\ntrain=train.txt\nvalid=train.txt\nlabels=labels.txt\n")
    with pytest.warns(Warning):
        with pytest.raises(DarkpruneError, match="no training image has a label name in its path"):
            finetune(classifier(), data, iters=1, progress=False)
    teacher, student = classifier(3), classifier(4)
    images = np.random.default_rng(1).random((4, 3, 8, 8)).astype(np.float32)
    t = Teacher(teacher, student.graph)

    def gap() -> float:
        net = TrainingNetwork(student)
        net.forward(images, train=False, outputs=[])
        return t.loss(net.output, images)[0]
    before = gap()
    with pytest.warns(Warning):
        result = finetune(student, data, iters=4, learning_rate=0.05, teacher=teacher, distill_temperature=2.0,
                          progress=False)
    assert result.distill["distill_temperature"] == 2.0
    assert gap() < before
