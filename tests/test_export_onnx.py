"""ONNX export: ONNX Runtime (CPU) running the exported graph gives our engine's outputs on the same input, on every
asset cfg the exporter covers (random He-initialised weights, input shrunk, batch 2 for the dynamic batch) and on
the real models; uncovered cfgs are refused with one line naming the layer; onnx.checker passes on every file; a
pruned and slimmed Yolo-Fastest keeps its mAP@0.5 through ONNX Runtime.

ONNX Runtime is an independent implementation of the operators (convolution, pooling, resize, softmax...): the
exporter's job is to map Darknet's semantics onto them, which the comparison with the engine (itself checked
against OpenCV's Darknet importer and the Darknet binary) tests.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import darkprune as dp
from darkprune.darknet import Model, read_cfg
from darkprune.darknet.graph import build_graph
from darkprune.engine.decode import yolo_detections, region_detections
from darkprune.engine.network import Network
from darkprune.errors import DarkpruneError

from conftest import ASSETS, BUNDLED_CFG, BUNDLED_DATA, BUNDLED_WEIGHTS, ROOT, asset, asset_cfgs, run_cli

onnx = pytest.importorskip("onnx", reason="ONNX export tests need the onnx package (pip install darkprune[onnx])")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (pip install darkprune[onnx])")

from darkprune.export import build_onnx, export_onnx, onnx_refusal  # noqa: E402

TOL = 1e-4
# cfgs with more parameters than this run only on request, DARKPRUNE_TEST_ONNX_ALL=1 (marked slow too): building,
# checking and loading a few hundred MB of random weights takes 5-60 s each, some 20 minutes for the 53 of them,
# and every layer type and option they use also occurs in a lighter cfg or in the small network below
LIGHT_PARAMS = 12_000_000
# and over this many (the cspx-p7 cfgs: 159-277 M) only with DARKPRUNE_TEST_HUGE=1 as well: the random weights, the
# ONNX file, the runtime's and the engine's copies then need over 8 GB
HUGE_PARAMS = 150_000_000
# the cfgs whose layer types the exporter does not cover (or our engine does not run), with the reason it gives
REFUSED = {
    "Gaussian_yolov3_BDD.cfg": "layer 82 [Gaussian_yolo]: ONNX export does not cover [Gaussian_yolo] layers",
    "t1.test.cfg": "layer 15 [detection]: ONNX export does not cover [detection] layers",
    "darknet53_448_xnor.cfg": "layer 1 [convolutional]: ONNX export does not cover binary (xnor=1) convolutions",
    "tiny-yolo_xnor.cfg": "layer 2 [convolutional]: ONNX export does not cover binary (xnor=1) convolutions",
    "yolov3-tiny_xnor.cfg": "layer 2 [convolutional]: ONNX export does not cover binary (xnor=1) convolutions",
}
MEASURED: dict[str, float] = {}     # cfg -> worst relative difference (printed at the end with -s)


@pytest.fixture(scope="module", autouse=True)
def _print_measured():
    yield
    for name, value in sorted(MEASURED.items()):
        print(f"measured: {name}: {value}")


def _shrunk(path: Path):
    """The cfg with the smallest square input (64, 96, 128...) its graph accepts; classifiers with [connected] or
    [crop] layers keep their size."""
    cfg = read_cfg(path)
    if any(s.type in ("connected", "crop") for s in cfg.layers):
        return cfg
    for side in (64, 96, 128, 256):
        if side >= max(cfg.net.get_int("width", 0), cfg.net.get_int("height", 0)):
            break
        cfg.net.set("width", side)
        cfg.net.set("height", side)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build_graph(cfg)
            return cfg
        except DarkpruneError:
            continue
    return read_cfg(path)


def _session(path_or_bytes):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes,
                                options, providers=["CPUExecutionProvider"])


def _squashed_scales(model: Model, network: Network, x: np.ndarray, outputs: list[int]) -> dict[int, float]:
    """For outputs that are a logistic's (a logistic conv, or a [yolo] head with new_coords=1 right after one):
    0.25 x the pre-activation's scale, computed by our engine's conv kernel without the activation. A logistic's
    slope is at most 1/4: float32 differences in the large pre-activations of random deep networks move saturated
    outputs by more than 1e-4 of their (0..1) scale without anything being wrong."""
    from darkprune.engine.conv import fold_batchnorm, prepare_conv2d
    targets = {}
    for index in outputs:
        layer = model.graph[index]
        conv = layer.inputs[0] if layer.type == "yolo" and layer.attrs["new_coords"] else index
        if conv >= 0 and model.graph[conv].attrs.get("activation") == "logistic" \
                and model.graph[conv].type == "convolutional":
            targets[index] = conv
    if not targets:
        return {}
    feeds = network.forward(x, outputs=sorted({model.graph[c].inputs[0] for c in targets.values()}))
    scales = {}
    for index, conv in targets.items():
        a = model.graph[conv].attrs
        p = model.params[conv if a["share"] is None else a["share"]]
        w, bias = p["weights"], p["biases"]
        if a["batch_normalize"]:
            w, bias = fold_batchnorm(w, bias, p["scales"], p["rolling_mean"], p["rolling_variance"], 1e-5)
        plan = prepare_conv2d(w, bias, a["stride_x"], a["stride_y"], a["pad"] * a["dilation"], a["dilation"],
                              a["groups"], activation="linear")
        scales[index] = 0.25 * float(np.abs(plan.forward(feeds[model.graph[conv].inputs[0]])).max())
    return scales


def _onnx_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = _session(path)
    return session.run(None, {"input": x})      # the session (a copy of every weight) goes when this returns


def _compare(model: Model, tmp_path: Path, x: np.ndarray, name: str) -> float:
    """Export `model`, check the file, run it in ONNX Runtime and return the worst difference against our engine's
    outputs, relative to each output's scale. Besides the network's outputs the graph also returns their inputs
    (a head's or softmax's input), which a saturated softmax or logistic would otherwise hide."""
    heads = model.graph.output_layers()
    layers = sorted(set(heads) | {i for o in heads for i in model.graph[o].inputs if i >= 0})
    path = tmp_path / "model.onnx"
    info = export_onnx(model, path, outputs=layers)
    onnx.checker.check_model(str(path))
    assert [o["layer"] for o in info["outputs"]] == layers
    got = _onnx_outputs(path, x)
    network = Network(model)
    want = network.forward(x, outputs=layers)
    squashed = _squashed_scales(model, network, x, layers)
    worst = 0.0
    for index, g in zip(layers, got):
        w = want[index]
        assert g.shape == w.shape, (index, g.shape, w.shape)
        assert np.isfinite(w).all() and float(w.std()) > 0, f"layer {index}: a degenerate output tests nothing"
        scale = max(float(np.abs(w).max()), squashed.get(index, 0.0))
        worst = max(worst, float(np.abs(g - w).max()) / scale)
    MEASURED[name] = worst
    return worst


def _case(path: Path):
    marks = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            params = build_graph(read_cfg(path)).total_params
        except DarkpruneError:
            params = 0
    if params > LIGHT_PARAMS:
        marks.append(pytest.mark.slow)
        if os.environ.get("DARKPRUNE_TEST_ONNX_ALL") != "1":
            marks.append(pytest.mark.skip(reason=f"{params / 1e6:.0f} M parameters: set DARKPRUNE_TEST_ONNX_ALL=1"))
    if params > HUGE_PARAMS and os.environ.get("DARKPRUNE_TEST_HUGE") != "1":
        marks.append(pytest.mark.skip(reason=f"{params / 1e6:.0f} M parameters: set DARKPRUNE_TEST_HUGE=1 (needs "
                                             f"over 8 GB of memory)"))
    return pytest.param(path, marks=marks, id=path.name)


MODEL_CFGS = sorted((ASSETS / "models").glob("*/*.cfg")) + [ROOT / "cfg" / "lenet.cfg"]
CFGS = [p for p in asset_cfgs(include_extra=False) + MODEL_CFGS if p.name not in REFUSED]


@pytest.mark.parametrize("path", [_case(p) for p in CFGS])
def test_onnx_runtime_matches_engine_on_asset_cfgs(path, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Model.from_cfg(_shrunk(path), seed=3)
    assert onnx_refusal(model) is None
    c, h, w = model.input_shape
    x = np.random.default_rng(0).random((2, c, h, w), dtype=np.float32)
    worst = _compare(model, tmp_path, x, path.name)
    assert worst <= TOL, f"{path.name}: ONNX Runtime differs from the engine by {worst:.2e} of the output scale"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_uncovered_cfgs_are_refused_with_one_line_naming_the_layer(name, tmp_path):
    path = asset("cfg", name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = read_cfg(path)
        model = Model(cfg, build_graph(cfg), {})    # no weights needed: the refusal comes before any is read
    reason = onnx_refusal(model)
    assert reason == f"{path}:{model.graph[int(REFUSED[name].split()[1])].section.line}: {REFUSED[name]}"
    with pytest.raises(DarkpruneError) as err:
        export_onnx(model, tmp_path / "x.onnx")
    assert str(err.value) == reason and "\n" not in reason
    assert not list(tmp_path.iterdir())


# The layer options and activations that no light asset cfg uses, in one small network (input 32x32): dilation,
# standalone [batchnorm] and [activation], share_index, both [reorg] directions, [reorg3d], [sam], [local_avgpool],
# upsample with scale, shortcuts over differently shaped inputs (cut and zero-padded flat prefixes), batch-normalised
# [connected], softmax with groups and temperature, and every activation the exporter maps.
ZOO_CFG = """
[net]
width=32
height=32
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
pad=1
activation=elu

[convolutional]
filters=8
size=3
dilation=2
pad=1
activation=selu

[activation]
activation=gelu

[batchnorm]

[convolutional]
filters=16
size=1
activation=hard_mish

[reorg]
stride=2

[convolutional]
filters=16
size=1
activation=ramp

[reorg]
stride=2
reverse=1

[reorg3d]
stride=2

[convolutional]
filters=16
size=3
pad=1
activation=plse

[sam]
from=-2
activation=tanh

[convolutional]
filters=16
size=1
activation=loggy

[maxpool]
size=3
stride=2

[local_avgpool]
size=2
stride=1

[upsample]
stride=2
scale=0.5

[convolutional]
filters=12
size=3
stride=2
pad=1
activation=relie

[shortcut]
from=13
activation=hardtan

[convolutional]
filters=12
size=1
activation=relu6

[shortcut]
from=10
activation=lhtan

[convolutional]
filters=6
size=1
activation=linear

[shortcut]
from=16

[route]
layers=20,19

[convolutional]
filters=24
size=1
activation=logistic

[shortcut]
from=21
activation=revleaky

[convolutional]
filters=24
size=1
activation=leaky

[convolutional]
share_index=24
filters=24
size=1
activation=linear

[avgpool]

[connected]
output=20
batch_normalize=1
activation=swish

[connected]
output=12
activation=mish

[softmax]
groups=3
temperature=2
"""


def test_every_option_and_activation_in_a_small_network(tmp_path):
    from darkprune.darknet.cfg import parse_cfg_text
    from darkprune.export.onnx_layers import ACTIVATIONS
    path = tmp_path / "zoo.cfg"
    path.write_text(ZOO_CFG)
    model = Model.from_cfg(parse_cfg_text(ZOO_CFG, str(path)), seed=6)
    assert model.graph[25].attrs["share"] == 24 and 25 not in model.params
    used = {layer.attrs.get("activation") for layer in model.graph} - {None}
    assert used >= set(ACTIVATIONS) - {"leaky", "relu"}     # those two: in nearly every asset cfg
    rng = np.random.default_rng(7)
    for layer in model.graph:   # batch norm that is not the identity, so the folding is tested
        p = model.params.get(layer.index, {})
        if "rolling_variance" in p:
            n = p["scales"].shape
            p["scales"][...] = rng.uniform(0.5, 1.5, n)
            p["rolling_mean"][...] = rng.normal(0, 0.3, n)
            p["rolling_variance"][...] = rng.uniform(0.2, 2.0, n)
            p["biases"][...] = rng.normal(0, 0.2, n)
    layers = list(range(len(model.graph)))
    x = rng.random((2, 3, 32, 32), dtype=np.float32)
    proto = build_onnx(model, outputs=layers)
    onnx.checker.check_model(proto)
    got = _session(proto.SerializeToString()).run(None, {"input": x})
    want = Network(model).forward(x, outputs=layers)
    for index, g in zip(layers, got):
        w = want[index]
        assert g.shape == w.shape and float(w.std()) > 0, index
        err = float(np.abs(g - w).max()) / float(np.abs(w).max())
        assert err <= TOL, f"layer {index} ({model.graph[index].type}): {err:.2e} of its scale"


REAL = [
    ("yolo-fastest-1.1", BUNDLED_CFG, BUNDLED_WEIGHTS),
    ("yolo-fastest-1.1-xl", ("models", "yolo-fastest-1.1", "yolo-fastest-1.1-xl.cfg"),
     ("models", "yolo-fastest-1.1", "yolo-fastest-1.1-xl.weights")),
    ("yoloface-50k", ("models", "yoloface", "yoloface-50k.cfg"), ("models", "yoloface", "yoloface-50k.weights")),
    ("yoloface-500k-v2", ("models", "yoloface", "yoloface-500k-v2.cfg"),
     ("models", "yoloface", "yoloface-500k-v2.weights")),
    ("lenet", ROOT / "cfg" / "lenet.cfg", ROOT / "weights" / "lenet.weights"),
    ("mnist-lenet", ("models", "mnist-lenet", "mnist_lenet.cfg"), ("models", "mnist-lenet", "mnist_lenet.weights")),
    ("cifar-small", ("models", "cifar-small", "cifar_small.cfg"), ("models", "cifar-small", "cifar_small.weights")),
]


def _real_input(model: Model, rng) -> np.ndarray:
    """Batch 2: a real photo (resized, RGB / 255) and uniform noise."""
    import cv2
    c, h, w = model.input_shape
    x = rng.random((2, c, h, w), dtype=np.float32)
    image = cv2.imread(str(asset("images", "dog.jpg")))
    image = cv2.cvtColor(cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
    image = image.astype(np.float32).transpose(2, 0, 1) / 255
    x[0] = image[:c] if c <= 3 else x[0]
    if c == 1:
        x[0] = image.mean(axis=0, keepdims=True)
    return x


def _path(p):
    return p if isinstance(p, Path) else asset(*p)


@pytest.mark.parametrize("name, cfg, weights", REAL, ids=[r[0] for r in REAL])
def test_onnx_runtime_matches_engine_with_real_weights(name, cfg, weights, tmp_path):
    model = dp.load(_path(cfg), _path(weights))
    x = _real_input(model, np.random.default_rng(1))
    worst = _compare(model, tmp_path, x, f"{name} (real weights)")
    assert worst <= TOL, f"{name}: ONNX Runtime differs from the engine by {worst:.2e} of the output scale"


# ----------------------------------------------------------------------------------------------------------------
# decoded boxes


def _engine_candidates(model: Model, heads: dict[int, np.ndarray], image: int):
    """Every (cell, anchor) candidate of every head, as the engine's decode lists them (thresh below any logistic
    output keeps them all), with boxes in input pixels."""
    net_w, net_h = model.graph.net["width"], model.graph.net["height"]
    boxes, objectness, scores = [], [], []
    for index, out in heads.items():
        layer = model.graph[index]
        params = dict(layer.attrs, type=layer.type)
        decode = yolo_detections if layer.type == "yolo" else region_detections
        dets = decode(out[image], params, net_w, net_h, thresh=-1e30)
        boxes.append(dets.boxes * np.array([net_w, net_h, net_w, net_h], np.float32))
        objectness.append(dets.objectness)
        scores.append(dets.probs)
    return np.concatenate(boxes), np.concatenate(objectness), np.concatenate(scores)


DECODE_CASES = [
    ("yolo-fastest-1.1 (real)", BUNDLED_CFG, BUNDLED_WEIGHTS),
    ("yoloface-500k-v2 (real)", ("models", "yoloface", "yoloface-500k-v2.cfg"),
     ("models", "yoloface", "yoloface-500k-v2.weights")),
    ("yolov7-tiny (new_coords)", ("cfg", "yolov7-tiny.cfg"), None),
    ("yolov2-tiny ([region])", ("cfg", "yolov2-tiny.cfg"), None),
]


@pytest.mark.parametrize("name, cfg, weights", DECODE_CASES, ids=[c[0].split()[0] for c in DECODE_CASES])
def test_decoded_boxes_and_scores_match_the_engines_decode(name, cfg, weights, tmp_path):
    if weights is None:
        model = Model.from_cfg(_shrunk(_path(cfg)), seed=4)
    else:
        model = dp.load(_path(cfg), _path(weights))
    x = _real_input(model, np.random.default_rng(2))
    path = tmp_path / "decoded.onnx"
    info = export_onnx(model, path, decode_boxes=True)
    onnx.checker.check_model(str(path))
    names = [o["name"] for o in info["outputs"]]
    assert names[-3:] == ["boxes", "objectness", "scores"]
    got = dict(zip(names, _session(path).run(None, {"input": x})))
    heads = Network(model).forward(x)
    for image in range(2):
        boxes, objectness, scores = _engine_candidates(model, heads, image)
        assert got["boxes"][image].shape == boxes.shape and got["scores"][image].shape == scores.shape
        np.testing.assert_allclose(got["objectness"][image], objectness, rtol=0, atol=TOL)
        np.testing.assert_allclose(got["scores"][image], scores, rtol=0, atol=TOL)
        # boxes in pixels: 1e-4 of the input size for the centres, relative 1e-4 for the (exp'ed) sizes
        size = max(model.graph.net["width"], model.graph.net["height"])
        np.testing.assert_allclose(got["boxes"][image][:, :2], boxes[:, :2], rtol=0, atol=TOL * size)
        np.testing.assert_allclose(got["boxes"][image][:, 2:], boxes[:, 2:], rtol=TOL, atol=TOL * size)


# ----------------------------------------------------------------------------------------------------------------
# the file itself


def test_batch_is_dynamic_and_metadata_names_cfg_version_and_opset(tmp_path):
    model = dp.load(ROOT / "cfg" / "lenet.cfg", ROOT / "weights" / "lenet.weights")
    path = tmp_path / "lenet.onnx"
    export_onnx(model, path)
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == 17 and proto.producer_name == "darkprune"
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["cfg"] == "lenet.cfg" and meta["weights"] == "lenet.weights"
    assert meta["darkprune_version"] == dp.__version__ and meta["opset"] == "17"
    assert [o.name for o in proto.graph.output] == ["softmax6"]     # the engine's output layer
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    session = _session(path)
    x = np.random.default_rng(3).random((3, 1, 28, 28), dtype=np.float32)
    together = session.run(None, {"input": x})[0]
    for i in range(3):
        alone = session.run(None, {"input": x[i:i + 1]})[0]
        np.testing.assert_allclose(alone[0], together[i], rtol=0, atol=1e-6)


@pytest.mark.parametrize("opset", [13, 21])
def test_other_opsets_run(opset, tmp_path):
    model = Model.from_cfg(_shrunk(asset("cfg", "yolov4-tiny.cfg")), seed=5)
    proto = build_onnx(model, opset=opset, decode_boxes=True)
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version == opset
    x = np.random.default_rng(4).random((2, *model.input_shape), dtype=np.float32)
    got = _session(proto.SerializeToString()).run(None, {"input": x})
    for g, w in zip(got, Network(model).forward(x).values()):
        assert float(np.abs(g - w).max()) <= TOL * float(np.abs(w).max())


def test_bad_opset_and_missing_onnx_are_one_line_errors(tmp_path, monkeypatch):
    model = dp.load(ROOT / "cfg" / "lenet.cfg", ROOT / "weights" / "lenet.weights")
    with pytest.raises(dp.DarkpruneError, match=r"^opset 9: the exporter writes opsets 13 to \d+"):
        export_onnx(model, tmp_path / "x.onnx", opset=9)
    with pytest.raises(dp.DarkpruneError, match="has no \\[yolo\\] or \\[region\\] head"):
        export_onnx(model, tmp_path / "x.onnx", decode_boxes=True)
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)
    with pytest.raises(dp.DarkpruneError, match=r"pip install darkprune\[onnx\]"):
        export_onnx(model, tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------------
# command line


def test_cli_export_json_quiet_and_never_over_an_input(tmp_path, capsys):
    out = tmp_path / "yf.onnx"
    code, stdout, stderr = run_cli(capsys, "export", BUNDLED_CFG, BUNDLED_WEIGHTS, "-o", out, "--decode", "--json",
                                   "--quiet", "--opset", "15")
    assert code == 0 and stderr == ""
    result = json.loads(stdout)
    assert result["path"] == str(out) and result["opset"] == 15 and result["decode_boxes"] is True
    assert result["inputs"] == [{"name": "input", "shape": ["batch", 3, 320, 320]}]
    assert [o["name"] for o in result["outputs"]] == ["yolo121", "yolo130", "boxes", "objectness", "scores"]
    assert result["outputs"][2]["shape"] == ["batch", 1500, 4] and result["bytes"] == out.stat().st_size
    onnx.checker.check_model(str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["yf.onnx"]   # no temp file left behind

    code, stdout, stderr = run_cli(capsys, "export", BUNDLED_CFG, BUNDLED_WEIGHTS, "-o", out)
    assert code == 0 and "written: " in stdout and "opset 17" in stdout

    copy = tmp_path / "copy.weights"
    copy.write_bytes(BUNDLED_WEIGHTS.read_bytes())
    code, stdout, stderr = run_cli(capsys, "export", BUNDLED_CFG, copy, "-o", copy)
    assert code == 1 and "refusing to overwrite an input file" in stderr and stdout == ""
    assert copy.read_bytes() == BUNDLED_WEIGHTS.read_bytes()

    code, stdout, stderr = run_cli(capsys, "export", BUNDLED_CFG, BUNDLED_WEIGHTS, "-o", out, "--opset", "3")
    assert code == 1 and stderr.startswith("darkprune export: error: --opset 3: the exporter writes opsets") and stderr.count("\n") == 1

    code, stdout, stderr = run_cli(capsys, "export", asset("cfg", "yolov3-tiny_xnor.cfg"), "-o", tmp_path / "x.onnx")
    assert code == 1 and "layer 2 [convolutional]: ONNX export does not cover binary" in stderr

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, stdout, stderr = run_cli(capsys, "export", BUNDLED_CFG, BUNDLED_WEIGHTS, "-o", blocker / "m.onnx")
    assert code == 1 and "a_file" in stderr and stderr.count("\n") == 1 and "Traceback" not in stderr


# ----------------------------------------------------------------------------------------------------------------
# a transformed model keeps its mAP through ONNX Runtime


def test_transformed_yolo_fastest_keeps_its_map_through_onnx_runtime(tmp_path):
    from darkprune.prune.groups import find_groups
    from darkprune.prune.plan import Plan
    from darkprune.prune.transform import transform

    data_path = BUNDLED_DATA if BUNDLED_DATA.exists() else asset("coco128", "coco128.data")
    model = dp.load(BUNDLED_CFG, BUNDLED_WEIGHTS)
    # a cheap plan instead of an analysis: the widest groups (224 channels) lose their 25% weakest channels (L1)
    rates = {g.id: 0.25 for g in find_groups(model.graph) if g.prunable and g.channels >= 224}
    small = transform(dp.prune(model, Plan(rates, "rate", 0.25)))
    assert small.graph.total_params < 0.95 * model.graph.total_params
    small.save(tmp_path / "small.cfg", tmp_path / "small.weights")
    small = dp.load(tmp_path / "small.cfg", tmp_path / "small.weights")
    export_onnx(small, tmp_path / "small.onnx")
    onnx.checker.check_model(str(tmp_path / "small.onnx"))
    session = _session(tmp_path / "small.onnx")
    heads = small.graph.output_layers()
    data = dp.load_data(str(data_path), split="valid")
    assert len(data) == 128

    start = time.perf_counter()
    ours = dp.evaluate(small, data, progress=False, cache_dir=tmp_path / "cache")
    engine_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = dp.evaluate(small, data, progress=False, cache_dir=tmp_path / "cache",
                         forward=lambda x: dict(zip(heads, session.run(None, {"input": x}))))
    onnx_s = time.perf_counter() - start
    MEASURED["transformed yolo-fastest mAP@0.5 engine / onnxruntime"] = (ours["map50"], theirs["map50"])
    print(f"\ntransformed Yolo-Fastest ({small.graph.total_params} params): mAP@0.5 engine {ours['map50']:.6f} "
          f"({engine_s:.1f} s), ONNX Runtime {theirs['map50']:.6f} ({onnx_s:.1f} s)")
    assert ours["map50"] > 0.2
    assert abs(ours["map50"] - theirs["map50"]) <= 0.0005
