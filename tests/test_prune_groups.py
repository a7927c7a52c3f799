"""Channel dependency groups, importance criteria and masks on small hand-written cfgs (each expected group worked out
by hand from Darknet's layer semantics), plus the grouping of real cfgs where the answer can be counted by eye."""
import json
import warnings

import cv2
import numpy as np
import pytest

from darkprune.darknet import Model, build_graph, parse_cfg_text, read_cfg
from darkprune.errors import DarkpruneError
from darkprune.prune.criteria import channel_scores, channels_to_prune, kept_count
from darkprune.prune.groups import describe_groups, find_groups
from darkprune.prune.masks import Masks, apply_masks, live_stats

from conftest import asset

NET = "[net]\nwidth={w}\nheight={h}\nchannels={c}\n"


def conv(filters, size=1, bn=1, act="leaky", groups=1, stride=1):
    return (f"[convolutional]\nbatch_normalize={bn}\nfilters={filters}\nsize={size}\nstride={stride}\npad=1\n"
            f"groups={groups}\nactivation={act}\n")


def graph_of(*sections, w=8, h=8, c=3):
    return build_graph(parse_cfg_text(NET.format(w=w, h=h, c=c) + "".join(sections), "hand.cfg"))


def by_member(groups):
    """{tuple(members): group} for lookups in the tests."""
    return {tuple(g.members): g for g in groups}


def test_plain_chain_one_group_per_conv_and_output_conv_fixed():
    g = graph_of(conv(8, 3), conv(16, 3), conv(4, 1, bn=0, act="linear"))
    groups = find_groups(g)
    assert [(x.members, x.channels, x.prunable) for x in groups] == [([0], 8, True), ([1], 16, True), ([2], 4, False)]
    assert "network output" in groups[2].reason
    # conv0's channels are read by conv1 at input channels 0..7
    (consumer,) = groups[0].consumers
    assert consumer.layer == 1 and list(consumer.positions) == list(range(8))
    assert list(consumer.group_channels) == list(range(8))


def test_shortcut_chain_ties_every_producer_of_the_residual_stream():
    # 0: conv 8; 1: conv 4; 2: conv 8; 3: shortcut 2+0; 4: conv 4; 5: conv 8; 6: shortcut 5+3; 7: conv 2 (output)
    g = graph_of(conv(8, 3), conv(4), conv(8, 3), "[shortcut]\nfrom=-3\nactivation=linear\n",
                 conv(4), conv(8, 3), "[shortcut]\nfrom=-3\nactivation=linear\n", conv(2, bn=0, act="linear"))
    groups = by_member(find_groups(g))
    stream = groups[(0, 2, 5)]
    assert stream.channels == 8 and stream.prunable
    assert sorted(c.layer for c in stream.consumers) == [1, 4, 7]
    for part in stream.parts:
        assert list(part.channels) == list(range(8))
    assert groups[(1,)].prunable and groups[(4,)].prunable


def test_shortcut_reaching_back_through_maxpool_and_upsample_still_ties():
    # 0: conv 8 (stride 1); 1: maxpool 2/2; 2: upsample 2; 3: conv 8; 4: shortcut 3 + 2 (= conv0 via pool+upsample)
    g = graph_of(conv(8, 3), "[maxpool]\nsize=2\nstride=2\n", "[upsample]\nstride=2\n", conv(8, 3),
                 "[shortcut]\nfrom=-2\nactivation=linear\n", conv(3, bn=0, act="linear"))
    groups = by_member(find_groups(g))
    assert groups[(0, 3)].channels == 8 and groups[(0, 3)].prunable


def test_channel_mixing_layers_fix_what_they_read_and_what_shortcuts_tie_to_them():
    # 0: conv 4 (8x8); 1: reorg /2 -> 16 x 4x4; 2: conv 16; 3: shortcut 2 + reorg; 4: conv 2 (output)
    g = graph_of(conv(4, 3), "[reorg]\nstride=2\n", conv(16, 3), "[shortcut]\nfrom=-2\nactivation=linear\n",
                 conv(2, bn=0, act="linear"))
    groups = by_member(find_groups(g))
    assert not groups[(0,)].prunable and "[reorg] layer 1" in groups[(0,)].reason
    assert not groups[(2,)].prunable and "made by [reorg] layer 1" in groups[(2,)].reason


def test_depthwise_conv_joins_its_input_producer():
    # 0: conv 8; 1: depthwise 8 (groups=8); 2: conv 4 (output)
    g = graph_of(conv(8), conv(8, 3, groups=8), conv(4, bn=0, act="linear"))
    groups = find_groups(g)
    dw = by_member(groups)[(0, 1)]
    assert dw.channels == 8 and dw.prunable
    assert sorted((p.layer, tuple(p.channels)) for p in dw.parts) == [(0, tuple(range(8))), (1, tuple(range(8)))]
    # the depthwise conv reads the group: it is a consumer too (input channel i = group channel i)
    assert {c.layer for c in dw.consumers} == {1, 2}


def test_depthwise_multiplier_ties_each_input_channel_to_its_filters():
    # groups=4 over 4 input channels with 8 filters: filters 2i and 2i+1 read input channel i
    g = graph_of(conv(4), conv(8, 3, groups=4), conv(2, bn=0, act="linear"))
    (grp,) = [x for x in find_groups(g) if x.prunable]
    assert grp.channels == 4 and grp.members == [0, 1]
    parts = sorted((p.layer, tuple(p.channels)) for p in grp.parts)
    assert parts == [(0, (0, 1, 2, 3)), (1, (0, 2, 4, 6)), (1, (1, 3, 5, 7))]


def test_grouped_conv_is_pruned_by_whole_groups():
    # groups=2 over 8 inputs -> 6 filters: block k = inputs 4k..4k+3 and filters 3k..3k+2
    g = graph_of(conv(8), conv(6, 3, groups=2), conv(2, bn=0, act="linear"))
    (grp,) = [x for x in find_groups(g) if x.prunable]
    assert grp.channels == 2
    parts = sorted((p.layer, tuple(p.channels)) for p in grp.parts)
    assert parts == [(0, (0, 4)), (0, (1, 5)), (0, (2, 6)), (0, (3, 7)), (1, (0, 3)), (1, (1, 4)), (1, (2, 5))]


def test_route_concat_does_not_tie_and_maps_offsets():
    # 0: conv 4; 1: conv 6; 2: route 0,1 (10 channels); 3: conv 2 (output)
    g = graph_of(conv(4), conv(6), "[route]\nlayers=0,1\n", conv(2, bn=0, act="linear"))
    groups = by_member(find_groups(g))
    a, b = groups[(0,)], groups[(1,)]
    assert a.prunable and b.prunable
    read_a = {c.layer: list(c.positions) for c in a.consumers}
    read_b = {c.layer: list(c.positions) for c in b.consumers}
    assert read_a == {1: [0, 1, 2, 3], 3: [0, 1, 2, 3]}
    assert read_b == {3: [4, 5, 6, 7, 8, 9]}


def test_route_groups_slice_is_tied_symmetrically():
    # yolov4-tiny's CSP pattern: 0: conv 8; 1: route -1 groups=2 group_id=1 (channels 4..7); 2: conv 4; 3: route 2,0
    g = graph_of(conv(8, 3), "[route]\nlayers=-1\ngroups=2\ngroup_id=1\n", conv(4, 3), "[route]\nlayers=-1,0\n",
                 conv(2, bn=0, act="linear"))
    grp = by_member(find_groups(g))[(0,)]
    assert grp.channels == 4 and grp.prunable
    assert sorted(tuple(p.channels) for p in grp.parts) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    reads = {c.layer: (list(c.positions), list(c.group_channels)) for c in grp.consumers}
    assert reads[2] == ([0, 1, 2, 3], [0, 1, 2, 3])                     # the slice: conv0 channels 4..7
    assert reads[4] == ([4, 5, 6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 0, 1, 2, 3])


SE_BLOCK = [conv(8, 3, act="relu"), "[avgpool]\n", conv(2, act="relu"), conv(8, bn=0, act="logistic"),
            "[scale_channels]\nfrom=-4\n", conv(3, bn=0, act="linear")]


def test_se_block_ties_scale_vector_and_feature_map_and_allows_the_logistic():
    g = graph_of(*SE_BLOCK)
    groups = by_member(find_groups(g))
    se = groups[(0, 3)]
    assert se.channels == 8 and se.prunable, se.reason
    assert groups[(2,)].prunable


def test_logistic_conv_outside_an_se_block_is_not_prunable():
    g = graph_of(conv(8, 3, act="logistic"), conv(4), conv(2, bn=0, act="linear"))
    grp = by_member(find_groups(g))[(0,)]
    assert not grp.prunable and "logistic(0)=0.5" in grp.reason


def test_flatten_into_connected_layers():
    # 0: conv 4 on 6x6 (output 4x6x6); 1: connected 10; 2: connected 5; 3: softmax
    g = graph_of(conv(4, 3), "[connected]\noutput=10\nactivation=relu\n", "[connected]\noutput=5\nactivation=linear\n",
                 "[softmax]\n", w=6, h=6)
    groups = by_member(find_groups(g))
    assert groups[(0,)].prunable and groups[(1,)].prunable
    assert not groups[(2,)].prunable and "softmax" in groups[(2,)].reason
    (reader,) = groups[(0,)].consumers
    assert reader.layer == 1 and list(reader.positions) == [0, 1, 2, 3]


def test_yolo_head_inputs_are_never_prunable_even_through_a_route():
    cfg = read_cfg(asset("cfg", "yolov3-tiny.cfg"))
    g = build_graph(cfg)
    groups = find_groups(g)
    heads = [l for l in g if l.type == "yolo"]
    for head in heads:
        producer = g[head.inputs[0]]
        assert producer.type == "convolutional"
        assert all(not x.prunable for x in groups if producer.index in x.members)
    # hand-made: a conv reaching a yolo head through a route
    yolo = "[yolo]\nmask=0\nanchors=10,14\nclasses=1\nnum=1\n"
    g2 = graph_of(conv(4, 3), conv(6, bn=0, act="linear"), "[route]\nlayers=-1\n", yolo)
    assert [x.prunable for x in find_groups(g2)] == [True, False]


def test_group_counts_of_real_models():
    # yolov4-tiny: 21 convolutions, no shortcut or depthwise conv, so one group per conv; the two head convs are
    # fixed. Its CSP route slices make three convs symmetric (each group: half of that conv's channels).
    g = build_graph(read_cfg(asset("cfg", "yolov4-tiny.cfg")))
    groups = find_groups(g)
    convs = [l.index for l in g if l.type == "convolutional"]
    assert len(convs) == 21 and len(groups) == 21
    assert sorted(m for x in groups for m in x.members) == convs
    assert sum(not x.prunable for x in groups) == 2
    assert sorted(x.members[0] for x in groups if len(x.parts) == 2) == [2, 10, 18]
    # Yolo-Fastest 1.1: every group is prunable except the two head convs
    g = build_graph(read_cfg(asset("models", "yolo-fastest-1.1", "yolo-fastest-1.1.cfg")))
    groups = find_groups(g)
    assert len(groups) == 38 and [x.members for x in groups if not x.prunable] == [[120], [129]]
    text = describe_groups(groups, g)
    assert text.splitlines()[0].startswith("38 channel groups, 36 prunable")
    assert "not prunable: feeds the [yolo] head (layer 121)" in text


def test_exclude_by_name_and_index_and_unknown_names_are_refused():
    g = graph_of(conv(8, 3), conv(16, 3), conv(4, bn=0, act="linear"))
    groups = find_groups(g, exclude=["conv1"])
    assert [x.prunable for x in groups] == [True, False, False]
    assert "excluded" in groups[1].reason
    assert [x.prunable for x in find_groups(g, exclude=[0])] == [False, True, False]
    assert [x.id for x in find_groups(g, exclude=[0])] == [x.id for x in find_groups(g)]
    with pytest.raises(DarkpruneError, match="conv9"):
        find_groups(g, exclude=["conv9"])


def test_every_asset_cfg_groups_cover_each_conv_channel_exactly_once():
    from conftest import asset_cfgs
    for path in asset_cfgs(include_extra=False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = build_graph(read_cfg(path))
        groups = find_groups(g)
        keys = [part.layer * 1_000_000 + part.channels for grp in groups for part in grp.parts]
        assert all(len(part.channels) == grp.channels for grp in groups for part in grp.parts), path.name
        keys = np.sort(np.concatenate(keys))
        expected = np.concatenate([layer.index * 1_000_000 + np.arange(layer.out_shape[0]) for layer in g
                                   if layer.type in ("convolutional", "connected")])
        assert np.array_equal(keys, expected), path.name          # every channel once, nothing else
        for layer in g:
            if layer.type in ("yolo", "region", "detection", "gaussian_yolo"):
                src = g[layer.inputs[0]]
                if src.type == "convolutional":
                    assert not any(grp.prunable for grp in groups if src.index in grp.members), path.name


# ---------------------------------------------------------------------------------------------------------------
# criteria

def test_l1_and_bn_scores_sum_over_members():
    g = graph_of(conv(4), conv(4, 3, groups=4, bn=0, act="relu"), conv(2, bn=0, act="linear"))
    model = Model.from_cfg(g.cfg, seed=0)
    p0, p1 = model.params[0], model.params[1]
    p0["weights"][:] = np.arange(4, dtype=np.float32)[:, None, None, None] * -1.0     # L1 = 3*i (3 inputs)
    p1["weights"][:] = 0.5                                                              # L1 = 9*0.5 per filter
    p0["scales"][:] = np.array([2.0, -1.0, 0.5, 0.0], dtype=np.float32)
    grp = [x for x in find_groups(model.graph) if x.members == [0, 1]][0]
    assert np.allclose(channel_scores(model, grp, "l1"), 3.0 * np.arange(4) + 4.5)
    # bn: |gamma| of conv0 plus the L1 of conv1 (no batch norm)
    assert np.allclose(channel_scores(model, grp, "bn"), [2.0 + 4.5, 1.0 + 4.5, 0.5 + 4.5, 0.0 + 4.5])
    with pytest.raises(DarkpruneError, match="criterion"):
        channel_scores(model, grp, "l2")


def test_channels_to_prune_rounding_ties_and_limits():
    scores = np.array([5.0, 1.0, 3.0, 1.0, 4.0, 2.0, 0.5, 6.0])
    assert list(channels_to_prune(scores, 0.25)) == [1, 6]              # 0.5, then the lower index of the 1.0 tie
    assert list(channels_to_prune(scores, 0.375)) == [1, 3, 6]          # 3 lowest: 0.5, 1.0 (idx 1), 1.0 (idx 3)
    assert list(channels_to_prune(scores, 0.0)) == []
    assert list(channels_to_prune(scores, 1.0)) == [0, 1, 2, 3, 4, 5, 6]  # keeps one: the best
    assert kept_count(8, 0.5, 1) == 4
    assert kept_count(32, 0.3, 8) == 24          # 32 - 10 = 22 -> up to 24
    assert kept_count(20, 0.1, 8) == 20          # 18 -> 24 does not fit: keep all
    assert kept_count(4, 0.5, 8) == 2            # no multiple of 8 fits: as asked
    assert kept_count(10, 0.99, 4) == 4          # at least one, rounded up to 4
    assert kept_count(5, 0.5, 1) == 2            # round(2.5) = 3 pruned (half up)
    with pytest.raises(DarkpruneError):
        kept_count(8, 1.5)


def test_channels_to_prune_ties_go_to_the_lower_index():
    assert list(channels_to_prune(np.ones(6), 0.5)) == [0, 1, 2]
    assert list(channels_to_prune([2.0, 1.0, 1.0, 1.0], 0.5)) == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# masks

def _tiny_model(seed=0):
    g = graph_of(conv(8, 3), conv(6, 3), conv(4, bn=0, act="linear"), w=10, h=10)
    return Model.from_cfg(g.cfg, seed=seed)


def test_pruned_channels_output_exactly_zero_in_opencv(tmp_path):
    model = _tiny_model()
    for p in model.params.values():           # non-trivial batch norm so that clearing it matters
        if "rolling_mean" in p:
            p["rolling_mean"][:] = 0.3
            p["biases"][:] = 0.7
    masked = apply_masks(model, {0: [1, 5], 1: [0, 2, 3]})
    masked.save(tmp_path / "m.cfg", tmp_path / "m.weights")
    net = cv2.dnn.readNetFromDarknet(str(tmp_path / "m.cfg"), str(tmp_path / "m.weights"))
    x = np.random.default_rng(0).random((1, 3, 10, 10), dtype=np.float32)
    net.setInput(x)
    out0, out1 = net.forward(["leaky_1", "leaky_2"])           # conv0's and conv1's activations
    assert np.all(out0[0, [1, 5]] == 0.0) and np.abs(out0[0, [0, 2, 3, 4, 6, 7]]).max() > 0
    assert np.all(out1[0, [0, 2, 3]] == 0.0) and np.abs(out1[0, [1, 4, 5]]).max() > 0
    # the original is untouched
    assert model.params[0]["biases"][1] == np.float32(0.7)


def test_masks_validation():
    model = _tiny_model()
    with pytest.raises(DarkpruneError, match="cannot be pruned"):
        apply_masks(model, {2: [0]})
    with pytest.raises(DarkpruneError, match="empty"):
        apply_masks(model, {0: range(8)})
    with pytest.raises(DarkpruneError, match="channels 0..7"):
        apply_masks(model, {0: [8]})
    with pytest.raises(DarkpruneError, match="no channel group 9"):
        apply_masks(model, {9: [0]})
    with pytest.raises(DarkpruneError, match="excluded"):
        apply_masks(model, {1: [0]}, exclude=["conv1"])


def test_masks_json_round_trip_and_other_models_are_refused(tmp_path):
    model = _tiny_model()
    masked = apply_masks(model, {0: [5, 1], 1: [3]})
    path = tmp_path / "masks.json"
    masked.masks.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "darkprune-masks" and data["groups"][0] == {"id": 0, "members": [0], "channels": 8,
                                                                         "pruned": [1, 5]}
    again = Masks.load(path, model)
    assert {k: list(v) for k, v in again.pruned.items()} == {0: [1, 5], 1: [3]}
    same = apply_masks(model, again)
    for i in model.params:
        for k in model.params[i]:
            assert np.array_equal(same.params[i][k], masked.params[i][k])
    other = Model.from_cfg(graph_of(conv(8, 3), conv(7, 3), conv(4, bn=0, act="linear"), w=10, h=10).cfg)
    with pytest.raises(DarkpruneError, match="another model"):
        Masks.load(path, other)
    path.write_text("{}")
    with pytest.raises(DarkpruneError, match="not a darkprune masks file"):
        Masks.load(path, model)


def test_live_stats_by_hand():
    # conv0: 8 filters 3x3 over 3 channels on 10x10; conv1: 6 filters 3x3; conv2: 4 filters 1x1, no BN
    model = _tiny_model()
    stats = live_stats(model, {0: [1, 5], 1: [0, 2, 3]})
    rows = stats["layers"]
    assert rows[0]["params"] == 6 * 3 * 9 + 6 * 4 and rows[0]["params_before"] == 8 * 3 * 9 + 8 * 4
    assert rows[1]["params"] == 3 * 6 * 9 + 3 * 4
    assert rows[2]["params"] == 4 * 3 + 4
    assert rows[0]["bflops"] == pytest.approx(2 * 6 * 27 * 100 / 1e9)
    assert rows[1]["bflops"] == pytest.approx(2 * 3 * 6 * 9 * 100 / 1e9)
    assert stats["total_params"] == sum(r["params"] for r in rows)
