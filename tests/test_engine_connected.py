"""Connected layer forward against numpy and OpenCV's Darknet importer; training-mode batch norm statistics."""

from __future__ import annotations

import numpy as np
import pytest

from darkprune.engine.activations import activate_
from darkprune.engine.connected import connected_forward, connected_forward_train, fold_batchnorm

HEADER = np.array([0, 2, 5], np.int32).tobytes() + np.array([0], np.int64).tobytes()


def layer(rng, inputs, outputs):
    return dict(weights=rng.standard_normal((outputs, inputs)).astype(np.float32) * 0.3,
                biases=rng.standard_normal(outputs).astype(np.float32),
                scales=rng.uniform(0.5, 1.5, outputs).astype(np.float32),
                mean=rng.standard_normal(outputs).astype(np.float32),
                var=rng.uniform(0.05, 2.0, outputs).astype(np.float32))


def test_forward_matches_numpy_in_darknet_input_order():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 3, 4))
    p = layer(rng, 24, 5)
    w = p["weights"].astype(np.float64)
    # Darknet's input index for image b is c*H*W + h*W + w: a C-order flatten of the CHW image
    flat = np.array([[x[b, c, i, j] for c in range(2) for i in range(3) for j in range(4)] for b in range(3)])
    assert np.allclose(connected_forward(x, w, p["biases"]), flat @ w.T + p["biases"], atol=1e-12)
    y = connected_forward(x, w, p["biases"], p["scales"], p["mean"], p["var"])
    expected = p["scales"] * (flat @ w.T - p["mean"]) / np.sqrt(p["var"] + 1e-5) + p["biases"]
    assert np.allclose(y, expected, atol=1e-12)
    fw, fb = fold_batchnorm(w, p["biases"], p["scales"], p["mean"], p["var"])
    assert np.allclose(connected_forward(x, fw, fb), expected, atol=1e-12)
    assert connected_forward(x.astype(np.float32), p["weights"], p["biases"]).dtype == np.float32


def test_train_forward_uses_batch_statistics_and_updates_rolling():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 10))
    p = layer(rng, 10, 4)
    w = p["weights"].astype(np.float64)
    rm, rv = p["mean"].astype(np.float64), p["var"].astype(np.float64)
    rm0, rv0 = rm.copy(), rv.copy()
    y, _ = connected_forward_train(x, w, p["biases"], p["scales"], rm, rv)
    z = x @ w.T
    mu, var = z.mean(axis=0), z.var(axis=0, ddof=1)  # Darknet: unbiased batch variance
    assert np.allclose(y, p["scales"] * (z - mu) / np.sqrt(var + 1e-5) + p["biases"], atol=1e-12)
    assert np.allclose(rm, 0.99 * rm0 + 0.01 * mu) and np.allclose(rv, 0.99 * rv0 + 0.01 * var)
    y2, _ = connected_forward_train(x, w, p["biases"], p["scales"], rm, rv, momentum=0.05, update_rolling=False)
    assert np.allclose(y2, y) and np.allclose(rm, 0.99 * rm0 + 0.01 * mu)
    y3, _ = connected_forward_train(x, w, p["biases"])
    assert np.allclose(y3, z + p["biases"])


def test_large_matrices_split_across_threads():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 1500)).astype(np.float32)
    w = rng.standard_normal((700, 1500)).astype(np.float32)
    b = rng.standard_normal(700).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + b
    assert np.abs(connected_forward(x, w, b) - ref).max() < 1e-4 * np.abs(ref).max()


def write(folder, c, h, w, outputs, activation, params, batch_normalize, opencv_order=False):
    cfg = folder / "fc.cfg"
    cfg.write_text(f"[net]\nwidth={w}\nheight={h}\nchannels={c}\n\n[connected]\noutput={outputs}\n"
                   f"batch_normalize={batch_normalize}\nactivation={activation}\n", encoding="ascii")
    blobs = [HEADER, params["biases"].tobytes()]
    bn = [params["scales"].tobytes(), params["mean"].tobytes(), params["var"].tobytes()] if batch_normalize else []
    blobs += (bn + [params["weights"].tobytes()]) if opencv_order else ([params["weights"].tobytes()] + bn)
    weights = folder / "fc.weights"
    weights.write_bytes(b"".join(blobs))
    return str(cfg), str(weights)


@pytest.mark.parametrize("activation", ["linear", "leaky", "logistic"])
def test_matches_opencv(tmp_path, activation):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(3)
    c, h, w, outputs = 3, 4, 5, 7
    p = layer(rng, c * h * w, outputs)
    cfg, weights = write(tmp_path, c, h, w, outputs, activation, p, 0)
    x = rng.standard_normal((2, c, h, w)).astype(np.float32)
    net = cv2.dnn.readNetFromDarknet(cfg, weights)
    net.setInput(x)
    ref = net.forward().reshape(2, outputs)
    ours = activate_(connected_forward(x, p["weights"], p["biases"]), activation)
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


def test_batchnorm_matches_opencv_given_its_weight_order(tmp_path):
    """OpenCV 4.x reads a connected layer's batch-norm triple *before* the weights (the conv order), whereas Darknet
    writes it after them; with a file in OpenCV's order the math (eps 1e-6) is the same as ours."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(4)
    c, h, w, outputs = 2, 3, 3, 6
    p = layer(rng, c * h * w, outputs)
    cfg, weights = write(tmp_path, c, h, w, outputs, "leaky", p, 1, opencv_order=True)
    x = rng.standard_normal((3, c, h, w)).astype(np.float32)
    net = cv2.dnn.readNetFromDarknet(cfg, weights)
    net.setInput(x)
    ref = net.forward().reshape(3, outputs)
    ours = activate_(connected_forward(x, p["weights"], p["biases"], p["scales"], p["mean"], p["var"], eps=1e-6),
                     "leaky")
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


def test_input_size_mismatch_is_reported():
    with pytest.raises(ValueError, match="12 inputs"):
        connected_forward(np.zeros((2, 10), np.float32), np.zeros((3, 12), np.float32), np.zeros(3, np.float32))
