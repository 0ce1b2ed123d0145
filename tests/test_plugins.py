"""The plugin door: a package installed with pip adds a pattern and a pass through entry points; a broken plugin is
reported and skipped; plugins can be turned off. Each case runs in a fresh process (plugins load once per process).
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PLUGIN = HERE / "plugins" / "example_plugin"

pytestmark = pytest.mark.slow

PROBE = textwrap.dedent("""
    import json, math, sys
    import torch
    import fxpasses
    from fxpasses.testing import RecordingBackend

    def gpt2_gelu(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))

    def model(x):
        return gpt2_gelu(x @ x.T)

    x = torch.randn(4, 4)
    out = {}
    for name, kwargs in [("default", {}), ("off", {"plugins": False})]:
        torch._dynamo.reset()
        backend = RecordingBackend(**kwargs)
        with torch.no_grad():
            got = torch.compile(model, backend=backend)(x)
        out[name] = {
            "matches": backend.report.matches,
            "gelu_after": backend.after["aten.gelu"],
            "equal": bool(torch.allclose(got, model(x), rtol=1e-5, atol=1e-6)),
            "plugins": [{"name": p.name, "patterns": list(p.patterns), "passes": list(p.passes), "error": p.error}
                        for p in backend.report.plugins],
            "notes": [n for r in backend.report.passes for n in r.notes],
            "report": str(backend.report),
        }
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The example plugin installed by pip into a folder of its own, plus a distribution whose entry point breaks."""
    target = tmp_path_factory.mktemp("site")
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *isolation, "--target", str(target),
                    str(PLUGIN)], check=True, capture_output=True)
    broken = target / "fxpasses_broken_plugin-0.1.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Metadata-Version: 2.1\nName: fxpasses-broken-plugin\nVersion: 0.1\n")
    (broken / "entry_points.txt").write_text("[fxpasses.patterns]\nbroken = fxpasses_no_such_module\n")
    return target


def _probe(site, **env):
    environ = {**os.environ, "PYTHONPATH": str(site), **env}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environ, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), proc.stderr


def test_plugin_pattern_fuses_and_pass_runs(site):
    result, stderr = _probe(site)
    on = result["default"]
    assert on["matches"] == {"example_gelu_tanh": 1} and on["gelu_after"] == 1 and on["equal"]
    by_name = {p["name"]: p for p in on["plugins"]}
    assert by_name["example_gelu"]["patterns"] == ["example_gelu_tanh"] and by_name["example_gelu"]["error"] is None
    assert by_name["example_census"]["passes"] == ["census"]
    assert any(n.startswith("example plugin:") and "calls after the patterns" in n for n in on["notes"])
    assert "plugin example_gelu (fxpasses.patterns = fxpasses_example_plugin.patterns" in on["report"]
    # the broken one: reported with its error, skipped, never fatal
    assert "No module named 'fxpasses_no_such_module'" in by_name["broken"]["error"]
    assert "failed to load and was skipped" in on["report"] and "fxpasses_no_such_module" in stderr
    # plugins=False leaves the plugin's pattern out, even after another Backend loaded it in this process
    off = result["off"]
    assert off["matches"] == {} and off["gelu_after"] == 0 and off["equal"] and off["plugins"] == []


def test_environment_variable_turns_plugins_off(site):
    result, _ = _probe(site, FXPASSES_PLUGINS="0")
    assert result["default"]["matches"] == {} and result["default"]["plugins"] == []
    assert result["default"]["equal"]
