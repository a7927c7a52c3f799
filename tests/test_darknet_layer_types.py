"""The layer-type table agrees with itself across its rules: for every layer of every cfg we have, the arrays an
entry says the type stores add up to the parameter count its shape rule gives (Darknet's two rules: the layer table's
count and load_weights' layout), its cost at the full channel counts is the graph's params and BFLOPs, and every
type the engine runs has its kernels attached to the same entry."""
import warnings

import numpy as np
import pytest

from darkprune.darknet import read_cfg
from darkprune.darknet.graph import build_graph
from darkprune.darknet.layer_types import LAYER_TYPES, PASS, PRODUCER, TIED, layer_type
from darkprune.engine.layer_ops import INFERENCE_TYPES
from darkprune.errors import DarkpruneError

from conftest import BUNDLED_CFG, asset_cfgs

CFGS = [BUNDLED_CFG] + asset_cfgs()


def graph_of(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return build_graph(read_cfg(path))
        except DarkpruneError as exc:
            pytest.skip(f"{path.name}: {exc}")


@pytest.mark.parametrize("path", CFGS, ids=[p.name for p in CFGS])
def test_arrays_and_costs_agree_with_the_shape_rule(path):
    graph = graph_of(path)
    for layer in graph:
        entry = layer_type(layer)
        stored = sum(int(np.prod(shape)) for _, shape in entry.arrays(layer))
        assert stored == layer.params, (layer.where(), stored, layer.params)
        c_in = sum(s.stop - s.start for s in layer.sources)
        if entry.cost is not None and entry.role(layer) in (PRODUCER, PASS, TIED) and len(layer.sources) == 1:
            assert entry.live_cost(layer, c_in, layer.out_shape[0]) == (layer.params, layer.bflops), layer.where()
        sliced = entry.slicing(layer)
        names = {name for name, _ in entry.arrays(layer)}
        assert set(sliced.out_axes) <= names and set(sliced.in_axes) <= names, layer.where()
        assert set(entry.trainable_arrays(layer)) <= names


def test_every_type_the_engine_runs_carries_its_kernels():
    for name, entry in LAYER_TYPES.items():
        assert (entry.engine is not None) == (name in INFERENCE_TYPES), name
        if entry.engine is not None:
            assert callable(entry.engine.infer) and callable(entry.engine.forward) and callable(entry.engine.backward)
