"""Stage 3: TracIn self-influence.

- `grad_norms`: per-sample squared gradient norms in one forward and one backward per batch
  (ghost norms), `self_influence_scores` and the checkpoint-loading `SelfInfluenceScorer`.
- `detection`: how well a score finds the known corrupted samples (precision/recall of a
  flagged set, AUROC, precision@k) and `flag_top_fraction`, the high-influence set H.
"""
