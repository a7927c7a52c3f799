"""The non-conv layer kernels against OpenCV's Darknet importer (cv2.dnn.readNetFromDarknet) on tiny cfgs.

Each test writes a small cfg (and random weights for the conv layers that make varied inputs), runs OpenCV, and
feeds OpenCV's own outputs of the layers before the one under test to our kernel, so only that kernel is compared.
OpenCV ignores some Darknet options (shortcut weights, upsample scale, scale_wh, softmax groups, maxpool_depth,
local_avgpool, reorg3d); those are covered by test_engine_layers_hand.py.
"""
import struct

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from darkprune.engine import crop, dropout, pool, reorg, route, sam, scale_channels, shortcut, softmax, upsample, yolo


# OpenCV layers that belong to the Darknet layer before them; OpenCV numbers an activation with the NEXT index
# (conv_1 -> logistic_2), so names cannot be mapped by their suffix alone.
_ATTACHED = {"bn", "relu", "leaky", "logistic", "swish", "mish", "tanh", "elu", "adjust_crop"}


def _opencv(tmp_path, cfg: str, blobs, x: np.ndarray, only=None) -> dict:
    """Runs OpenCV on the cfg; returns {darknet layer index: output} (the [region] layer as "region"), the output of
    a Darknet layer being its last OpenCV layer (conv_3 -> bn_3 -> relu_4). `only`: the Darknet indices to fetch
    (asking OpenCV for every output trips it on some graphs)."""
    (tmp_path / "m.cfg").write_text(cfg)
    with open(tmp_path / "m.weights", "wb") as f:
        f.write(struct.pack("<3i", 0, 2, 5))
        f.write(struct.pack("<q", 0))
        for b in blobs:
            f.write(np.asarray(b, np.float32).tobytes())
    net = cv2.dnn.readNetFromDarknet(str(tmp_path / "m.cfg"), str(tmp_path / "m.weights"))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.enableFusion(False)  # fused layers (conv+bn+activation, ...) do not keep their own outputs
    last_name = {}
    current = None
    for name in net.getLayerNames():
        prefix, _, suffix = name.rpartition("_")
        if name == "detection_out":
            current = "region"
        elif prefix not in _ATTACHED:
            current = int(suffix)
        last_name[current] = name
    wanted = list(last_name) if only is None else list(only)
    net.setInput(x)
    outs = net.forward([last_name[i] for i in wanted])
    return dict(zip(wanted, outs))


def _net(c: int, h: int, w: int) -> str:
    return f"[net]\nwidth={w}\nheight={h}\nchannels={c}\n\n"


def _conv(rng, c_in: int, filters: int, activation: str = "linear"):
    """A 1x1 conv section and its weights (biases, then filters): a cheap way to get distinct, signed tensors."""
    text = f"[convolutional]\nfilters={filters}\nsize=1\nstride=1\npad=1\nactivation={activation}\n\n"
    return text, [rng.normal(size=filters), rng.normal(size=(filters, c_in, 1, 1))]


def _input(rng, c, h, w, n=1):
    return rng.normal(size=(n, c, h, w)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------- maxpool

MAXPOOL_CASES = [
    # size, stride, padding (None = Darknet's default size-1), h, w
    (2, 2, None, 8, 10),   # tiny-yolo downsampling, padding 1 all right/bottom, even input
    (2, 2, None, 7, 9),    # odd input: the last window half outside
    (2, 1, None, 6, 7),    # yolov3-tiny's stride-1 maxpool
    (3, 1, None, 6, 7),
    (5, 1, None, 9, 8),    # SPP
    (9, 1, None, 10, 11),  # SPP
    (9, 1, None, 80, 70),  # SPP on a plane large enough for the parallel kernel
    (3, 1, 0, 6, 7),       # stride 1 without padding: the output shrinks
    (3, 1, 1, 6, 7),       # stride 1, odd padding: all of it right/bottom
    (4, 1, None, 7, 6),    # even size: padding 3 splits 1 left/top, 2 right/bottom
    (5, 1, 2, 9, 8),
    (3, 2, None, 9, 8),    # even padding 2: one cell each side
    (3, 2, 0, 9, 8),
    (2, 2, 0, 9, 8),       # no padding, odd input: the last column dropped
    (3, 2, 1, 9, 9),       # odd padding 1 with size 3: extra padding right/bottom
    (4, 2, 3, 10, 9),
    (3, 3, 2, 11, 10),
]


@pytest.mark.parametrize("size,stride,padding,h,w", MAXPOOL_CASES)
def test_maxpool_matches_opencv(tmp_path, kernels, size, stride, padding, h, w):
    rng = np.random.default_rng(size * 100 + stride * 10 + h)
    x = _input(rng, 3, h, w, n=2)  # signed values: zero padding instead of -FLT_MAX would show
    pad_line = "" if padding is None else f"padding={padding}\n"
    out = _opencv(tmp_path, _net(3, h, w) + f"[maxpool]\nsize={size}\nstride={stride}\n{pad_line}", [], x)[0]
    pad = size - 1 if padding is None else padding
    ours = pool.maxpool_forward(x, size, stride, stride, pad)  # inference path (separable for size >= 3)
    assert ours.shape == out.shape
    np.testing.assert_array_equal(ours, out)
    with_idx, idx = pool.maxpool_forward(x, size, stride, stride, pad, return_indices=True)  # training path
    np.testing.assert_array_equal(with_idx, out)
    np.testing.assert_array_equal(x.reshape(-1)[idx], out)


def test_avgpool_matches_opencv(tmp_path):
    rng = np.random.default_rng(1)
    x = _input(rng, 5, 7, 9, n=2)
    out = _opencv(tmp_path, _net(5, 7, 9) + "[avgpool]\n", [], x)[0]
    np.testing.assert_allclose(pool.avgpool_forward(x), out, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------- route

@pytest.mark.parametrize("groups,group_id", [(1, 0), (2, 0), (2, 1)])
def test_route_groups_matches_opencv(tmp_path, groups, group_id):
    rng = np.random.default_rng(2)
    c1, w1 = _conv(rng, 3, 8)
    cfg = _net(3, 5, 6) + c1 + f"[route]\nlayers=-1\ngroups={groups}\ngroup_id={group_id}\n"
    outs = _opencv(tmp_path, cfg, w1, _input(rng, 3, 5, 6))
    np.testing.assert_array_equal(route.route_forward([outs[0]], groups, group_id), outs[1])


def test_route_concat_matches_opencv(tmp_path):
    rng = np.random.default_rng(3)
    c1, w1 = _conv(rng, 3, 4)
    c2, w2 = _conv(rng, 4, 6)
    c3, w3 = _conv(rng, 6, 2)
    cfg = _net(3, 5, 6) + c1 + c2 + c3 + "[route]\nlayers=-1,0,-2\n"
    outs = _opencv(tmp_path, cfg, w1 + w2 + w3, _input(rng, 3, 5, 6))
    np.testing.assert_array_equal(route.route_forward([outs[2], outs[0], outs[1]]), outs[3])


# -------------------------------------------------------------------------------------------------------- shortcut

@pytest.mark.parametrize("c_prev,c_from", [(4, 4), (6, 4), (4, 6)])
def test_shortcut_matches_opencv(tmp_path, c_prev, c_from):
    rng = np.random.default_rng(4 + c_prev * 3 + c_from)
    c1, w1 = _conv(rng, 3, c_from)
    c2, w2 = _conv(rng, c_from, c_prev)
    cfg = _net(3, 5, 6) + c1 + c2 + "[shortcut]\nfrom=-2\nactivation=linear\n"
    outs = _opencv(tmp_path, cfg, w1 + w2, _input(rng, 3, 5, 6, n=2))
    ours = shortcut.shortcut_forward(outs[1], [outs[0]])
    np.testing.assert_allclose(ours, outs[2], rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------------------------------------------- upsample

@pytest.mark.parametrize("stride", [2, 3])
def test_upsample_matches_opencv(tmp_path, stride):
    rng = np.random.default_rng(5)
    c1, w1 = _conv(rng, 3, 4)
    outs = _opencv(tmp_path, _net(3, 4, 5) + c1 + f"[upsample]\nstride={stride}\n", w1, _input(rng, 3, 4, 5, n=2))
    np.testing.assert_array_equal(upsample.upsample_forward(outs[0], stride), outs[1])


# ----------------------------------------------------------------------------------------------------------- reorg

@pytest.mark.parametrize("stride,c,h,w", [(2, 4, 4, 6), (2, 8, 6, 6), (3, 9, 6, 9)])
def test_reorg_matches_opencv(tmp_path, stride, c, h, w):
    rng = np.random.default_rng(6)
    x = _input(rng, c, h, w, n=2)
    out = _opencv(tmp_path, _net(c, h, w) + f"[reorg]\nstride={stride}\n", [], x)[0]
    np.testing.assert_array_equal(reorg.reorg_forward(x, stride), out)


# --------------------------------------------------------------------------------------------------------- softmax

def test_softmax_classifier_matches_opencv(tmp_path):
    rng = np.random.default_rng(7)
    c1, w1 = _conv(rng, 3, 10)
    cfg = _net(3, 5, 6) + c1 + "[avgpool]\n\n[softmax]\ngroups=1\n"
    outs = _opencv(tmp_path, cfg, w1, _input(rng, 3, 5, 6, n=2) * 4)
    np.testing.assert_allclose(softmax.softmax_forward(outs[1]), outs[2], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------- scale_channels / sam

def test_scale_channels_matches_opencv(tmp_path):
    rng = np.random.default_rng(8)
    c1, w1 = _conv(rng, 3, 6)
    c2, w2 = _conv(rng, 6, 6, "logistic")
    cfg = _net(3, 5, 6) + c1 + "[avgpool]\n\n" + c2 + "[scale_channels]\nfrom=-3\n"
    # batch 1 and only the outputs we need: OpenCV's Scale layer fails on this graph otherwise
    outs = _opencv(tmp_path, cfg, w1 + w2, _input(rng, 3, 5, 6), only=[0, 2, 3])
    ours = scale_channels.scale_channels_forward(outs[2], outs[0])
    np.testing.assert_allclose(ours, outs[3], rtol=1e-6, atol=1e-7)


def test_sam_matches_opencv(tmp_path):
    rng = np.random.default_rng(9)
    c1, w1 = _conv(rng, 3, 5)
    c2, w2 = _conv(rng, 5, 5, "logistic")
    cfg = _net(3, 4, 6) + c1 + c2 + "[sam]\nfrom=-2\n"
    outs = _opencv(tmp_path, cfg, w1 + w2, _input(rng, 3, 4, 6, n=2))
    np.testing.assert_allclose(sam.sam_forward(outs[1], outs[0]), outs[2], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------- crop / dropout

@pytest.mark.parametrize("ch,cw,noadjust", [(3, 3, 0), (2, 5, 0), (4, 3, 1)])
def test_crop_matches_opencv(tmp_path, ch, cw, noadjust):
    rng = np.random.default_rng(10)
    x = _input(rng, 3, 6, 7)
    cfg = _net(3, 6, 7) + f"[crop]\ncrop_height={ch}\ncrop_width={cw}\nnoadjust={noadjust}\n"
    outs = _opencv(tmp_path, cfg, [], x)
    expected = outs[max(outs)]  # OpenCV adds an "adjust" layer after the crop unless noadjust
    ours, _ = crop.crop_forward(x, ch, cw, noadjust=bool(noadjust))
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-7)


def test_dropout_is_identity_at_inference_like_opencv(tmp_path):
    rng = np.random.default_rng(11)
    c1, w1 = _conv(rng, 3, 4)
    outs = _opencv(tmp_path, _net(3, 4, 5) + c1 + "[dropout]\nprobability=0.5\n", w1, _input(rng, 3, 4, 5))
    ours, mask = dropout.dropout_forward(outs[0], 0.5)
    assert mask is None
    np.testing.assert_array_equal(ours, outs[1])


# ----------------------------------------------------------------------------------------------- yolo and region

def _decode_rows(act, anchors, n_anchor, entries, net_hw, region: bool, new_coords: bool):
    """Our activated head output, decoded the way OpenCV's Region layer lays out its rows: one row per
    (cell y, cell x, anchor): cx, cy, w, h (relative), objectness, class * objectness."""
    _, _, h, w = act.shape
    rows = []
    for j in range(h):
        for i in range(w):
            for a in range(n_anchor):
                e = act[0, a * entries:(a + 1) * entries, j, i].astype(np.float64)
                if new_coords:
                    bw, bh = e[2] * e[2] * 4, e[3] * e[3] * 4
                else:
                    bw, bh = np.exp(e[2]), np.exp(e[3])
                if region:  # [region] anchors are in cells, [yolo] anchors in network pixels
                    bw, bh = bw * anchors[a][0] / w, bh * anchors[a][1] / h
                else:
                    bw, bh = bw * anchors[a][0] / net_hw[1], bh * anchors[a][1] / net_hw[0]
                rows.append([(i + e[0]) / w, (j + e[1]) / h, bw, bh, e[4], *(e[5:] * e[4])])
    return np.array(rows)


@pytest.mark.parametrize("extra,activation", [("", "linear"), ("scale_x_y=1.2\n", "linear"),
                                              ("scale_x_y=1.05\n", "linear"),
                                              ("new_coords=1\nscale_x_y=2.0\n", "logistic")])
def test_yolo_head_matches_opencv(tmp_path, kernels, extra, activation):
    rng = np.random.default_rng(12)
    classes, h, w = 3, 4, 6
    c1, w1 = _conv(rng, 3, 2 * (5 + classes), activation)
    cfg = (_net(3, h, w) + c1 + "[yolo]\nmask=1,2\nanchors=10,14,23,27,37,58\nclasses=3\nnum=3\nthresh=0\n"
           + extra)
    outs = _opencv(tmp_path, cfg, w1, _input(rng, 3, h, w))
    scale = float(extra.split("scale_x_y=")[1].split()[0]) if "scale_x_y" in extra else 1.0
    new_coords = "new_coords" in extra
    act = yolo.yolo_forward(outs[0], 2, classes, scale, new_coords)
    rows = _decode_rows(act, [(23, 27), (37, 58)], 2, 5 + classes, (h, w), region=False, new_coords=new_coords)
    np.testing.assert_allclose(rows, outs[1], rtol=2e-6, atol=1e-6)


def test_region_head_matches_opencv(tmp_path, kernels):
    rng = np.random.default_rng(13)
    classes, h, w = 3, 4, 6
    c1, w1 = _conv(rng, 3, 2 * (5 + classes))
    cfg = _net(3, h, w) + c1 + "[region]\nanchors=1.5,2,3,4.5\nclasses=3\nnum=2\nsoftmax=1\ncoords=4\nthresh=0\n"
    outs = _opencv(tmp_path, cfg, w1, _input(rng, 3, h, w))
    act = yolo.region_forward(outs[0], 2, classes, 4, softmax=True)
    rows = _decode_rows(act, [(1.5, 2), (3, 4.5)], 2, 5 + classes, (h, w), region=True, new_coords=False)
    ocv = outs["region"]
    np.testing.assert_allclose(rows[:, :5], ocv[:, :5], rtol=2e-6, atol=1e-7)
    # OpenCV's Region layer runs NMS and zeroes the class scores of suppressed boxes: compare the others
    kept = ocv[:, 5:] != 0
    assert kept.mean() > 0.5
    np.testing.assert_allclose(rows[:, 5:][kept], ocv[:, 5:][kept], rtol=2e-6, atol=1e-7)


# ------------------------------------------------------------------------------------- a real model, layer by layer

ASSETS = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "assets"
FASTEST = ASSETS / "models" / "yolo-fastest-1.1"


def _sections(cfg_text: str):
    """[(type, {key: value})] of the layers (not [net]); enough of a cfg reader for this test."""
    layers = []
    for raw in cfg_text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            layers.append((line.strip("[]"), {}))
        elif "=" in line:
            k, v = line.split("=", 1)
            layers[-1][1][k.strip()] = v.strip()
    return layers[1:]


def _refs(opts, key, i):
    return [int(v) + i if int(v) < 0 else int(v) for v in opts[key].split(",")]


@pytest.mark.skipif(not (FASTEST / "yolo-fastest-1.1.weights").exists(), reason="needs ../shared/assets")
def test_yolo_fastest_layers_match_opencv():
    """Every maxpool/route/shortcut/upsample/dropout/yolo layer of the real Yolo-Fastest on dog.jpg, fed OpenCV's
    outputs of its input layers, gives OpenCV's output of that layer."""
    cfg = (FASTEST / "yolo-fastest-1.1.cfg").read_text()
    layers = _sections(cfg)
    net = cv2.dnn.readNetFromDarknet(str(FASTEST / "yolo-fastest-1.1.cfg"), str(FASTEST / "yolo-fastest-1.1.weights"))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.enableFusion(False)  # fused layers (conv+bn+activation, ...) do not keep their own outputs
    last_name, current = {}, None
    for name in net.getLayerNames():
        prefix, _, suffix = name.rpartition("_")
        if prefix not in _ATTACHED:
            current = int(suffix)
        last_name[current] = name
    img = cv2.imread(str(ASSETS / "images" / "dog.jpg"))
    net.setInput(cv2.dnn.blobFromImage(img, 1 / 255.0, (320, 320), swapRB=True, crop=False))
    idx = sorted(last_name)
    outs = dict(zip(idx, net.forward([last_name[i] for i in idx])))
    checked = set()
    for i, (kind, o) in enumerate(layers):
        prev = outs.get(i - 1)
        if kind == "maxpool":
            size, stride = int(o["size"]), int(o.get("stride", 1))
            ours = pool.maxpool_forward(prev, size, stride, stride, int(o.get("padding", size - 1)))
        elif kind == "route":
            ours = route.route_forward([outs[j] for j in _refs(o, "layers", i)], int(o.get("groups", 1)),
                                       int(o.get("group_id", 0)))
        elif kind == "shortcut":
            assert o.get("activation", "linear") == "linear"
            ours = shortcut.shortcut_forward(prev, [outs[j] for j in _refs(o, "from", i)])
        elif kind == "upsample":
            ours = upsample.upsample_forward(prev, int(o.get("stride", 2)))
        elif kind == "dropout":
            ours = dropout.dropout_forward(prev, float(o.get("probability", 0.2)))[0]
        elif kind == "yolo":
            mask = [int(v) for v in o["mask"].split(",")]
            anchors = np.array([float(v) for v in o["anchors"].split(",")]).reshape(-1, 2)
            classes = int(o["classes"])
            act = yolo.yolo_forward(prev, len(mask), classes, float(o.get("scale_x_y", 1.0)))
            rows = _decode_rows(act, anchors[mask], len(mask), 5 + classes, (320, 320), region=False,
                                new_coords=False)
            expected = outs[i]
            # OpenCV zeroes class scores under its thresh (0.2 by default): compare objectness-scaled scores above it
            np.testing.assert_allclose(rows[:, :5], expected[:, :5], rtol=1e-5, atol=1e-6)
            keep = expected[:, 5:] != 0
            np.testing.assert_allclose(rows[:, 5:][keep], expected[:, 5:][keep], rtol=1e-5, atol=1e-7)
            assert np.all(rows[:, 5:][~keep] <= 0.2 + 1e-6)
            checked.add(kind)
            continue
        else:
            continue
        np.testing.assert_allclose(ours, outs[i], rtol=1e-6, atol=1e-6, err_msg=f"layer {i} [{kind}]")
        checked.add(kind)
    assert checked == {"maxpool", "route", "shortcut", "upsample", "dropout", "yolo"}
