"""Confident learning (Northcutt et al., JAIR 2021): the self-confidence of the assigned label
under K-fold out-of-sample probabilities, computed by the cleanlab stage. Low self-confidence is
suspicious; the stage also records cleanlab's own `find_label_issues` set."""

from diffinf_ray.detectors.base import Detector

CLEANLAB = Detector(
    name="cleanlab", stage="cleanlab", table="label_issues.parquet", column="self_confidence",
    description="1 - out-of-sample probability of the assigned label (K folds)", sign=-1.0)
