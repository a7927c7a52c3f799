"""BLAS for the engine: thread control from Python, and a GEMM that numba kernels call from inside `prange`.

Why not numpy.matmul: on a small machine two thread pools fight. OpenBLAS's workers spin for a long while after each
call and numba's OpenMP workers spin after each parallel region; with both pools at N threads on N cores every
hand-over waits for a scheduler time slice (measured on the 2-core box: a 0.1 ms 1x1 convolution took 30-60 ms).
So the engine keeps a single pool: BLAS runs single-threaded and our numba kernels split the GEMMs across numba's
threads, calling the BLAS `cblas_?gemm` directly (resolved once here and registered with LLVM under a fixed alias,
so cached kernels stay valid across processes). That also lets a kernel fuse im2col, GEMM and the epilogue on a block
that is still in cache.

Finding the BLAS needs no extra dependency: the OpenBLAS numpy loaded is among the shared objects mapped into this
process (/proc/self/maps on Linux; numpy's bundled-library folders elsewhere), driven through ctypes; its symbols are
looked up by pattern (plain `cblas_sgemm`, OpenBLAS' `cblas_sgemm64_`, scipy-openblas' `scipy_cblas_sgemm64_`...).
When no usable BLAS is found the GEMM falls back to a (slower) numba implementation and the thread setters report
False.

Row-major GEMM for numba code:  gemm(ta, tb, m, n, k, alpha, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc)
    C[c_off...] (m x n, row stride ldc) = alpha * op(A) @ op(B) + beta * C; op(X) = X.T when the flag is set;
    a, b, c are contiguous float32 (or all float64) arrays, offsets and strides in elements.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import subprocess
import sys

# How numba's OpenMP workers wait between parallel regions. Sleeping at once (passive) costs a wake-up per region,
# ~50 us on this 2-core VM (an idle vCPU is halted and must be interrupted): a depthwise 3x3 on 8x160x160 took
# 107 us on two threads against 103 us on one, and Yolo-Fastest batch 1 on two threads 9.4 ms against 9.1 on one.
# A short spin bridges the few microseconds of Python between one layer's kernel and the next: the same layer
# 53 us, the network 5.7-6.0 ms. 10,000 spins last about half a millisecond after the last region, so a process
# that stops running the engine burns that much and no more (300,000, libgomp's own default, burns ~8 ms each
# time). When other processes hold the cores a spinning worker loses its turn and the regions wait for it; the
# runner then falls back to one thread by measurement (parallel.ThreadChoice). Only effective if set before numba
# first starts its thread pool, hence here, at import; a user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

import llvmlite.binding as llvm
import numba
import numpy as np
from numba import cfunc, njit, prange, types

_LIB_PATTERN = re.compile(r"(openblas|libblas|blis|flexiblas)[^/]*\.(so[.\d]*|dylib|dll)$", re.IGNORECASE)

_state: dict = {"searched": False, "lib": None, "path": None, "set": None, "get": None, "symbols": {},
                "backend": None, "blas_threads": None}

_ROW_MAJOR = 101
_NO_TRANS = 111
_TRANS = 112

SGEMM_ALIAS = "darkprune_engine_sgemm"
DGEMM_ALIAS = "darkprune_engine_dgemm"


def _mapped_libraries() -> list[str]:
    paths: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6:
                    path = parts[5].strip()
                    if path.startswith("/") and path not in paths:
                        paths.append(path)
    except OSError:
        pass
    if not paths:
        # no procfs (macOS, Windows): numpy's wheels bundle their BLAS next to the package
        try:
            root = os.path.dirname(os.path.dirname(np.__file__))
            for folder in ("numpy.libs", "numpy/.dylibs", "numpy/.libs"):
                paths.extend(glob.glob(os.path.join(root, folder, "*")))
        except Exception:  # pragma: no cover - best effort only
            pass
    return paths


def _exported(path: str) -> list[str]:
    try:
        out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True, timeout=10)
        return [line.split()[-1] for line in out.stdout.splitlines() if line.split()]
    except (OSError, subprocess.SubprocessError):
        return []


def _candidates(exported: list[str], stem: str) -> list[str]:
    """Names for `stem` (e.g. 'openblas_set_num_threads', 'cblas_sgemm'): exported ones first, then usual spellings."""
    found = [n for n in exported if stem in n and not n.endswith("_local") and "batch" not in n
             and not n.endswith("gemmt64_") and "gemmtr" not in n]
    guesses = []
    for prefix in ("", "scipy_"):
        for suffix in ("", "64_", "_64"):
            guesses.append(f"{prefix}{stem}{suffix}")
    return found + [g for g in guesses if g not in found]


def _lookup(lib, names):
    for name in names:
        try:
            return name, getattr(lib, name)
        except AttributeError:
            continue
    return None, None


def _find():
    if _state["searched"]:
        return _state["lib"]
    _state["searched"] = True
    for path in _mapped_libraries():
        if not _LIB_PATTERN.search(os.path.basename(path)):
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        exported = _exported(path)
        _, setter = _lookup(lib, _candidates(exported, "openblas_set_num_threads"))
        _, getter = _lookup(lib, _candidates(exported, "openblas_get_num_threads"))
        sname, sgemm = _lookup(lib, _candidates(exported, "cblas_sgemm"))
        dname, dgemm = _lookup(lib, _candidates(exported, "cblas_dgemm"))
        if setter is None and sgemm is None:
            continue
        if setter is not None:
            setter.argtypes = [ctypes.c_int]
            setter.restype = None
        if getter is not None:
            getter.argtypes = []
            getter.restype = ctypes.c_int
        _state.update(lib=lib, path=path, set=setter, get=getter)
        if sgemm is not None and dgemm is not None:
            _state["symbols"] = {"sgemm": (sname, sgemm), "dgemm": (dname, dgemm)}
        return lib
    return None


# ----------------------------------------------------------------------------------------------------------------
# the GEMM numba kernels call

_PTR_SIG_ARGS = (types.int32, types.int32, types.int32, types.int64, types.int64, types.int64)
_sgemm_sig = types.void(*_PTR_SIG_ARGS, types.float32, types.uintp, types.int64, types.uintp, types.int64,
                        types.float32, types.uintp, types.int64)
_dgemm_sig = types.void(*_PTR_SIG_ARGS, types.float64, types.uintp, types.int64, types.uintp, types.int64,
                        types.float64, types.uintp, types.int64)
_sgemm_ext = types.ExternalFunction(SGEMM_ALIAS, _sgemm_sig)
_dgemm_ext = types.ExternalFunction(DGEMM_ALIAS, _dgemm_sig)


def _fallback_gemm(dtype):
    """A numba GEMM with the cblas row-major signature, for when no BLAS symbol is reachable."""
    ptr = types.CPointer(types.float32 if dtype == np.float32 else types.float64)
    scalar = types.float32 if dtype == np.float32 else types.float64
    sig = types.void(*_PTR_SIG_ARGS, scalar, ptr, types.int64, ptr, types.int64, scalar, ptr, types.int64)

    @cfunc(sig)
    def fallback(order, ta, tb, m, n, k, alpha, a_ptr, lda, b_ptr, ldb, beta, c_ptr, ldc):
        a_rows = k if ta == _TRANS else m
        b_rows = n if tb == _TRANS else k
        a = numba.carray(a_ptr, (max(a_rows - 1, 0) * lda + lda,))
        b = numba.carray(b_ptr, (max(b_rows - 1, 0) * ldb + ldb,))
        c = numba.carray(c_ptr, (max(m - 1, 0) * ldc + ldc,))
        acc = np.empty(n, dtype=c.dtype)
        for i in range(m):
            for j in range(n):
                acc[j] = 0.0
            for p in range(k):
                av = a[p * lda + i] if ta == _TRANS else a[i * lda + p]
                if tb == _TRANS:
                    for j in range(n):
                        acc[j] += av * b[j * ldb + p]
                else:
                    base = p * ldb
                    for j in range(n):
                        acc[j] += av * b[base + j]
            row = i * ldc
            for j in range(n):
                if beta == 0.0:
                    c[row + j] = alpha * acc[j]
                else:
                    c[row + j] = alpha * acc[j] + beta * c[row + j]

    return fallback


def _lp64_adapter(dtype, symbol_address):
    """cblas with 32-bit integers behind the 64-bit-integer signature our kernels use."""
    alias = f"darkprune_engine_{'s' if dtype == np.float32 else 'd'}gemm_lp64"
    llvm.add_symbol(alias, symbol_address)
    scalar = types.float32 if dtype == np.float32 else types.float64
    inner = types.ExternalFunction(alias, types.void(types.int32, types.int32, types.int32, types.int32,
                                                     types.int32, types.int32, scalar, types.uintp, types.int32,
                                                     types.uintp, types.int32, scalar, types.uintp, types.int32))
    sig = _sgemm_sig if dtype == np.float32 else _dgemm_sig

    @cfunc(sig)
    def adapter(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        inner(order, ta, tb, np.int32(m), np.int32(n), np.int32(k), alpha, a, np.int32(lda), b, np.int32(ldb),
              beta, c, np.int32(ldc))

    return adapter


def _install_gemm() -> None:
    _find()
    # DARKPRUNE_ENGINE_GEMM=numba forces the fallback (to test it, or to rule the BLAS out when debugging)
    symbols = {} if os.environ.get("DARKPRUNE_ENGINE_GEMM", "").lower() == "numba" else _state["symbols"]
    keep = []
    if symbols:
        sname = symbols["sgemm"][0]
        ilp64 = sname.endswith("64_") or sname.endswith("_64")
        addr_s = ctypes.cast(symbols["sgemm"][1], ctypes.c_void_p).value
        addr_d = ctypes.cast(symbols["dgemm"][1], ctypes.c_void_p).value
        if ilp64:
            llvm.add_symbol(SGEMM_ALIAS, addr_s)
            llvm.add_symbol(DGEMM_ALIAS, addr_d)
            _state["backend"] = f"BLAS {sname} ({_state['path']})"
        else:
            keep = [_lp64_adapter(np.float32, addr_s), _lp64_adapter(np.float64, addr_d)]
            llvm.add_symbol(SGEMM_ALIAS, keep[0].address)
            llvm.add_symbol(DGEMM_ALIAS, keep[1].address)
            _state["backend"] = f"BLAS {sname}, 32-bit integers ({_state['path']})"
    else:
        keep = [_fallback_gemm(np.float32), _fallback_gemm(np.float64)]
        llvm.add_symbol(SGEMM_ALIAS, keep[0].address)
        llvm.add_symbol(DGEMM_ALIAS, keep[1].address)
        _state["backend"] = "numba fallback GEMM (no cblas found: slow)"
    _state["keepalive"] = keep
    # The engine splits GEMMs across numba's threads itself: BLAS must not start its own pool inside them.
    set_blas_threads(1)


@njit(cache=True, inline="always")
def gemm(ta, tb, m, n, k, alpha, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc):
    """Row-major C = alpha*op(A)@op(B) + beta*C on flat offsets (see the module doc). Sequential."""
    if m <= 0 or n <= 0:
        return
    t_a = _TRANS if ta else _NO_TRANS
    t_b = _TRANS if tb else _NO_TRANS
    if c.itemsize == 4:
        _sgemm_ext(_ROW_MAJOR, t_a, t_b, m, n, k, np.float32(alpha), a.ctypes.data + a_off * 4, lda,
                   b.ctypes.data + b_off * 4, ldb, np.float32(beta), c.ctypes.data + c_off * 4, ldc)
    else:
        _dgemm_ext(_ROW_MAJOR, t_a, t_b, m, n, k, np.float64(alpha), a.ctypes.data + a_off * 8, lda,
                   b.ctypes.data + b_off * 8, ldb, np.float64(beta), c.ctypes.data + c_off * 8, ldc)


@njit(cache=True, parallel=True, nogil=True)
def _par_gemm(ta, tb, alpha, a, b, beta, c, nsplit):
    """c (m x n) = alpha*op(a)@op(b) + beta*c, split into nsplit blocks of columns (or of rows when n is small)."""
    m, n = c.shape
    k = a.shape[0] if ta else a.shape[1]
    lda = a.shape[1]
    ldb = b.shape[1]
    by_cols = n >= m or n >= 64 * nsplit
    if by_cols:
        step = (n + nsplit - 1) // nsplit
        step = ((step + 15) // 16) * 16
    else:
        step = (m + nsplit - 1) // nsplit
    nblocks = ((n if by_cols else m) + step - 1) // step
    for blk in prange(nblocks):
        lo = blk * step
        if by_cols:
            hi = min(n, lo + step)
            # columns lo..hi of op(b): b[:, lo] when not transposed, b[lo, :] when transposed
            gemm(ta, tb, m, hi - lo, k, alpha, a, 0, lda, b, lo * ldb if tb else lo, ldb, beta, c, lo, n)
        else:
            hi = min(m, lo + step)
            gemm(ta, tb, hi - lo, n, k, alpha, a, lo if ta else lo * lda, lda, b, 0, ldb, beta, c, lo * n, n)


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, *, trans_a: bool = False,
           trans_b: bool = False, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """out = alpha * op(a) @ op(b) + beta * out for 2-D C-contiguous arrays of one float dtype, on numba's threads."""
    m = a.shape[1] if trans_a else a.shape[0]
    k = a.shape[0] if trans_a else a.shape[1]
    kb = b.shape[1] if trans_b else b.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    if k != kb:
        raise ValueError(f"matmul: inner dimensions differ ({k} and {kb})")
    if out is None:
        out = np.zeros((m, n), dtype=a.dtype) if beta != 0.0 else np.empty((m, n), dtype=a.dtype)
    if a.dtype != b.dtype or a.dtype != out.dtype or a.dtype not in (np.float32, np.float64):
        raise TypeError("matmul: a, b and out must share one float32/float64 dtype")
    if not (a.flags.c_contiguous and b.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("matmul: arrays must be C-contiguous")
    if out.shape != (m, n):
        raise ValueError(f"matmul: out has shape {out.shape}, expected {(m, n)}")
    if m == 0 or n == 0:
        return out
    if k == 0:
        out *= beta
        return out
    itemsize = a.dtype.itemsize
    threads = threads_for(2.0 * m * n * k, (m * k + k * n + m * n) * itemsize)
    with limit_threads(threads):
        _par_gemm(trans_a, trans_b, alpha, a, b, beta, out, 1 if threads == 1 else 2 * threads)
    return out


# ----------------------------------------------------------------------------------------------------------------
# thread control


# With the workers spinning (above) a parallel region costs 1-2 us on a quiet machine, so nearly every kernel is worth
# splitting; only the tiniest (a few microseconds of work) stay on the calling thread. A busy machine is the runner's
# concern (parallel.ThreadChoice), not each kernel's.
SMALL_WORK_US = 2.0


def threads_for(flops: float, bytes_moved: float = 0.0) -> int:
    """Threads worth engaging for a kernel of this size (estimated at ~100 GFLOP/s and ~40 GB/s per thread, what
    one thread of this machine does on layer-sized, cache-resident work)."""
    available = numba.get_num_threads()
    if available <= 1:
        return 1
    estimate_us = flops / 100e3 + bytes_moved / 40e3
    return int(max(1, min(available, estimate_us // SMALL_WORK_US)))


class limit_threads:
    """Context manager around engine kernels: run them on at most n numba threads, with BLAS single-threaded.

    The kernels call BLAS from numba's threads, so a BLAS allowed several threads of its own (someone called
    set_blas_threads(n) for numpy's sake) would stack a second pool on the same cores; it is set to 1 for the
    duration and restored afterwards. Both settings are restored on exit; nesting is fine."""

    __slots__ = ("n", "previous", "previous_blas")

    def __init__(self, n: int):
        self.n = int(n)
        self.previous = 0
        self.previous_blas = None

    def __enter__(self):
        self.previous = numba.get_num_threads()
        if self.n < self.previous:
            numba.set_num_threads(max(1, self.n))
        blas_threads = _state["blas_threads"]
        if blas_threads is not None and blas_threads != 1 and _state["set"] is not None:
            self.previous_blas = blas_threads
            _state["set"](1)
            _state["blas_threads"] = 1
        return self

    def __exit__(self, *exc):
        if numba.get_num_threads() != self.previous:
            numba.set_num_threads(self.previous)
        if self.previous_blas is not None:
            _state["set"](self.previous_blas)
            _state["blas_threads"] = self.previous_blas
            self.previous_blas = None
        return False


def blas_library() -> str | None:
    """Path of the BLAS numpy uses, or None when it could not be found."""
    _find()
    return _state["path"]


def gemm_backend() -> str:
    """What the engine's GEMM calls (for reports and benchmarks)."""
    return _state["backend"] or "not installed"


def set_blas_threads(n: int) -> bool:
    """Set BLAS's own thread count (it matters for numpy.matmul outside the engine); False when unreachable.

    Engine kernels call BLAS from numba's threads and switch it to 1 while they run (see limit_threads)."""
    if _find() is None or _state["set"] is None:
        return False
    n = max(1, int(n))
    _state["set"](n)
    _state["blas_threads"] = n
    return True


def get_blas_threads() -> int | None:
    """BLAS's own thread count, or None when unknown."""
    if _find() is None or _state["get"] is None:
        return None
    return int(_state["get"]())


def set_threads(n: int) -> bool:
    """Run the engine on n threads: numba's pool gets n (clamped to its size) and BLAS 1, because the engine splits
    its GEMMs across numba's threads itself (two pools on the same cores stall each other). True when the BLAS
    library was reachable and set."""
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return set_blas_threads(1)


def get_threads() -> tuple[int, int | None]:
    """(numba threads, BLAS threads or None)."""
    return numba.get_num_threads(), get_blas_threads()


_install_gemm()


if __name__ == "__main__":  # pragma: no cover - manual check
    print(gemm_backend(), get_threads(), set_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1), get_threads())
