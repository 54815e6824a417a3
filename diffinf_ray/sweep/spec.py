"""The sweep file's schema (SweepConfig; the format is in the package docstring): the search
space of each swept key (uniform, loguniform, choice, grid; each gives its candidates and its
Tune domain), the scheduler and the objective."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from diffinf_ray.config import as_override_mapping

OBJECTIVE_METRICS = ("val_accuracy", "val_loss", "train_accuracy", "train_loss")


# choice/grid values: anything a config key takes (influence.layers: [null, [head]])
Value = bool | int | float | str | None | list


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Range(_Model):
    def bounds(self) -> tuple[float, float]:
        raise NotImplementedError

    @model_validator(mode="after")
    def _ordered(self):
        lo, hi = self.bounds()
        if not lo < hi:
            raise ValueError(f"needs lo < hi, got [{lo}, {hi}]")
        return self


class Uniform(_Range):
    uniform: tuple[float, float]

    def bounds(self) -> tuple[float, float]:
        return self.uniform

    def candidates(self) -> list:
        return list(self.uniform)

    def domain(self):
        from ray import tune

        return tune.uniform(*self.uniform)


class LogUniform(_Range):
    loguniform: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]

    def bounds(self) -> tuple[float, float]:
        return self.loguniform

    def candidates(self) -> list:
        return list(self.loguniform)

    def domain(self):
        from ray import tune

        return tune.loguniform(*self.loguniform)


class Choice(_Model):
    choice: list[Value] = Field(min_length=1)

    def candidates(self) -> list:
        return list(self.choice)

    def domain(self):
        from ray import tune

        return tune.choice(self.choice)


class Grid(_Model):
    grid: list[Value] = Field(min_length=1)

    def candidates(self) -> list:
        return list(self.grid)

    def domain(self):
        from ray import tune

        return tune.grid_search(self.grid)


ParamSpec = Uniform | LogUniform | Choice | Grid


class SchedulerSection(_Model):
    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)  # reports before ASHA may stop a trial
    reduction_factor: float = Field(2, gt=1)


class SweepConfig(_Model):
    base: str  # pipeline config, relative to the sweep file's folder
    # dotted key -> value, applied to the base; a list of `key=value` strings reads the same
    overrides: Annotated[dict[str, Any], BeforeValidator(as_override_mapping)] = {}
    name: str | None = None  # default: the sweep file's stem
    root: str | None = None  # default: <base run.root>/sweeps/<name>
    params: dict[str, ParamSpec] = Field(min_length=1)
    num_samples: int = Field(1, ge=1)  # samples per grid point
    # Settings tried first, e.g. the base config's own values as a reference trial
    # ([{edit.w_id: 1.0, edit.w_reg: 1.0, edit.w_si: 1.0}]). Tune's rule: each point replaces
    # one of the num_samples; keys a point leaves out are sampled.
    points_to_evaluate: list[dict[str, Value]] = []
    metric: Literal[OBJECTIVE_METRICS] = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerSection = SchedulerSection()
    # Trials run side by side; each Train run inside one asks for its own workers (train.*),
    # so on one GPU (or 2 CPUs) keep this at 1.
    max_concurrent_trials: int = Field(1, ge=1)
    trial_cpus: float = Field(0.5, gt=0)  # the trial driver only: Train asks for its own
    max_failures: int = Field(0, ge=0)  # retries of a failed trial (from its last report)
    objective_stage: Literal["retrain", "removal"] = "retrain"
    epochs_per_report: int = Field(1, ge=1)
    seed: int = 0  # of the random search

    @model_validator(mode="after")
    def _points_fit(self) -> SweepConfig:
        for i, point in enumerate(self.points_to_evaluate):
            unknown = sorted(set(point) - set(self.params))
            if unknown:
                raise ValueError(f"points_to_evaluate[{i}] sets {unknown}, which are not "
                                 f"swept params ({sorted(self.params)})")
        if len(self.points_to_evaluate) > self.num_samples:
            raise ValueError(f"{len(self.points_to_evaluate)} points_to_evaluate need "
                             f"num_samples >= {len(self.points_to_evaluate)} (each point "
                             "replaces one sample)")
        return self
