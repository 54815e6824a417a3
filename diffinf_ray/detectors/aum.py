"""Area under the margin (Pleiss et al., NeurIPS 2020): the assigned label's logit minus the
largest other logit, averaged over training. A mislabelled row is pulled towards its label only
by memorisation, so its margin stays low (negative) longer than a clean row's. Here the average
is over the saved checkpoints (the influence stage computes the logits in its TracIn pass, eval
mode, no augmentation), not over every epoch of the training forward passes as in the paper:
with `train.checkpoint_every: 1` the two differ only by train vs eval mode and augmentation."""

from diffinf_ray.detectors.base import Detector

AUM = Detector(
    name="aum", stage="influence", table="influence.parquet", column="aum",
    description="assigned-label margin averaged over the saved checkpoints (low = suspicious)",
    sign=-1.0)
