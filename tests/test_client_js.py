"""The browser client's own unit tests (resampler, framing, formats, reconnect logic) under node's test
runner, so the one ``python -m pytest`` runs them too."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .conftest import scaled, skip_unless

CLIENT_JS = Path(__file__).resolve().parents[1] / "client_js"
NODE = shutil.which("node")


def node_major_version() -> int:
    assert NODE is not None
    out = subprocess.run([NODE, "--version"], capture_output=True, text=True, timeout=30, check=True)
    return int(out.stdout.strip().lstrip("v").split(".")[0])


@skip_unless(NODE is not None, "node is not installed (the browser client's tests need node >= 20)")
def test_client_js_unit_tests_pass() -> None:
    """`node --test client_js/test/unit/` passes, with tests actually run."""
    assert node_major_version() >= 20, "the client's tests need node >= 20 (node:test, global EventTarget)"
    completed = subprocess.run(
        [NODE, "--test", "--test-reporter=spec", "test/unit/"],
        cwd=CLIENT_JS,
        capture_output=True,
        text=True,
        timeout=scaled(120),
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"node --test failed:\n{output}"
    passed = [line for line in output.splitlines() if line.strip().startswith("ℹ pass")]
    assert passed and int(passed[-1].split()[-1]) >= 40, f"too few node tests ran:\n{output}"
