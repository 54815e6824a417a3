import pytest

from diffinf_ray.config import STAGES, ConfigError, fingerprint, load_config


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_and_dotted_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 7\n"), ["train.epochs=3", "noise.rate=0.2"])
    assert cfg.train.epochs == 3
    assert cfg.noise.rate == 0.2
    assert cfg.train.lr == 1e-4  # paper default


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.epoch" in str(err.value) and str(path) in str(err.value)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(write(tmp_path, "trian: {epochs: 3}\n"))


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, "train:\n  epochs: three\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "'train.epochs'" in str(err.value) and "three" in str(err.value)


def test_out_of_range_override(tmp_path):
    with pytest.raises(ConfigError, match="noise.rate"):
        load_config(write(tmp_path, ""), ["noise.rate=1.5"])


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(write(tmp_path, ""), ["train.epochs"])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/run.yaml")


def test_user_data_needs_path(tmp_path):
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(write(tmp_path, "data: {source: folder}\n"))


def test_fingerprints_chain_upstream(tmp_path):
    path = write(tmp_path, "")
    base = load_config(path)
    more_epochs = load_config(path, ["train.epochs=99"])
    other_noise = load_config(path, ["noise.rate=0.1"])
    assert fingerprint(base, "ingest") == fingerprint(more_epochs, "ingest")
    assert fingerprint(base, "noise") == fingerprint(more_epochs, "noise")
    assert fingerprint(base, "train") != fingerprint(more_epochs, "train")
    # a noise change invalidates noise, train and evaluate but not ingest
    assert fingerprint(base, "ingest") == fingerprint(other_noise, "ingest")
    for stage in ("noise", "train", "evaluate"):
        assert fingerprint(base, stage) != fingerprint(other_noise, stage)


def test_scheduling_settings_do_not_change_fingerprints(tmp_path):
    path = write(tmp_path, "")
    base = load_config(path)
    placed = load_config(path, ["train.cpus_per_worker=0.5", "edit.actors=4",
                                "edit.gpus_per_actor=0.5"])
    assert all(fingerprint(base, s) == fingerprint(placed, s) for s in STAGES)
    assert fingerprint(base, "train") != fingerprint(load_config(path, ["train.lr=0.01"]), "train")


def test_judges_do_not_rerun_when_the_edits_change(tmp_path):
    """The judges draw and train on their own data: new edit settings or noise re-judge the
    edits (oracle) without retraining the judges; an oracle setting retrains them."""
    path = write(tmp_path, "")
    base = load_config(path)
    for override in ("edit.w_id=3.0", "noise.rate=0.1", "influence.tau=0.2"):
        changed = load_config(path, [override])
        assert fingerprint(base, "judges") == fingerprint(changed, "judges"), override
        assert fingerprint(base, "oracle") != fingerprint(changed, "oracle"), override
    bigger = load_config(path, ["oracle.num_samples=500"])
    assert fingerprint(base, "judges") != fingerprint(bigger, "judges")


def test_shipped_configs_validate():
    """Pipeline configs load; experiment and sweep files (a top-level `base:`) load with their
    own loaders, which validate every run config they make; fairness files (a top-level
    `severities:`) with theirs."""
    from pathlib import Path

    import yaml

    from diffinf_ray.experiment import load_experiment
    from diffinf_ray.fairness.runner import load_fairness_config
    from diffinf_ray.sweep import load_sweep

    configs = sorted((Path(__file__).parents[1] / "jobs" / "configs").glob("*.yaml"))
    assert configs
    kinds = set()
    for path in configs:
        tree = yaml.safe_load(path.read_text())
        if "severities" in tree:
            load_fairness_config(path)
            kinds.add("fairness")
        elif "base" not in tree:
            load_config(path)
            kinds.add("pipeline")
        elif "params" in tree:
            load_sweep(path)
            kinds.add("sweep")
        else:
            load_experiment(path)
            kinds.add("experiment")
    assert kinds == {"pipeline", "sweep", "experiment", "fairness"}


# -- dotted overrides: one function for the command line, experiment and sweep files ----------

def test_overrides_as_mapping_or_strings_give_the_same_config(tmp_path):
    from diffinf_ray.config import override_args, parse_overrides

    path = write(tmp_path, "")
    strings = ["train.epochs=3", "influence.layers=[head]", "autoencoder.overrides={z_dim: 16}",
               "run.name=x y", "baselines.options.small_loss.noise_rate=0.25"]
    mapping = {"train.epochs": 3, "influence.layers": ["head"],
               "autoencoder.overrides": {"z_dim": 16}, "run.name": "x y",
               "baselines.options.small_loss.noise_rate": 0.25}
    assert parse_overrides(strings) == mapping
    assert load_config(path, strings) == load_config(path, mapping)
    assert parse_overrides(override_args(mapping)) == mapping  # best.json's `reproduce`
    cfg = load_config(path, mapping)
    assert cfg.baselines.options == {"small_loss": {"noise_rate": 0.25}}
    assert cfg.run.name == "x y" and cfg.influence.layers == ["head"]


def test_override_keys_are_checked_before_they_are_set(tmp_path):
    from diffinf_ray.config import apply_overrides, override_config

    path = write(tmp_path, "train: {epochs: 3}\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown config key 'train.epohcs'"):
        load_config(path, {"train.epohcs": 3})
    with pytest.raises(ConfigError, match="'train.epochs' is not a section"):
        load_config(path, ["train.epochs.x=1"])
    tree = {"train": {"epochs": 3}}
    assert apply_overrides(tree, ["train.lr=0.5"], "t") == {"train": {"epochs": 3, "lr": 0.5}}
    assert tree == {"train": {"epochs": 3}}  # a copy: the caller's tree is unchanged
    cfg = load_config(path)
    assert override_config(cfg, {"edit.w_id": 2.0}).edit.w_id == 2.0
    with pytest.raises(ConfigError, match=r"trial 7: 'edit.w_id': .*greater than or equal"):
        override_config(cfg, {"edit.w_id": -1.0}, "trial 7")


# -- free-form sections are checked on load (not when their stage runs) ------------------------
# (moved here from test_baselines_stage.py's test_unknown_option_key_is_an_error_naming_it: the
# elr_plus.betta and promx cases now fail when the config is loaded, before any stage runs)

@pytest.mark.parametrize("text, message", [
    ("baselines: {options: {elr_plus: {betta: 0.5}}}",
     r"unknown key 'baselines.options.elr_plus.betta' \(elr_plus takes \[.*'beta'"),
    ("baselines: {options: {promx: {}}}", "unknown key 'baselines.options.promx'"),
    ("baselines: {options: {promix: {pretrain_epochs: 2.5}}}",
     "'baselines.options.promix.pretrain_epochs': expected int, got 2.5"),
    ("baselines: {options: {small_loss: {eval_net: best}}}",
     "'baselines.options.small_loss.eval_net': expected 'net1' | 'mean', got 'best'"),
    ("baselines: {options: {small_loss: {co_teaching: 1}}}",
     "'baselines.options.small_loss.co_teaching': expected bool"),
    ("autoencoder: {overrides: {z_dimm: 16}}",
     r"unknown key 'autoencoder.overrides.z_dimm' \(DiffAEConfig fields: \[.*'z_dim'"),
    ("autoencoder: {overrides: {z_dim: 1.5}}", "'autoencoder.overrides.z_dim': expected int"),
    ("autoencoder: {overrides: {unet_channels: 32}}",
     "'autoencoder.overrides.unet_channels': expected a list of ints"),
    ("autoencoder: {overrides: {num_classes: 3}}",
     "'autoencoder.overrides.num_classes': set by autoencoder.label_conditioning"),
])
def test_free_form_keys_are_checked_on_load_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")
    section, value = (part.strip() for part in text.split(":", 1))
    with pytest.raises(ConfigError, match=message):  # the same through an override
        load_config(write(tmp_path, ""), [f"{section}={value}"])


def test_good_free_form_values_load(tmp_path):
    cfg = load_config(write(tmp_path, "baselines: {options: {small_loss: {noise_rate: 0, "
                                      "eval_net: mean}, elr_plus: {optimizer: sgd, lam: 2}}}\n"
                                      "autoencoder: {overrides: {z_dim: 16, dropout: 0, "
                                      "unet_channels: [16, 32]}}\n"))
    assert cfg.baselines.options["elr_plus"] == {"optimizer": "sgd", "lam": 2}
    assert cfg.autoencoder.overrides["unet_channels"] == [16, 32]


def test_option_tables_are_the_methods_defaults():
    """The torch-free tables the config checks against are what the methods are built with."""
    from diffinf_ray.baselines import METHODS, method_defaults
    from diffinf_ray.baselines.base import MethodBase
    from diffinf_ray.baselines.registry import COMMON_OPTIONS, fits
    from diffinf_ray.diffae.config import field_types
    from diffinf_ray.diffae.model import DiffAEConfig

    METHOD_OPTIONS = {name: entry.options for name, entry in METHODS.items()}
    for name, entry in METHODS.items():  # each entry's class is the method of that name
        cls = entry.load()
        assert issubclass(cls, MethodBase) and cls.name == name
    for name, table in METHOD_OPTIONS.items():
        defaults = method_defaults(name)
        assert set(defaults) == set(table) | set(COMMON_OPTIONS)
        for key, (kind, default) in {**COMMON_OPTIONS, **table}.items():
            assert default is None or fits(kind, default), (name, key)
    assert set(field_types()) == set(DiffAEConfig.__dataclass_fields__)


def test_baselines_methods_are_the_registered_ones():
    """`baselines.methods` takes every registered method and nothing else; the experiment
    table has a row label for each."""
    from diffinf_ray.baselines import METHODS
    from diffinf_ray.experiment import CONDITIONS

    cfg = load_config("jobs/configs/tiny.yaml", [f"baselines.methods=[{','.join(METHODS)}]"])
    assert cfg.baselines.methods == list(METHODS)
    with pytest.raises(ConfigError, match="baselines.methods"):
        load_config("jobs/configs/tiny.yaml", ["baselines.methods=[mentornet]"])
    assert {name: CONDITIONS[name] for name in METHODS} == {
        name: entry.label for name, entry in METHODS.items()}


def test_config_module_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from diffinf_ray.config import load_config; "
            "load_config('jobs/configs/demo.yaml'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_one_step_count_governs_inversion_and_decode(tmp_path):
    from diffinf_ray.edit.editor import EditSettings

    default = load_config(write(tmp_path, ""))
    assert (default.edit.steps, default.edit.encode_steps, default.edit.decode_steps) == (10, None, None)
    settings = EditSettings.from_section(default.edit)
    assert (settings.encode_steps, settings.decode_steps) == (10, 10)
    one = EditSettings.from_section(load_config(write(tmp_path, ""), ["edit.steps=20"]).edit)
    assert (one.encode_steps, one.decode_steps) == (20, 20)
    # the old keys still work, alone (the other follows `steps`) or both on purpose
    old = load_config(write(tmp_path, "edit:\n  encode_steps: 250\n  decode_steps: 20\n"))
    both = EditSettings.from_section(old.edit)
    assert (both.encode_steps, both.decode_steps) == (250, 20)
    alone = EditSettings.from_section(load_config(write(tmp_path, ""), ["edit.encode_steps=50"]).edit)
    assert (alone.encode_steps, alone.decode_steps) == (50, 10)
    assert fingerprint(old, "edit") != fingerprint(default, "edit")


@pytest.mark.parametrize("override", ["edit.steps=45", "edit.encode_steps=600", "edit.decode_steps=1"])
def test_step_counts_without_an_official_grid_are_refused(tmp_path, override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(write(tmp_path, ""), [override])


def test_ekfac_settings_are_checked_on_load(tmp_path):
    cfg = load_config(write(tmp_path, "ekfac: {damping: 0.001, checkpoint: all}\n"))
    assert cfg.ekfac.damping == 0.001 and cfg.ekfac.checkpoint == "all"
    assert load_config(write(tmp_path, "")).ekfac.model_dump() == {
        "strategy": "ekfac", "damping": None, "batch_size": 64, "checkpoint": "last",
        "fisher": "true", "layers": None, "use_gpu": False}
    for bad, key in (("ekfac.strategy=ekfc", "ekfac.strategy"), ("ekfac.damping=0", "ekfac.damping"),
                     ("ekfac.checkpoint=first", "ekfac.checkpoint"),
                     ("ekfac.fisher=exact", "ekfac.fisher"), ("ekfac.batch_size=0", "ekfac.batch_size")):
        with pytest.raises(ConfigError, match=key):
            load_config(write(tmp_path, ""), [bad])
