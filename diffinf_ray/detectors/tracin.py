"""TracIn self-influence (the paper's detector, METHOD.md stage 3): sum over the saved
checkpoints of lr_t * ||grad loss_i(theta_t)||^2, computed by the influence stage."""

from diffinf_ray.detectors.base import Detector

TRACIN = Detector(
    name="tracin", stage="influence", table="influence.parquet", column="score",
    description="TracIn self-influence over every saved checkpoint (Pruthi et al. 2020)")
