"""The engine's GEMM (BLAS called from numba threads) and thread control."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

from darkprune.engine import blas

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("mkn", [(1, 1, 1), (5, 7, 3), (33, 200, 1000), (700, 30, 20)])
def test_matmul_matches_numpy(dtype, trans_a, trans_b, mkn):
    m, k, n = mkn
    rng = np.random.default_rng(m + k + n)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    c = rng.standard_normal((m, n)).astype(dtype)
    expected = 0.5 * ((a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64))
    expected += 2.0 * c
    got = blas.matmul(a, b, c.copy(), trans_a=trans_a, trans_b=trans_b, alpha=0.5, beta=2.0)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    assert np.abs(got - expected).max() <= tol * max(1.0, np.abs(expected).max())


def test_matmul_rejects_bad_input():
    with pytest.raises(ValueError):
        blas.matmul(np.zeros((2, 3), np.float32), np.zeros((4, 2), np.float32))
    with pytest.raises(TypeError):
        blas.matmul(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float64))


def test_thread_control():
    before = numba.get_num_threads()
    try:
        found = blas.set_threads(1)
        assert numba.get_num_threads() == 1
        if found:
            # the engine splits GEMMs itself: BLAS stays single-threaded
            assert blas.get_blas_threads() == 1
            assert blas.blas_library() is not None
            assert blas.set_blas_threads(2) and blas.get_blas_threads() == 2
            blas.set_blas_threads(1)
        else:
            assert blas.get_blas_threads() is None
        assert blas.set_threads(10_000) == found  # clamped to numba's pool, no error
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    finally:
        numba.set_num_threads(before)


def test_numba_fallback_gemm_in_a_fresh_process():
    """With no BLAS symbol (forced here), the kernels run on the numba fallback GEMM and give the same result."""
    code = (
        "import numpy as np\n"
        "from darkprune.engine import blas\n"
        "from darkprune.engine.conv import conv2d_forward\n"
        "assert 'fallback' in blas.gemm_backend(), blas.gemm_backend()\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.standard_normal((2, 16, 9, 9)).astype(np.float32)\n"
        "w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)\n"
        "a = rng.standard_normal((37, 19)); b = rng.standard_normal((23, 19))\n"
        "assert np.allclose(blas.matmul(a, b, trans_b=True), a @ b.T)\n"
        "for path in ('im2col', 'winograd'):\n"
        "    np.save(f'{path}.npy', conv2d_forward(x, w, None, 1, 1, 1, path=path))\n"
    )
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, DARKPRUNE_ENGINE_GEMM="numba", PYTHONPATH=str(ROOT))
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        from darkprune.engine.conv import conv2d_forward

        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 16, 9, 9)).astype(np.float32)
        w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
        for path in ("im2col", "winograd"):
            ref = conv2d_forward(x, w, None, 1, 1, 1, path=path)
            assert np.abs(np.load(Path(tmp) / f"{path}.npy") - ref).max() <= 1e-5 * np.abs(ref).max()
