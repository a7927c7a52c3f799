"""Darknet's [yolo] and [region] training losses.

Where Darknet's delta is the exact negative gradient of a defined loss (mse box loss, BCE objectness/classes, the
region layer), the gradient is checked against central finite differences of an independent float64 re-statement of
that loss. Where it is not (iou/giou/diou/ciou box deltas), dx_box_iou is checked against finite differences of
independently written IoU/GIoU/DIoU/CIoU geometry with Darknet's documented departures (w, h derivatives doubled,
the DIoU enclosing-box term's sign for x, y, CIoU's constant alpha and dropped 1/(w^2+h^2)), and the wiring into the
raw input (no logistic/scale_x_y/anchor chain factors) against the formula on a hand-built one-truth case.
"""
import math

import numpy as np
import pytest

from darkprune.darknet.cfg import parse_cfg_text
from darkprune.darknet.graph import build_graph
from darkprune.train.yolo_loss import RegionOptions, YoloOptions, dx_box_iou, region_loss, yolo_loss

from conftest import central_grad

EPS = 1e-6


# ---------------------------------------------------------------------------------------------------------------
# independent float64 references

def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def softplus(z):
    return float(np.logaddexp(0.0, z))


def edges(b):
    x, y, w, h = b
    return x - w / 2, x + w / 2, y - h / 2, y + h / 2


def ref_iou(a, b):
    al, ar, at, ab = edges(a)
    bl, br, bt, bb = edges(b)
    iw = min(ar, br) - max(al, bl)
    ih = min(ab, bb) - max(at, bt)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def ref_enclosing(a, b):
    al, ar, at, ab = edges(a)
    bl, br, bt, bb = edges(b)
    return max(ar, br) - min(al, bl), max(ab, bb) - min(at, bt)


def ref_giou(a, b):
    al, ar, at, ab = edges(a)
    bl, br, bt, bb = edges(b)
    iw = max(0.0, min(ar, br) - max(al, bl))
    ih = max(0.0, min(ab, bb) - max(at, bt))
    union = a[2] * a[3] + b[2] * b[3] - iw * ih
    cw, ch = ref_enclosing(a, b)
    return ref_iou(a, b) - (cw * ch - union) / (cw * ch)


def numeric_grad(f, x):
    return central_grad(f, x, EPS)


def ref_yolo_loss(x, truths, o: YoloOptions, net_w, net_h, stats=None):
    """The loss whose negative gradient Darknet's mse [yolo] deltas are (no iou_thresh/truth_thresh/objectness_smooth
    /focal, at most one truth per cell and anchor), written from the rules, not from the implementation."""
    n_img, _, H, W = x.shape
    A, C, s = len(o.mask), o.classes, o.scale_x_y
    anchors = np.asarray(o.anchors).reshape(-1, 2)
    total = 0.0
    for b in range(n_img):
        xb = x[b].reshape(A, 5 + C, H, W)
        rows = [r for r in np.asarray(truths[b], np.float64).reshape(-1, 5) if 0 <= r[0] < C]
        positive = {}
        for r in rows:
            ious = [ref_iou((0, 0, aw / net_w, ah / net_h), (0, 0, r[3], r[4])) for aw, ah in anchors]
            best = int(np.argmax(ious))
            if best in o.mask:
                positive[(o.mask.index(best), int(r[2] * H), int(r[1] * W))] = (best, r)
        for a in range(A):
            aw, ah = anchors[o.mask[a]]
            for j in range(H):
                for i in range(W):
                    z = xb[a, :, j, i]
                    if o.new_coords:
                        act = z.copy()
                        pw, ph = z[2] ** 2 * 4 * aw / net_w, z[3] ** 2 * 4 * ah / net_h
                    else:
                        act = sigmoid(z)
                        pw, ph = math.exp(z[2]) * aw / net_w, math.exp(z[3]) * ah / net_h
                    ox, oy = s * act[0] - (s - 1) / 2, s * act[1] - (s - 1) / 2
                    pred = ((i + ox) / W, (j + oy) / H, pw, ph)
                    if (a, j, i) in positive:
                        best, (cls, cx, cy, w, h) = positive[(a, j, i)]
                        sc = (2 - w * h) * o.iou_normalizer
                        tx, ty = cx * W - i, cy * H - j
                        y = np.where(np.arange(C) == cls, 1.0, 0.0)
                        if o.label_smooth_eps:
                            y = y * (1 - o.label_smooth_eps) + 0.5 * o.label_smooth_eps
                        if o.new_coords:
                            tw = math.sqrt(w * net_w / (4 * anchors[best][0]))
                            th = math.sqrt(h * net_h / (4 * anchors[best][1]))
                            total += sc * ((ox - tx) ** 2 + (oy - ty) ** 2) / (2 * s)
                            total += 0.5 * sc * ((z[2] - tw) ** 2 + (z[3] - th) ** 2)
                            total += 0.5 * o.obj_normalizer * (1 - z[4]) ** 2
                            total += 0.5 * float(((y - z[5:]) ** 2).sum())
                        else:
                            tw = math.log(w * net_w / anchors[best][0])
                            th = math.log(h * net_h / anchors[best][1])
                            total += sc * (s * softplus(z[0]) - (tx + (s - 1) / 2) * z[0])
                            total += sc * (s * softplus(z[1]) - (ty + (s - 1) / 2) * z[1])
                            total += 0.5 * sc * ((z[2] - tw) ** 2 + (z[3] - th) ** 2)
                            total += o.obj_normalizer * (softplus(z[4]) - z[4])
                            total += sum(softplus(z[5 + k]) - y[k] * z[5 + k] for k in range(C))
                        continue
                    match = max([ref_iou(pred, r[1:]) for r in rows] if (act[5:] > 0.25).any() else [0.0],
                                default=0.0)
                    if match > o.ignore_thresh:
                        if stats is not None:
                            stats["ignored"] += 1
                        continue
                    if o.new_coords:
                        total += 0.5 * o.obj_normalizer * z[4] ** 2
                    else:
                        total += o.obj_normalizer * softplus(z[4])
    return total


ANCHORS = (10, 13, 16, 30, 33, 23, 30, 61)     # four anchors, in network pixels


def _truths():
    return [np.array([[1, 0.30, 0.40, 0.20, 0.40],        # best anchor 1 (16x30 of 64x64) -> in mask
                      [2, 0.80, 0.70, 0.45, 0.33],        # best anchor 2 -> in mask
                      [0, 0.55, 0.15, 0.48, 0.95],        # best anchor 3 -> not in this layer's mask
                      [5, 0.10, 0.10, 0.20, 0.20]]),      # class out of range: skipped
            np.array([[0, 0.62, 0.55, 0.30, 0.50]])]


@pytest.mark.parametrize("config", [
    dict(),
    dict(scale_x_y=1.2, label_smooth_eps=0.1, obj_normalizer=2.0, iou_normalizer=0.5, ignore_thresh=0.15),
    dict(new_coords=1, scale_x_y=2.0, obj_normalizer=1.5, ignore_thresh=0.2),
])
def test_mse_gradient_matches_finite_differences(config):
    o = YoloOptions(classes=3, mask=(0, 1, 2), anchors=ANCHORS, **config)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3 * 8, 3, 4)) * 0.8
    if o.new_coords:
        x = sigmoid(x * 2)               # the conv before applied a logistic
    truths = _truths()
    res = yolo_loss(x, truths, o, 64, 64)
    assert res.grad.dtype == np.float64 and res.grad.shape == x.shape
    stats = {"ignored": 0}
    ref_yolo_loss(x, truths, o, 64, 64, stats)
    if o.ignore_thresh < 0.5:
        assert stats["ignored"] > 0, "the case should exercise the ignore rule"
    num = numeric_grad(lambda: ref_yolo_loss(x, truths, o, 64, 64), x)
    np.testing.assert_allclose(res.grad, num, rtol=1e-5, atol=1e-7)
    assert res.stats["count"] == 3
    assert res.cost == pytest.approx(float((res.delta.astype(np.float64) ** 2).sum()))   # mse: sum(delta^2)


def test_one_truth_one_cell_assignment():
    # 5 wide x 4 high grid, anchors (in 80x64 network pixels): #0 8x8, #1 40x32 (not in the mask), #2 24x16
    o = YoloOptions(classes=3, mask=(0, 2), anchors=(8, 8, 40, 32, 24, 16), ignore_thresh=0.7)
    x = np.zeros((1, 2 * 8, 4, 5))
    truth = np.array([[2, 0.65, 0.30, 0.28, 0.26]])        # ~22x17 px: best anchor #2, cell i=3, j=1
    res = yolo_loss(x, [truth], o, 80, 64)
    g = res.grad.reshape(2, 8, 4, 5)
    hit = np.zeros((2, 4, 5), bool)
    hit[1, 1, 3] = True
    box = np.abs(g[:, :4]).sum(axis=1) > 0
    np.testing.assert_array_equal(box, hit)                               # box gradient only there
    np.testing.assert_array_equal(np.abs(g[:, 5:]).sum(axis=1) > 0, hit)  # class gradient only there
    p = 0.5                                                               # sigmoid(0)
    assert g[1, 4, 1, 3] == pytest.approx(-(1 - p))                       # objectness pulled up
    assert np.all(g[:, 4][~hit] == pytest.approx(p))                      # everywhere else pushed down
    np.testing.assert_allclose(g[1, 5:, 1, 3], [p, p, -(1 - p)])           # class 2 up, the others down
    # mse box deltas by hand: scale = 2 - w*h, iou_normalizer 0.75
    sc = (2 - 0.28 * 0.26) * 0.75
    tx, ty = 0.65 * 5 - 3, 0.30 * 4 - 1
    tw, th = math.log(0.28 * 80 / 24), math.log(0.26 * 64 / 16)
    np.testing.assert_allclose(g[1, :4, 1, 3], [-sc * (tx - 0.5), -sc * (ty - 0.5), -sc * tw, -sc * th], rtol=1e-5)
    assert res.stats["count"] == 1
    # a truth whose best anchor (#1) belongs to another layer's mask gets nothing here
    res2 = yolo_loss(x, [np.array([[0, 0.5, 0.5, 0.5, 0.5]])], o, 80, 64)
    assert res2.stats["count"] == 0
    assert not np.abs(res2.grad.reshape(2, 8, 4, 5)[:, [0, 1, 2, 3, 5, 6, 7]]).any()


def test_iou_thresh_assigns_extra_anchors_and_truth_list_rules():
    o = YoloOptions(classes=2, mask=(0, 1), anchors=(16, 16, 18, 18), iou_thresh=0.213)
    x = np.zeros((1, 2 * 7, 2, 2))
    truth = np.array([[1, 0.7, 0.2, 0.27, 0.27]])
    res = yolo_loss(x, [truth], o, 64, 64)
    assert res.stats["count"] == 2                                        # best anchor + the extra one
    g = res.grad.reshape(2, 7, 2, 2)
    assert np.abs(g[0, :4, 0, 1]).sum() > 0 and np.abs(g[1, :4, 0, 1]).sum() > 0
    assert yolo_loss(x, [truth], YoloOptions(classes=2, mask=(0, 1), anchors=(16, 16, 18, 18)), 64, 64
                     ).stats["count"] == 1
    # Darknet reads truth rows up to the first with cx == 0, and at most `max`
    rows = np.array([[1, 0.7, 0.2, 0.27, 0.27], [0, 0, 0, 0, 0], [1, 0.2, 0.7, 0.27, 0.27]])
    assert yolo_loss(x, [rows], o, 64, 64).stats["count"] == 2
    o.max_boxes = 1
    assert yolo_loss(x, [rows[[2, 0]]], o, 64, 64).stats["count"] == 2    # only the first row is read


def test_truth_thresh_and_objectness_smooth():
    # a prediction in the neighbouring cell whose box equals the truth exactly (scale_x_y=2 lets x reach -0.4)
    o = YoloOptions(classes=1, mask=(0,), anchors=(16, 16), scale_x_y=2.0, truth_thresh=0.9)
    x = np.zeros((1, 6, 4, 4))
    x[0, 0, 1, 2] = math.log(0.05 / 0.95)       # 2*sigmoid - 0.5 = -0.4 -> centre (2 - 0.4)/4 = 0.40
    x[0, 1, 1, 2] = math.log(0.45 / 0.55)       # 2*0.45 - 0.5 = 0.4  -> centre (1 + 0.4)/4 = 0.35
    truth = np.array([[0, 0.40, 0.35, 0.25, 0.25]])
    res = yolo_loss(x, [truth], o, 64, 64)
    iou = ref_iou(((2 - 0.4) / 4, (1 + 0.4) / 4, 0.25, 0.25), (0.40, 0.35, 0.25, 0.25))
    assert iou > 0.999
    assert res.grad[0, 4, 1, 2] == pytest.approx(-(1 - 0.5))             # positive objectness from truth_thresh
    assert res.grad[0, 5, 1, 2] == pytest.approx(-(1 - 0.5))             # and its class
    assert res.stats["total_bbox"] == 2 and res.stats["count"] == 1
    # objectness_smooth: an ignored prediction is pulled toward its IoU instead of left alone
    o2 = YoloOptions(classes=1, mask=(0,), anchors=(16, 16), scale_x_y=2.0, objectness_smooth=1)
    res2 = yolo_loss(x, [truth], o2, 64, 64)
    assert res2.grad[0, 4, 1, 2] == pytest.approx(-(iou - 0.5), rel=1e-6)
    o3 = YoloOptions(classes=1, mask=(0,), anchors=(16, 16), scale_x_y=2.0)
    assert yolo_loss(x, [truth], o3, 64, 64).grad[0, 4, 1, 2] == 0.0     # plain ignore


def test_focal_loss_class_delta_by_hand():
    o = YoloOptions(classes=3, mask=(0,), anchors=(16, 16), focal_loss=1)
    x = np.zeros((1, 8, 2, 2))
    x[0, 5:, 0, 0] = [0.3, -0.2, 1.0]
    res = yolo_loss(x, [np.array([[2, 0.25, 0.25, 0.25, 0.25]])], o, 64, 64)
    p = sigmoid(np.array([0.3, -0.2, 1.0]))
    pt = p[2]
    grad = -(1 - pt) * (2 * pt * math.log(pt) + pt - 1)
    np.testing.assert_allclose(res.grad[0, 5:, 0, 0], -(np.array([0, 0, 1.0]) - p) * 0.5 * grad, rtol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# IoU-family box deltas: not true gradients, checked against Darknet's formula

PRED = (0.50, 0.45, 0.30, 0.20)      # overlapping, no shared edges; pred sticks out left and top
TRUTH = (0.55, 0.52, 0.25, 0.30)


def _fd_box(f, box, k):
    b1, b2 = list(box), list(box)
    b1[k] += EPS
    b2[k] -= EPS
    return (f(b1) - f(b2)) / (2 * EPS)


def expected_dx_box_iou(kind, pred=PRED, truth=TRUTH):
    """Darknet's dx_box_iou as characterised in yolo_loss's docs, from finite differences of plain geometry."""
    def fd(f, k):
        return _fd_box(f, pred, k)

    base = ref_giou if kind == "giou" else ref_iou
    g = [fd(lambda b: base(b, truth), k) for k in range(4)]
    g[2] *= 2                                            # Darknet's w, h derivatives are not halved
    g[3] *= 2
    if kind in ("diou", "ciou"):
        def dist2(b):
            return (b[0] - truth[0]) ** 2 + (b[1] - truth[1]) ** 2

        def diag2(b):
            cw, ch = ref_enclosing(b, truth)
            return cw * cw + ch * ch

        S, C = dist2(pred), diag2(pred)
        for k in (0, 1):                                 # -dS/C - S*dC/C^2: the C term's sign flipped
            g[k] += -fd(dist2, k) / C - S * fd(diag2, k) / C ** 2
        for k in (2, 3):                                 # +S*dC/C^2: the true derivative of -S/C
            g[k] += S * fd(diag2, k) / C ** 2
        if kind == "ciou":
            iou = ref_iou(pred, truth)
            ar = math.atan(truth[2] / truth[3]) - math.atan(pred[2] / pred[3])
            v = 4 / math.pi ** 2 * ar ** 2
            alpha = v / (1 - iou + v + 0.000001)
            g[2] += alpha * 8 / math.pi ** 2 * ar * pred[3]
            g[3] += -alpha * 8 / math.pi ** 2 * ar * pred[2]
    return np.array(g)


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou"])
def test_dx_box_iou_is_darknets_formula(kind):
    code = {"iou": 1, "giou": 2, "diou": 3, "ciou": 4}[kind]
    got = np.array(dx_box_iou(*PRED, *TRUTH, code))
    np.testing.assert_allclose(got, expected_dx_box_iou(kind), rtol=1e-6, atol=1e-9)
    # IoU and GIoU: x, y are the true derivatives of the score (w, h twice theirs)
    if kind in ("iou", "giou"):
        f = ref_giou if kind == "giou" else ref_iou
        assert got[0] == pytest.approx(_fd_box(lambda b: f(b, TRUTH), PRED, 0), rel=1e-6)


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
def test_iou_loss_deltas_reach_the_raw_input_without_chain_factors(kind):
    # one truth, one anchor, one cell: pred box from chosen raw values
    net = 64
    o = YoloOptions(classes=2, mask=(0,), anchors=(19.2, 12.8), iou_loss=kind, iou_normalizer=0.07,
                    scale_x_y=1.05)
    W = H = 2
    x = np.zeros((1, 7, H, W))
    z = np.array([0.4, -0.3, -0.5, 0.1])
    x[0, :4, 0, 1] = z
    truth = np.array([[1, 0.74, 0.26, 0.25, 0.30]])        # cell i=1, j=0; partial overlap on every side
    res = yolo_loss(x, [truth], o, net, net)
    s = 1.05
    ox, oy = s * sigmoid(z[0]) - (s - 1) / 2, s * sigmoid(z[1]) - (s - 1) / 2
    pred = ((1 + ox) / W, (0 + oy) / H, math.exp(z[2]) * 19.2 / net, math.exp(z[3]) * 12.8 / net)
    d = expected_dx_box_iou(kind, pred, tuple(truth[0, 1:]))
    d[2] *= math.exp(z[2])                                   # Darknet's only chain factor: exp(raw w/h)
    d[3] *= math.exp(z[3])
    np.testing.assert_allclose(res.grad[0, :4, 0, 1], -0.07 * d, rtol=1e-5, atol=1e-10)
    # ... which is not the gradient of 1 - IoU-score w.r.t. the raw input (missing sigmoid', 1/W, anchor factors)
    assert not np.allclose(res.grad[0, 0, 0, 1], -0.07 * d[0] * sigmoid(z[0]) * (1 - sigmoid(z[0])) * s / W)
    # max_delta clips each box delta
    o.max_delta = 0.001
    clipped = yolo_loss(x, [truth], o, net, net).grad[0, :4, 0, 1]
    np.testing.assert_allclose(np.abs(clipped), np.minimum(np.abs(0.07 * d), 0.001), rtol=1e-5)
    # cost with show_details (default): iou_normalizer * mean(1 - iou or giou) + obj_normalizer * non-box sum(d^2)
    o.max_delta = math.inf
    res = yolo_loss(x, [truth], o, net, net)
    score = ref_giou(pred, truth[0, 1:]) if kind == "giou" else ref_iou(pred, truth[0, 1:])
    dl = res.delta.reshape(7, H, W).astype(np.float64)
    assert res.cost == pytest.approx(0.07 * (1 - score) + float((dl[4:] ** 2).sum()), rel=1e-5)


def test_options_from_a_cfg_layer():
    cfg = parse_cfg_text("""[net]
width=64
height=64
channels=3
[convolutional]
filters=21
size=1
activation=linear
[yolo]
mask=0,1,2
anchors=10,14, 23,27, 37,58, 81,82
classes=2
num=4
iou_loss=ciou
iou_normalizer=0.07
scale_x_y=1.05
iou_thresh=0.213
iou_thresh_kind=giou
counters_per_class=100,25
max_delta=3
label_smooth_eps=0.05
""")
    layer = build_graph(cfg)[1]
    o = YoloOptions.from_layer(layer)
    assert (o.iou_loss, o.iou_normalizer, o.scale_x_y, o.iou_thresh, o.iou_thresh_kind) == \
        ("ciou", 0.07, 1.05, 0.213, "giou")
    np.testing.assert_allclose(o.class_multipliers, [1.0, 3.0])          # max/count, capped at max_delta
    x = np.random.default_rng(0).normal(size=(1, 21, 4, 4)).astype(np.float32)
    r1 = yolo_loss(x, [np.array([[1, 0.5, 0.5, 0.3, 0.4]])], layer, 64, 64)
    r2 = yolo_loss(x, [np.array([[1, 0.5, 0.5, 0.3, 0.4]])], o, 64, 64)
    np.testing.assert_array_equal(r1.grad, r2.grad)
    assert np.isfinite(r1.cost) and r1.stats["count"] >= 1


# ---------------------------------------------------------------------------------------------------------------
# [region]

def ref_region_loss(x, truths, o: RegionOptions):
    n_img, _, H, W = x.shape
    C = o.classes
    anchors = np.asarray(o.anchors).reshape(-1, 2)
    A = len(anchors)
    total = 0.0
    for b in range(n_img):
        xb = x[b].reshape(A, 5 + C, H, W)
        rows = np.asarray(truths[b], np.float64).reshape(-1, 5)

        def box(a, j, i):
            z = xb[a, :, j, i]
            return ((i + sigmoid(z[0])) / W, (j + sigmoid(z[1])) / H, math.exp(z[2]) * anchors[a][0] / W,
                    math.exp(z[3]) * anchors[a][1] / H)

        positive = {}
        for r in rows:
            i, j = int(r[1] * W), int(r[2] * H)
            ious = [ref_iou((0, 0) + box(a, j, i)[2:], (0, 0, r[3], r[4])) for a in range(A)]
            positive[(int(np.argmax(ious)), j, i)] = r
        for a in range(A):
            for j in range(H):
                for i in range(W):
                    z = xb[a, :, j, i]
                    p = sigmoid(z[4])
                    if (a, j, i) in positive:
                        cls, cx, cy, w, h = positive[(a, j, i)]
                        t = (cx * W - i, cy * H - j, math.log(w * W / anchors[a][0]), math.log(h * H / anchors[a][1]))
                        total += 0.5 * o.coord_scale * ((t[0] - sigmoid(z[0])) ** 2 + (t[1] - sigmoid(z[1])) ** 2
                                                        + (t[2] - z[2]) ** 2 + (t[3] - z[3]) ** 2)
                        total += 0.5 * o.object_scale * (1 - p) ** 2
                        logits = z[5:]
                        logp = logits - logits.max() - math.log(np.exp(logits - logits.max()).sum())
                        total += -o.class_scale * logp[int(cls)]
                        continue
                    best = max([ref_iou(box(a, j, i), r[1:]) for r in rows], default=0.0)
                    if best <= o.thresh:
                        total += 0.5 * o.noobject_scale * p ** 2
    return total


def test_region_gradient_matches_finite_differences():
    o = RegionOptions(classes=3, anchors=(0.6, 0.8, 1.5, 1.2, 2.5, 3.0), softmax=1, thresh=0.2, coord_scale=1.5,
                      object_scale=5.0, noobject_scale=0.5, class_scale=2.0)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3 * 8, 3, 3)) * 0.7
    truths = [np.array([[1, 0.3, 0.4, 0.2, 0.3], [2, 0.8, 0.75, 0.5, 0.6]]), np.array([[0, 0.5, 0.2, 0.7, 0.3]])]
    res = region_loss(x, truths, o, seen=100000)
    num = numeric_grad(lambda: ref_region_loss(x, truths, o), x)
    np.testing.assert_allclose(res.grad, num, rtol=1e-5, atol=1e-7)
    assert res.stats["count"] == 3
    assert res.cost == pytest.approx(float((res.delta ** 2).sum()))
    # the first 12800 images add Darknet's 0.01-scaled pull of every box toward its anchor prior
    early = region_loss(x, truths, o, seen=640)
    changed = np.abs(early.grad - res.grad).reshape(2, 3, 8, 3, 3)
    assert changed[:, :, :4].max() > 0 and changed[:, :, 4:].max() == 0
