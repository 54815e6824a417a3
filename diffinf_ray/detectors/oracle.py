"""The oracle detector (a control, synthfaces or any run whose noise the noise stage injected):
the truly corrupted rows score 1, the others 0, so at a budget tau it flags corrupted rows only
(ties in sample order, i.e. an arbitrary subset of them when tau is below the noise rate). It
bounds what any detector could give a treatment at the same budget (issue 15's factorial)."""

from diffinf_ray.detectors.base import Detector

ORACLE = Detector(
    name="oracle", stage="influence", table="influence.parquet", column="is_corrupted",
    description="the injected corruption itself (control: a perfect detector)")
