"""Without Triton, as on macOS and Windows (it has wheels only for Linux on x86_64 and aarch64):
lecture_kit imports, every form but ``kernel`` works, ``kernel`` says why it cannot and what to use,
and the notebooks run top to bottom, saying which cells they skipped.

Triton is hidden by a ``sitecustomize`` module on PYTHONPATH that refuses ``import triton`` in every
process started with that environment: the subprocesses here, pytest's, and the notebooks' kernels.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from lecture_kit.hardware import NEEDS_TRITON

ROOT = Path(__file__).resolve().parent.parent

BLOCK_TRITON = textwrap.dedent('''
    """Refuse ``import triton`` (and its submodules) as if Triton were not installed."""
    import sys


    class NoTriton:
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
            return None


    sys.meta_path.insert(0, NoTriton())
''')

#: Unit tests of every form but ``kernel`` and of the layers built on them (the kernel tests, and
#: test_bench which lists a kernel's source, need Triton by design; test_widgets, slow, only draws;
#: test_validation's refusals run the same code with Triton or without it, and rerunning its
#: thousand cases here cost CI a minute and a half).
UNIT_TESTS = ["test_forms.py", "test_semiseparable.py", "test_blocks.py", "test_tasks.py",
              "test_vision.py"]

#: A ladder page (its kernel rungs are skipped cell by cell) and the numerics page (two listings).
NOTEBOOKS = ["04a_ladder_ssd.ipynb", "05b_numerics.ipynb"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """This process's environment with Triton hidden (and no TRITON_INTERPRET inherited)."""
    folder = tmp_path_factory.mktemp("no_triton")
    (folder / "sitecustomize.py").write_text(BLOCK_TRITON)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH")) if p)
    return env


def python(env, code, timeout=300):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_triton_is_hidden_and_lecture_kit_knows_it(env):
    done = python(env, """
        import os
        try:
            import triton
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit("triton was imported")
        import lecture_kit
        assert not lecture_kit.HAS_TRITON and not lecture_kit.TRITON_INTERPRETED
        assert "TRITON_INTERPRET" not in os.environ      # nothing to interpret
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_every_kernel_form_says_triton_is_missing_and_points_to_chunked(env):
    done = python(env, """
        import lecture_kit
        from lecture_kit.testing import MIXERS, errors, mixer, random_inputs
        for name in MIXERS:
            m = mixer(name)
            args, kw = random_inputs(name, length=20, initial_state=True)
            try:
                m.kernel(*args, **kw)
            except ModuleNotFoundError as e:
                assert e.name == "triton" and "need Triton" in str(e) and "use chunked" in str(e), e
            else:
                raise SystemExit(f"{name}.kernel ran without Triton")
            out, _ = m.chunked(*args, **kw, chunk_size=8)      # what the message points to, in fp64
            ref, _ = m.recurrent(*args, **kw)
            assert errors(out, ref).rel_rms < 1e-12, name
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_unit_tests_of_every_other_form_pass(env):
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *(f"tests/{name}" for name in UNIT_TESTS)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0 and " passed" in summary and "skipped" not in summary, done.stdout[-3000:]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_a_notebook_runs_and_says_what_it_skipped(env, name):
    """Executed as the book and nbval execute it (a Jupyter kernel started with ``env``): no cell
    fails, the import cell says that Triton is missing, and every cell marked ``# needs Triton``
    prints its skip note instead of running."""
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=600,
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute(env=env)
    text = lambda cell: "".join(o.get("text", "") + json.dumps(o.get("data", {})) for o in cell.get("outputs", []))
    code = [c for c in nb.cells if c.cell_type == "code"]
    marked = [c for c in code if c.source.startswith(NEEDS_TRITON)]
    assert marked, f"{name} marks no cell '{NEEDS_TRITON}'"
    assert any("Triton is not installed on this machine" in text(c) for c in code), name
    for cell in marked:
        assert text(cell).startswith("skipped: this cell needs Triton"), (cell.source, text(cell))
    for cell in code:
        if cell not in marked and "google.colab" not in cell.source:
            assert "skipped: this cell needs Triton" not in text(cell), cell.source
