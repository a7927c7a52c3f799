"""Darknet cfg/weights I/O and the layer graph, checked against Darknet's own figures and OpenCV's importer."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from darkprune.cli import main
from darkprune.darknet import load, parse_cfg_text, read_cfg
from darkprune.darknet.graph import build_graph
from darkprune.darknet.weights import WeightsHeader, expected_floats
from darkprune.errors import DarkpruneError

from conftest import ASSETS, BUNDLED_CFG, BUNDLED_WEIGHTS, asset, asset_cfgs, real_model_pairs

CFGS = asset_cfgs()


@pytest.mark.parametrize("path", CFGS, ids=[str(p.relative_to(ASSETS / "cfg")) for p in CFGS])
def test_every_asset_cfg_parses_round_trips_and_gets_shapes(path):
    raw = path.read_bytes()
    cfg = read_cfg(path)
    written = cfg.text().encode("ascii")
    if b"\r" not in raw and raw.isascii() and not raw.startswith(b"\xef\xbb\xbf"):
        assert written == raw
    again = parse_cfg_text(written.decode("ascii"), str(path))
    assert [(s.header, [(o.key, o.value) for o in s.options]) for s in again.sections] == \
           [(s.header, [(o.key, o.value) for o in s.options]) for s in cfg.sections]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = build_graph(cfg)
    assert len(graph) == len(cfg.sections) - 1
    for layer in graph:
        assert all(v > 0 for v in layer.out_shape), (layer.index, layer.out_shape)


# Darknet's own `Total BFLOPS` lines: the figures (yolov3-tiny, yolov4-tiny) and MANIFEST's (Yolo-Fastest).
@pytest.mark.parametrize("rel, total", [
    ("cfg/yolov3-tiny.cfg", 5.571), ("cfg/yolov4-tiny.cfg", 6.910),
    ("models/yolo-fastest-1.1/yolo-fastest-1.1.cfg", 0.252),
    ("models/yolo-fastest-1.1/yolo-fastest-1.1-xl.cfg", 0.725),
])
def test_total_bflops_equal_darknets(rel, total):
    graph = build_graph(read_cfg(asset(*rel.split("/"))))
    assert f"{graph.total_bflops:5.3f}".strip() == f"{total:.3f}"


def test_yolov3_tiny_layer_table_follows_darknet_rules():
    graph = build_graph(read_cfg(asset("cfg", "yolov3-tiny.cfg")))
    # Darknet's table: layer 11 is the stride-1 maxpool (13x13 -> 13x13, padding 1 at right/bottom).
    assert graph[10].out_shape == (512, 13, 13) and graph[11].type == "maxpool"
    assert graph[11].out_shape == (512, 13, 13)
    # conv 0: 16 3x3/1 416x416x3 -> 416x416x16 = 0.150 BF in Darknet's printout
    assert f"{graph[0].bflops:.3f}" == "0.150"
    route = graph[20]
    assert route.type == "route" and route.out_shape == (384, 26, 26)
    assert [(s.layer, s.start, s.stop) for s in route.sources] == [(19, 0, 128), (8, 0, 256)]


def test_route_groups_take_a_channel_slice():
    graph = build_graph(read_cfg(asset("cfg", "yolov4-tiny.cfg")))
    route = graph[3]  # [route] layers=-1 groups=2 group_id=1
    assert route.attrs["groups"] == 2 and route.out_shape == (32, 104, 104)
    assert [(s.layer, s.start, s.stop) for s in route.sources] == [(2, 32, 64)]


def test_cfg_reader_accepts_crlf_bom_and_tabs_and_writes_plain_lf_ascii(tmp_path):
    text = "[net]\nwidth=32\nheight = 32\nchannels=3\n\n[convolutional]\nfilters=4\nsize=3\nstride=1\npad=1\n" \
           "activation=leaky\n"
    messy = "\ufeff" + text.replace("\n", "\r\n").replace("height = 32", "height\t=\t32")
    path = tmp_path / "messy.cfg"
    path.write_bytes(messy.encode("utf-8"))
    cfg = read_cfg(path)
    graph = build_graph(cfg)
    assert graph.input_shape == (3, 32, 32) and graph[0].out_shape == (4, 32, 32)
    out = cfg.text().encode("ascii")
    assert b"\r" not in out and not out.startswith(b"\xef")
    assert parse_cfg_text(out.decode()).net.get_int("height") == 32


def test_first_of_repeated_keys_wins_as_in_darknet():
    cfg = parse_cfg_text("[net]\nwidth=8\nheight=8\nchannels=1\n[convolutional]\nfilters=2\nfilters=5\nsize=1\n")
    assert build_graph(cfg)[0].out_shape[0] == 2


def test_edited_option_and_unknown_keys_are_written_back():
    cfg = parse_cfg_text("[net]\nwidth=8\nheight=8\nchannels=1\n# note\n[convolutional]\nfilters=2\n"
                         "my_custom_key = hello\nsize=1\n")
    cfg.layers[0].set("filters", 7)
    text = cfg.text()
    assert "filters=7\n" in text and "my_custom_key = hello\n" in text and "# note\n" in text


@pytest.mark.parametrize("text, expected", [
    ("[net]\nwidth=8\nheight=8\nchannels=1\n[convolutional]\nfilters 2\n", "x.cfg:6: expected 'key=value'"),
    ("[net]\nwidth=8\nheight=8\nchannels=1\n[convolutinal]\nfilters=2\n", "x.cfg:5: unknown section [convolutinal]"),
    ("[net]\nwidth=8\nheight=8\nchannels=1\n[convolutional]\nfilters=3x\n", "x.cfg:6: [convolutional] filters=3x"),
    ("width=8\n[net]\n", "x.cfg:1: option 'width=8' appears before"),
    ("[convolutional]\nfilters=2\n", "x.cfg:1: the first section must be [net]"),
    ("[net]\nwidth=8\nheight=8\nchannels=1\n[route]\nlayers=-3\n", "x.cfg:6: layer 0 [route] layers refers to"),
    ("[net]\nwidth=8\nheight=8\nchannels=1\n[convolutional]\nactivation=leeky\n", "unknown activation 'leeky'"),
])
def test_malformed_cfgs_name_file_and_line(tmp_path, text, expected):
    path = tmp_path / "x.cfg"
    path.write_text(text)
    with pytest.raises(DarkpruneError) as err:
        build_graph(read_cfg(path))
    message = str(err.value)
    assert expected.replace("x.cfg", str(path)) in message and "\n" not in message


@pytest.mark.parametrize("cfg_path, weights_path", real_model_pairs(), ids=lambda p: Path(p).name)
def test_real_weights_round_trip_byte_exact(cfg_path, weights_path):
    model = load(cfg_path, weights_path)
    assert model.weights_bytes() == Path(weights_path).read_bytes()
    assert expected_floats(model.graph) * 4 + model.header.nbytes == Path(weights_path).stat().st_size


def test_old_header_with_32bit_seen_and_transposed_connected_round_trip(tmp_path):
    lenet_cfg = asset("models", "mnist-lenet", "mnist_lenet.cfg")
    model = load(lenet_cfg, asset("models", "mnist-lenet", "mnist_lenet.weights"))
    for header in (WeightsHeader(0, 1, 0, 12345), WeightsHeader(1001, 1001, 0, 77)):
        model.header = header
        data = model.weights_bytes()
        path = tmp_path / f"v{header.major}.weights"
        path.write_bytes(data)
        again = load(lenet_cfg, path)
        assert again.header == header and again.weights_bytes() == data
        for index, arrays in model.params.items():
            for name, arr in arrays.items():
                np.testing.assert_array_equal(again.params[index][name], arr)
    # the transposed layout really differs on disk
    model.header = WeightsHeader(0, 2, 0, 0)
    plain = model.weights_bytes()
    model.header = WeightsHeader(1001, 1001, 0, 0)
    assert model.weights_bytes()[20:] != plain[20:]


def test_opencv_loads_what_we_write_with_identical_output(tmp_path):
    cv2 = pytest.importorskip("cv2")
    cfg_path, weights_path = BUNDLED_CFG, BUNDLED_WEIGHTS
    model = load(cfg_path, weights_path)
    out_cfg, out_weights = tmp_path / "copy.cfg", tmp_path / "copy.weights"
    model.save(out_cfg, out_weights)
    image = cv2.imread(str(asset("images", "dog.jpg")))
    blob = cv2.dnn.blobFromImage(image, 1 / 255.0, (320, 320), swapRB=True, crop=False)
    outputs = []
    for c, w in ((cfg_path, weights_path), (out_cfg, out_weights)):
        net = cv2.dnn.readNetFromDarknet(str(c), str(w))
        net.setInput(blob)
        outputs.append(net.forward(net.getUnconnectedOutLayersNames()))
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a, b)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _cli_error(capsys, argv) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_truncated_weights_name_the_layer(tmp_path, capsys):
    data = BUNDLED_WEIGHTS.read_bytes()
    bad = _write(tmp_path / "cut.weights", data[: len(data) - 4000])
    line = _cli_error(capsys, ["info", str(BUNDLED_CFG), str(bad)])
    assert "cut.weights: ends in layer" in line and "needs 346062 floats" in line and "has 345062" in line


def test_over_long_weights_name_the_count_left_over(tmp_path, capsys):
    bad = _write(tmp_path / "long.weights", BUNDLED_WEIGHTS.read_bytes() + b"\0" * 40)
    line = _cli_error(capsys, ["info", str(BUNDLED_CFG), str(bad)])
    assert "10 floats left over" in line
    # Darknet's lenient partial load is an option
    assert main(["info", str(BUNDLED_CFG), str(bad), "--lenient", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == 346062


def test_wrong_header_is_refused(tmp_path, capsys):
    bad = _write(tmp_path / "text.weights", BUNDLED_CFG.read_bytes())
    line = _cli_error(capsys, ["info", str(BUNDLED_CFG), str(bad)])
    assert "text.weights: not a Darknet weights file: header version" in line
    tiny = _write(tmp_path / "tiny.weights", b"\0\0\0")
    assert "too short for a Darknet weights header" in _cli_error(capsys, ["info", str(BUNDLED_CFG), str(tiny)])


def test_weights_for_another_cfg_are_refused(capsys):
    other = asset("models", "yolo-fastest-1.1", "yolo-fastest-1.1-xl.weights")
    line = _cli_error(capsys, ["info", str(BUNDLED_CFG), str(other)])
    assert "floats left over" in line and "weights for another cfg" in line
    xl_cfg = asset("models", "yolo-fastest-1.1", "yolo-fastest-1.1-xl.cfg")
    line = _cli_error(capsys, ["info", str(xl_cfg), str(BUNDLED_WEIGHTS)])
    assert "ends in layer" in line


def test_missing_and_wrong_kind_of_files(tmp_path, capsys):
    assert "no such cfg file" in _cli_error(capsys, ["info", str(tmp_path / "nope.cfg")])
    assert "binary data" in _cli_error(capsys, ["info", str(BUNDLED_WEIGHTS)])
    empty = _write(tmp_path / "empty.cfg", b"")
    assert "no [net] section" in _cli_error(capsys, ["info", str(empty)])


def test_info_json_shape(capsys):
    assert main(["info", str(BUNDLED_CFG), str(BUNDLED_WEIGHTS), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_bflops"] == pytest.approx(0.252, abs=5e-4) and info["total_params"] == 346062
    first = info["layers"][0]
    assert {"index", "type", "out_shape", "bflops", "params", "sparsity"} <= set(first)
    assert first["out_shape"] == [8, 160, 160] and first["params"] == 8 * 3 * 9 + 8 + 24


def test_save_is_atomic_and_never_overwrites_inputs(tmp_path):
    model = load(BUNDLED_CFG, BUNDLED_WEIGHTS)
    with pytest.raises(DarkpruneError, match="refusing to overwrite an input"):
        model.save(tmp_path / "x.cfg", BUNDLED_WEIGHTS)
    with pytest.raises(DarkpruneError, match="does not exist"):
        model.save(tmp_path / "missing" / "x.cfg", tmp_path / "missing" / "x.weights")
    model.save(tmp_path / "x.cfg", tmp_path / "x.weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.cfg", "x.weights"]


def test_random_init_is_seeded_and_finite():
    a = load(asset("cfg", "yolov4-tiny.cfg"), seed=3)
    b = load(asset("cfg", "yolov4-tiny.cfg"), seed=3)
    c = load(asset("cfg", "yolov4-tiny.cfg"), seed=4)
    assert a.weights_bytes() == b.weights_bytes() != c.weights_bytes()
    assert np.all(a.params[0]["rolling_variance"] == 1)
