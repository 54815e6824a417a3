"""Generative correction (METHOD.md stages 4 and 6), Ray-free PyTorch cores.

- `predictor`: the influence predictor h_w(g(x), y) -> p_high;
- `identity`: F_id (insightface ArcFace from ONNX, or a small embedder trained here);
- `parsing`: the face-parsing network of L_struct (BiSeNet layout, or a small net trained here);
- `perceptual`: LPIPS (or the stated fallback distance);
- `losses`: the edit objective's terms, per sample;
- `editor`: latent optimisation through the frozen diffusion autoencoder's decode.
- `gate`: the check before an edit replaces its original, by a classifier that never guided it.
- `editor`: latent optimisation through the frozen diffusion autoencoder's decode (`latent`);
- `guided`: gradient-free editing, null-label partial inversion + label-guided decode (`guided`);
- `methods`: the edit methods by name (`edit.method`).
"""
