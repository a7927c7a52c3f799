"""Reconstruction without labels (prune/reconstruct.py) against independent references.

- The least-squares fit of one consumer equals numpy.linalg.lstsq on patches built here by plain loops (the consumer
  reads an unpruned producer with some channels masked: 1x1, a padded 3x3 with stride 2, a depthwise conv and a
  connected layer, with and without batch norm), with the ridge as extra rows of the system.
- On held-out images, the reconstructed model's outputs are closer to the unpruned model's than the plain masked
  and the compensated models' outputs (random-weight models with random masks).
- Pruned channels stay exactly zero (applying the masks again changes no parameter), and `transform` of a
  reconstructed model keeps its outputs.
- `darkprune prune --reconstruct` on the bundled model, and its refusals.
"""
import json

import numpy as np
import pytest

import darkprune as dp
from darkprune.darknet import Model, parse_cfg_text
from darkprune.engine.network import Network
from darkprune.errors import DarkpruneError
from darkprune.prune.compensate import compensate
from darkprune.prune.groups import build_grouping
from darkprune.prune.masks import Masks, apply_masks, kept_channels
from darkprune.prune.reconstruct import reconstruct
from darkprune.prune.transform import transform

from conftest import BUNDLED_CFG, BUNDLED_DATA, BUNDLED_WEIGHTS, asset, perturb_params, run_cli

EPS = 1e-5          # Darknet's batch-norm eps

# a residual chain (shortcut-tied producers), a depthwise conv, a route of two maps, maxpool and upsample between
# producers and their readers, 1x1 and padded 3x3 readers with and without batch norm
NET = """
[net]
width=24
height=24
channels=3

[convolutional]
batch_normalize=1
filters=12
size=3
stride=1
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=12
size=1
stride=1
activation=leaky

[convolutional]
batch_normalize=1
filters=12
groups=12
size=3
stride=1
pad=1
activation=leaky

[convolutional]
filters=12
size=1
stride=1
activation=linear

[shortcut]
from=-4
activation=linear

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky

[upsample]
stride=2

[route]
layers=-1,-4

[convolutional]
batch_normalize=1
filters=10
size=1
stride=1
activation=leaky

[convolutional]
filters=8
size=3
stride=1
pad=1
activation=linear
"""

# a conv and connected layers (flattened map and vector readers, with and without batch norm)
FLAT = """
[net]
width=8
height=8
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky

[connected]
output=12
batch_normalize=1
activation=leaky

[connected]
output=6
activation=linear
"""


def _model(text: str, seed: int) -> Model:
    model = Model.from_cfg(parse_cfg_text(text, "reconstruct-test.cfg"), seed=seed)
    perturb_params(model, np.random.default_rng(seed + 100))
    return model


def _random_masks(model: Model, seed: int, share: float = 0.4) -> Masks:
    grouping = build_grouping(model.graph)
    rng = np.random.default_rng(seed)
    pruned = {g.id: np.sort(rng.choice(g.channels, max(1, int(g.channels * share)), replace=False))
              for g in grouping.groups if g.prunable}
    assert pruned
    return Masks.for_model(model, pruned, grouping=grouping)


def _images(model: Model, count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((count,) + model.input_shape, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# the fit of one consumer against lstsq on explicit patches

CONSUMERS = {
    "1x1": "[convolutional]\nfilters=7\nsize=1\nstride=1\nactivation=linear\n",
    "3x3-padded-stride2-bn": "[convolutional]\nbatch_normalize=1\nfilters=7\nsize=3\nstride=2\npad=1\n"
                             "activation=linear\n",
    "depthwise": "[convolutional]\nbatch_normalize=1\nfilters=10\ngroups=10\nsize=3\nstride=1\npad=1\n"
                 "activation=linear\n",
    "connected": "[connected]\noutput=5\nactivation=linear\n",
    "connected-bn": "[connected]\nbatch_normalize=1\noutput=5\nactivation=linear\n",
}


def _single(consumer: str) -> str:
    size = 5 if consumer.startswith("connected") else 9
    return (f"[net]\nwidth={size}\nheight={size}\nchannels=3\n\n[convolutional]\nbatch_normalize=1\nfilters=10\n"
            f"size=3\nstride=1\npad=1\nactivation=leaky\n\n{CONSUMERS[consumer]}\n{TAIL.get(consumer[:4], TAIL['1x1'])}")


# a last layer after the consumer (the network output is never pruned, so a tied depthwise consumer must not be it)
TAIL = {"conn": "[connected]\noutput=3\nactivation=linear\n",
        "1x1": "[convolutional]\nfilters=3\nsize=1\nactivation=linear\n"}


def _explicit_patches(layer, x: np.ndarray) -> np.ndarray:
    """(images * positions, groups, columns) by plain loops over output pixels, kernel taps and channels."""
    n, c, h, w = x.shape
    if layer.type == "connected":
        return x.reshape(n, 1, -1).astype(np.float64)
    a = layer.attrs
    k, s, pad, groups = a["size"], a["stride_x"], a["pad"], a["groups"]
    _, oh, ow = layer.out_shape
    cin = c // groups
    rows = []
    for b in range(n):
        for oy in range(oh):
            for ox in range(ow):
                row = np.zeros((groups, cin, k, k))
                for ch in range(c):
                    for ky in range(k):
                        for kx in range(k):
                            iy, ix = oy * s - pad + ky, ox * s - pad + kx
                            if 0 <= iy < h and 0 <= ix < w:
                                row[ch // cin, ch % cin, ky, kx] = x[b, ch, iy, ix]
                rows.append(row.reshape(groups, -1))
    return np.array(rows)


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_fit_equals_lstsq_on_explicit_patches(consumer):
    model = _model(_single(consumer), 3)
    grouping = build_grouping(model.graph)
    producer = next(g for g in grouping.groups if g.prunable and 0 in g.members)
    masks = Masks.for_model(model, {producer.id: np.array([1, 4, 6])}, grouping=grouping)
    masked = apply_masks(model, masks)
    ridge = 1e-2
    x = _images(model, 6, 4)
    got = reconstruct(model, masked, x, masks, ridge=ridge, samples=0, progress=False)
    layer = model.graph[1]
    kept = kept_channels(model, masks)
    p_in = Network(masked).forward(x, outputs=[0])[0]           # what the consumer reads in the pruned network
    o_in = Network(model).forward(x, outputs=[0])[0]
    pp, po = _explicit_patches(layer, p_in), _explicit_patches(layer, o_in)
    a = model.params[1]
    n_out = a["weights"].shape[0]
    w = a["weights"].reshape(n_out, -1).astype(np.float64)
    bn = "rolling_mean" in a
    groups = pp.shape[1]
    per = n_out // groups
    per_channel = pp.shape[2] // (len(kept.reads(1)) // groups)
    for g in range(groups):
        cols = np.repeat(kept.reads(1)[g * (pp.shape[2] // per_channel):(g + 1) * (pp.shape[2] // per_channel)],
                         per_channel)
        if not cols.any():
            continue
        outs = np.arange(g * per, (g + 1) * per)
        live = outs[kept.out[1][outs]]
        target = po[:, g] @ w[live].T + (0.0 if bn else a["biases"][live].astype(np.float64))
        design = np.concatenate([pp[:, g][:, cols], np.ones((len(pp), 1))], axis=1)
        lam = ridge * np.mean(np.sum(pp[:, g][:, cols] ** 2, axis=0))
        penalty = np.concatenate([np.sqrt(lam) * np.eye(cols.sum()), np.zeros((cols.sum(), 1))], axis=1)
        ref = np.linalg.lstsq(np.concatenate([design, penalty]),
                              np.concatenate([target, np.zeros((cols.sum(), len(live)))]), rcond=None)[0]
        fitted = got.params[1]["weights"].reshape(n_out, -1)[live].astype(np.float64)
        np.testing.assert_allclose(fitted[:, cols], ref[:-1].T, rtol=2e-4, atol=2e-5 * np.abs(ref).max())
        assert not fitted[:, ~cols].any()
        bias = (a["rolling_mean"][live] - got.params[1]["rolling_mean"][live]) if bn else \
            got.params[1]["biases"][live]
        np.testing.assert_allclose(bias, ref[-1], rtol=2e-4, atol=2e-5 * np.abs(ref).max())


# ---------------------------------------------------------------------------------------------------------------
# the whole network

def _error(model: Model, reference: dict, x: np.ndarray, layers: list[int], kept) -> float:
    got = Network(model).forward(x, outputs=layers)
    return sum(float(np.mean((got[i][:, kept.out[i]] - reference[i][:, kept.out[i]]) ** 2)) for i in layers)


@pytest.mark.parametrize("text, count", [(NET, 48), (FLAT, 400)], ids=["spatial", "flat"])
def test_reconstruction_lowers_the_error_on_held_out_images(text, count):
    """(A connected layer has one patch per image: its 128 columns need more images than a conv's many pixels.)"""
    model = _model(text, 1)
    masks = _random_masks(model, 1)
    masked = apply_masks(model, masks)
    compensated = compensate(model, masked, masks)
    rebuilt = reconstruct(model, compensated, _images(model, count, 5), masks, progress=False)
    held_out = _images(model, 16, 6)
    kept = kept_channels(model, masks)
    readers = [layer.index for layer in model.graph
               if layer.type in ("convolutional", "connected") and not kept.reads(layer.index).all()]
    layers = sorted(set(readers) | set(model.graph.output_layers()))
    reference = Network(model).forward(held_out, outputs=layers)
    error = {name: _error(m, reference, held_out, layers, kept)
             for name, m in (("masked", masked), ("compensated", compensated), ("reconstructed", rebuilt))}
    assert error["reconstructed"] < 0.5 * error["compensated"], error
    assert error["compensated"] < error["masked"], error


@pytest.mark.parametrize("text", [NET, FLAT], ids=["spatial", "flat"])
@pytest.mark.parametrize("layers", ["readers", "all"])
def test_pruned_channels_stay_zero_and_transform_is_exact(text, layers):
    model = _model(text, 2)
    masks = _random_masks(model, 2)
    masked = apply_masks(model, masks)
    before = {i: {k: v.copy() for k, v in a.items()} for i, a in masked.params.items()}
    rebuilt = reconstruct(model, masked, _images(model, 24, 7), masks, layers=layers, progress=False)
    for index, arrays in masked.params.items():          # the inputs are not modified
        for name, value in arrays.items():
            assert np.array_equal(value, before[index][name])
    again = apply_masks(rebuilt, masks)                     # masking again changes nothing: pruned stays zero
    changed = 0
    for index, arrays in rebuilt.params.items():
        for name, value in arrays.items():
            assert np.array_equal(again.params[index][name], value), (index, name)
            changed += not np.array_equal(value, masked.params[index][name])
    assert changed
    x = _images(model, 4, 8)
    small = transform(rebuilt)
    a, b = Network(rebuilt).forward(x), Network(small).forward(x)
    for k in a:
        assert np.abs(a[k] - b[k]).max() <= 1e-5 * max(float(np.abs(a[k]).max()), 1e-3)


def test_api_keyword_and_bad_input(tmp_path):
    model = _model(NET, 4)
    masks = _random_masks(model, 4)
    x = _images(model, 16, 9)
    via_api = dp.prune(model, masks.pruned, reconstruct=x)
    direct = reconstruct(model, compensate(model, apply_masks(model, masks), masks), x, masks, progress=False)
    for index, arrays in direct.params.items():
        for name, value in arrays.items():
            assert np.array_equal(via_api.params[index][name], value)
    with pytest.raises(DarkpruneError, match="data="):
        dp.prune(model, masks.pruned, reconstruct=16)
    with pytest.raises(DarkpruneError, match="shape"):
        reconstruct(model, apply_masks(model, masks), x[:, :, :5], masks, progress=False)
    with pytest.raises(DarkpruneError, match="another structure"):
        reconstruct(model, transform(apply_masks(model, masks)), x, masks, progress=False)
    with pytest.raises(DarkpruneError, match="ridge"):
        reconstruct(model, apply_masks(model, masks), x, masks, ridge=-1.0, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# the command

def _data_file(tmp_path, train: list[str]) -> str:
    listed = tmp_path / "train.txt"
    listed.write_text("\n".join(train) + "\n")
    data = tmp_path / "calib.data"
    names = BUNDLED_DATA.parent / "../../cfg/coco.names"
    data.write_text(f"classes=80\ntrain={listed}\nvalid={BUNDLED_DATA.parent / 'valid.txt'}\nnames={names}\n")
    return str(data)


def test_prune_command_reconstructs(tmp_path, capsys):
    from darkprune.prune.analysis import Sensitivity, prunable_groups
    train = sorted(str(p) for p in asset("coco128", "images", "train2017").glob("*.jpg"))[:3]
    data = _data_file(tmp_path, train)
    model = dp.load(BUNDLED_CFG, BUNDLED_WEIGHTS)
    keep = {3, 16}
    exclude = ",".join(model.graph[g.members[0]].name for g in prunable_groups(model) if g.id not in keep)
    ws = tmp_path / "ws"
    code, out, err = run_cli(capsys, "ana", BUNDLED_CFG, BUNDLED_WEIGHTS, "--data", data, "--limit", 2,
                             "--rates", "0.5", "--exclude", exclude, "-w", ws, "-q")
    assert code == 0, err
    code, out, err = run_cli(capsys, "prune", BUNDLED_CFG, BUNDLED_WEIGHTS, "-w", ws, "--rate", 0.01, "--json",
                             "--reconstruct", "--calib-images", 5, "-q")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["reconstructed"] and summary["compensated"] and summary["calib_images"] == 5
    assert summary["planned_on"] == "plain"           # no reconstructed curves yet
    plain = json.loads((ws / "sensitivity.json").read_text())
    # ana --reconstruct adds the second curve set to the same file (the plain curves are kept as they were)
    code, out, err = run_cli(capsys, "ana", BUNDLED_CFG, BUNDLED_WEIGHTS, "--data", data, "--limit", 2,
                             "--rates", "0.5", "--exclude", exclude, "-w", ws, "-q", "--reconstruct",
                             "--calib-images", 4)
    assert code == 0, err
    both = json.loads((ws / "sensitivity.json").read_text())
    assert both["groups"] == plain["groups"] and both["reconstructed"]["info"]["calib_images"] == 4
    assert sorted(g["id"] for g in both["reconstructed"]["groups"]) == sorted(keep)
    loaded = Sensitivity.load(ws / "sensitivity.json", model)
    assert loaded.complete_reconstructed and set(loaded.reconstructed) == keep
    code, out, err = run_cli(capsys, "prune", BUNDLED_CFG, BUNDLED_WEIGHTS, "-w", ws, "--rate", 0.01, "--json",
                             "--reconstruct", "--calib-images", 5, "-q")
    assert code == 0 and json.loads(out)["planned_on"] == "plain", err        # the default, as measured best
    for choice in ("auto", "reconstructed"):
        code, out, err = run_cli(capsys, "prune", BUNDLED_CFG, BUNDLED_WEIGHTS, "-w", ws, "--rate", 0.01, "--json",
                                 "--reconstruct", "--calib-images", 5, "--plan-curves", choice, "-q")
        assert code == 0 and json.loads(out)["planned_on"] == "reconstructed", err
    assert summary["calib_files"] == 3 and summary["reconstruct_seconds"] > 0
    assert json.loads((ws / "summary.json").read_text())["prune"]["reconstructed"]
    code, out, err = run_cli(capsys, "transform", BUNDLED_CFG, "-w", ws, "--json")
    assert code == 0 and json.loads(out)["max_output_change"] < 1e-4, err
    for argv, message in ((["--calib-images", 0], "--calib-images 0"),
                          (["--data", str(BUNDLED_DATA)], "valid= list")):
        code, out, err = run_cli(capsys, "prune", BUNDLED_CFG, BUNDLED_WEIGHTS, "-w", ws, "--rate", 0.01,
                                 "--reconstruct", *argv)
        assert code == 1 and message in err and err.count("\n") == 1, err
    config = tmp_path / "run.conf"
    config.write_text(f"cfg={BUNDLED_CFG}\nweights={BUNDLED_WEIGHTS}\nworkspace={ws}\nrate=0.01\nreconstruct=1\n"
                      f"calib_images=2\n")
    code, out, err = run_cli(capsys, "prune", "--config", config, "--json", "-q")
    assert code == 0 and json.loads(out)["calib_images"] == 2, err


def test_old_sensitivity_files_load_without_the_second_set():
    from darkprune.prune.analysis import Sensitivity
    old = {"format": "darkprune-sensitivity", "fingerprint": "f", "metric": "map50", "baseline": 0.3,
           "rates": [0.5], "criterion": "l1", "images": 2, "groups": [{"id": 3, "metric": {"0.5": 0.2}}]}
    sens = Sensitivity.from_json(old)
    assert sens.reconstructed == {} and not sens.complete_reconstructed
    assert "reconstructed" not in sens.to_json()
    sens.reconstructed, sens.reconstruct_info = {3: {0.5: 0.25}}, {"calib_images": 4}
    again = Sensitivity.from_json(sens.to_json())
    assert again.reconstructed == {3: {0.5: 0.25}} and again.with_reconstructed().curves == {3: {0.5: 0.25}}
    assert again.curves == {3: {0.5: 0.2}}
