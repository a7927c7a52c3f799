"""Training for the Deep Compression pipeline, both on darkprune.train.loop's one training loop:

- finetuning while pruning: darkprune.train.finetune with the fine-grained masks held;
- centroid finetuning: the same loop with one hook (_CentroidHooks): the gradients of a quantised layer's weights
  are taken out of the optimizer's way, summed over the iteration's mini-batches and turned into gradients of its
  codebook (the sum over each cluster, Han et al.'s eq. 3, or the mean); after each update the codebook takes an
  SGD step (CentroidFinetuner) and the layer's weights are set back to codebook[label] at the kept positions.
  Every other trainable array (biases, batch-norm scales...) trains with Darknet's SGD as usual.

Optimiser settings come from the cfg's [net] (batch/subdivisions, momentum, decay); the learning rate is the given
one on the cfg's policy compressed to the iteration count (finetune_schedule). Each training run draws its own
batches: the seed is (seed, run number).
"""
from __future__ import annotations

import os
import time

import numpy as np

from darkprune.compress.kmeans import CentroidFinetuner
from darkprune.errors import DarkpruneError
from darkprune.train.loop import Hooks, LoopSettings, TrainingLoop, darknet_optimizer, split_batch


class _CentroidHooks(Hooks):
    """The codebook layers' weight gradients -> their CentroidFinetuners; see the module doc."""

    def __init__(self, codebooks: dict, rate: float, momentum: float, reduce: str):
        self.finetuners, self.scales = {}, {}
        for index, spec in codebooks.items():
            self.finetuners[index] = CentroidFinetuner(spec["codebook"], spec["labels"], spec["mask"], lr=rate,
                                                       momentum=momentum)
            if reduce == "mean":
                counts = np.bincount(spec["labels"].ravel(), minlength=spec["codebook"].size).astype(np.float32)
                scale = np.zeros(spec["mask"].shape, np.float32)
                scale[spec["mask"]] = 1.0 / counts[spec["labels"].ravel()]
                self.scales[index] = scale
        self.weight_grads: dict[int, np.ndarray] = {}

    def on_gradients(self, loop, grads):
        for index in self.finetuners:
            grad = grads[index].pop("weights")
            total = self.weight_grads.get(index)
            if total is None:
                total = self.weight_grads[index] = np.zeros(grad.shape, np.float32)
            total += grad

    def after_step(self, loop, rate):
        full_batch = loop.settings.full_batch
        for index, finetuner in self.finetuners.items():
            weights = loop.model.params[index]["weights"]
            # Darknet's weight decay, as the gradient of the shared weights would carry it.
            grads = self.weight_grads[index] + np.float32(loop.optimizer.decay * full_batch) * weights
            if index in self.scales:
                grads *= self.scales[index]
            weights[...] = finetuner.step(grads, lr=rate / full_batch)
        self.weight_grads = {}


class Trainer:
    """The pipeline's training runs on one model and dataset (see the module doc)."""

    def __init__(self, model, data, seed: int = 0, batch: int | None = None, progress: bool = True):
        if data is None:
            raise DarkpruneError("finetuning needs training data (a .data file with a train= list)")
        self.data = data
        self.seed = int(seed)
        self.batch = batch
        self.progress = progress
        self.runs = 0
        self.base_lr = float(model.graph.cfg.net.get_float("learning_rate", 0.001))

    def _next_seed(self) -> int:
        self.runs += 1
        return self.seed * 1000 + self.runs

    def finetune(self, model, masks, iters: int, lr: float | None = None) -> dict:
        from darkprune.train.finetune import finetune
        rate = self.base_lr / 10 if lr is None else float(lr)
        fine = {index: {"weights": mask} for index, mask in masks.items()}
        result = finetune(model, self.data, iters=int(iters), masks=fine, batch=self.batch, learning_rate=rate,
                          seed=self._next_seed(), progress=self.progress, keep="last")
        return {"iterations": result.iterations, "learning_rate": rate, "seconds": round(result.seconds, 2),
                "final_avg_loss": result.avg_losses[-1] if result.avg_losses else None}

    def finetune_centroids(self, model, codebooks: dict, iters: int, lr: float | None = None,
                           reduce: str = "sum") -> dict:
        """Trains the codebooks (labels and masks fixed) and every other trainable array for `iters` iterations;
        updates `codebooks` and the model's weights in place."""
        from darkprune.engine.batchnorm import DARKNET_MOMENTUM
        from darkprune.train.backprop import TrainingNetwork
        from darkprune.train.feeder import BatchFeeder
        from darkprune.train.schedule import finetune_schedule

        graph = model.graph
        mini_batch, subdivisions = split_batch(graph, self.batch, None, at_least_one=True)
        rate = self.base_lr / 100 if lr is None else float(lr)
        seed = self._next_seed()
        dataset = self.data
        if isinstance(dataset, (str, os.PathLike)):
            from darkprune.data import load_data
            dataset = load_data(dataset, split="train")
        net = TrainingNetwork(model, np.float32, DARKNET_MOMENTUM, seed)
        opt = darknet_optimizer(model, mini_batch * subdivisions, skip={(index, "weights") for index in codebooks})
        hooks = _CentroidHooks(codebooks, rate, opt.momentum, reduce)
        settings = LoopSettings(iters=int(iters), mini_batch=mini_batch, subdivisions=subdivisions, seed=seed,
                                name="centroids", run_name="centroid finetuning",
                                rate_name="the centroid learning rate", seen_base=model.header.seen,
                                progress=self.progress, leave_progress=False)
        started = time.perf_counter()
        run = TrainingLoop(model, net, opt, finetune_schedule(graph, int(iters), rate),
                           BatchFeeder(dataset, graph, mini_batch, seed), settings, [hooks]).run()
        for index, finetuner in hooks.finetuners.items():
            codebooks[index]["codebook"] = finetuner.codebook.copy()
        return {"iterations": int(iters), "learning_rate": rate, "gradient": reduce,
                "seconds": round(time.perf_counter() - started, 2), "final_avg_loss": run.avg_loss}
