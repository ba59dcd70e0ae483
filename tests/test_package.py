"""What a new user meets before the first cell: the package's metadata and version, the Colab lines of
the README and of every notebook, and the Makefile's CPU and root switches."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

import lecture_kit

ROOT = Path(__file__).resolve().parent.parent
REPO_URL = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]


def installed_metadata() -> dict:
    """lecture_kit's installed metadata, read in a fresh process outside the checkout (where a stale
    ``lecture_kit.egg-info`` of an old build could shadow it)."""
    code = ("import json; from importlib.metadata import metadata; m = metadata('lecture_kit'); "
            "print(json.dumps({k: m.get_all(k) for k in set(m.keys())}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path.home(), capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_version_is_the_one_in_pyproject():
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert lecture_kit.__version__ == declared == installed_metadata()["Version"][0]


def test_metadata_has_the_readme_licence_repository_urls_and_marks_triton_linux_only():
    meta = installed_metadata()
    assert meta["Description-Content-Type"] == ["text/markdown"]
    assert meta["Description"][0].startswith("# Lecture 17")               # README.md, as on PyPI
    urls = dict(u.split(", ", 1) for u in meta["Project-URL"])
    assert urls["Repository"] == urls["Homepage"] == REPO_URL and urls["Issues"] == REPO_URL + "/issues"
    triton = [r for r in meta["Requires-Dist"] if r.startswith("triton")]
    assert len(triton) == 1 and 'sys_platform == "linux"' in triton[0], triton
    assert any(r == "tqdm" for r in meta["Requires-Dist"])
    assert meta["License-Expression"] == ["MIT"] and meta["License-File"] == ["LICENSE"]


def test_requirements_install_triton_only_where_it_has_wheels():
    lines = [l for l in (ROOT / "requirements.txt").read_text().splitlines() if l.startswith("triton")]
    assert len(lines) == 1
    from packaging.requirements import Requirement
    marker = Requirement(lines[0].split("#")[0]).marker
    for system, machine, wanted in (("linux", "x86_64", True), ("linux", "aarch64", True),
                                    ("darwin", "arm64", False), ("win32", "AMD64", False)):
        assert marker.evaluate({"sys_platform": system, "platform_machine": machine}) is wanted


def colab_cells():
    """The install cell (tagged remove-cell, the one that mentions Colab) of every notebook."""
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = [c for c in json.loads(path.read_text())["cells"]
                 if "google.colab" in "".join(c["source"])]
        assert len(cells) == 1, f"{path.name}: {len(cells)} Colab cells"
        yield path.name, cells[0]


def test_every_notebook_installs_the_repository_on_colab_without_an_editable_install():
    """An editable install is a .pth file, read only when Python starts: on Colab ``import lecture_kit``
    would fail until a restart.  A plain install of a clone is importable at once, and working in the
    clone's notebooks/ lets the pages read ../benchmarks as they do on your own machine."""
    for name, cell in colab_cells():
        source = "".join(cell["source"])
        assert "remove-cell" in cell["metadata"].get("tags", []), name
        assert f"git clone -q --depth 1 {REPO_URL} /content/mamba2-and-kin" in source, name
        assert "%pip install -q /content/mamba2-and-kin\n" in source and " -e " not in source, name
        assert source.rstrip().endswith("%cd /content/mamba2-and-kin/notebooks"), name


def test_the_readme_colab_lines_install_a_clone_without_an_editable_install():
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("**Colab.**"):]
    block = block[block.index("```python") + len("```python"):]
    lines = block[:block.index("```")].strip().splitlines()
    assert lines[0] == f"!git clone -q {REPO_URL}"
    assert lines[1] == "%pip install -q ./mamba2-and-kin"           # not -e: no restart needed
    assert lines[2] == "%cd mamba2-and-kin/notebooks"


def make_dry_run(*args):
    done = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_lab_allows_root_only_when_run_as_root():
    lab = [l for l in make_dry_run("lab").splitlines() if "jupyter lab" in l]
    assert len(lab) == 1 and lab[0].endswith("--allow-root") == (os.getuid() == 0), lab


def test_make_cpu_1_takes_torch_from_pytorchs_cpu_index(tmp_path):
    """Dry runs of a fresh .venv: CPU=1 installs the pinned torch from the CPU index before the rest."""
    pin = re.search(r"^(torch==\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    cpu = make_dry_run("VENV=" + str(tmp_path / "venv"), "CPU=1", "test")
    assert f'--index-url https://download.pytorch.org/whl/cpu "{pin}"' in cpu
    assert cpu.index("download.pytorch.org") < cpu.index("-r requirements.txt")
    assert "download.pytorch.org" not in make_dry_run("VENV=" + str(tmp_path / "venv"), "test")


def test_make_cpu_1_refuses_a_venv_that_holds_the_cuda_build(tmp_path):
    """An existing, up-to-date .venv is checked, not silently reused: its python says which build."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    (venv / ".installed").touch()                       # newer than requirements.txt and pyproject.toml
    for cuda_build, ok in ((True, False), (False, True)):
        # stands in for `python -c "... sys.exit(torch.version.cuda is not None)"`
        python.write_text(f"#!/bin/sh\nexit {int(cuda_build)}\n")
        python.chmod(0o755)
        done = subprocess.run(["make", f"VENV={venv}", "CPU=1", "venv"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert (done.returncode == 0) is ok, done.stdout + done.stderr
        assert ("already holds PyTorch's CUDA build" in done.stdout) is not ok, done.stdout
    assert subprocess.run(["make", f"VENV={venv}", "venv"], cwd=ROOT, capture_output=True).returncode == 0


def test_binder_installs_the_requirements_with_pytorchs_cpu_build():
    """Binder's file adds the CPU index that ``make CPU=1`` uses (one address, read from the
    Makefile) to the root requirements, and names no package of its own that could drift."""
    cpu_index = re.search(r"^CPU_INDEX\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    lines = [line.strip() for line in (ROOT / "binder" / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert f"--extra-index-url {cpu_index}" in lines and "-r ../requirements.txt" in lines
    assert all(line.startswith(("--extra-index-url", "-r ")) for line in lines), lines
