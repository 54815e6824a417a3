"""Training loss at the last checkpoint: the simplest noisy-label detector (mislabelled rows
keep a high loss until the network memorises them), a by-product of the influence stage."""

from diffinf_ray.detectors.base import Detector

LOSS = Detector(
    name="loss", stage="influence", table="influence.parquet", column="loss_last",
    description="cross-entropy of the assigned label at the last checkpoint")
