"""scripts/recover_yolo_fastest.py --quick: the recipe runs end to end on real images and writes a pair that OpenCV
loads, with fewer BFLOPs, and a table whose figures are the files' own."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, asset

cv2 = pytest.importorskip("cv2")


def test_quick_recipe_writes_a_smaller_pair_opencv_loads_and_its_table(tmp_path):
    data = asset("coco128", "coco128.data")
    ws = tmp_path / "ws"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "recover_yolo_fastest.py"), "--quick", "-w", str(ws),
                          "--data", str(data)], capture_output=True, text=True, timeout=900,
                         env={"PYTHONPATH": str(ROOT), "DARKPRUNE_QUIET": "1", "DARKPRUNE_CACHE": str(tmp_path / "c"),
                              "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((ws / "recover.json").read_text())
    import darkprune as dp
    small = dp.load(str(ws / "recovered.cfg"), str(ws / "recovered.weights"))
    cv2.dnn.readNetFromDarknet(str(ws / "recovered.cfg"), str(ws / "recovered.weights"))
    original = dp.load(str(ROOT / "cfg" / "yolo-fastest-1.1.cfg"))
    assert small.graph.total_bflops == pytest.approx(report["recovered"]["bflops"])
    assert small.graph.total_bflops <= 0.7 * original.graph.total_bflops + 1e-9      # --final 0.3
    assert report["recovered"]["opencv_loads"] and report["recovered"]["opencv_max_difference"] < 1e-3
    assert [s["step"] for s in report["steps"]] == [1, 2]
    row = report["curve"][0]
    assert {"masked", "compensated", "reconstructed", "distilled"} <= set(row)
    assert "| recovered" in (ws / "recover.md").read_text()
    sizes = report["input_sizes"]            # --quick: 256x256, then with the 5% cut on top
    assert [(r["width"], r["height"], r["cut"]) for r in sizes] == [(256, 256, 0.0), (256, 256, 0.05)]
    assert sizes[0]["bflops"] == pytest.approx(original.graph.total_bflops * 0.64, rel=1e-6)
    assert sizes[1]["bflops"] < sizes[0]["bflops"] and 0 <= sizes[1]["map50"] <= 1
    assert "| 256x256 |" in (ws / "recover.md").read_text()
