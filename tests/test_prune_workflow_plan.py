"""Planning from a sensitivity analysis, on hand-made loss curves and a hand-made model whose BFLOPs are worked out
by hand (Darknet's rule: a conv costs 2 * size^2 * inputs/groups * filters * out_h * out_w)."""
import json
import math

import numpy as np
import pytest

import darkprune as dp
from darkprune.darknet import Model, parse_cfg_text
from darkprune.prune.analysis import Sensitivity
from darkprune.prune.masks import structure_fingerprint
from darkprune.prune.plan import Plan, masks_for_plan, plan_by_rate, plan_by_threshold

CHAIN = """[net]
width=8
height=8
channels=3
[convolutional]
filters=8
size=3
pad=1
activation=leaky
[convolutional]
filters=8
size=3
pad=1
activation=leaky
[convolutional]
filters=4
size=1
activation=linear
"""
# layer 0: 3 -> 8, 3x3 on 8x8: 2*9*3*8*64 = 27648 FLOPs; layer 1: 8 -> 8, 3x3: 73728; layer 2: 8 -> 4, 1x1: 4096
TOTAL = 27648 + 73728 + 4096


def chain_model():
    return Model.from_cfg(parse_cfg_text(CHAIN, "chain.cfg"), seed=0)


def saved_flops(k0: int, k1: int) -> int:
    """FLOPs removed when k0 filters of layer 0 and k1 of layer 1 go (layer 1 also loses k0 inputs, layer 2 k1)."""
    return 2 * 9 * 3 * k0 * 64 + (73728 - 2 * 9 * (8 - k0) * (8 - k1) * 64) + 2 * k1 * 4 * 64


def sensitivity(curves: dict, baseline=0.5, model=None, metric="map50") -> Sensitivity:
    rates = sorted({r for c in curves.values() for r in c})
    fp = structure_fingerprint(model.graph) if model is not None else "x"
    sens = Sensitivity(fp, metric, baseline, rates, "l1", 1, 10, "hand.data")
    sens.curves = {g: dict(c) for g, c in curves.items()}
    sens.groups = {g: {"members": [], "channels": 8} for g in curves}
    sens.assigned = sorted(curves)
    if model is not None:
        sens.bind(model)
    return sens


def test_threshold_takes_the_largest_rate_whose_loss_and_every_smaller_ones_fit():
    sens = sensitivity({
        0: {0.25: 0.49, 0.5: 0.48, 0.75: 0.40},      # losses 0.01, 0.02, 0.10
        1: {0.25: 0.499, 0.5: 0.45, 0.75: 0.30},     # 0.001, 0.05, 0.2
        2: {0.25: 0.497, 0.5: 0.47, 0.75: 0.51},     # 0.003, 0.03, -0.01: the dip at 0.75 is noise, not taken
    })
    plan = plan_by_threshold(sens, 0.01)
    assert plan.rates == {0: 0.25, 1: 0.25, 2: 0.25}
    assert plan.predicted_loss == pytest.approx(0.01 + 0.001 + 0.003)
    plan = plan_by_threshold(sens, 0.02)
    assert plan.rates == {0: 0.5, 1: 0.25, 2: 0.25}
    assert plan.predicted_loss == pytest.approx(0.02 + 0.001 + 0.003)
    plan = plan_by_threshold(sens, 0.0)
    assert plan.rates == {} and plan.predicted_loss == 0
    assert plan_by_threshold(sens, 0.2, exclude={1}).rates == {0: 0.75, 2: 0.75}


def test_a_measured_gain_counts_as_no_loss_and_a_later_gain_does_not_undo_a_loss():
    sens = sensitivity({0: {0.25: 0.52, 0.5: 0.46, 0.75: 0.55}})    # gain, loss 0.04, gain
    assert plan_by_threshold(sens, 0.01).rates == {0: 0.25}
    assert plan_by_threshold(sens, 0.01).predicted_loss == 0.0
    assert plan_by_threshold(sens, 0.04).rates == {0: 0.75}
    assert plan_by_threshold(sens, 0.04).predicted_loss == pytest.approx(0.04)


@pytest.mark.parametrize("threshold", [-0.01, 0.5, 0.7, float("nan"), "abc"])
def test_thresholds_that_could_empty_a_layer_are_refused(threshold):
    sens = sensitivity({0: {0.5: 0.45}})
    with pytest.raises(dp.DarkpruneError, match="threshold") as info:
        plan_by_threshold(sens, threshold)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_rates_outside_zero_one_are_refused(rate):
    model = chain_model()
    sens = sensitivity({0: {0.5: 0.45}, 1: {0.5: 0.45}}, model=model)
    with pytest.raises(dp.DarkpruneError, match="rate"):
        plan_by_rate(model, sens, rate)


def test_rate_plan_reaches_the_bflops_share_with_the_cheapest_steps():
    model = chain_model()
    groups = [g for g in dp.prune.groups.find_groups(model.graph) if g.prunable]
    assert [g.members for g in groups] == [[0], [1]]
    assert model.graph.total_bflops == pytest.approx(TOTAL / 1e9)
    # k = 2, 4, 6 filters go at rates 0.25, 0.5, 0.75 (8 - round(8 r) kept)
    sens = sensitivity({0: {0.25: 0.49, 0.5: 0.48, 0.75: 0.40},       # 0.01, 0.02, 0.10
                        1: {0.25: 0.499, 0.5: 0.45, 0.75: 0.30}},     # 0.001, 0.05, 0.2
                       model=model)
    # alone: layer 0 saves 12672 per filter (its own 3456 + 9216 in layer 1), layer 1 saves 9728 (9216 + 512).
    # Cheapest step per FLOP: g1 to 0.25 (0.001 for 19456), then g0 to 0.25 (0.01 for 25344).
    plan = plan_by_rate(model, sens, 0.1)         # 10547 FLOPs: the first step is enough
    assert plan.rates == {1: 0.25} and plan.predicted_loss == pytest.approx(0.001)
    assert plan.details["bflops_removed"] * 1e9 == pytest.approx(saved_flops(0, 2))
    plan = plan_by_rate(model, sens, 0.2)         # 21094: the walk takes g0 to 0.25 too (0.011 for 40192) ...
    # ... and then steps g1 back to 0: g0 at 0.25 alone saves 25344 >= 21094 for 0.01 < 0.011
    assert plan.rates == {0: 0.25} and plan.predicted_loss == pytest.approx(0.01)
    assert plan.details["bflops_removed"] * 1e9 == pytest.approx(saved_flops(2, 0))
    masks = masks_for_plan(model, plan)
    stats = dp.prune.masks.live_stats(model, masks)
    assert stats["total_bflops"] * 1e9 == pytest.approx(TOTAL - saved_flops(2, 0))
    plan = plan_by_rate(model, sens, 0.3)         # 31642: both at 0.25 (40192); neither alone reaches it
    assert plan.rates == {0: 0.25, 1: 0.25} and plan.predicted_loss == pytest.approx(0.011)
    assert plan.details["bflops_removed"] * 1e9 == pytest.approx(saved_flops(2, 2))
    plan = plan_by_rate(model, sens, 0.6)         # 63283: g0 to 0.5 next (0.01 for 25344 more), then g1 to 0.5
    assert plan.rates == {0: 0.5, 1: 0.5} and plan.predicted_loss == pytest.approx(0.02 + 0.05)
    with pytest.raises(dp.DarkpruneError, match="analyse larger rates"):
        plan_by_rate(model, sens, 0.95)


def test_plan_and_sensitivity_round_trip_through_json(tmp_path):
    model = chain_model()
    sens = sensitivity({0: {0.25: 0.49, 0.5: 0.48}, 1: {0.25: 0.499, 0.5: 0.45}}, model=model)
    sens.save(tmp_path / "s.json")
    back = Sensitivity.load(tmp_path / "s.json", model)
    assert back.curves == sens.curves and back.baseline == sens.baseline and back.rates == sens.rates
    assert back.plan(threshold=0.01).rates == sens.plan(threshold=0.01).rates
    plan = sens.plan(rate=0.1)
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))).rates == plan.rates


def test_a_sensitivity_file_for_another_model_is_refused(tmp_path):
    model = chain_model()
    sens = sensitivity({0: {0.5: 0.45}}, model=model)
    sens.save(tmp_path / "s.json")
    other = Model.from_cfg(parse_cfg_text(CHAIN.replace("filters=4", "filters=5"), "other.cfg"), seed=0)
    with pytest.raises(dp.DarkpruneError, match="another model"):
        Sensitivity.load(tmp_path / "s.json", other)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(dp.DarkpruneError, match="corrupt"):
        Sensitivity.load(tmp_path / "bad.json")


def test_prune_api_masks_exactly_the_lowest_l1_filters():
    model = chain_model()
    norms = np.abs(model.params[0]["weights"]).reshape(8, -1).sum(axis=1)
    plan = Plan({0: 0.25}, "threshold", 0.01)
    masked = dp.prune(model, plan)
    gone = sorted(np.argsort(norms, kind="stable")[:2].tolist())
    assert masked.masks.pruned[0].tolist() == gone
    assert not masked.params[0]["weights"][gone].any() and masked.params[0]["weights"].any()
    assert math.isclose(float(np.abs(masked.params[1]["weights"][:, gone]).sum()), 0.0)
