"""The `diffinf` command as a user meets it: one clear line on bad input, exit code 2."""

import subprocess
import sys

import pytest


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "diffinf_ray.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_unknown_key_is_one_clear_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  epohcs: 3\n")
    proc = run_cli("run", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {cfg}: unknown key 'train.epohcs'"
    assert "Traceback" not in proc.stderr


def test_bad_override_type(tmp_path):
    proc = run_cli("config", "jobs/configs/tiny.yaml", "train.epochs=many")
    assert proc.returncode == 2 and "'train.epochs'" in proc.stderr


def test_config_prints_fingerprints():
    proc = run_cli("config", "jobs/configs/tiny.yaml", "train.epochs=4")
    assert proc.returncode == 0
    assert "epochs: 4" in proc.stdout and "# fingerprint train:" in proc.stdout


def test_synthfaces_preview(tmp_path):
    out = tmp_path / "grid.png"
    proc = run_cli("synthfaces-preview", "--task", "expression", "--resolution", "32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the faces as the expression task drew them before its default gain (README's grid then)
    as_before = tmp_path / "gain1.png"
    proc = run_cli("synthfaces-preview", "--task", "expression", "--resolution", "32",
                   "--expression-gain", "1", "--out", str(as_before))
    assert proc.returncode == 0, proc.stderr
    assert as_before.read_bytes() != out.read_bytes()
    refused = run_cli("synthfaces-preview", "--task", "expression", "--expression-gain", "9",
                      "--out", str(tmp_path / "no.png"))
    assert refused.returncode != 0 and "expression_gain" in refused.stderr


# -- --help of every command ---------------------------------------------------------------------

# Each command's own arguments: its --help must show them (not the top-level usage).
OWN_OPTIONS = {
    "run": ["config", "key=value", "--force"],
    "stage": ["STAGE", "config", "key=value", "--force", "autoencoder"],
    "config": ["config", "key=value"],
    "experiment": ["config", "--task", "--dry-run", "--table-only"],
    "sweep": ["config", "key=value", "--restore", "--no-restore", "--dry-run"],
    "synthfaces-preview": ["--task", "--resolution", "--per-class", "--seed", "--expression-gain",
                           "--out"],
    "diagnose-labels": ["config", "key=value", "--images", "--scales", "--depths", "--steps"],
    "record": ["config", "key=value", "--ledger"],
    "status": ["RUN_ROOT", "CONFIG", "key=value"],
    "ledger": ["--ledger", "--a", "--b", "--metric"],
    "fairness": ["config", "key=value", "--dry-run"],
}


def help_text(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    out = capsys.readouterr()
    assert "unrecognized" not in out.err
    return out.out


@pytest.mark.parametrize("command", sorted(OWN_OPTIONS))
def test_every_command_has_its_own_help(command, capsys):
    from diffinf_ray.cli import main

    text = help_text(main, [command, "--help"], capsys)
    assert text.startswith(f"usage: diffinf {command} ")
    for option in [*OWN_OPTIONS[command], "--debug", "--quiet"]:
        assert option in text, (command, option)


def test_top_level_help_lists_every_command(capsys, monkeypatch):
    from diffinf_ray.cli import COMMANDS, main

    monkeypatch.setenv("COLUMNS", "80")
    text = help_text(main, ["--help"], capsys)
    lines = text.splitlines()
    for command, (summary, _, _) in COMMANDS.items():
        [line] = [x for x in lines if x.split()[:1] == [command]]
        assert summary in line  # one line each, with its summary
    assert set(OWN_OPTIONS) == set(COMMANDS)


def test_help_as_a_user_runs_it():
    """The forwarded commands used to print the top-level usage and 'unrecognized arguments'."""
    for args in (["experiment", "--help"], ["sweep", "--help"]):
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"usage: diffinf {args[0]} ")
    proc = subprocess.run([sys.executable, "-m", "jobs.sweep", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--config" in proc.stdout and "--no-restore" in proc.stdout


@pytest.mark.parametrize("job, command", [("pipeline", "run"), ("experiment", "experiment"),
                                          ("sweep", "sweep")])
def test_job_recipes_take_the_commands_arguments(job, command, capsys):
    import importlib

    module = importlib.import_module(f"jobs.{job}")
    text = help_text(module.main, ["--help"], capsys)
    assert "--config" in text
    for option in OWN_OPTIONS[command]:
        if option != "config":
            assert option in text, (job, option)


def test_overrides_may_follow_the_options():
    """`diffinf sweep s.yaml --dry-run num_samples=2`: overrides after flags, as before."""
    from diffinf_ray.cli import build_parser, parse

    args = parse(build_parser(), ["sweep", "s.yaml", "a=1", "--dry-run", "num_samples=2",
                                  "--no-restore"])
    assert (args.config, args.overrides, args.dry_run, args.restore) == (
        "s.yaml", ["a=1", "num_samples=2"], True, False)
    args = parse(build_parser(), ["--debug", "run", "c.yaml", "--force", "train.epochs=2"])
    assert args.debug and args.force and args.overrides == ["train.epochs=2"]
    assert parse(build_parser(), ["run", "c.yaml", "--debug"]).debug
    with pytest.raises(SystemExit):
        parse(build_parser(), ["experiment", "e.yaml", "train.epochs=2"])  # takes no overrides
    with pytest.raises(SystemExit):
        parse(build_parser(), ["run", "c.yaml", "--forse"])


def test_the_run_summary_gives_every_detector_its_top_tau_figures(capsys):
    """cleanlab's own precision/recall are of find_label_issues' set (any size): the summary
    shows its top tau's, as for every other detector, in one aligned column."""
    from diffinf_ray.cli import _print_metrics

    _print_metrics({
        "influence": {"flag_by": "tracin", "tracin": {"precision": 0.4, "recall": 0.13,
                                                      "auroc": 0.67}},
        "cleanlab": {"cleanlab": {"precision": 0.465, "recall": 0.733, "top_tau_precision": 0.682,
                                  "top_tau_recall": 0.227, "auroc": 0.756}}})
    out = capsys.readouterr().out
    assert "  tracin    precision 0.400  recall 0.130  AUROC 0.670" in out
    assert "  cleanlab  precision 0.682  recall 0.227  AUROC 0.756" in out
