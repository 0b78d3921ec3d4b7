"""Installing seqpar must not add top-level `kernels`, `parallel` or `launcher` modules."""

import importlib.metadata
import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = {"kernels", "parallel", "launcher"}


def test_wheel_has_only_the_seqpar_namespace(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), REPO],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("seqpar-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top - {"seqpar"} == {d for d in top if d.endswith(".dist-info")}, top
    for sub in ("kernels", "parallel", "launcher"):
        assert f"seqpar/{sub}/__init__.py" in names
    assert "seqpar/kernels/reference.py" in names and "seqpar/launcher/cli.py" in names


def test_installed_environment_has_no_top_level_folders(tmp_path):
    """From outside the repo (so the checkout is not on sys.path), only seqpar.* resolves to our code."""
    code = (
        "import importlib.util, json\n"
        "out = {n: getattr(importlib.util.find_spec(n), 'origin', None) for n in ('kernels', 'parallel', 'launcher')}\n"
        "import seqpar.kernels, seqpar.parallel, seqpar.launcher\n"
        "out['seqpar.kernels'] = seqpar.kernels.__file__\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    import json

    found = json.loads(proc.stdout)
    for name in FORBIDDEN:
        origin = found[name]
        assert origin is None or not os.path.abspath(origin).startswith(REPO + os.sep), (name, origin)
    assert found["seqpar.kernels"]
    dist = importlib.metadata.distribution("seqpar")
    assert any(ep.value == "seqpar.launcher.cli:main" for ep in dist.entry_points if ep.name == "seqpar")
