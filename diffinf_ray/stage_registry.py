"""Every stage of the pipeline, declared once: what it runs, which settings it reads, which
stages' outputs it reads, and which folders of the run root it owns.

From these declarations follow
- `STAGES`, the pipeline order;
- `fingerprint(cfg, stage)`: the hash of the settings a stage reads, and of its upstream
  stages' settings, so a finished stage is skipped while they stay the same (pipeline.py);
- `config_for_stage(cfg, stage)`: the config as the stage sees it. It holds only what the
  fingerprint covers, so a stage cannot read a setting that would leave its outputs stale: an
  undeclared read is an `UndeclaredSettingError` naming the stage and the key, at once, on any
  config. (This is how `influence.tau` read by the cleanlab stage but hashed by another was
  found.)

What every stage may read without declaring it: `run.seed` (hashed for every stage),
`run.root`, and the `storage` and `ray` sections (where data lives and how work is placed: they
do not change outputs). `train.max_failures` and `autoencoder.max_failures` (how often Ray Train
restarts failed workers) are read with their sections and not hashed. A stage reads its upstream stages' settings freely: they are in its
fingerprint through them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffinf_ray.edit.methods import methods_needing_autoencoder

# Readable by every stage and not hashed (the `run.seed` is hashed for all, see fingerprint).
AMBIENT = {"run": ("root", "seed"), "storage": None, "ray": None}

# Settings that only place work on the cluster: they hash as their defaults, so giving a Train
# worker half a CPU (as a sweep on a small box must) does not rebuild a finished stage.
SCHEDULING_FIELDS = {"train": ("cpus_per_worker",), "edit": ("actors", "gpus_per_actor")}

# Settings that only say how hard to retry, whether decoded images wait in the object store
# between epochs, or which Ray machinery runs a fit: left out of the hash altogether (they came after
# the fingerprints of finished runs, which must not change).
UNHASHED_FIELDS = {"train": ("max_failures", "cache_decoded_images", "runner"),
                   "autoencoder": ("max_failures", "runner")}

# Settings added after runs were finished: hashed only when set to something other than their
# default, so a run root made before the setting existed keeps its fingerprints.
HASHED_WHEN_SET = {"influence": ("flag_by",)}


def _expression_gain(cfg) -> float:
    """The gain synthfaces draws with (its task's default when unset); 1 for user data."""
    if cfg.data.source != "synthfaces":
        return 1.0
    from diffinf_ray.data.synthfaces import resolved_expression_gain

    return float(resolved_expression_gain(cfg.data.task, cfg.data.synthfaces.expression_gain))


# Settings added after runs were finished whose default depends on other settings: hashed as
# the value they take, and left out when that is the value every earlier run had. The
# expression gain is hashed for the expression task, whose faces it changed, never for age.
HASHED_AS_RESOLVED = {("data", "synthfaces", "expression_gain"): (_expression_gain, 1.0)}


@dataclass(frozen=True)
class Stage:
    """One stage. `reads` names config sections (`train`) or settings (`influence.tau`,
    `edit.gate.fallback`), and "-key" takes a setting out of a section read whole (the edit
    stage reads `edit` but not `-edit.gate.fallback`, which only refine acts on);
    `upstream` the stages whose outputs it reads; `outputs` the run-root folders it owns (cleared
    before it runs with a new fingerprint). `tolerant`: it runs on whatever its upstream stages
    left, even when one of them failed (the report). `upstream_when`: stages read only under
    one setting, {stage: (dotted setting, value)} (the influence stage reads the cleanlab stage's
    scores when `influence.flag_by` is cleanlab, the ekfac stage's when it is ekfac): upstream, and in the fingerprint, only then."""

    name: str
    entry: str  # "module:function", imported only when the stage runs
    reads: tuple[str, ...]
    upstream: tuple[str, ...]
    outputs: tuple[str, ...]
    tolerant: bool = False
    upstream_when: tuple[tuple[str, str, Any], ...] = ()

    def upstream_of(self, cfg=None) -> tuple[str, ...]:
        """The stages whose outputs this one reads under `cfg` (None: the unconditional ones)."""
        extra = tuple(s for s, key, value in self.upstream_when
                      if cfg is not None and _holds(_setting(cfg, key), value))
        return self.upstream + extra

    def function(self) -> Callable:
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)


def _holds(setting, value) -> bool:
    """An upstream_when condition: the setting equals `value`, or is one of a frozenset."""
    return setting in value if isinstance(value, frozenset) else setting == value


def _setting(cfg, key: str):
    """The value of a dotted setting (`influence.flag_by`) of a config or a stage's view of it."""
    if isinstance(cfg, _Restricted):
        cfg = cfg._model
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _stage(name: str, entry: str, reads=(), upstream=(), outputs=None, tolerant=False,
           upstream_when=None) -> Stage:
    module, _, function = entry.partition(":")
    return Stage(name, f"diffinf_ray.stages.{module}:{function}", tuple(reads), tuple(upstream),
                 tuple(outputs or (name,)), tolerant,
                 tuple((s, *cond) for s, cond in (upstream_when or {}).items()))


REGISTRY: dict[str, Stage] = {s.name: s for s in (
    _stage("ingest", "ingest:run_ingest", ["data"], outputs=["manifest", "quarantine"]),
    _stage("noise", "noise:run_noise", ["noise"], ["ingest"], outputs=["manifest_noisy"]),
    _stage("train", "train:run_train", ["train"], ["noise"], outputs=["checkpoints"]),
    _stage("evaluate", "evaluate:run_evaluate", ["evaluate"], ["train"], outputs=["evaluation"]),
    # K classifiers trained like the baseline; detection figures at the influence budget tau
    _stage("cleanlab", "detectors:run_cleanlab",
           ["train", "evaluate", "cleanlab", "influence.tau", "influence.per_class"], ["noise"]),
    # second-order (EK-FAC) self-influence under the trained classifier; detection figures at
    # the influence budget tau
    _stage("ekfac", "detectors:run_ekfac", ["ekfac", "influence.tau", "influence.per_class"],
           ["train"]),
    # flags the top tau by TracIn (the paper) or another detector (influence.flag_by); by
    # cleanlab's self-confidence or EK-FAC only after the cleanlab or ekfac stage
    _stage("influence", "influence:run_influence", ["influence"], ["train"],
           upstream_when={"cleanlab": ("influence.flag_by", "cleanlab"),
                          "ekfac": ("influence.flag_by", "ekfac")}),
    # the baseline recipe retrained without the flagged set
    _stage("removal", "detectors:run_removal", ["train", "evaluate"], ["influence"]),
    # the baseline recipe with the flagged rows' labels set to the truth (a control)
    _stage("relabel", "detectors:run_relabel", ["train", "evaluate"], ["influence"]),
    _stage("baselines", "baselines:run_baselines", ["train", "evaluate", "baselines"], ["noise"]),
    # trains on the assigned (noisy) labels
    _stage("autoencoder", "autoencoder:run_autoencoder", ["autoencoder"], ["noise"]),
    # g(x) features are mapped with the evaluation batch size
    _stage("predictor", "predictor:run_predictor", ["predictor", "evaluate.batch_size"],
           ["influence"]),
    # images, identities and region masks; no labels
    _stage("lossnets", "lossnets:run_lossnets", ["lossnets"], ["ingest"]),
    # the removal stage's classifier, which never guided an edit, gates each one (edit.gate)
    # edit.gate.fallback only decides what refine does with a rejected edit: changing it
    # re-runs refine and what follows, not the edits
    # the autoencoder only for the methods that edit with it (not oracle_repair, which draws
    # the face again)
    _stage("edit", "edit:run_edit", ["edit", "-edit.gate.fallback"],
           ["removal", "predictor", "lossnets"], outputs=["edits"],
           upstream_when={"autoencoder": ("edit.method", methods_needing_autoencoder())}),
    _stage("refine", "refine:run_refine", ["edit.gate.fallback"], ["edit"], outputs=["refined"]),
    # the baseline recipe on the refined training split
    _stage("retrain", "refine:run_retrain", ["train", "evaluate"], ["refine"]),
    # its own synthfaces draw, recipe and embedder: independent of every other stage's outputs
    _stage("judges", "oracle:run_judges", ["data", "train", "lossnets", "oracle"]),
    _stage("oracle", "oracle:run_oracle", [], ["edit", "judges"]),
    _stage("report", "report:run_report", ["run.name", "report"],
           ["evaluate", "removal", "relabel", "baselines", "retrain", "oracle"], tolerant=True),
)}

STAGES: tuple[str, ...] = tuple(REGISTRY)


def upstream_stages(stage: str, cfg=None) -> set[str]:
    """Every stage whose outputs `stage` reads under `cfg`, directly or through others (without
    `cfg`: those it reads under every config)."""
    found: set[str] = set()
    todo = list(REGISTRY[stage].upstream_of(cfg))
    while todo:
        s = todo.pop()
        if s not in found:
            found.add(s)
            todo.extend(REGISTRY[s].upstream_of(cfg))
    return found


# A permission tree: {field: None (all of it) | a tree of its sub-fields}, from the config's top.
Tree = dict[str, Any]


def _merge(a: Tree | None, b: Tree | None) -> Tree | None:
    """The settings of either tree (None: everything)."""
    if a is None or b is None:
        return None
    return {k: _merge(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k))
            for k in {*a, *b}}


def _without(tree: Tree | None, path: list[str], model) -> Tree:
    """`tree` less the setting at `path` (a whole node is first opened into its fields)."""
    if tree is None:
        tree = dict.fromkeys(type(model).model_fields)
    head, rest = path[0], path[1:]
    if not rest:
        return {k: v for k, v in tree.items() if k != head}
    if head not in tree:
        return tree
    return {**tree, head: _without(tree[head], rest, getattr(model, head))}


def _tree_of(keys, model) -> Tree:
    """The tree of dotted keys, e.g. ["train", "influence.tau"]; a key starting with "-"
    takes that setting out of what the others name ("-edit.gate.fallback")."""
    tree: Tree = {}
    for key in (k for k in keys if not k.startswith("-")):
        node = {}
        for part in reversed(key.split(".")):
            node = {part: node or None}
        tree = _merge(tree, node)
    for key in (k[1:] for k in keys if k.startswith("-")):
        tree = _without(tree, key.split("."), model)
    return tree


def covered_settings(stage: str, cfg=None) -> Tree:
    """{section: None for the whole section, or a tree of its fields} that `stage`'s
    fingerprint covers under `cfg`: what it and its upstream stages declare."""
    from diffinf_ray.config import Config

    covered: Tree = {}
    for s in (stage, *upstream_stages(stage, cfg)):
        covered = _merge(covered, _tree_of(REGISTRY[s].reads, Config()))
    return covered


def _select(dumped: dict, tree: Tree | None):
    return dumped if tree is None else {k: _select(dumped[k], t) for k, t in sorted(tree.items())}


def fingerprint_parts(cfg, stage: str) -> dict:
    """The values `fingerprint` hashes: run.seed and every covered setting (scheduling-only
    settings as their defaults, retry settings left out, settings added later (HASHED_WHEN_SET)
    only when set)."""
    parts: dict[str, Any] = {"seed": cfg.run.seed}
    for section, fields in covered_settings(stage, cfg).items():
        values = getattr(cfg, section)
        dumped = values.model_dump(mode="json")
        if section in SCHEDULING_FIELDS:
            defaults = type(values)().model_dump(mode="json")
            for name in SCHEDULING_FIELDS[section]:
                dumped[name] = defaults[name]
        parts[section] = _select(dumped, fields)
        for name in UNHASHED_FIELDS.get(section, ()):
            parts[section].pop(name, None)
        for name in HASHED_WHEN_SET.get(section, ()):
            if isinstance(parts[section], dict) and name in parts[section] and \
                    parts[section][name] == type(values).model_fields[name].default:
                parts[section].pop(name)
    for (section, *path, name), (resolve, legacy) in HASHED_AS_RESOLVED.items():
        node = parts.get(section)
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and name in node:
            value = resolve(cfg)
            if value == legacy:
                node.pop(name)
            else:
                node[name] = value
    return parts


def fingerprint(cfg, stage: str) -> str:
    """Hash of the settings `stage` and its upstream stages depend on (16 hex digits)."""
    blob = json.dumps(fingerprint_parts(cfg, stage), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# -- the config as one stage sees it ------------------------------------------------------


class UndeclaredSettingError(AttributeError):
    """A stage read a setting its fingerprint does not cover."""


def readable_settings(stage: str, cfg=None) -> Tree:
    """{section: None (all) or a tree of its fields} that `stage` may read under `cfg`: what its
    fingerprint covers plus the ambient settings."""
    readable = covered_settings(stage, cfg)
    for section, fields in AMBIENT.items():
        ambient = None if fields is None else dict.fromkeys(fields)
        readable[section] = _merge(readable.get(section, {}), ambient)
    return readable


class _Restricted:
    """A pydantic model (the config or one section) showing only `allowed` of its fields."""

    def __init__(self, model, allowed: dict[str, Any], stage: str, where: str):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_allowed", allowed)  # field -> sub-permission (None: all)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_where", where)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_model", "_allowed", "_stage", "_where"):
            raise AttributeError(name)
        model = self._model
        if name not in type(model).model_fields:
            return getattr(model, name)  # methods and properties (e.g. class_names)
        if name not in self._allowed:
            key = f"{self._where}{name}"
            raise UndeclaredSettingError(
                f"stage {self._stage} read the setting {key!r}, which its fingerprint does not "
                f"cover: add {key!r} to the stage's `reads` in diffinf_ray/stage_registry.py")
        fields = self._allowed[name]
        value = getattr(model, name)
        if fields is None:
            return value
        return _Restricted(value, fields, self._stage, f"{self._where}{name}.")

    def __setattr__(self, name: str, value) -> None:
        getattr(self, name)  # only a readable setting may be changed (sweep epoch chunks)
        setattr(self._model, name, value)

    def __reduce__(self):  # pickles (Ray tasks, actors) as the same restricted view
        return (_Restricted, (self._model, self._allowed, self._stage, self._where))

    def __repr__(self) -> str:
        return f"<settings of stage {self._stage}: {self._where or 'config'} {sorted(self._allowed)}>"

    def model_dump(self, **kwargs) -> dict:
        """Only the readable settings: a config rebuilt from it holds defaults elsewhere."""
        out = {}
        for name in self._allowed:
            value = getattr(self, name)
            out[name] = value.model_dump(**kwargs) if hasattr(value, "model_dump") else value
        return out

    def model_copy(self, deep: bool = False) -> _Restricted:
        return _Restricted(self._model.model_copy(deep=deep), self._allowed, self._stage,
                           self._where)

    @property
    def class_names(self) -> list[str]:
        # derived from data.*: readable where `data` is (every stage after ingest, judges)
        self.data  # noqa: B018 (raises UndeclaredSettingError where data is not readable)
        return self._model.class_names


def config_for_stage(cfg, stage: str):
    """`cfg` as `stage` may read it (module docstring); passes through Ray pickling."""
    if isinstance(cfg, _Restricted):
        cfg = cfg._model
    return _Restricted(cfg, readable_settings(stage, cfg), stage, "")
