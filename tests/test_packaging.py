"""A built wheel holds one import package, ``fxpasses``; installed into a fresh venv it works from a directory whose
own ``ops.py`` and ``patterns.py`` would shadow generic top-level names."""
import importlib.util
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out), str(ROOT)],
                   check=True, capture_output=True)
    (path,) = out.glob("fxpasses-*.whl")
    return path


def test_wheel_holds_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"fxpasses", wheel.name.split("-py3")[0] + ".dist-info"}
    for module in ("fxpasses/ops/__init__.py", "fxpasses/ops/norms.py", "fxpasses/patterns/registry.py",
                   "fxpasses/compat.py", "fxpasses/models/llama.py"):
        assert module in names


def test_installed_wheel_is_not_shadowed_by_a_users_ops_and_patterns(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # torch and the other dependencies come from the test venv (a path line: its own .pth files, among them the
    # editable install of fxpasses, are not processed); fxpasses itself only from the wheel.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    work = tmp_path / "user_project"
    work.mkdir()
    (work / "ops.py").write_text("raise ImportError('the user project ops.py was imported')\n")
    (work / "patterns.py").write_text("raise ImportError('the user project patterns.py was imported')\n")
    probe = textwrap.dedent("""
        import torch, fxpasses
        from fxpasses import ops, patterns
        assert fxpasses.__file__.startswith(%r), fxpasses.__file__
        assert ops.__file__.startswith(%r) and patterns.__file__.startswith(%r)
        assert ops.FP8_MAX > 0 and hasattr(torch.ops.fxp, "rms_norm")
        model = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        backend = fxpasses.Backend()
        x, w = torch.randn(3, 8), torch.randn(8)
        with torch.no_grad():
            out = torch.compile(model, backend=backend)(x, w)
        torch.testing.assert_close(out, model(x, w))
        assert backend.report.matches == {"rms_norm": 1}, backend.report.matches
        print("ok")
    """) % (str(site), str(site / "fxpasses"), str(site / "fxpasses"))
    proc = subprocess.run([str(python), "-c", probe], cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
