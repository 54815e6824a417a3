"""Generators for group-balanced synthetic data (issue 16 items 2-3; METHOD.md "A second seed").

Fine-tune the project's label-conditioned diffusion autoencoder (diffae/family.py) on each
training group's images (or on each k-means cluster of a group), then sample equal numbers of
images per (label, group) cell into a manifest with `synthetic = true` and a `generator` column.

Modules (one concept each; nothing heavy is imported here):
- `settings`   FinetuneSettings, SynthesisSettings, the base model reference (plain data)
- `cells`      (label, group) cells of a manifest's rows, their images
- `zprior`     the diagonal Gaussian over z that a generator samples its semantic codes from
- `clusters`   k-means of a cell's z (scikit-learn) into per-cluster fine-tunes
- `lora`       LoRA adapters (peft) on the UNet's conv and attention layers: inject, save, load
- `finetune`   the fine-tune loops (LoRA; DreamBooth with prior preservation), the DiffAE loss
- `sampling`   drawing images: z from the prior, x_T ~ N(0, I), DDIM decode with the label
- `generator`  a saved generator folder (kind, cell, z prior, weights) and loading it to sample
- `fit`        one fine-tune per cell/cluster as Ray tasks (a GPU each when present)
- `synthesis`  balanced counts per cell and the Ray Data actors that write the manifest
- `variants`   the registry of synthetic-data variants (vanilla, lora, dreambooth, *_cluster)
"""
