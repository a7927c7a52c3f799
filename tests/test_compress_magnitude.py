"""Fine-grained magnitude pruning and the schedule / config parsing."""

import numpy as np
import pytest

from darkprune.compress.magnitude import (PruneStep, apply_mask, build_compress_config, final_ratios,
                                          format_schedule, magnitude_mask, parse_clusters, parse_schedule,
                                          parse_sparsity, prune_count, read_compress_config)
from darkprune.errors import DarkpruneError


def test_smallest_magnitudes_go_first():
    weights = np.array([0.5, -0.1, 0.3, -0.7, 0.1, 0.2], dtype=np.float32)
    assert magnitude_mask(weights, 0.5).tolist() == [True, False, True, True, False, False]
    assert magnitude_mask(weights, 0.0).all()
    assert not magnitude_mask(weights, 1.0).any()


def test_ties_are_broken_by_position():
    weights = np.array([[1.0, -1.0], [1.0, -1.0]], dtype=np.float32)
    assert magnitude_mask(weights, 0.5).tolist() == [[False, False], [True, True]]


@pytest.mark.parametrize("ratio, size", [(0.33, 500), (0.8, 25000), (0.9, 400000), (0.8, 5000), (0.1, 10)])
def test_counts(ratio, size):
    rng = np.random.default_rng(0)
    weights = rng.standard_normal(size).astype(np.float32)
    keep = magnitude_mask(weights, ratio)
    assert (~keep).sum() == prune_count(size, ratio) == round(ratio * size)
    # Independent check: every kept |w| is at least every pruned |w|.
    assert np.abs(weights[keep]).min() >= np.abs(weights[~keep]).max()


def test_previous_mask_is_held():
    rng = np.random.default_rng(1)
    weights = rng.standard_normal(1000).astype(np.float32)
    first = magnitude_mask(weights, 0.5)
    # Finetuning moved weights: some pruned ones are now large (in the masked model they are 0, but be safe).
    moved = weights.copy()
    moved[~first] *= 100
    second = magnitude_mask(moved, 0.8, mask=first)
    assert not (second & ~first).any()
    assert (~second).sum() == 800
    assert (apply_mask(moved, second)[~second] == 0).all()


def test_parse_sparsity_and_clusters():
    assert parse_sparsity("conv1=0.33, conv2=0.8,ip1=0.9,ip2=0.8") == {"conv1": 0.33, "conv2": 0.8, "ip1": 0.9,
                                                                      "ip2": 0.8}
    assert parse_clusters("conv1=256,ip1=32") == {"conv1": 256, "ip1": 32}
    with pytest.raises(DarkpruneError, match="^sparsity: conv1: sparse ratio 80 is outside"):
        parse_sparsity("conv1=80")
    with pytest.raises(DarkpruneError, match="not a number"):
        parse_sparsity("conv1=abc")
    with pytest.raises(DarkpruneError, match="given twice"):
        parse_sparsity("a=0.1,a=0.2")
    with pytest.raises(DarkpruneError, match="not LAYER=VALUE"):
        parse_clusters("conv1")


def test_schedules():
    sparsity = {"conv1": 0.33, "conv2": 0.8}
    steps = parse_schedule("layerwise", sparsity, finetune_iters=500)
    assert steps == [PruneStep({"conv1": 0.33}, 500), PruneStep({"conv2": 0.8}, 500)]
    assert parse_schedule("oneshot", sparsity, 100) == [PruneStep(sparsity, 100)]
    steps = parse_schedule("conv2=0.5@1000; conv2=0.8,conv1=0.33@2000; ip1=0.9", finetune_iters=7)
    assert steps == [PruneStep({"conv2": 0.5}, 1000), PruneStep({"conv2": 0.8, "conv1": 0.33}, 2000),
                     PruneStep({"ip1": 0.9}, 7)]
    assert final_ratios(steps) == {"conv2": 0.8, "conv1": 0.33, "ip1": 0.9}
    assert parse_schedule(format_schedule(steps)) == steps
    with pytest.raises(DarkpruneError, match="never come back"):
        parse_schedule("a=0.8;a=0.5")
    with pytest.raises(DarkpruneError, match="ends at"):
        parse_schedule("a=0.5", sparsity={"a": 0.8})


def test_config_file(tmp_path):
    path = tmp_path / "lenet.compress"
    path.write_text("# Caffe Deep Compression schedule for LeNet-5\r\n"
                    "sparsity = conv1=0.33,conv2=0.8\n"
                    "clusters = conv1=256,conv2=256\n"
                    "finetune_iters = 2000   # per step\n"
                    "centroid_iters=3000\n"
                    "learning_rate=0.1\n"
                    "[ip1]\nsparse_ratio=0.9\nclass_num=32\nindex_bits=5\n"
                    "[ip2]\nsparse_ratio=0.8\nclass_num=32\nfoo=1\n", encoding="utf-8")
    config = read_compress_config(path)
    assert config.sparsity == {"conv1": 0.33, "conv2": 0.8, "ip1": 0.9, "ip2": 0.8}
    assert config.clusters == {"conv1": 256, "conv2": 256, "ip1": 32, "ip2": 32}
    assert config.index_bits == {"ip1": 5}
    assert [list(step.ratios) for step in config.schedule] == [["conv1"], ["conv2"], ["ip1"], ["ip2"]]
    assert all(step.finetune_iters == 2000 for step in config.schedule)
    assert config.centroid_iters == 3000 and config.init == "linear"
    assert config.unknown == [f"{path}:6: learning_rate", f"{path}:14: [ip2] foo"]


def test_config_file_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.compress"
    path.write_text("sparsity = conv1=0.3\n[conv1]\nclass_num=big\n")
    with pytest.raises(DarkpruneError, match=r"bad.compress:3: conv1: cluster count 'big' is not an integer"):
        read_compress_config(path)
    path.write_text("sparsity conv1 0.3\n")
    with pytest.raises(DarkpruneError, match=r"bad.compress:1: expected key=value"):
        read_compress_config(path)
    with pytest.raises(DarkpruneError, match="cannot read"):
        read_compress_config(tmp_path / "missing")


def test_build_config_from_flags():
    config = build_compress_config(sparsity="conv1=0.33,ip1=0.9", clusters="conv1=256,ip1=32", finetune_iters=10,
                                   schedule="oneshot")
    assert config.schedule == [PruneStep({"conv1": 0.33, "ip1": 0.9}, 10)]
    with pytest.raises(DarkpruneError, match="initialisation"):
        build_compress_config(sparsity="a=0.5", init="best")


def test_matches_a_stable_sort_reference_with_many_ties():
    rng = np.random.default_rng(5)
    for _ in range(200):
        size = int(rng.integers(1, 300))
        weights = rng.integers(-3, 4, size).astype(np.float32)  # few distinct magnitudes: ties everywhere
        ratio = float(rng.random())
        prior = rng.random(size) < 0.8 if rng.random() < 0.5 else None
        key = np.abs(weights.astype(np.float64))
        if prior is not None:
            key[~prior] = -1.0
        order = sorted(range(size), key=lambda i: (key[i], i))
        expected = np.ones(size, dtype=bool)
        expected[order[:int(np.floor(ratio * size + 0.5))]] = False
        if prior is not None:
            expected &= prior
        np.testing.assert_array_equal(magnitude_mask(weights, ratio, prior), expected)
