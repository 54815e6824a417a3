"""The `diffinf` command as a user meets it: one clear line on bad input, exit code 2."""

import subprocess
import sys


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
