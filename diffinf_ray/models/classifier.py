"""The attribute classifier: torchvision ResNet-18 with a two-layer fully connected head.

Inputs are float images in [-1, 1], shape (B, 3, H, W), any H, W >= 32 (the diffusion
autoencoder's range, so edits feed back without renormalising). `features(x)` is the
backbone's pooled 512-d output g(x); it is differentiable w.r.t. the image, which the
influence predictor and the editor rely on.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

FEATURE_DIM = 512


class AttributeClassifier(nn.Module):
    """ResNet-18 backbone (random init) + Linear(512, hidden) -> ReLU -> Linear(hidden, classes)."""

    def __init__(self, num_classes: int, head_hidden: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.head_hidden = head_hidden
        backbone = resnet18(weights=None)
        backbone.fc = nn.Identity()  # keep the pooled features; the head below replaces fc
        self.backbone = backbone
        self.head = nn.Sequential(
            nn.Linear(FEATURE_DIM, head_hidden),
            nn.ReLU(inplace=False),
            nn.Linear(head_hidden, num_classes),
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """g(x): (B, 512) pooled backbone features."""
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits, (B, num_classes)."""
        return self.head(self.features(images))

    def architecture(self) -> dict:
        """What a checkpoint must match to be loaded into this model."""
        return {"name": "resnet18_fc2", "num_classes": self.num_classes, "head_hidden": self.head_hidden}


def build_classifier(num_classes: int, head_hidden: int = 256) -> AttributeClassifier:
    return AttributeClassifier(num_classes=num_classes, head_hidden=head_hidden)
