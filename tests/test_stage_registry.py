"""The stage registry: fingerprints cover what each stage reads, and a stage cannot read more."""

import pickle
import subprocess
import sys

import pytest
from pydantic import BaseModel

from diffinf_ray.config import Config, load_config
from diffinf_ray.stage_registry import (
    REGISTRY,
    SCHEDULING_FIELDS,
    STAGES,
    UNHASHED_FIELDS,
    UndeclaredSettingError,
    config_for_stage,
    covered_settings,
    fingerprint,
    readable_settings,
    upstream_stages,
)

TINY = "jobs/configs/tiny.yaml"
DEMO = "jobs/configs/demo.yaml"


def test_cleanlab_fingerprint_covers_the_influence_budget():
    base = load_config(TINY)
    other_tau = load_config(TINY, ["influence.tau=0.2"])
    assert fingerprint(base, "cleanlab") != fingerprint(other_tau, "cleanlab")
    # only tau and per_class: the influence stage's batch size leaves cleanlab's outputs alone
    other_batch = load_config(TINY, ["influence.batch_size=7"])
    assert fingerprint(base, "cleanlab") == fingerprint(other_batch, "cleanlab")
    assert fingerprint(base, "influence") != fingerprint(other_batch, "influence")


def test_diffinf_config_shows_the_cleanlab_fingerprint_change():
    def cleanlab_line(*overrides: str) -> str:
        out = subprocess.run([sys.executable, "-m", "diffinf_ray.cli", "config", TINY,
                              *overrides], capture_output=True, text=True, check=True).stdout
        return next(line for line in out.splitlines() if line.startswith("# fingerprint cleanlab"))

    assert cleanlab_line() != cleanlab_line("influence.tau=0.2")


def test_registry_is_consistent():
    for name, stage in REGISTRY.items():
        assert stage.name == name
        assert all(STAGES.index(u) < STAGES.index(name) for u in stage.upstream), name
        assert all(STAGES.index(u) < STAGES.index(name) for u, _, _ in stage.upstream_when), name
        section_names = Config.model_fields
        for key in stage.reads:  # every dotted part names a setting ("-": taken out)
            section, *fields = key.removeprefix("-").split(".")
            assert section in section_names, (name, key)
            model = getattr(Config(), section)
            for field in fields:
                assert field in type(model).model_fields, (name, key)
                model = getattr(model, field)
        assert stage.function().__name__ == stage.entry.rpartition(":")[2]
    owned = [folder for stage in REGISTRY.values() for folder in stage.outputs]
    assert len(owned) == len(set(owned)), "two stages own one folder"


@pytest.mark.filterwarnings("ignore::UserWarning")  # values set without validation
@pytest.mark.parametrize("stage", STAGES)
def test_every_readable_setting_changes_the_fingerprint(stage):
    """What a stage can read (config_for_stage) is what its fingerprint hashes: changing any
    readable setting (bar the ambient and scheduling-only ones) changes the fingerprint."""
    base = Config()
    ambient = {"run", "storage", "ray"}
    for section, fields in readable_settings(stage).items():
        if section in ambient:
            continue
        model = getattr(base, section)
        for field in fields or type(model).model_fields:
            if field in (*SCHEDULING_FIELDS.get(section, ()), *UNHASHED_FIELDS.get(section, ())):
                continue
            changed = base.model_copy(deep=True)
            value = getattr(model, field)
            # set without validation: only the hash matters here
            getattr(changed, section).__dict__[field] = _other_value(value)
            assert fingerprint(changed, stage) != fingerprint(base, stage), (stage, section, field)


def _other_value(value):
    """A different value of the same shape as `value`."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return "changed"
    if isinstance(value, BaseModel):
        name = next(iter(type(value).model_fields))
        return value.model_copy(update={name: _other_value(getattr(value, name))})
    if isinstance(value, dict):
        return {**value, "x": 1}
    return [*value, 1]


def test_a_stage_cannot_read_an_undeclared_setting():
    cfg = load_config(TINY)
    view = config_for_stage(cfg, "noise")
    assert view.noise.rate == cfg.noise.rate
    assert view.data.task == cfg.data.task  # upstream (ingest) settings are covered
    assert view.run.root == cfg.run.root and view.ray.num_cpus == cfg.ray.num_cpus  # ambient
    with pytest.raises(UndeclaredSettingError, match=r"stage noise read the setting 'train'"):
        _ = view.train
    with pytest.raises(UndeclaredSettingError, match="'run.name'"):
        _ = view.run.name


def test_single_settings_are_readable_alone():
    cfg = load_config(TINY, ["influence.tau=0.25"])
    view = config_for_stage(cfg, "cleanlab")
    assert sorted(covered_settings("cleanlab")["influence"]) == ["per_class", "tau"]
    assert view.influence.tau == 0.25
    with pytest.raises(UndeclaredSettingError, match="'influence.batch_size'"):
        _ = view.influence.batch_size


def test_the_view_pickles_and_dumps_only_what_it_shows():
    cfg = load_config(TINY)
    view = pickle.loads(pickle.dumps(config_for_stage(cfg, "edit")))
    assert view.edit.lr == cfg.edit.lr
    with pytest.raises(UndeclaredSettingError):
        _ = view.baselines
    dumped = view.model_dump(mode="json")
    assert "baselines" not in dumped and "edit" in dumped
    assert Config.model_validate(dumped).edit == cfg.edit
    assert view.class_names == cfg.class_names


def test_judges_read_no_other_stage():
    assert upstream_stages("judges") == set()
    assert "report" in [s for s, st in REGISTRY.items() if st.tolerant]


def test_the_edit_gate_is_covered_by_the_fingerprints():
    """The edit reads the removal stage's classifier (edit.gate), so the removal recipe is in
    its fingerprint; every gate setting but the fallback reaches the edit and everything after
    it. The fallback (what refine does with a rejected edit) reaches refine and what follows,
    not the edit or the oracle (which judges the edits), so changing it re-uses the edits."""
    assert "removal" in REGISTRY["edit"].upstream
    assert "removal" in upstream_stages("refine") and "removal" in upstream_stages("report")
    base = load_config(TINY)
    # evaluate.ece_bins: read by removal's evaluation, not by the predictor the edit also reads
    assert list(covered_settings("predictor")["evaluate"]) == ["batch_size"]
    for override in ("edit.gate.min_identity=0.5", "edit.gate.enabled=false",
                     "evaluate.ece_bins=20"):
        changed = load_config(TINY, [override])
        for stage in ("edit", "refine", "retrain", "oracle", "report"):
            assert fingerprint(base, stage) != fingerprint(changed, stage), (override, stage)
        assert fingerprint(base, "predictor") == fingerprint(changed, "predictor"), override
    keep = load_config(TINY, ["edit.gate.fallback=keep"])
    for stage in ("refine", "retrain", "report"):
        assert fingerprint(base, stage) != fingerprint(keep, stage), stage
    for stage in ("edit", "oracle", "predictor"):
        assert fingerprint(base, stage) == fingerprint(keep, stage), stage
    assert config_for_stage(keep, "refine").edit.gate.fallback == "keep"
    edit_view = config_for_stage(keep, "edit")
    assert edit_view.edit.gate.min_identity is None and edit_view.edit.lr == keep.edit.lr
    with pytest.raises(UndeclaredSettingError, match="'edit.gate.fallback'"):
        _ = edit_view.edit.gate.fallback


def test_fingerprints_of_whole_sections_are_unchanged_by_the_settings_tree():
    """A stage whose upstream reads a whole section, less one setting, and whose own reads put
    it back hashes exactly what reading the whole section hashed (run roots made before the
    tree keep their fingerprints there)."""
    from diffinf_ray.stage_registry import fingerprint_parts

    cfg = load_config(TINY)
    assert fingerprint_parts(cfg, "refine")["edit"] == cfg.edit.model_dump(mode="json")


def test_flag_by_is_hashed_only_when_set():
    """influence.flag_by came after finished runs: at its default the fingerprints are what
    they were before it existed; set, it re-runs influence and everything downstream."""
    from diffinf_ray.stage_registry import fingerprint_parts

    cfg = load_config(TINY)
    before_the_setting = cfg.influence.model_dump(mode="json")
    del before_the_setting["flag_by"]
    assert fingerprint_parts(cfg, "influence")["influence"] == before_the_setting
    oracle = cfg.model_copy(deep=True)
    oracle.influence.flag_by = "oracle"
    changed = {s for s in STAGES if fingerprint(oracle, s) != fingerprint(cfg, s)}
    assert changed == {"influence", *(s for s in STAGES if "influence" in upstream_stages(s))}
    assert "cleanlab" not in changed and "train" not in changed


def test_expression_gain_is_hashed_as_the_gain_the_faces_are_drawn_with():
    """data.synthfaces.expression_gain came after finished runs. Age faces never changed, so an
    age run hashes what it hashed before the setting existed, unset or set to 1; expression faces
    did (the task's default gain is 4), so an expression run hashes the gain it draws with, and
    a run root made before the setting is rebuilt from ingest on."""
    from diffinf_ray.data.synthfaces import EXPRESSION_GAIN
    from diffinf_ray.stage_registry import fingerprint_parts

    age = load_config(DEMO)
    assert "expression_gain" not in fingerprint_parts(age, "ingest")["data"]["synthfaces"]
    assert fingerprint(load_config(DEMO, ["data.synthfaces.expression_gain=1"]), "train") == \
        fingerprint(age, "train")
    assert fingerprint(load_config(DEMO, ["data.synthfaces.expression_gain=2"]), "ingest") != \
        fingerprint(age, "ingest")

    expression = load_config(TINY)
    assert expression.data.task == "expression"
    hashed = fingerprint_parts(expression, "ingest")["data"]["synthfaces"]["expression_gain"]
    assert hashed == EXPRESSION_GAIN["expression"] == 4.0
    explicit = load_config(TINY, ["data.synthfaces.expression_gain=4"])
    assert fingerprint(explicit, "report") == fingerprint(expression, "report")
    as_drawn_before = load_config(TINY, ["data.synthfaces.expression_gain=1"])
    assert "expression_gain" not in fingerprint_parts(as_drawn_before, "ingest")["data"]["synthfaces"]
    assert {s for s in STAGES if fingerprint(as_drawn_before, s) != fingerprint(expression, s)} \
        == set(STAGES)  # every stage reads the data, through ingest


def test_flag_by_cleanlab_puts_the_cleanlab_stage_upstream_of_influence():
    """Only under flag_by=cleanlab does the influence stage read the cleanlab stage: then its
    fingerprint (and everything downstream) covers cleanlab's settings, the run waits for it, and
    a config without the cleanlab stage is refused on load."""
    from diffinf_ray.config import ConfigError

    stages = ["ingest", "noise", "train", "cleanlab", "influence", "removal"]
    cfg = load_config(TINY, [f"stages=[{','.join(stages)}]"])
    by_cleanlab = load_config(TINY, [f"stages=[{','.join(stages)}]", "influence.flag_by=cleanlab"])
    assert "cleanlab" not in upstream_stages("removal", cfg)
    assert "cleanlab" in upstream_stages("removal", by_cleanlab)
    assert "cleanlab" not in upstream_stages("removal")  # no config: the unconditional ones
    assert "cleanlab" not in covered_settings("influence", cfg)
    assert "cleanlab" in covered_settings("influence", by_cleanlab)
    # the cleanlab stage's own settings now change the flagged set
    more_folds = load_config(TINY, [f"stages=[{','.join(stages)}]", "influence.flag_by=cleanlab",
                                    "cleanlab.folds=4"])
    assert fingerprint(more_folds, "removal") != fingerprint(by_cleanlab, "removal")
    assert fingerprint(more_folds, "train") == fingerprint(by_cleanlab, "train")
    assert fingerprint(load_config(TINY, [f"stages=[{','.join(stages)}]", "cleanlab.folds=4"]),
                       "removal") == fingerprint(cfg, "removal")
    # the influence stage may read the cleanlab section only then
    assert config_for_stage(by_cleanlab, "influence").cleanlab.folds == 3
    with pytest.raises(UndeclaredSettingError):
        _ = config_for_stage(cfg, "influence").cleanlab
    with pytest.raises(ConfigError, match="add cleanlab to stages"):
        load_config(TINY, ["stages=[ingest,noise,train,influence]", "influence.flag_by=cleanlab"])


def test_flag_by_ekfac_puts_the_ekfac_stage_upstream_of_influence():
    """As for cleanlab: only under flag_by=ekfac does the influence stage (and what reads its
    flagged set) wait for and hash the ekfac stage and its settings; without the ekfac stage
    among the stages the config is refused on load, naming the setting."""
    from diffinf_ray.config import ConfigError

    stages = "stages=[ingest,noise,train,ekfac,influence,removal]"
    cfg = load_config(TINY, [stages])
    by_ekfac = load_config(TINY, [stages, "influence.flag_by=ekfac"])
    assert REGISTRY["ekfac"].upstream == ("train",)
    assert STAGES.index("ekfac") < STAGES.index("influence")
    assert "ekfac" not in upstream_stages("removal", cfg)
    assert "ekfac" in upstream_stages("removal", by_ekfac)
    assert "ekfac" not in covered_settings("influence", cfg)
    assert "ekfac" in covered_settings("influence", by_ekfac)
    damped = load_config(TINY, [stages, "influence.flag_by=ekfac", "ekfac.damping=0.01"])
    assert fingerprint(damped, "removal") != fingerprint(by_ekfac, "removal")
    assert fingerprint(damped, "ekfac") != fingerprint(by_ekfac, "ekfac")
    assert fingerprint(load_config(TINY, [stages, "ekfac.damping=0.01"]), "removal") == \
        fingerprint(cfg, "removal")
    # the ekfac stage hashes the budget its detection figures use, not the influence batch size
    assert fingerprint(load_config(TINY, [stages, "influence.tau=0.2"]), "ekfac") != \
        fingerprint(cfg, "ekfac")
    assert fingerprint(load_config(TINY, [stages, "influence.batch_size=8"]), "ekfac") == \
        fingerprint(cfg, "ekfac")
    assert config_for_stage(by_ekfac, "influence").ekfac.strategy == "ekfac"
    with pytest.raises(UndeclaredSettingError):
        _ = config_for_stage(cfg, "influence").ekfac
    with pytest.raises(ConfigError, match="influence.flag_by='ekfac'.*add ekfac to stages"):
        load_config(TINY, ["stages=[ingest,noise,train,influence]", "influence.flag_by=ekfac"])
