"""Two cheaper or sharper cuts of TracIn, scored in the same pass as the paper's (the influence
stage's table): TracIn over the output layer's parameters only (last-layer TracIn, the usual
large-model shortcut), and TracIn over the checkpoints up to the best validation accuracy on the
assigned labels (after the peak the network starts to memorise the wrong labels, and a
memorised row's gradient, hence its score, shrinks)."""

from diffinf_ray.detectors.base import Detector

TRACIN_LAST = Detector(
    name="tracin_last", stage="influence", table="influence.parquet", column="score_last",
    description="TracIn over the output layer's parameters only")

TRACIN_EARLY = Detector(
    name="tracin_early", stage="influence", table="influence.parquet", column="score_early",
    description="TracIn over the checkpoints up to the validation peak (assigned labels)")
