"""A small helper for writing an ONNX graph node by node: unique tensor names, constants as initializers, and the
elementwise building blocks (affine maps, channel slices, piecewise activations) the layer emitters share.

The `onnx` package is passed in (it is an optional dependency, imported lazily by darkprune.export.onnx).
"""
from __future__ import annotations

import numpy as np


class GraphBuilder:
    """Collects nodes and initializers; every method returns the name of the tensor it produced."""

    def __init__(self, onnx_module):
        self.onnx = onnx_module
        self.helper = onnx_module.helper
        self.numpy_helper = onnx_module.numpy_helper
        self.nodes: list = []
        self.initializers: list = []
        self._counts: dict[str, int] = {}
        self._scalars: dict[tuple, str] = {}
        self.shapes: dict[int, tuple[int, int, int]] = {}   # (c, h, w) of each layer's output, -1 = the input

    def fresh(self, stem: str) -> str:
        """A tensor or node name not used before, derived from `stem`."""
        n = self._counts.get(stem, 0)
        self._counts[stem] = n + 1
        return stem if n == 0 else f"{stem}_{n}"

    # -- constants ------------------------------------------------------------------------------------------------
    def const(self, stem: str, array: np.ndarray) -> str:
        name = self.fresh(stem)
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def scalar(self, value: float) -> str:
        """A float32 scalar constant, shared by every node that uses the same value."""
        key = ("f32", float(np.float32(value)))
        if key not in self._scalars:
            self._scalars[key] = self.const("c", np.asarray(np.float32(value)))
        return self._scalars[key]

    def ints(self, values) -> str:
        """An int64 1-D constant (shapes, slice bounds, axes), shared by equal values."""
        values = tuple(int(v) for v in values)
        key = ("i64",) + values
        if key not in self._scalars:
            self._scalars[key] = self.const("i", np.asarray(values, np.int64))
        return self._scalars[key]

    # -- nodes ----------------------------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: list[str], stem: str, **attrs) -> str:
        out = self.fresh(stem)
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def ops(self, op_type: str, inputs: list[str], stems: list[str], **attrs) -> list[str]:
        outs = [self.fresh(s) for s in stems]
        self.nodes.append(self.helper.make_node(op_type, inputs, outs, name=outs[0], **attrs))
        return outs

    def mul(self, a: str, b: str, stem: str) -> str:
        return self.op("Mul", [a, b], stem)

    def add(self, a: str, b: str, stem: str) -> str:
        return self.op("Add", [a, b], stem)

    def affine(self, x: str, scale: float, shift: float, stem: str) -> str:
        """x * scale + shift (skipping the identity parts)."""
        y = x
        if float(scale) != 1.0:
            y = self.mul(y, self.scalar(scale), stem)
        if float(shift) != 0.0:
            y = self.add(y, self.scalar(shift), stem)
        return y

    def clip(self, x: str, low: float, high: float, stem: str) -> str:
        return self.op("Clip", [x, self.scalar(low), self.scalar(high)], stem)

    def slice(self, x: str, axis: int, start: int, stop: int, stem: str) -> str:
        return self.op("Slice", [x, self.ints([start]), self.ints([stop]), self.ints([axis])], stem)

    def reshape(self, x: str, shape, stem: str) -> str:
        """Reshape; a 0 in `shape` keeps that dimension (the dynamic batch)."""
        return self.op("Reshape", [x, self.ints(shape)], stem)

    def transpose(self, x: str, perm, stem: str) -> str:
        return self.op("Transpose", [x], stem, perm=[int(p) for p in perm])

    def concat(self, parts: list[str], axis: int, stem: str) -> str:
        if len(parts) == 1:
            return parts[0]
        return self.op("Concat", parts, stem, axis=int(axis))
