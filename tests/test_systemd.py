"""Both systemd units pass ``systemd-analyze verify``: the system unit
(``systemd/ccpd.service``, installed to /etc/systemd/system) and the user unit
(``systemd/user/ccpd.service``, for ``systemctl --user``).

``verify`` checks that the ExecStart program exists, so the units' install paths (/opt/ccpd,
``%h/ccpd``) are pointed at this checkout first; anything it prints (an unknown key, a bad
value) fails the test, since verify itself still exits 0 for most of them."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian package 'systemd'; "
                            ".ci/run installs it when it can)")


def placed(unit: Path, directory: Path, *, typo: bool = False) -> Path:
    """``unit`` with its install paths pointed at this checkout, in ``directory``."""
    text = (unit.read_text().replace("/opt/ccpd", str(REPO))
            .replace("%h/ccpd", str(REPO)).replace("%h/.config", str(directory)))
    if typo:
        text = text.replace("ProtectSystem=", "ProtectSytem=")
    target = directory / unit.name
    target.write_text(text)
    return target


def verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([ANALYZE, "verify", "--man=no", str(path)], capture_output=True,
                          text=True, timeout=60, cwd=path.parent)


@pytest.fixture(autouse=True)
def _installed():
    if not (REPO / ".venv" / "bin" / "twistd").exists():
        pytest.skip("no .venv/bin/twistd for the units' ExecStart: `make test` makes it")


@pytest.mark.parametrize("unit", ["systemd/ccpd.service", "systemd/user/ccpd.service"])
def test_the_unit_verifies_clean(unit, tmp_path):
    done = verify(placed(REPO / unit, tmp_path))
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_a_mistake_in_a_unit_is_caught(tmp_path):
    done = verify(placed(REPO / "systemd/user/ccpd.service", tmp_path, typo=True))
    assert "Unknown key 'ProtectSytem'" in done.stdout + done.stderr
