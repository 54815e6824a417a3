"""diffinf-ray: find the training samples whose image and label disagree (TracIn self-influence)
and repair them with an identity-preserving diffusion-autoencoder edit, on Ray."""

__version__ = "0.1.0"
