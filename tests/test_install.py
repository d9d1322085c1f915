"""A clean, non-editable install in a fresh virtual environment runs the quick start from an empty folder:
nothing the commands need (jobs, site settings, the POC project) is read from the repository."""

import json
import os
import shutil
import subprocess

import pytest

from helpers import bare_python

pytestmark = pytest.mark.simulator
INSTALL_FILES = ("custom", "setup.cfg", "pyproject.toml", "README.md")


def test_installed_package_runs_synth_partition_simulate_from_an_empty_folder(project_root, tmp_path):
    source, venv, empty = tmp_path / "source", tmp_path / "venv", tmp_path / "empty"
    for name in INSTALL_FILES:  # a copy: building writes into the source tree
        copy = shutil.copytree if (project_root / name).is_dir() else shutil.copy
        copy(project_root / name, source / name)
    # A fresh venv whose dependencies (torch, NVFlare, MONAI, pip, setuptools) are this environment's: no
    # downloads; only the wheel built from the copy is split_unet there.
    python = bare_python(venv)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    str(source)], check=True, timeout=300, env=env)
    empty.mkdir()

    def split_unet(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "split-unet"), *args], cwd=empty, env=env, capture_output=True,
                              text=True, timeout=900)

    where = subprocess.run([python, "-c", "import split_unet; print(split_unet.__file__)"], cwd=empty, env=env,
                           capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(venv)), where.stdout
    for args in (("synth", "--out", "msd", "--patients", "4", "--size", "16"),
                 ("partition", "--data", "msd", "--out", "sites"),
                 ("simulate", "--sites", "sites", "--workspace", "ws", "--size", "16", "--channels", "4,8",
                  "--epochs", "1", "--val-fraction", "0.5")):
        result = split_unet(*args)
        assert result.returncode == 0, f"split-unet {args[0]}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    summary = json.loads((empty / "ws" / "summary.json").read_text())
    assert "error" not in summary and summary["steps"] == 1
    assert sorted(path.name for path in empty.iterdir()) == ["msd", "sites", "ws"]
