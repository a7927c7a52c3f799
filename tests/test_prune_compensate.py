"""Bias compensation (prune/compensate.py) against an independent reference.

The reference is the unpruned model run by the engine with each pruned filter's weights zeroed and, with batch norm,
its rolling_mean set to 0: the pruned channel then outputs its constant act(beta) (act(bias) without batch norm)
everywhere, and every later layer computes on it as it would, with no folding arithmetic. The compensated masked
model (pruned channels exactly 0, the constants folded into the readers' biases / batch-norm means) must give the
reference's live channels, on every layer; the plain masked model must not (so the tests can fail).

The hand cfgs use unpadded convolutions where a k x k conv reads a pruned channel, so every pixel is interior; one
test puts a padded 3x3 reader after a pruned channel and checks the interior matches and the border does not (the
documented inexactness of the fold under zero padding).
"""
import numpy as np
import pytest

import darkprune as dp
from darkprune.darknet import Model, parse_cfg_text
from darkprune.engine.network import Network
from darkprune.prune.compensate import compensate
from darkprune.prune.groups import build_grouping
from darkprune.prune.masks import Masks, apply_masks, kept_channels, live_stats
from darkprune.prune.transform import transform

from conftest import BUNDLED_CFG, BUNDLED_DATA, BUNDLED_WEIGHTS, perturb_params

# conv+BN and conv without BN producers, a per-channel weighted shortcut, a route slice (groups), an unpadded 3x3
# BN reader, maxpool, a depthwise conv, upsample, a route concatenation, a per-feature weighted shortcut with a
# relu-normalised weight, and 1x1 readers with and without BN.
SPATIAL = """
[net]
width=22
height=22
channels=3

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=0
activation=leaky

[convolutional]
filters=16
size=1
stride=1
activation=mish

[shortcut]
from=-2
weights_type=per_channel
activation=linear

[route]
layers=-1
groups=2
group_id=1

[convolutional]
batch_normalize=1
filters=12
size=3
stride=1
pad=0
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=12
groups=12
size=3
stride=1
pad=0
activation=relu

[upsample]
stride=2

[convolutional]
filters=12
size=1
stride=1
activation=leaky

[shortcut]
from=-2
weights_type=per_feature
weights_normalization=relu
activation=leaky

[route]
layers=-1,-3

[convolutional]
batch_normalize=1
filters=10
size=1
stride=1
activation=swish

[convolutional]
filters=6
size=3
stride=1
pad=0
activation=linear
"""

# dropout, local_avgpool, global avgpool and connected readers (of a flattened map and of a vector), with and
# without batch norm.
FLAT = """
[net]
width=12
height=12
channels=3

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky

[dropout]
probability=0.3

[convolutional]
filters=16
size=1
stride=1
activation=leaky

[local_avgpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=12
size=1
stride=1
activation=leaky

[avgpool]

[connected]
output=10
batch_normalize=1
activation=leaky

[connected]
output=8
activation=linear

[route]
layers=4

[connected]
output=6
activation=linear
"""

# an SE block (the tied feature and logistic scale channels multiplied by [scale_channels]), then [activation] and
# a standalone [batchnorm] before the reader.
SQUEEZE = """
[net]
width=10
height=10
channels=3

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky

[avgpool]

[convolutional]
filters=8
size=1
stride=1
activation=leaky

[convolutional]
filters=16
size=1
stride=1
activation=logistic

[scale_channels]
from=-4

[activation]
activation=mish

[batchnorm]

[convolutional]
batch_normalize=1
filters=8
size=1
stride=1
activation=leaky

[convolutional]
filters=4
size=1
stride=1
activation=linear
"""

# A padded 3x3 reader of a pruned channel: the fold is exact inside, not on the 1-pixel border.
PADDED = """
[net]
width=16
height=16
channels=3

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=linear
"""


def _model(text: str, seed: int) -> Model:
    model = Model.from_cfg(parse_cfg_text(text, "compensate-test.cfg"), seed=seed)
    perturb_params(model, np.random.default_rng(seed + 100))
    for arrays in model.params.values():         # BN shifts well away from 0, so the constants matter
        if "rolling_mean" in arrays:
            arrays["biases"][:] = np.random.default_rng(seed + 7).normal(0.5, 0.5, arrays["biases"].shape)
    return model


def _random_masks(model: Model, seed: int) -> Masks:
    grouping = build_grouping(model.graph)
    rng = np.random.default_rng(seed)
    pruned = {g.id: np.sort(rng.choice(g.channels, max(1, g.channels // 3), replace=False))
              for g in grouping.groups if g.prunable}
    assert pruned, "the test cfg must have prunable groups"
    return Masks.for_model(model, pruned, grouping=grouping)


def _reference(model: Model, masks: Masks) -> Model:
    """The unpruned model with the pruned filters zeroed (and their rolling_mean 0): they output their constant."""
    ref = model.copy()
    for gid, channels in masks.pruned.items():
        for part in masks.grouping.groups[gid].parts:
            arrays = ref.params[part.layer]
            dead = part.channels[channels]
            arrays["weights"][dead] = 0.0
            if "rolling_mean" in arrays:
                arrays["rolling_mean"][dead] = 0.0
    return ref


def _outputs(model: Model, x: np.ndarray) -> dict:
    return Network(model).forward(x, outputs=list(range(len(model.graph))))


def _live_error(a: dict, b: dict, kept, crop: int = 0) -> float:
    """The largest |a - b| over live channels of every layer, relative to that layer's scale."""
    worst = 0.0
    for index, out_a in a.items():
        live = kept.out[index]
        va, vb = out_a[:, live], b[index][:, live]
        if crop and va.ndim == 4:
            va, vb = va[..., crop:-crop, crop:-crop], vb[..., crop:-crop, crop:-crop]
        scale = max(float(np.abs(va).max()), 1e-3)
        worst = max(worst, float(np.abs(va - vb).max()) / scale)
    return worst


@pytest.mark.parametrize("text", [SPATIAL, FLAT, SQUEEZE], ids=["spatial", "flat", "squeeze"])
@pytest.mark.parametrize("seed", [0, 1])
def test_compensated_model_reproduces_the_constants(text, seed):
    model = _model(text, seed)
    masks = _random_masks(model, seed)
    x = np.random.default_rng(seed + 3).random((2,) + model.input_shape, dtype=np.float32)
    reference = _outputs(_reference(model, masks), x)
    masked = apply_masks(model, masks)
    compensated = compensate(model, masked, masks)
    kept = kept_channels(model, masks)
    got = _outputs(compensated, x)
    assert _live_error(reference, got, kept) < 1e-5
    plain = _outputs(masked, x)
    assert _live_error(reference, plain, kept) > 1e-2      # masking alone loses the constants
    for index, out in got.items():      # pruned channels output what masking made them: 0 (an SE scale: 0.5)
        dead = ~kept.out[index]
        assert np.array_equal(out[:, dead], plain[index][:, dead])
        if model.graph[index].attrs.get("activation") != "logistic":
            assert not out[:, dead].any()


def test_every_reader_kind_is_compensated():
    """The hand cfgs really put pruned channels into each kind of reader: biases (no BN) and rolling means (BN) of
    convs, of a depthwise-tied conv's live neighbours' readers, and of connected layers change."""
    changed = set()
    for text in (SPATIAL, FLAT):
        model = _model(text, 0)
        masks = _random_masks(model, 0)
        masked = apply_masks(model, masks)
        compensated = compensate(model, masked, masks)
        for index, arrays in masked.params.items():
            for name in ("biases", "rolling_mean"):
                if name in arrays and not np.array_equal(arrays[name], compensated.params[index][name]):
                    changed.add((model.graph[index].type, name, model.graph[index].attrs.get("size", 0)))
    assert {("convolutional", "biases", 1), ("convolutional", "biases", 3), ("convolutional", "rolling_mean", 3),
            ("convolutional", "rolling_mean", 1), ("connected", "biases", 0),
            ("connected", "rolling_mean", 0)} <= changed


def test_padded_reader_exact_inside_not_on_the_border():
    model = _model(PADDED, 5)
    masks = _random_masks(model, 5)
    x = np.random.default_rng(8).random((2,) + model.input_shape, dtype=np.float32)
    kept = kept_channels(model, masks)
    reference = _outputs(_reference(model, masks), x)
    got = _outputs(compensate(model, apply_masks(model, masks), masks), x)
    assert _live_error(reference, got, kept, crop=1) < 1e-5
    assert _live_error(reference, got, kept) > 1e-3          # the zero padding: the fold is inexact at the border


@pytest.mark.parametrize("text", [SPATIAL, FLAT], ids=["spatial", "flat"])
def test_transform_keeps_the_compensated_outputs(text):
    model = _model(text, 2)
    masks = _random_masks(model, 2)
    compensated = compensate(model, apply_masks(model, masks), masks)
    small = transform(compensated)
    x = np.random.default_rng(4).random((2,) + model.input_shape, dtype=np.float32)
    a, b = Network(compensated).forward(x), Network(small).forward(x)
    for k in a:
        assert np.abs(a[k] - b[k]).max() <= 1e-5 * max(float(np.abs(a[k]).max()), 1e-3)


def test_api_keyword():
    model = _model(SPATIAL, 3)
    masks = _random_masks(model, 3)
    plain, folded = dp.prune(model, masks.pruned), dp.prune(model, masks.pruned, compensate=True)
    direct = compensate(model, apply_masks(model, masks), masks)
    for index, arrays in direct.params.items():
        for name, value in arrays.items():
            assert np.array_equal(folded.params[index][name], value)
    assert any(not np.array_equal(plain.params[i]["biases"], folded.params[i]["biases"]) for i in plain.params
               if "biases" in plain.params[i])
    assert folded.masks.pruned.keys() == masks.pruned.keys()


def test_real_model_compensation_brings_outputs_closer():
    """Yolo-Fastest with an eighth of every prunable group's lowest-L1 channels masked (about 20% fewer BFLOPs): on
    images no step looked at, the compensated model's head inputs are closer to the unpruned model's than the plain
    masked model's are (mean squared error, summed over the two heads)."""
    from darkprune.data import load_data
    from darkprune.data.preprocess import preprocess_image
    from darkprune.prune.plan import Plan, masks_for_plan
    model = dp.load(BUNDLED_CFG, BUNDLED_WEIGHTS)
    grouping = build_grouping(model.graph)
    rates = {g.id: 0.125 for g in grouping.groups if g.prunable}
    masks = masks_for_plan(model, Plan(rates, "rate", 0.2), (), grouping)
    assert 0.15 < 1 - live_stats(model, masks, grouping)["total_bflops"] / model.graph.total_bflops < 0.25
    masked = apply_masks(model, masks, grouping=grouping)
    folded = compensate(model, masked, masks)
    data = load_data(str(BUNDLED_DATA), split="valid")
    _, h, w = model.input_shape
    x = np.stack([preprocess_image(path, w, h)[0] for path in data.image_paths[120:124]])
    heads = [model.graph[h].inputs[0] for h in model.graph.output_layers()]
    want = Network(model).forward(x, heads)
    error = {}
    for name, candidate in (("masked", masked), ("compensated", folded)):
        got = Network(candidate).forward(x, heads)
        error[name] = sum(float(np.mean((got[h] - want[h]) ** 2)) for h in heads)
    assert error["compensated"] < 0.7 * error["masked"], error


def test_prune_command_compensates_on_request(tmp_path, capsys):
    """`darkprune prune --compensate` (or compensate=1 in a config) writes the compensated masked weights and
    says so in the workspace summary; the default stays plain masking; `transform` then keeps the outputs."""
    import json

    from darkprune.prune.analysis import prunable_groups

    from conftest import run_cli
    model = dp.load(BUNDLED_CFG, BUNDLED_WEIGHTS)
    keep = {3, 16, 33}
    exclude = ",".join(model.graph[g.members[0]].name for g in prunable_groups(model) if g.id not in keep)
    ws = tmp_path / "ws"
    code, out, err = run_cli(capsys, "ana", BUNDLED_CFG, BUNDLED_WEIGHTS, "--data", BUNDLED_DATA, "--limit", 4,
                             "--rates", "0.5", "--exclude", exclude, "-w", ws, "-q")
    assert code == 0, err
    weights = {}
    for name, extra in (("plain", []), ("flag", ["--compensate"])):
        code, out, err = run_cli(capsys, "prune", BUNDLED_CFG, BUNDLED_WEIGHTS, "-w", ws, "--rate", 0.02, "--json",
                                 *extra)
        assert code == 0, err
        summary = json.loads(out)
        assert summary["compensated"] == (name == "flag")
        assert json.loads((ws / "summary.json").read_text())["prune"]["compensated"] == (name == "flag")
        weights[name] = dp.load(BUNDLED_CFG, ws / "pruned.weights")
    masks = Masks.load(ws / "masks.json", model)
    expected = compensate(model, apply_masks(model, masks), masks)
    for index, arrays in expected.params.items():
        for key, value in arrays.items():
            assert np.array_equal(weights["flag"].params[index][key], value)
    assert any(not np.array_equal(weights["plain"].params[i]["rolling_mean"], expected.params[i]["rolling_mean"])
               for i in expected.params if "rolling_mean" in expected.params[i])
    code, out, err = run_cli(capsys, "transform", BUNDLED_CFG, "-w", ws, "--json")
    assert code == 0, err
    assert json.loads(out)["max_output_change"] < 1e-4
    # the config key, read by the one boolean parser
    config = tmp_path / "run.conf"
    config.write_text(f"cfg={BUNDLED_CFG}\nweights={BUNDLED_WEIGHTS}\nworkspace={ws}\nrate=0.02\ncompensate=yes\n")
    code, out, err = run_cli(capsys, "prune", "--config", config, "--json")
    assert code == 0 and json.loads(out)["compensated"] is True, err
    config.write_text(f"cfg={BUNDLED_CFG}\nweights={BUNDLED_WEIGHTS}\nworkspace={ws}\nrate=0.02\ncompensate=maybe\n")
    code, out, err = run_cli(capsys, "prune", "--config", config)
    assert code == 1 and f"{config}:5: compensate=maybe" in err and err.count("\n") == 1
