"""scripts/setup.sh writes apt's and pip's output into a log (no terminal) only when they fail.

apt-get, dpkg, sudo and python3 are stand-ins on PATH that record their calls: nothing is installed.
"""
import os
import pathlib
import subprocess

REPO = pathlib.Path(__file__).resolve().parent.parent
STAND_INS = {
    "dpkg": "exit 1",  # dataset-fashion-mnist is not installed yet
    "apt-get": 'echo "Get:1 apt-get $*"; echo "E: Unable to fetch some archives" >&2; exit "$APT_STATUS"',
    "python3": 'echo "Successfully installed shunted_jax"',
    "sudo": 'exec "$@"',
}


def run_setup(tmp_path: pathlib.Path, apt_status: int) -> tuple[subprocess.CompletedProcess, list]:
    """setup.sh with its output captured (not a terminal); the result and the commands it ran."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for name, body in STAND_INS.items():
        (bin_dir / name).write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{calls}"\n{body}\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "APT_STATUS": str(apt_status)}
    result = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    return result, calls.read_text().splitlines() if calls.exists() else []


def test_installing_prints_nothing_into_a_log(tmp_path):
    result, calls = run_setup(tmp_path, apt_status=0)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    commands = [call.split()[0] for call in calls]
    assert commands.count("apt-get") == 2 and commands.count("python3") == 2


def test_a_failed_apt_get_shows_its_output_and_stops_the_setup(tmp_path):
    result, calls = run_setup(tmp_path, apt_status=100)
    assert result.returncode == 100
    assert "Get:1 apt-get update -qq" in result.stderr and "E: Unable to fetch" in result.stderr
    assert calls == ["dpkg -s dataset-fashion-mnist", "apt-get update -qq"]
