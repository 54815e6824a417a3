"""diffinf-ray: find the training samples whose image and label disagree (TracIn self-influence)
and repair them with an identity-preserving diffusion-autoencoder edit, on Ray."""

__version__ = "0.1.0"

from diffinf_ray.console import tag_worker_logs as _tag_worker_logs  # noqa: E402

_tag_worker_logs()  # in a Ray worker only: this package's warnings reach the driver's console
