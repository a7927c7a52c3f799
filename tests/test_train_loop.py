"""The one training loop (darkprune.train.loop) and its hooks: a loss given by a hook on batches without ground truth
(how distillation plugs in) trains exactly as the heads' own loss does; the heads' loss weighted or switched off;
gradients a hook takes never reach the optimizer; a batch with nothing to learn from is refused."""
import numpy as np
import pytest

from darkprune.errors import DarkpruneError
from darkprune.train.backprop import TrainBatch, TrainingNetwork, detector_loss
from darkprune.train.feeder import BatchFeeder
from darkprune.train.loop import Hooks, LoopSettings, TrainingLoop, darknet_optimizer, split_batch
from darkprune.train.schedule import finetune_schedule
from test_train_finetune import VAL_DATA, tiny_yolo

ITERS = 3


class HiddenTruths:
    """The feeder's batches with the ground truth taken out (kept aside, per batch, for a hook to use)."""

    def __init__(self, feeder):
        self.feeder = feeder
        self.truths = None

    def get(self, iteration, subdivision, following=None):
        batch = self.feeder.get(iteration, subdivision, following)
        self.truths = batch.truths
        return TrainBatch(batch.images)

    def close(self):
        self.feeder.close()


class TeacherLoss(Hooks):
    """An extra loss: the detector's own loss against the hidden truths, as a teacher's targets would be."""

    def __init__(self, batches: HiddenTruths):
        self.batches = batches
        self.calls = 0

    def extra_loss(self, loop, batch, seen):
        self.calls += 1
        truths = batch.truths if self.batches is None else self.batches.truths
        out = detector_loss(loop.net, truths, seen)
        return out.cost, out.seeds


class TakeWeights(Hooks):
    """Takes layer 0's weight gradients for itself (as centroid finetuning does for its layers)."""

    def __init__(self):
        self.taken = 0

    def on_gradients(self, loop, grads):
        grads[0].pop("weights")
        self.taken += 1


def run(model, hooks=(), wrap=None, skip=(), **options):
    from darkprune.data import load_data
    mini_batch, subdivisions = split_batch(model.graph, None, None)
    net = TrainingNetwork(model, np.float32, 0.1, 5)
    opt = darknet_optimizer(model, mini_batch * subdivisions, skip=skip)
    feeder = BatchFeeder(load_data(VAL_DATA, split="train"), model.graph, mini_batch, 5)
    batches = wrap(feeder) if wrap else feeder
    hooks = hooks(batches) if callable(hooks) else hooks
    settings = LoopSettings(iters=ITERS, mini_batch=mini_batch, subdivisions=subdivisions, seed=5, progress=False,
                            **options)
    return TrainingLoop(model, net, opt, finetune_schedule(model.graph, ITERS, 0.001), batches, settings,
                        hooks).run(), hooks


def test_extra_loss_on_unlabelled_batches_trains_as_the_heads_loss():
    plain_model, taught_model = tiny_yolo(), tiny_yolo()
    plain, _ = run(plain_model)
    taught, hooks = run(taught_model, hooks=lambda batches: [TeacherLoss(batches)], wrap=HiddenTruths)
    assert hooks[0].calls == ITERS * 2                      # every mini-batch (subdivisions=2)
    assert taught.history["loss"] == plain.history["loss"] and all(np.isfinite(plain.history["loss"]))
    for index, arrays in plain_model.params.items():
        for name, value in arrays.items():
            assert np.array_equal(taught_model.params[index][name], value), (index, name)
    assert taught_model.header.seen == plain_model.header.seen == ITERS * 4


def test_task_weight_scales_the_heads_loss():
    plain_model, replaced_model, doubled_model = tiny_yolo(), tiny_yolo(), tiny_yolo()
    plain, _ = run(plain_model)
    # the heads' loss switched off and given back by a hook: the same training
    replaced, _ = run(replaced_model, hooks=[TeacherLoss(None)], task_weight=0.0)
    assert replaced.history["loss"] == plain.history["loss"]
    assert all(np.array_equal(replaced_model.params[i][k], v) for i, p in plain_model.params.items()
               for k, v in p.items())
    doubled, _ = run(doubled_model, task_weight=2.0)
    assert np.allclose(doubled.history["loss"][0], 2 * plain.history["loss"][0], rtol=1e-6)
    assert not np.array_equal(doubled_model.params[0]["weights"], plain_model.params[0]["weights"])


def test_gradients_a_hook_takes_skip_the_optimizer():
    model = tiny_yolo()
    before = {i: {k: v.copy() for k, v in p.items()} for i, p in model.params.items()}
    hook = TakeWeights()
    run(model, hooks=[hook], skip={(0, "weights")})
    assert hook.taken == ITERS * 2
    assert np.array_equal(model.params[0]["weights"], before[0]["weights"])
    assert not np.array_equal(model.params[0]["biases"], before[0]["biases"])


def test_a_batch_with_nothing_to_learn_from_is_refused():
    with pytest.raises(DarkpruneError, match="iteration 1: the batch has no ground truth and no hook adds a loss"):
        run(tiny_yolo(), wrap=HiddenTruths)
