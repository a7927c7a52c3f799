from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
BUNDLED_CFG = ROOT / "cfg" / "yolo-fastest-1.1.cfg"
BUNDLED_WEIGHTS = ROOT / "weights" / "yolo-fastest-1.1.weights"
BUNDLED_DATA = ROOT / "data" / "coco128-val" / "coco128-val.data"


def run_cli(capsys, *argv):
    """`darkprune ARGV...` in this process: (exit code, stdout, stderr)."""
    from darkprune.cli import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def asset(*parts: str) -> Path:
    """A file under ../shared/assets; the test is skipped when the shared assets are not beside the project."""
    path = ASSETS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared asset {path} not present")
    return path


def asset_cfgs(include_extra: bool = True) -> list[Path]:
    """Every non-recurrent cfg in ../shared/assets/cfg (the flat folder, plus yolov1/ and pjreddie/ as extra)."""
    folder = ASSETS / "cfg"
    if not folder.exists():
        return []
    cfgs = sorted(folder.glob("*.cfg"))
    if include_extra:
        cfgs += sorted((folder / "yolov1").glob("*.cfg")) + sorted((folder / "pjreddie").glob("*.cfg"))
    return cfgs


def real_model_pairs() -> list[tuple[Path, Path]]:
    pairs = []
    for weights in sorted((ASSETS / "models").glob("*/*.weights")):
        cfg = weights.with_suffix(".cfg")
        if cfg.exists():
            pairs.append((cfg, weights))
    if not pairs:
        pairs.append((BUNDLED_CFG, BUNDLED_WEIGHTS))
    return pairs


@pytest.fixture(scope="session")
def darknet():
    """The real Darknet executable, built once into a cache folder outside the project (tests/darknet_binary.py);
    the test is skipped, with the reason, when it cannot be built here (no compiler, no source)."""
    from darknet_binary import darknet_binary
    return darknet_binary()
