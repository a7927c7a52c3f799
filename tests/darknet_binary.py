"""The real Darknet (AlexeyAB's, commit 59596d7, from ../shared/assets/darknet) built once into a cache folder
outside the project, for tests that compare darkprune with what Darknet itself loads, prints and trains.

``darknet_binary()`` returns the path of the built executable, or calls ``pytest.skip`` with the reason (no source
tarball, no C compiler or make, a failed build). The build goes into a fresh temporary folder beside the cache
entry and is renamed into place only when it finished, so a killed build is never half-used; a lock file serialises
two processes that start it at the same time. Reused on later runs. The cache folder is
``$DARKPRUNE_CACHE/darknet-59596d7`` (default ``~/.cache/darkprune/darknet-59596d7``); it keeps the build tree,
whose ``3rdparty/stb/include`` a test compiles against.

Build flags: CPU only, no OpenCV (Darknet then decodes images with stb_image and resizes with its own code), AVX
when the CPU has it, OpenMP: ``make GPU=0 CUDNN=0 OPENCV=0 AVX=1 OPENMP=1`` as in the assets' MANIFEST.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARBALL = ROOT.parent / "shared" / "assets" / "darknet" / "darknet-59596d7.tar.gz"
VERSION = "darknet-59596d7"
BUILD_TIMEOUT = 1800


def cache_dir() -> Path:
    base = os.environ.get("DARKPRUNE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "darkprune") / VERSION


def _cpu_has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _build(target: Path) -> str | None:
    """Build into a temp folder beside `target`, rename it to `target`; returns None, or why it could not."""
    if not TARBALL.is_file():
        return f"the Darknet source {TARBALL} is not present"
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None or shutil.which("g++") is None or shutil.which("make") is None:
        return "no C/C++ compiler (gcc, g++) or make on PATH to build Darknet"
    build_root = Path(tempfile.mkdtemp(prefix=f".{VERSION}-build-", dir=target.parent))
    try:
        with tarfile.open(TARBALL) as tar:
            tar.extractall(build_root, filter="data")
        source = build_root / "darknet"
        avx = "1" if _cpu_has_avx2() else "0"
        jobs = str(max(1, min(4, os.cpu_count() or 1)))
        try:
            done = subprocess.run(["make", "-C", str(source), f"-j{jobs}", "GPU=0", "CUDNN=0", "OPENCV=0",
                                   f"AVX={avx}", "OPENMP=1"], stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, errors="replace", timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            return f"building Darknet took over {BUILD_TIMEOUT} s"
        if done.returncode != 0 or not (source / "darknet").is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return f"building Darknet failed (make exited with {done.returncode}: {tail[0]})"
        os.replace(source, target)
        return None
    finally:
        shutil.rmtree(build_root, ignore_errors=True)


def darknet_binary() -> Path:
    """The built Darknet executable (built on first use), or pytest.skip with the reason."""
    target = cache_dir()
    binary = target / "darknet"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)      # a second process waits here, then finds the finished build
        if not binary.is_file():
            reason = _build(target)
            if reason is not None:
                pytest.skip(reason)
    return binary


def run_darknet(binary: Path, *args, cwd: Path, timeout: float = 900) -> str:
    """Run Darknet (stdin closed: it calls getchar() on some errors), return stdout + stderr; fail on a non-zero
    exit. One OpenMP thread: the tests share the machine, and spinning OpenMP threads only slow a busy one down."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
    done = subprocess.run([str(binary), *map(str, args)], cwd=str(cwd), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, errors="replace", timeout=timeout, env=env)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-5:])
        raise AssertionError(f"darknet {' '.join(map(str, args))} exited with {done.returncode}:\n{tail}")
    return output


def detection_data(folder: Path, images: list[Path], names: Path) -> Path:
    """A .data file Darknet reads from any folder: absolute image paths (Darknet's label rule, /images/ ->
    /labels/ and .jpg -> .txt, then finds each label file), train= and valid= the same list."""
    folder.mkdir(parents=True, exist_ok=True)
    listing = folder / "images.txt"
    listing.write_text("".join(f"{Path(p).resolve()}\n" for p in images))
    data = folder / "darknet.data"
    data.write_text(f"classes=80\ntrain={listing}\nvalid={listing}\nnames={names.resolve()}\n"
                    f"backup={folder / 'backup'}\n")
    return data


def darknet_map(binary: Path, data: Path, cfg: Path, weights: Path, points: int = 0) -> float:
    """`darknet detector map` at IoU 0.5: the printed mAP@0.50 as a fraction."""
    output = run_darknet(binary, "detector", "map", data, cfg, weights, "-points", points, "-dont_show",
                         cwd=data.parent)
    found = re.search(r"mean average precision \(mAP@0\.50\) = ([0-9.]+)", output)
    assert found, f"no mAP line in Darknet's output:\n{output[-2000:]}"
    return float(found.group(1))


def total_bflops(binary: Path, cfg: Path, cwd: Path) -> str:
    """The "Total BFLOPS" figure Darknet prints when it parses a cfg, as printed (3 decimals). `partial` with
    /dev/null for weights and 0 layers to copy parses the cfg at batch 1 and reads no weights."""
    output = run_darknet(binary, "partial", cfg, os.devnull, os.devnull, 0, cwd=cwd, timeout=300)
    found = re.search(r"Total BFLOPS\s+([0-9.]+)", output)
    assert found, f"{cfg}: no Total BFLOPS line in Darknet's output:\n{output[-2000:]}"
    return found.group(1)


_STB_TO_PNG = r"""
/* Decode images with stb_image (as Darknet built without OpenCV does, 3 channels) and store the pixels losslessly
   as PNG: argv = IN1 OUT1 IN2 OUT2 ... */
#define STB_IMAGE_IMPLEMENTATION
#include "stb_image.h"
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include "stb_image_write.h"
#include <stdio.h>
int main(int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i += 2) {
        int w, h, c;
        unsigned char *pixels = stbi_load(argv[i], &w, &h, &c, 3);
        if (!pixels) { fprintf(stderr, "%s: %s\n", argv[i], stbi_failure_reason()); return 1; }
        if (!stbi_write_png(argv[i + 1], w, h, 3, pixels, w * 3)) { fprintf(stderr, "%s: write failed\n", argv[i + 1]); return 1; }
        stbi_image_free(pixels);
    }
    return 0;
}
"""


def stb_decoded_copy(binary: Path, images: list[Path], folder: Path) -> list[Path]:
    """`images` decoded by stb_image (the decoder inside the Darknet binary) and written as lossless PNGs under
    FOLDER/images/, with their label files under FOLDER/labels/: fed these, darkprune sees Darknet's pixels exactly."""
    stb = binary.parent / "3rdparty" / "stb" / "include"
    tool = folder / "stb_to_png"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(exist_ok=True)
    source = folder / "stb_to_png.c"
    source.write_text(_STB_TO_PNG)
    compiler = shutil.which("gcc") or shutil.which("cc")
    subprocess.run([compiler, "-O1", f"-I{stb}", str(source), "-o", str(tool), "-lm"], check=True,
                   capture_output=True)
    out, args = [], []
    for image in images:
        png = folder / "images" / (Path(image).stem + ".png")
        label = Path(str(image).replace("/images/", "/labels/")).with_suffix(".txt")
        shutil.copyfile(label, folder / "labels" / (Path(image).stem + ".txt"))
        args += [str(image), str(png)]
        out.append(png)
    for start in range(0, len(args), 64):
        subprocess.run([str(tool), *args[start:start + 64]], check=True, capture_output=True)
    return out
