"""Fairness under spurious correlation (issue "fairness"; METHOD.md "A second seed"): Ray-free
method cores and metrics, and the severity x method x seed runner.

- metrics.py: average, worst-group and per-group accuracy;
- group_dro.py: Group-DRO's online group weights and loss (Sagawa et al. 2020);
- reweighting.py: ERM, inverse-frequency loss weights, group-balanced upsampling;
- methods.py: the method registry, and the plug point for synthetic-pretraining variants;
- training.py: the Ray-free training loop (and the one prediction function);
- ray_train.py: the same methods through the project's Ray Train harness;
- runner.py: `diffinf fairness CONFIG`: biased synthfaces draws, every cell, ledger records,
  the table and the plot (docs/FAIRNESS.md).
"""
