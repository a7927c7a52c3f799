"""Our convolution kernels against OpenCV's, layer by layer, on the convolutions of real networks.

For every convolutional layer of yolov4-tiny (416x416) and Yolo-Fastest 1.1 (320x320) (shapes walked from the cfgs in
../shared/assets), a one-layer Darknet cfg + weights is written to a temp folder and loaded with
cv2.dnn.readNetFromDarknet; the same layer (batch-norm folded, activation fused) runs through our Conv2dPlan.
Both use the same thread count (darkprune.workflow.timing.set_threads). Runs alternate in blocks
(5 of ours, 5 of OpenCV's, ...) so that load from other processes hits both alike without the two thread pools
fighting call by call; warm-ups excluded; median and min of the repeats. The per-network rows sum the layers
(identical layers are timed once and counted). OpenCV's per-layer time includes its per-call overhead (setInput,
forward bookkeeping), which a whole network pays once per layer too.

    .venv/bin/python benchmarks/bench_kernels.py [--threads 2] [--batch 1 8] [--repeat 15] [--net all]
        [--paths]        also time each 3x3 stride-1 layer on the im2col and Winograd paths
        [--full-opencv]  also time OpenCV on the whole network (context for the per-layer sums)
        [--clock cpu]    process CPU time instead of wall time (single-thread compute cost on a busy machine)
        [--json FILE]    write the measurements
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402

from darkprune.workflow.timing import set_threads  # noqa: E402
from darkprune.engine.conv import (  # noqa: E402
    PATH_IM2COL,
    PATH_WINOGRAD,
    fold_batchnorm,
    prepare_conv2d,
)

ASSETS = ROOT.parent / "shared" / "assets"
NETWORKS = {
    "yolov4-tiny": (ASSETS / "cfg" / "yolov4-tiny.cfg", 416),
    "yolo-fastest-1.1": (ASSETS / "models" / "yolo-fastest-1.1" / "yolo-fastest-1.1.cfg", 320),
}


# ------------------------------------------------------------------------------------------------------------------
# just enough of a cfg walk to know every convolution's input shape (the project's real parser lives in
# darkprune/darknet; this script stays independent of it)


def read_sections(path: Path) -> list[tuple[str, dict]]:
    sections: list[tuple[str, dict]] = []
    for raw in path.read_text(encoding="utf-8-sig").splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            sections.append((line.strip("[]").strip(), {}))
        elif "=" in line and sections:
            key, value = line.split("=", 1)
            sections[-1][1][key.strip()] = value.strip()
    return sections


def conv_layers(path: Path, size: int) -> list[dict]:
    sections = read_sections(path)
    net = sections[0][1]
    shape = (int(net.get("channels", 3)), size, size)
    shapes: list[tuple[int, int, int]] = []
    convs: list[dict] = []
    for index, (kind, opts) in enumerate(sections[1:]):
        c, h, w = shape
        if kind == "convolutional":
            k = int(opts.get("size", 1))
            stride = int(opts.get("stride", 1))
            pad = k // 2 if int(opts.get("pad", 0)) else int(opts.get("padding", 0))
            filters = int(opts["filters"])
            groups = int(opts.get("groups", 1))
            convs.append(dict(index=index, c=c, h=h, w=w, n=filters, k=k, stride=stride, pad=pad, groups=groups,
                              activation=opts.get("activation", "logistic"),
                              batch_normalize=int(opts.get("batch_normalize", 0))))
            shape = (filters, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1)
        elif kind == "maxpool":
            stride = int(opts.get("stride", 1))
            k = int(opts.get("size", stride))
            pad = int(opts.get("padding", k - 1))
            shape = (c, (h + pad - k) // stride + 1, (w + pad - k) // stride + 1)
        elif kind == "route":
            layers = [int(v) for v in opts["layers"].split(",")]
            layers = [v if v >= 0 else index + v for v in layers]
            groups = int(opts.get("groups", 1))
            total = sum(shapes[v][0] for v in layers) // groups
            shape = (total, shapes[layers[0]][1], shapes[layers[0]][2])
        elif kind == "upsample":
            stride = int(opts.get("stride", 2))
            shape = (c, h * stride, w * stride)
        elif kind in ("shortcut", "dropout", "yolo"):
            pass
        else:
            raise SystemExit(f"{path}: layer type [{kind}] not handled by this benchmark's shape walk")
        shapes.append(shape)
    return convs


# ------------------------------------------------------------------------------------------------------------------


def make_layer(spec: dict, rng: np.random.Generator):
    n, c, k, groups = spec["n"], spec["c"], spec["k"], spec["groups"]
    fan_in = (c // groups) * k * k
    weights = (rng.standard_normal((n, c // groups, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    biases = (rng.standard_normal(n) * 0.1).astype(np.float32)
    scales = rng.uniform(0.5, 1.5, n).astype(np.float32)
    mean = (rng.standard_normal(n) * 0.1).astype(np.float32)
    var = rng.uniform(0.5, 1.5, n).astype(np.float32)
    return weights, biases, scales, mean, var


def opencv_net(spec: dict, params, folder: str):
    weights, biases, scales, mean, var = params
    activation = spec["activation"]
    if activation not in ("linear", "leaky", "relu", "logistic", "tanh", "mish", "swish"):
        activation = "linear"
    cfg = (f"[net]\nbatch=1\nwidth={spec['w']}\nheight={spec['h']}\nchannels={spec['c']}\n\n"
           f"[convolutional]\nbatch_normalize=1\nfilters={spec['n']}\nsize={spec['k']}\nstride={spec['stride']}\n"
           f"padding={spec['pad']}\ngroups={spec['groups']}\nactivation={activation}\n")
    cfg_path = os.path.join(folder, "layer.cfg")
    weights_path = os.path.join(folder, "layer.weights")
    with open(cfg_path, "w", encoding="ascii") as f:
        f.write(cfg)
    with open(weights_path, "wb") as f:
        f.write(np.array([0, 2, 5], np.int32).tobytes() + np.array([0], np.int64).tobytes())
        for a in (biases, scales, mean, var, weights):
            f.write(a.astype(np.float32).tobytes())
    return cv2.dnn.readNetFromDarknet(cfg_path, weights_path), activation


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def interleaved(fns, repeat: int, warmup: int = 2, block: int = 5):
    """Median and min (ms) of `repeat` timed runs of each fn. Contestants alternate in blocks of `block` runs (the
    first run of each block is a discarded warm-up): per-call alternation would make each library's idle thread
    pool compete with the other's working one, which measures the pools' fight rather than either library."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    while len(times[0]) < repeat:
        for i, fn in enumerate(fns):
            fn()
            for _ in range(min(block, repeat - len(times[i]))):
                t0 = _clock()
                fn()
                times[i].append(_clock() - t0)
    return [(statistics.median(t) * 1e3, min(t) * 1e3) for t in times]


def network_weights(cfg: Path, convs: list[dict], folder: str, rng: np.random.Generator) -> str:
    """The real .weights beside the cfg when there is one, else a seeded random file (He-scaled filters, unit
    batch-norm variance) in `folder`."""
    real = cfg.with_suffix(".weights")
    if real.exists():
        return str(real)
    path = os.path.join(folder, cfg.stem + ".random.weights")
    with open(path, "wb") as f:
        f.write(np.array([0, 2, 5], np.int32).tobytes() + np.array([0], np.int64).tobytes())
        for spec in convs:
            weights, biases, scales, mean, var = make_layer(spec, rng)
            f.write(biases.tobytes())
            if spec["batch_normalize"]:
                f.write(scales.tobytes() + mean.tobytes() + var.tobytes())
            f.write(weights.tobytes())
    return path


def spec_key(s: dict):
    return (s["c"], s["h"], s["w"], s["n"], s["k"], s["stride"], s["pad"], s["groups"], s["activation"])


def run(args) -> dict:
    rng = np.random.default_rng(0)
    results = {"threads": args.threads, "opencv": cv2.__version__, "networks": {}}
    blas_ok = set_threads(args.threads)         # the timing harness' one thread policy
    print(f"threads={args.threads} (BLAS control: {'yes' if blas_ok else 'NOT FOUND'}), OpenCV {cv2.__version__}, "
          f"repeat={args.repeat}; ratio = ours / OpenCV (median of interleaved runs; < 1 means we are faster)")
    with tempfile.TemporaryDirectory() as folder:
        for net_name, (cfg, size) in NETWORKS.items():
            if args.net != "all" and args.net != net_name:
                continue
            if not cfg.exists():
                print(f"skip {net_name}: {cfg} missing")
                continue
            convs = conv_layers(cfg, size)
            unique: dict = {}
            for spec in convs:
                unique.setdefault(spec_key(spec), [spec, 0])[1] += 1
            net_result = {}
            for batch in args.batch:
                rows = []
                tot_ours = tot_cv = 0.0
                tot_min_ours = tot_min_cv = 0.0
                print(f"\n{net_name} {size}x{size}, batch {batch}: {len(convs)} convolutions "
                      f"({len(unique)} distinct)")
                print(f"{'layer':>5} {'c':>4} {'hxw':>9} {'n':>4} {'k':>2} {'s':>2} {'grp':>4} {'act':>8} {'x':>3} "
                      f"{'path':>9} {'ours ms':>9} {'cv ms':>9} {'ratio':>6}"
                      + ("  im2col/wino ms" if args.paths else ""))
                for spec, count in unique.values():
                    params = make_layer(spec, rng)
                    net, _ = opencv_net(spec, params, folder)
                    w, b = fold_batchnorm(params[0], params[1], params[2], params[3], params[4], eps=1e-6)
                    plan = prepare_conv2d(w, b, spec["stride"], spec["stride"], spec["pad"], 1, spec["groups"],
                                          spec["activation"])
                    x = rng.standard_normal((batch, spec["c"], spec["h"], spec["w"])).astype(np.float32)
                    out = np.empty(plan.output_shape(x.shape), np.float32)

                    def ours():
                        plan.forward(x, out=out)

                    def opencv():
                        net.setInput(x)
                        net.forward()

                    (m_ours, min_ours), (m_cv, min_cv) = interleaved([ours, opencv], args.repeat)
                    extra = ""
                    row = dict(spec=spec, count=count, path=plan.path, ours_ms=m_ours, opencv_ms=m_cv,
                               ours_min_ms=min_ours, opencv_min_ms=min_cv)
                    if args.paths and spec["k"] == 3 and spec["stride"] == 1 and spec["groups"] == 1:
                        alt = [prepare_conv2d(w, b, 1, 1, spec["pad"], 1, 1, spec["activation"], path=p)
                               for p in (PATH_IM2COL, PATH_WINOGRAD)]
                        (m_i, _), (m_w, _) = interleaved([lambda: alt[0].forward(x, out=out),
                                                          lambda: alt[1].forward(x, out=out)], args.repeat)
                        extra = f"  {m_i:7.3f}/{m_w:.3f}"
                        row.update(im2col_ms=m_i, winograd_ms=m_w)
                    rows.append(row)
                    tot_ours += m_ours * count
                    tot_cv += m_cv * count
                    tot_min_ours += min_ours * count
                    tot_min_cv += min_cv * count
                    print(f"{spec['index']:>5} {spec['c']:>4} {spec['h']:>4}x{spec['w']:<4} {spec['n']:>4} "
                          f"{spec['k']:>2} {spec['stride']:>2} {spec['groups']:>4} {spec['activation'][:8]:>8} "
                          f"{count:>3} {plan.path:>9} {m_ours:9.3f} {m_cv:9.3f} {m_ours / m_cv:6.2f}{extra}")
                print(f"{'total':>5} (sum over all {len(convs)} convs): ours {tot_ours:.2f} ms, "
                      f"OpenCV {tot_cv:.2f} ms, "
                      f"ratio {tot_ours / tot_cv:.2f} (min-based: {tot_min_ours:.2f} / {tot_min_cv:.2f} = "
                      f"{tot_min_ours / tot_min_cv:.2f})")
                entry = dict(layers=rows, ours_ms=tot_ours, opencv_ms=tot_cv, ratio=tot_ours / tot_cv,
                             ours_min_ms=tot_min_ours, opencv_min_ms=tot_min_cv)
                if args.full_opencv:
                    weights_file = network_weights(cfg, convs, folder, rng)
                    full = cv2.dnn.readNetFromDarknet(str(cfg), weights_file)
                    xin = rng.random((batch, 3, size, size), dtype=np.float32)

                    def whole():
                        full.setInput(xin)
                        full.forward(full.getUnconnectedOutLayersNames())

                    ((m_full, min_full),) = interleaved([whole], args.repeat)
                    kind = "random" if weights_file.endswith(".random.weights") else "real"
                    print(f"      OpenCV whole network (all layers, {kind} weights): {m_full:.2f} ms "
                          f"(min {min_full:.2f})")
                    entry.update(opencv_full_ms=m_full)
                net_result[f"batch{batch}"] = entry
            results["networks"][net_name] = net_result
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--net", default="all", choices=["all", *NETWORKS])
    parser.add_argument("--paths", action="store_true")
    parser.add_argument("--full-opencv", action="store_true")
    parser.add_argument("--clock", choices=list(CLOCK), default="wall",
                        help="wall (latency, what users see) or cpu (process CPU time: with --threads 1 it measures "
                             "compute cost and ignores time lost to other processes on a shared machine)")
    parser.add_argument("--json")
    args = parser.parse_args()
    global _clock
    _clock = CLOCK[args.clock]
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
