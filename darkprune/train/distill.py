"""Distillation: a term of the training loss that pulls the student's head outputs towards a teacher's.

    hook = Distillation(teacher_model, student_model.graph, weight=1.0)
    TrainingLoop(..., hooks=[hook, ...])          # finetune(..., teacher=teacher_model) does this

The teacher (typically the unpruned model) runs through the engine's inference Network (batch norm folded, rolling
statistics) on the very mini-batch the student sees, augmentation included; its outputs are constants. The term's
gradient is w.r.t. the student's raw head outputs (the input of each [yolo] head, or the logits of the [softmax]),
seeded there and run through the ordinary backward, so masks, stopbackward and the optimizer apply as to the task
loss. Like the task losses it is a sum over the batch's images (the optimizer divides by the batch).

[yolo] heads (k-th head of the student against the k-th of the teacher: same mask, anchors, classes and grid).
Both sides are decoded as Darknet's [yolo] layer and get_yolo_box do: s = the layer's activations (logistic on x, y,
objectness and classes, then x, y <- x*scale_x_y - (scale_x_y - 1)/2; with new_coords=1 no logistic), the box
centre (i + x, j + y) in grid cells, the size exp(w)*anchor_w/net_w, exp(h)*anchor_h/net_h (new_coords:
4 w^2 anchor/net). Per anchor cell, with t the teacher's values and o = t's objectness:
    KL(t_obj || s_obj) + o * sum_c KL(t_c || s_c)
      + box_weight * o * 0.5 * [(s_x - t_x)^2 + (s_y - t_y)^2 + (log s_w - log t_w)^2 + (log s_h - log t_h)^2]
where KL(p || q) = p log(p/q) + (1-p) log((1-p)/(1-q)) is the binary cross-entropy of q against the soft target p
minus p's own entropy: the same gradient as the BCE, but 0 (and its gradient 0) when the student equals the teacher.
Through the logistic, d/dz of KL(t || sigma(z)) is sigma(z) - t. The box is compared where Darknet's own mse box
loss compares it: the centre in grid cells, the size in log space (so the anchor cancels: log s_w - log t_w is the
raw difference, 2 log(s_w / t_w) with new_coords). An L2 on the sizes themselves (exp of the raw values) was tried
first: on random-weight models it gave a box term of 1e4 and inf in the second iteration, and it hardly weighs
small boxes. Logs are taken of max(q, 1e-30) so a saturated float32 output (q == 1) gives a large finite loss, not
inf; the gradient is unaffected.

Classifiers (the last [softmax] layer's input, the logits z; `groups` honoured): with temperature T,
    T^2 * KL(softmax(z_t / T) || softmax(z / T)),  gradient T * (softmax(z / T) - softmax(z_t / T))
(Hinton et al.'s scaling, so the gradient's size does not shrink with T). 0 when the logits are equal.

[region] heads (YOLOv2, coords=4, softmax=1): the same terms on the region layer's activations (logistic x, y and
objectness, raw w, h, softmax classes), the classes' KL being the softmax's (region_distillation).
"""
from __future__ import annotations

import hashlib

import numpy as np
from numba import njit

from ..darknet.model import Model
from ..engine.network import Network
from ..engine.yolo import region_forward, yolo_forward
from ..errors import DarkpruneError
from .loop import Hooks

YOLO_TEMPERATURE = 1.0          # [yolo] heads: the temperature is not used (their outputs are per-value logistics)
CLASSIFIER_TEMPERATURE = 4.0    # classifiers: Hinton et al.'s usual softening
LOG_FLOOR = 1e-30


# ---------------------------------------------------------------------------------------------------------------
# [yolo]

@njit(cache=True, error_model="numpy")
def _kl(p, q):
    """Binary KL(p || q), q floored at LOG_FLOOR on both sides."""
    loss = 0.0
    if p > 0.0:
        loss += p * (np.log(p) - np.log(max(q, 1e-30)))
    if p < 1.0:
        loss += (1.0 - p) * (np.log(1.0 - p) - np.log(max(1.0 - q, 1e-30)))
    return loss


@njit(cache=True, error_model="numpy")
def _prob_grad(z, s, t, logistic):
    """d KL(t || s(z)) / dz: s - t through the logistic, (s - t) / (s (1 - s)) for a raw probability."""
    if logistic:
        return s - t
    d = s * (1.0 - s)
    return (s - t) / d if d > 0.0 else 0.0


@njit(cache=True, error_model="numpy")
def _log_size(raw, new_coords):
    """(log of the decoded w or h up to its constant log(anchor / net), its derivative w.r.t. the raw value)."""
    if new_coords:                   # 4 raw^2 anchor / net
        v = max(raw, 1e-30)
        return 2.0 * np.log(v), (2.0 / raw if raw > 1e-30 else 0.0)
    return raw, 1.0                  # exp(raw) anchor / net


@njit(cache=True, error_model="numpy")
def _yolo_distill_kernel(z, s, t, mask, classes, scale, beta, new_coords, box_weight, grad, terms):
    """Loss terms (objectness, classes, box) summed into `terms`, dL/dz into `grad` (see the module doc)."""
    n_batch, _, lh, lw = z.shape
    num = mask.shape[0]
    entries = 5 + classes
    logistic = not new_coords
    for b in range(n_batch):
        for a in range(num):
            c0 = a * entries
            for j in range(lh):
                for i in range(lw):
                    to = np.float64(t[b, c0 + 4, j, i])
                    so = np.float64(s[b, c0 + 4, j, i])
                    terms[0] += _kl(to, so)
                    grad[b, c0 + 4, j, i] = _prob_grad(z[b, c0 + 4, j, i], so, to, logistic)
                    for c in range(classes):
                        ch = c0 + 5 + c
                        tc = np.float64(t[b, ch, j, i])
                        sc = np.float64(s[b, ch, j, i])
                        terms[1] += to * _kl(tc, sc)
                        grad[b, ch, j, i] = to * _prob_grad(z[b, ch, j, i], sc, tc, logistic)
                    wo = box_weight * to
                    for e in range(2):          # x, y: the box centre, in grid cells
                        sv = np.float64(s[b, c0 + e, j, i])
                        d = sv - np.float64(t[b, c0 + e, j, i])
                        terms[2] += wo * 0.5 * d * d
                        deriv = scale
                        if logistic:
                            sig = (sv - beta) / scale
                            deriv *= sig * (1.0 - sig)
                        grad[b, c0 + e, j, i] = wo * d * deriv
                    for e in range(2, 4):       # w, h: log of the box size
                        sv, deriv = _log_size(np.float64(z[b, c0 + e, j, i]), new_coords)
                        tv, _ = _log_size(np.float64(t[b, c0 + e, j, i]), new_coords)
                        d = sv - tv
                        terms[2] += wo * 0.5 * d * d
                        grad[b, c0 + e, j, i] = wo * d * deriv


def yolo_distillation(raw: np.ndarray, teacher_out: np.ndarray, layer, box_weight: float = 1.0) -> tuple[float, np.ndarray, dict]:
    """The [yolo] distillation term of one head: (loss, dL/d raw, {"objectness", "classes", "box": loss parts}).

    raw: the student's head input (N, len(mask)*(5+classes), H, W); teacher_out: the teacher's [yolo] layer output
    (its activations, as the inference Network leaves them), same shape; layer: the student's [yolo] Layer."""
    a = layer.attrs
    raw = np.ascontiguousarray(raw)
    if raw.dtype not in (np.float32, np.float64):
        raw = raw.astype(np.float32)
    teacher_out = np.ascontiguousarray(teacher_out, raw.dtype)
    if teacher_out.shape != raw.shape:
        raise DarkpruneError(f"{layer.where()}: the teacher's head output {teacher_out.shape} does not match the "
                             f"student's {raw.shape}")
    s = yolo_forward(raw, len(a["mask"]), a["classes"], a["scale_x_y"], bool(a["new_coords"]))
    # the affine x, y step as the engine applies it (scale_x_y as a float, see engine.yolo._xy_affine)
    scale = float(np.float32(a["scale_x_y"]))
    beta = float(np.float32(-0.5 * (scale - 1.0)))
    grad = np.zeros(raw.shape, np.float64)
    terms = np.zeros(3, np.float64)
    _yolo_distill_kernel(raw, s, teacher_out, np.asarray(a["mask"], np.int64), int(a["classes"]), scale, beta,
                         bool(a["new_coords"]), float(box_weight), grad, terms)
    parts = {"objectness": float(terms[0]), "classes": float(terms[1]), "box": float(terms[2])}
    return float(terms.sum()), grad.astype(raw.dtype), parts


# ---------------------------------------------------------------------------------------------------------------
# [region]

def region_distillation(raw: np.ndarray, teacher_out: np.ndarray, layer,
                        box_weight: float = 1.0) -> tuple[float, np.ndarray, dict]:
    """The [region] (YOLOv2) term of one head, as yolo_distillation's: objectness binary KL, the classes' softmax
    KL(t || s) weighted by the teacher's objectness, the box (logistic x, y in grid cells, raw w, h = log sizes)
    weighted the same. raw: the head's input; teacher_out: the teacher's [region] output (its activations)."""
    a = layer.attrs
    num, classes, coords = int(a["num"]), int(a["classes"]), int(a["coords"])
    if coords != 4 or not a["softmax"]:
        raise DarkpruneError(f"{layer.where()}: distillation of a [region] head needs coords=4 and softmax=1")
    raw = np.ascontiguousarray(raw)
    if raw.dtype not in (np.float32, np.float64):
        raw = raw.astype(np.float32)
    if np.shape(teacher_out) != raw.shape:
        raise DarkpruneError(f"{layer.where()}: the teacher's head output {np.shape(teacher_out)} does not match "
                             f"the student's {raw.shape}")
    n, _, h, w = raw.shape
    s = region_forward(raw, num, classes, coords, True).astype(np.float64).reshape(n, num, 5 + classes, h, w)
    t = np.asarray(teacher_out, np.float64).reshape(s.shape)
    z = raw.astype(np.float64).reshape(s.shape)
    grad = np.zeros(s.shape)
    so, to = s[:, :, 4], t[:, :, 4]
    obj = _binary_kl(to, so)
    grad[:, :, 4] = so - to
    with np.errstate(divide="ignore", invalid="ignore"):
        log_t = np.where(t[:, :, 5:] > 0, np.log(np.where(t[:, :, 5:] > 0, t[:, :, 5:], 1.0)), 0.0)
    log_s = np.log(np.maximum(s[:, :, 5:], LOG_FLOOR))
    cls = to * (t[:, :, 5:] * (log_t - log_s)).sum(2)
    grad[:, :, 5:] = to[:, :, None] * (s[:, :, 5:] - t[:, :, 5:])
    wo = box_weight * to
    d_xy, d_wh = s[:, :, :2] - t[:, :, :2], z[:, :, 2:4] - t[:, :, 2:4]
    box = wo * 0.5 * ((d_xy ** 2).sum(2) + (d_wh ** 2).sum(2))
    grad[:, :, :2] = wo[:, :, None] * d_xy * s[:, :, :2] * (1 - s[:, :, :2])
    grad[:, :, 2:4] = wo[:, :, None] * d_wh
    parts = {"objectness": float(obj.sum()), "classes": float(cls.sum()), "box": float(box.sum())}
    return float(sum(parts.values())), grad.reshape(raw.shape).astype(raw.dtype), parts


def _binary_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(np.maximum(q, LOG_FLOOR))), 0.0)
        b = np.where(p < 1, (1 - p) * (np.log(np.where(p < 1, 1 - p, 1.0)) - np.log(np.maximum(1 - q, LOG_FLOOR))),
                     0.0)
    return a + b


# ---------------------------------------------------------------------------------------------------------------
# classifiers

def _log_softmax(rows: np.ndarray) -> np.ndarray:
    shifted = rows - rows.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax_distillation(logits: np.ndarray, teacher_logits: np.ndarray, temperature: float = CLASSIFIER_TEMPERATURE,
                         groups: int = 1) -> tuple[float, np.ndarray]:
    """(T^2 * KL(softmax(teacher/T) || softmax(student/T)) summed over the batch, dL/d logits)."""
    x = np.asarray(logits)
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float32)
    if np.shape(teacher_logits) != x.shape:
        raise DarkpruneError(f"the teacher's logits {np.shape(teacher_logits)} do not match the student's {x.shape}")
    temp = float(temperature)
    if not temp > 0:
        raise DarkpruneError(f"distill temperature {temperature}: must be > 0")
    n = x.shape[0]
    rows = x.astype(np.float64).reshape(n * groups, -1) / temp
    trows = np.asarray(teacher_logits, np.float64).reshape(n * groups, -1) / temp
    log_s, log_t = _log_softmax(rows), _log_softmax(trows)
    p_t = np.exp(log_t)
    loss = temp * temp * float((p_t * (log_t - log_s)).sum())
    grad = temp * (np.exp(log_s) - p_t)
    return loss, grad.reshape(x.shape).astype(dtype)


# ---------------------------------------------------------------------------------------------------------------
# the teacher and the hook

def _heads(graph, kind: str) -> list:
    return [layer for layer in graph if layer.type == kind]


def model_digest(model: Model) -> str:
    """A short hash of a model's structure and weights (what a checkpoint records of its teacher)."""
    from ..prune.masks import structure_fingerprint
    h = hashlib.sha256(structure_fingerprint(model.graph).encode())
    h.update(model.weights_bytes())
    return h.hexdigest()[:16]


class Teacher:
    """The teacher's inference Network and which of its layers answer which of the student's: [yolo] heads in
    order, or the logits of the last [softmax]. Checks that the two models fit (input, head shapes and options)."""

    def __init__(self, teacher: Model, student_graph, temperature: float | None = None):
        if not isinstance(teacher, Model):
            raise DarkpruneError(f"teacher must be a darkprune Model, not {type(teacher).__name__}")
        self.model = teacher
        self.graph = student_graph
        tg = teacher.graph
        if tuple(tg.input_shape) != tuple(student_graph.input_shape):
            raise DarkpruneError(f"{teacher.cfg_path}: the teacher's input {tg.input_shape} differs from the "
                                 f"student's {student_graph.input_shape}")
        kind = "region" if _heads(student_graph, "region") else "yolo"
        yolos, tyolos = _heads(student_graph, kind), _heads(tg, kind)
        self.detector = bool(yolos)
        if self.detector:
            self.pairs = self._match_heads(yolos, tyolos, kind)
            self.temperature = YOLO_TEMPERATURE
            if temperature not in (None, 1, 1.0):
                raise DarkpruneError(f"distill temperature {temperature}: [yolo] heads are distilled without one "
                                     f"(it applies to classifiers' softmax)")
        else:
            soft, tsoft = _heads(student_graph, "softmax"), _heads(tg, "softmax")
            if not soft or not tsoft:
                raise DarkpruneError(f"{(teacher.cfg_path if soft else student_graph.cfg.path)}: distillation needs "
                                     f"[yolo] heads or a [softmax] layer in both models")
            s, t = soft[-1], tsoft[-1]
            if tg[t.inputs[0]].out_shape != student_graph[s.inputs[0]].out_shape:
                raise DarkpruneError(f"{t.where()}: the teacher's logits {tg[t.inputs[0]].out_shape} differ from the "
                                     f"student's {student_graph[s.inputs[0]].out_shape}")
            self.pairs = [(s, t.inputs[0])]
            self.temperature = CLASSIFIER_TEMPERATURE if temperature is None else float(temperature)
            if not self.temperature > 0:
                raise DarkpruneError(f"distill temperature {temperature}: must be > 0")
        self.net = Network(teacher)
        self.digest = model_digest(teacher)

    def _match_heads(self, yolos, tyolos, kind: str) -> list:
        if len(yolos) != len(tyolos):
            raise DarkpruneError(f"{self.model.cfg_path}: the teacher has {len(tyolos)} [{kind}] heads, the student "
                                 f"{len(yolos)}")
        keys = ("classes", "mask", "anchors", "scale_x_y", "new_coords") if kind == "yolo" else \
            ("classes", "num", "coords", "anchors", "softmax")
        for s, t in zip(yolos, tyolos):
            if s.out_shape != t.out_shape or any(list(s.attrs[k]) != list(t.attrs[k]) if k in ("mask", "anchors")
                                                 else s.attrs[k] != t.attrs[k] for k in keys):
                raise DarkpruneError(f"{t.where()}: the teacher's [{kind}] head differs from the student's "
                                     f"{s.where()} ({', '.join(('grid',) + keys)})")
        return [(s, t.index) for s, t in zip(yolos, tyolos)]

    def outputs(self, images: np.ndarray) -> list[np.ndarray]:
        """The teacher's outputs paired with the student's heads (see pairs), for one batch."""
        wanted = [index for _, index in self.pairs]
        got = self.net.forward(np.ascontiguousarray(images, np.float32), outputs=wanted)
        return [got[i] for i in wanted]

    def loss(self, student_outputs, images: np.ndarray, box_weight: float = 1.0):
        """(loss, {student layer: dL/d its output}, parts) of one batch; student_outputs(index) gives the
        student's output of a layer (TrainingNetwork.output)."""
        seeds: dict[int, np.ndarray] = {}
        parts: dict[str, float] = {}
        total = 0.0
        for (layer, _), out in zip(self.pairs, self.outputs(images)):
            src = layer.inputs[0]
            if self.detector:
                term = yolo_distillation if layer.type == "yolo" else region_distillation
                loss, grad, terms = term(student_outputs(src), out, layer, box_weight)
                for k, v in terms.items():
                    parts[k] = parts.get(k, 0.0) + v
            else:
                loss, grad = softmax_distillation(student_outputs(src), out, self.temperature, layer.attrs["groups"])
                parts["kl"] = loss
            total += loss
            seeds[src] = seeds[src] + grad if src in seeds else grad
        return total, seeds, parts


class Distillation(Hooks):
    """The training loop's hook: `weight` times the distillation term on every mini-batch (see the module doc).
    `last` holds the last mini-batch's terms (unweighted, per image)."""

    def __init__(self, teacher: Model, student_graph, weight: float = 1.0, temperature: float | None = None,
                 box_weight: float = 1.0):
        self.weight = float(weight)
        if not self.weight >= 0:
            raise DarkpruneError(f"distill_weight {weight}: must be >= 0")
        self.teacher = Teacher(teacher, student_graph, temperature)
        self.box_weight = float(box_weight)
        self.last: dict[str, float] = {}

    def describe(self) -> dict:
        return {"teacher": str(self.teacher.model.cfg_path), "teacher_weights": str(self.teacher.model.weights_path),
                "teacher_digest": self.teacher.digest, "distill_weight": self.weight,
                "distill_temperature": self.teacher.temperature if not self.teacher.detector else None}

    def extra_loss(self, loop, batch, seen):
        loss, seeds, parts = self.teacher.loss(loop.net.output, batch.images, self.box_weight)
        n = max(1, len(batch.images))
        self.last = {"distill_loss": loss / n, **{k: v / n for k, v in parts.items()}}
        w = self.weight
        if w != 1.0:
            loss, seeds = loss * w, {i: g * g.dtype.type(w) for i, g in seeds.items()}
        return loss, seeds
