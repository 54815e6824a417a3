"""The assigned-label convention shared by every diffusion autoencoder here.

Labels are class indices 0..C-1; `NULL_LABEL` means "no label", the null class of
classifier-free guidance (trained by label dropout, used by the unconditional branch).
Kept in its own torch-free module so that the official-architecture path does not import the
diffusers-based model to learn one constant.
"""

NULL_LABEL = -1
