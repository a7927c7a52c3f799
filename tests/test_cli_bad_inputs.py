"""The consolidated bad-input suite: every command given a missing file, an empty file, a cfg with a typo, weights for
another cfg, a truncated weights file, a .data pointing at nothing, an unwritable output folder. Each must give exit
code 1 and one line on stderr naming the file or layer at fault, leave no half-written output and change no input."""
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from darkprune.cli import COMMANDS, main

from conftest import BUNDLED_CFG, BUNDLED_DATA, BUNDLED_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("quiet")


@pytest.fixture
def files(tmp_path):
    """Copies of the bundled pair and bad variants of it, all in tmp_path."""
    cfg = tmp_path / "model.cfg"
    weights = tmp_path / "model.weights"
    shutil.copyfile(BUNDLED_CFG, cfg)
    shutil.copyfile(BUNDLED_WEIGHTS, weights)
    data = BUNDLED_WEIGHTS.read_bytes()
    out = {
        "cfg": cfg, "weights": weights,
        "missing": tmp_path / "nowhere.cfg",
        "empty": tmp_path / "empty.cfg",
        "typo_cfg": tmp_path / "typo.cfg",
        "truncated": tmp_path / "truncated.weights",
        "other_weights": tmp_path / "other.weights",
        "bad_data": tmp_path / "nothing.data",
        "data": BUNDLED_DATA,
    }
    out["empty"].write_bytes(b"")
    out["typo_cfg"].write_text(cfg.read_text().replace("[convolutional]", "[convolutionl]", 3))
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["other_weights"].write_bytes(data[:20] + data[20:20 + 4 * 1000])
    out["bad_data"].write_text("classes=80\nvalid=no_such_list.txt\nnames=no_such.names\n")
    return out


def _digest(paths):
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths if Path(p).is_file()}


def _files_under(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def check_refused(capsys, argv, expect, watch: Path | None = None, inputs=()):
    before_inputs = _digest(inputs)
    before = _files_under(watch) if watch else None
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 1, (argv, code, err)
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert expect in lines[0], (expect, lines[0])
    if watch is not None:
        assert _files_under(watch) == before, "a half-written output was left behind"
    assert _digest(inputs) == before_inputs, "an input file was changed"
    return lines[0]


MODEL_COMMANDS = ["info", "eval", "run", "ana", "sweep", "bench"]


def _argv(command, cfg, weights, files, ws):
    image = str(ROOT / "data" / "coco128-val" / "images" / "000000000139.jpg")
    extra = {
        "info": [], "bench": ["--repeats", "1"],
        "eval": ["--data", files["data"], "--limit", "4"],
        "run": [image],
        "ana": ["--data", files["data"], "-w", ws, "--limit", "2", "--rates", "0.5"],
        "sweep": ["--data", files["data"], "-w", ws, "--limit", "2", "--rates", "0.5", "--thresholds", "0.01"],
    }[command]
    return [command, cfg, weights] + extra


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_missing_empty_typo_cfgs(capsys, files, tmp_path, command):
    ws = tmp_path / "ws"
    check_refused(capsys, _argv(command, files["missing"], files["weights"], files, ws), "nowhere.cfg: no such cfg")
    check_refused(capsys, _argv(command, files["empty"], files["weights"], files, ws), "empty.cfg: no [net] section")
    check_refused(capsys, _argv(command, files["typo_cfg"], files["weights"], files, ws),
                  "unknown section [convolutionl]", inputs=[files["typo_cfg"]])
    assert not ws.exists() or not any(ws.iterdir())


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_bad_weights(capsys, files, tmp_path, command):
    ws = tmp_path / "ws"
    check_refused(capsys, _argv(command, files["cfg"], files["truncated"], files, ws),
                  "truncated.weights: ends in layer", inputs=[files["truncated"], files["cfg"]])
    check_refused(capsys, _argv(command, files["cfg"], files["other_weights"], files, ws),
                  "other.weights: ends in layer", inputs=[files["other_weights"]])
    check_refused(capsys, _argv(command, files["cfg"], tmp_path / "gone.weights", files, ws),
                  "gone.weights: no such weights file")


@pytest.mark.parametrize("command", ["eval", "ana", "sweep"])
def test_data_pointing_at_nothing(capsys, files, tmp_path, command):
    argv = _argv(command, files["cfg"], files["weights"], files, tmp_path / "ws")
    argv[argv.index(files["data"])] = files["bad_data"]
    line = check_refused(capsys, argv, "", inputs=[files["bad_data"]])
    assert "nothing.data" in line or "no_such" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_output_folder(capsys, files, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        check_refused(capsys, ["transform", files["cfg"], files["weights"], "-w", locked], "locked", watch=locked)
    finally:
        locked.chmod(0o700)


def test_unwritable_output_paths_even_as_root(capsys, files, tmp_path):
    """A path whose parent is a file cannot be written by anyone, root included."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    ws = blocker / "ws"
    check_refused(capsys, ["ana", files["cfg"], files["weights"], "--data", files["data"], "-w", ws, "--limit", "2",
                           "--rates", "0.5"], "a_file")
    check_refused(capsys, ["run", files["cfg"], files["weights"],
                           str(ROOT / "data" / "coco128-val" / "images" / "000000000139.jpg"), "--out", ws],
                  "a_file")


def test_every_command_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: darkprune" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert "darkprune" in capsys.readouterr().out
