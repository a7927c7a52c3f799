from pathlib import Path

import numpy as np
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


def central_difference(f, flat, i, eps):
    """(f() at flat[i] + eps - f() at flat[i] - eps) / (2 eps): flat is a view of the array f reads, perturbed in
    place and restored."""
    old = flat[i]
    flat[i] = old + eps
    up = f()
    flat[i] = old - eps
    down = f()
    flat[i] = old
    return (up - down) / (2 * eps)


def central_grad(f, x, eps, entries=None):
    """The gradient of the scalar f() w.r.t. x by central differences, over every entry of x or only the flat
    indices `entries` (the others are NaN). x (C-contiguous) is perturbed in place and restored."""
    grad = np.zeros_like(x) if entries is None else np.full_like(x, np.nan)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in (range(flat.size) if entries is None else entries):
        gflat[i] = central_difference(f, flat, i, eps)
    return grad


def quiet_cache(monkeypatch, folder) -> None:
    """For one test: no progress bars, and the decoded-input cache in `folder` (not the user's ~/.cache)."""
    monkeypatch.setenv("DARKPRUNE_QUIET", "1")
    monkeypatch.setenv("DARKPRUNE_CACHE", str(folder))


def asset_files(*paths: Path) -> tuple[Path, ...]:
    """The given shared-asset files; the test is skipped when any of them is missing."""
    if not all(path.exists() for path in paths):
        pytest.skip("shared assets not present")
    return paths


@pytest.fixture
def quiet(monkeypatch, tmp_path_factory, request):
    """quiet_cache with one cache folder per test module (modules opt in with pytest.mark.usefixtures("quiet"))."""
    quiet_cache(monkeypatch, tmp_path_factory.getbasetemp() / f"{request.module.__name__}-cache")


def perturb_params(model, rng) -> None:
    """Random weights come with zero biases and an identity batch norm; give them random shifts, scales and
    statistics, so that a pruned channel whose bias or batch-norm shift was not cleared would show."""
    for arrays in model.params.values():
        for name, arr in arrays.items():
            if name == "biases":
                arr[:] = rng.normal(0.0, 0.2, arr.shape)
            elif name == "scales":
                arr[:] = rng.uniform(0.5, 1.5, arr.shape)
            elif name == "rolling_mean":
                arr[:] = rng.normal(0.0, 0.2, arr.shape)
            elif name == "rolling_variance":
                arr[:] = rng.uniform(0.5, 2.0, arr.shape)


@pytest.fixture(params=["serial", "parallel"])
def kernels(request, monkeypatch):
    """Runs a test with the serial kernels (the small-layer default) and again with the parallel ones forced."""
    from darkprune.engine import pool, yolo
    if request.param == "parallel":
        monkeypatch.setattr(pool, "PARALLEL_MIN_WORK", 0)
        monkeypatch.setattr(yolo, "PARALLEL_MIN_SIZE", 0)
    return request.param


@pytest.fixture(scope="session")
def darknet():
    """The real Darknet executable, built once into a cache folder outside the project (tests/darknet_binary.py);
    the test is skipped, with the reason, when it cannot be built here (no compiler, no source)."""
    from darknet_binary import darknet_binary
    return darknet_binary()
