"""The run root: where every stage reads and writes (`./runs/<name>` or `s3://bucket/prefix`).

Layout:
    manifest/          ingest output (parquet, one row per sample)
    quarantine/        rows that could not be ingested, with the reason
    manifest_noisy/    manifest with assigned `label`, `label_clean`, `is_corrupted`
    checkpoints/       classifier checkpoints (epoch_NNNN/checkpoint.pt), via Ray Train
    evaluation/        metrics.json + predictions.parquet on the clean test split
    stages/<stage>.json  the fingerprint each finished stage ran with, and its summary
"""

from __future__ import annotations

import time
import uuid

from diffinf_ray.storage import Location, StorageOptions


class RunRoot:
    def __init__(self, uri: str, options: StorageOptions | None = None):
        self.base = Location(uri, options)

    def __getattr__(self, name: str):  # fs, path, display, child, ... of the base folder
        if name == "base" or name.startswith("__"):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.base, name)

    def __str__(self) -> str:
        return self.base.display

    def child(self, *parts: str) -> Location:
        """A folder or file of the run root; every named folder below comes through here, so
        a subclass that routes folders (a sweep trial's root) overrides only this."""
        return self.base.child(*parts)

    @property
    def manifest(self) -> Location:
        return self.child("manifest")

    @property
    def quarantine(self) -> Location:
        return self.child("quarantine")

    @property
    def noisy_manifest(self) -> Location:
        return self.child("manifest_noisy")

    @property
    def checkpoints(self) -> Location:
        return self.child("checkpoints")

    @property
    def evaluation(self) -> Location:
        return self.child("evaluation")

    def _marker(self, stage: str) -> Location:
        return self.base.child("stages", f"{stage}.json")

    def stage_record(self, stage: str) -> dict | None:
        marker = self._marker(stage)
        return marker.read_json() if marker.exists() else None

    def mark_started(self, stage: str, fingerprint: str) -> None:
        """Outputs under the run root now belong to this fingerprint (resume or replace)."""
        self._marker(stage).write_json({"stage": stage, "fingerprint": fingerprint,
                                        "status": "running"})

    def mark_done(self, stage: str, fingerprint: str, summary: dict, seconds: float,
                  inputs: dict | None = None) -> None:
        """`inputs`: the attempt of each upstream stage whose outputs this run read, so that
        a stage built on outputs that were rebuilt since is not taken for current."""
        self._marker(stage).write_json({
            "stage": stage,
            "fingerprint": fingerprint,
            "status": "done",
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_seconds": round(seconds, 2),
            # tells two completions apart when the clock (1 s) and the rounded time agree
            "attempt": uuid.uuid4().hex,
            "inputs": inputs or {},
            "summary": summary,
        })

    def mark_failed(self, stage: str, fingerprint: str, error: str) -> None:
        """The stage raised: not done; a rerun with the same fingerprint resumes it."""
        self._marker(stage).write_json({
            "stage": stage, "fingerprint": fingerprint, "status": "failed",
            "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "error": error})
