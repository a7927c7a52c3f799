"""One layer of a Darknet network as the graph resolves it: its type, attributes, inputs, shapes and costs.

Which channels a layer reads from which producer is explicit in `Layer.sources`: a list of `Source(layer, start,
stop)` channel slices, in the order the layer consumes them (a route concatenates its sources; a shortcut adds them; a
conv reads its single source). Pruning walks these.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .cfg import Section


@dataclass(frozen=True)
class Source:
    layer: int      # producer index, -1 = network input
    start: int      # first channel of the producer's output read
    stop: int       # one past the last channel read


@dataclass
class Layer:
    index: int
    type: str
    section: Section
    inputs: list[int]                     # producer indices in consumption order (-1 = network input)
    in_shape: tuple[int, int, int]        # (c, h, w) of the primary input
    out_shape: tuple[int, int, int]       # (c, h, w)
    attrs: dict = field(default_factory=dict)
    sources: list[Source] = field(default_factory=list)
    params: int = 0
    bflops: float = 0.0                   # Darknet's figure for this layer (what its layer table prints)

    @property
    def name(self) -> str:
        """The name `info` prints and users pass to --exclude/--sparsity: e.g. conv12, connected3, maxpool2."""
        short = {"convolutional": "conv"}.get(self.type, self.type)
        return f"{short}{self.index}"

    @property
    def outputs(self) -> int:
        c, h, w = self.out_shape
        return c * h * w

    def where(self) -> str:
        return f"{self.section.path}:{self.section.line}: layer {self.index} [{self.section.header}]"
