"""Second-order self-influence (issue 15; the paper's Eq. 4 with curvature): g^T (G + lambda I)^-1 g
under the trained classifier, G the EK-FAC Fisher of kronfluence (influence/ekfac.py), computed
by the ekfac stage. High self-influence is suspicious, as for TracIn."""

from diffinf_ray.detectors.base import Detector

EKFAC = Detector(
    name="ekfac", stage="ekfac", table="ekfac.parquet", column="score",
    description="EK-FAC self-influence g^T (G + lambda I)^-1 g (kronfluence)")
