"""`darkprune compress` / `darkprune decompress` on the command line: the report, the written files, the config
file, and every bad input giving one clear line and exit code 1 (usage errors: 2)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

import darkprune as dp
from darkprune.cli import main
from conftest import ASSETS, asset_files, run_cli

LENET = ASSETS / "models" / "mnist-lenet"


pytestmark = pytest.mark.usefixtures("quiet")


@pytest.fixture(scope="module")
def pair():
    return asset_files(LENET / "mnist_lenet.cfg", LENET / "mnist_lenet.weights")


@pytest.fixture(scope="module")
def compressed(pair, tmp_path_factory):
    """A .dcz written by the CLI, with its JSON report."""
    folder = tmp_path_factory.mktemp("cli-dcz")
    out = folder / "lenet.dcz"
    code = main(["compress", str(pair[0]), str(pair[1]), "--sparsity", "conv0=0.3,fc=0.8,connected8=0.5",
                 "--clusters", "conv=128,fc=16", "--index-bits", "conv=6,fc=4", "-o", str(out), "--json"])
    assert code == 0
    return out


def test_compress_json_report(pair, tmp_path, capsys):
    out = tmp_path / "x.dcz"
    code, stdout, err = run_cli(capsys, "compress", *pair, "--sparsity", "conv0=0.3,fc=0.8", "-o", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)  # one JSON object, nothing else on stdout
    assert report["files"]["dcz"] == str(out)
    assert report["total"]["bytes_after"] == os.path.getsize(out)
    assert report["total"]["weights_file_bytes"] == os.path.getsize(pair[1])
    by_name = {row["name"]: row for row in report["layers"]}
    assert by_name["conv0"]["clusters"] == 256 and by_name["conv0"]["index_bits"] == 8  # conv defaults
    assert by_name["connected4"]["clusters"] == 32 and by_name["connected4"]["index_bits"] == 5  # fc defaults
    assert by_name["connected4"]["weights_kept_share"] == pytest.approx(0.2, abs=1e-3)
    assert by_name["conv2"]["weights_kept_share"] == 1.0
    assert sum(row["bytes_after"] for row in report["layers"]) + report["total"]["overhead_bytes"] == \
        report["total"]["bytes_after"]


def test_compress_table(pair, tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "compress", *pair, "--sparsity", "fc=0.5", "-o", tmp_path / "t.dcz")
    assert code == 0
    assert "connected4" in stdout and "+huffman" in stdout and "x smaller" in stdout


def test_decompress_writes_the_quantised_pair(compressed, tmp_path, capsys):
    code, stdout, err = run_cli(capsys, "decompress", compressed, "-o", tmp_path / "back", "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert Path(info["cfg"]).exists() and Path(info["weights"]).exists()
    model = dp.load(info["cfg"], info["weights"])
    from darkprune.compress.pipeline import decompress
    reference = decompress(compressed)
    for index, arrays in reference.params.items():
        for name, value in arrays.items():
            assert np.array_equal(model.params[index][name].view(np.uint32), value.view(np.uint32))
    by_name = {row["name"]: row for row in info["layers"]}
    assert by_name["connected4"]["index_bits"] == 4 and by_name["conv0"]["index_bits"] == 6
    assert by_name["connected4"]["clusters"] <= 16 and by_name["conv0"]["clusters"] <= 128
    assert by_name["connected8"]["kept"] == round(0.5 * by_name["connected8"]["params"])
    # The cfg is the original text; no temp files are left behind.
    assert Path(info["cfg"]).read_text() == Path(LENET / "mnist_lenet.cfg").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.cfg", "back.weights"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "not-dcz"])
def test_corrupt_dcz_is_refused(compressed, tmp_path, capsys, damage):
    data = bytearray(compressed.read_bytes())
    bad = tmp_path / "bad.dcz"
    if damage == "truncate":
        bad.write_bytes(bytes(data[:len(data) // 2]))
    elif damage == "flip":
        data[len(data) // 2] ^= 0x10
        bad.write_bytes(bytes(data))
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        bad.write_bytes(Path(LENET / "mnist_lenet.weights").read_bytes())
    code, stdout, err = run_cli(capsys, "decompress", bad, "-o", tmp_path / "out")
    assert code == 1
    assert stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0]
    assert {"truncate": "truncated", "flip": "checksum", "empty": "bad.dcz", "not-dcz": "not a .dcz"}[damage] \
        in lines[0]
    assert not (tmp_path / "out.weights").exists() and not (tmp_path / "out.cfg").exists()


@pytest.mark.parametrize("flags, message", [
    (["--sparsity", "conv1=0.5"], "no layer named 'conv1'"),
    (["--sparsity", "conv0=1.5"], "outside [0, 1]"),
    (["--sparsity", "conv0=-0.2"], "outside [0, 1]"),
    (["--sparsity", "conv0"], "is not LAYER=VALUE"),
    (["--sparsity", "maxpool1=0.5"], "[maxpool]"),
    (["--clusters", "conv0=0"], "outside [1, 65536]"),
    (["--clusters", "nolayer=16"], "no layer named 'nolayer'"),
    (["--index-bits", "fc=17"], "outside [1, 16]"),
    (["--schedule", "conv0=0.5;conv0=0.2"], "lowers"),
    (["--sparsity", "conv0=0.5", "--finetune-iters", "5"], "training data"),
])
def test_bad_options_give_one_line_and_exit_1(pair, tmp_path, capsys, flags, message):
    code, stdout, err = run_cli(capsys, "compress", *pair, *flags, "-o", tmp_path / "x.dcz")
    assert code == 1, err
    assert stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "x.dcz").exists()


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["decompress", "x.dcz"])  # -o is required
    assert exc.value.code == 2


def test_missing_dcz(tmp_path, capsys):
    code, _, err = run_cli(capsys, "decompress", tmp_path / "nope.dcz", "-o", tmp_path / "o")
    assert code == 1 and "nope.dcz" in err


def test_config_file(pair, tmp_path, capsys):
    config = tmp_path / "run.txt"
    config.write_text(f"cfg={pair[0]}\nweights={pair[1]}\nsparsity=fc=0.7\nout={tmp_path / 'c.dcz'}\n"
                      "clusters=fc=8\nfancy_key=1\n[conv0]\nsparse_ratio=0.25\nclass_num=16\nindex_bits=4\n")
    with pytest.warns(UserWarning, match="fancy_key"):
        code, stdout, err = run_cli(capsys, "compress", "--config", config, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    by_name = {row["name"]: row for row in report["layers"]}
    assert by_name["conv0"]["weights_kept_share"] == pytest.approx(0.75, abs=0.01)
    assert by_name["conv0"]["clusters"] == 16 and by_name["conv0"]["index_bits"] == 4
    assert by_name["connected6"]["clusters"] == 8
    assert by_name["connected6"]["weights_kept_share"] == pytest.approx(0.3, abs=0.01)
    # A flag wins over the file.
    code, stdout, err = run_cli(capsys, "compress", "--config", config, "--sparsity", "fc=0.5", "--json")
    assert code == 0, err
    by_name = {row["name"]: row for row in json.loads(stdout)["layers"]}
    assert by_name["connected6"]["weights_kept_share"] == pytest.approx(0.5, abs=0.01)
    assert by_name["conv0"]["weights_kept_share"] == 1.0


def test_workspace_keeps_the_run(pair, tmp_path, capsys):
    ws = tmp_path / "ws"
    code, stdout, err = run_cli(capsys, "compress", *pair, "--sparsity", "conv0=0.3,fc=0.6", "-w", ws, "--json")
    assert code == 0, err
    assert json.loads(stdout)["files"]["dcz"] == str(ws / "model.dcz")
    for name in ("model.dcz", "config.txt", "masks.npz", "report.json", "pruned.cfg", "pruned.weights"):
        assert (ws / name).exists(), name
    # The workspace's config reruns the same compression.
    code, stdout2, err = run_cli(capsys, "compress", *pair, "--config", ws / "config.txt", "-o", tmp_path / "again.dcz",
                                 "--json")
    assert code == 0, err
    assert (tmp_path / "again.dcz").read_bytes() == (ws / "model.dcz").read_bytes()


def test_dead_neurons_are_pruned_unless_kept(pair, tmp_path, capsys):
    shares = {}
    for flags in ([], ["--keep-dead"]):
        code, stdout, err = run_cli(capsys, "compress", *pair, "--sparsity", "connected8=0.97", *flags,
                                    "-o", tmp_path / "d.dcz", "--json")
        assert code == 0, err
        shares[bool(flags)] = {row["name"]: row["weights_kept_share"] for row in json.loads(stdout)["layers"]}
    # connected8 keeps 3% of its 10 x 84 weights: most of connected6's 84 neurons feed nothing any more.
    assert shares[True]["connected6"] == 1.0
    assert shares[False]["connected6"] < 0.5
    assert shares[False]["connected8"] == shares[True]["connected8"]


def test_auto_index_bits_and_stripped_cfg(pair, tmp_path, capsys):
    from darkprune.compress.pipeline import best_index_bits, read_compressed
    code, stdout, err = run_cli(capsys, "compress", *pair, "--sparsity", "connected4=0.95,connected6=0.5",
                                "--index-bits", "fc=auto,connected8=3", "--strip-comments", "-o", tmp_path / "a.dcz",
                                "--json")
    assert code == 0, err
    by_name = {row["name"]: row for row in json.loads(stdout)["layers"]}
    model, specs = read_compressed(tmp_path / "a.dcz")
    assert by_name["connected8"]["index_bits"] == 3 and by_name["conv0"]["index_bits"] == 8
    for index in (4, 6):
        spec = specs[index]
        assert spec["index_bits"] == best_index_bits(spec["mask"], spec["labels"])
    # 95% sparse: long gaps, so "auto" picks wider indices than fc's default 5.
    assert specs[4]["index_bits"] > 5
    text = model.cfg.text()
    assert "#" not in text and "\n\n" not in text
    assert [s.type for s in model.cfg.sections] == [s.type for s in dp.load(*pair).cfg.sections]
    # The same in a config file (global and per-layer auto).
    config = tmp_path / "auto.txt"
    config.write_text("sparsity=connected4=0.95\nindex_bits=connected4=auto\nstrip_comments=1\n"
                      "[connected6]\nindex_bits=auto\n")
    code, stdout, err = run_cli(capsys, "compress", *pair, "--config", config, "-o", tmp_path / "b.dcz", "--json")
    assert code == 0, err
    assert json.loads(stdout)["config"]["index_bits"]["connected4"] == "auto"
    assert json.loads(stdout)["config"]["index_bits"]["connected6"] == "auto"


def test_config_errors_name_the_file(pair, tmp_path, capsys):
    config = tmp_path / "bad.txt"
    config.write_text("index_bits=fc=auto\nsparsity=conv0=2\n")
    code, _, err = run_cli(capsys, "compress", *pair, "--config", config, "-o", tmp_path / "x.dcz")
    assert code == 1 and str(config) in err and "outside [0, 1]" in err


def test_decompress_never_writes_over_its_input(compressed, tmp_path, capsys):
    source = tmp_path / "model.weights"           # a .dcz under a misleading name
    source.write_bytes(compressed.read_bytes())
    code, _, err = run_cli(capsys, "decompress", source, "-o", tmp_path / "model")
    assert code == 1 and "refusing to overwrite" in err
    assert source.read_bytes() == compressed.read_bytes()
    assert not (tmp_path / "model.cfg").exists()


def test_workspace_config_alone_reruns(pair, tmp_path, capsys):
    ws = tmp_path / "ws"
    code, _, err = run_cli(capsys, "compress", *pair, "--sparsity", "fc=0.6", "--index-bits", "fc=auto", "-w", ws)
    assert code == 0, err
    code, _, err = run_cli(capsys, "compress", "--config", ws / "config.txt", "-o", tmp_path / "again.dcz")
    assert code == 0, err
    assert (tmp_path / "again.dcz").read_bytes() == (ws / "model.dcz").read_bytes()
