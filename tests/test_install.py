"""The Makefile's llama-cpp-python install: its own portable build, never a
wheel that pip finds or cached before (perhaps a native one that traps)."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.live import ROOT

VERSION = "0.3.36"
TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"
PLATFORM = sysconfig.get_platform().replace("-", "_").replace(".", "_")


def fake_wheel(directory: Path, build: str, build_tag: str = "") -> Path:
    """A wheel of llama-cpp-python whose package only says which build it is."""
    directory.mkdir(parents=True, exist_ok=True)
    parts = ["llama_cpp_python", VERSION, *([build_tag] if build_tag else []), TAG, TAG, PLATFORM]
    path = directory / ("-".join(parts) + ".whl")
    info = f"llama_cpp_python-{VERSION}.dist-info"
    files = {
        "llama_cpp/__init__.py": f"BUILD = {build!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: {VERSION}\n",
        f"{info}/WHEEL": (
            f"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: {TAG}-{TAG}-{PLATFORM}\n"
        ),
    }
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
        wheel.writestr(
            f"{info}/RECORD", "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
        )
    return path


def make(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_build_skips_pips_wheel_cache_and_its_key_follows_the_flags():
    plan = make("-n", "llama", "LLAMA_WHEELS=/nowhere", env=dict(os.environ)).stdout
    build = next(line for line in plan.splitlines() if "pip wheel" in line)
    assert "-DGGML_NATIVE=OFF" in build and "-march=native" not in plan
    assert "--no-cache-dir" in build and "--no-binary llama-cpp-python" in plan

    def wheels_dir(*overrides: str) -> str:
        printed = make("-n", "llama", "CHATSITE_CACHE=/nowhere", *overrides, env=dict(os.environ))
        printed = printed.stdout
        return next(line for line in printed.splitlines() if "kept in" in line)

    assert wheels_dir() != wheels_dir("LLAMA_CMAKE_ARGS=-DGGML_NATIVE=ON")


@pytest.mark.slow
def test_install_takes_our_build_over_a_native_wheel_pip_would_find(tmp_path):
    ours = tmp_path / "ours"
    fake_wheel(ours, "portable")
    (ours / ".built").touch()
    # A native build where pip looks: in its find-links (with a build tag,
    # which pip prefers to a wheel without one) and in its cache.
    native = fake_wheel(tmp_path / "links", "native", build_tag="1")
    cache = tmp_path / "pip-cache"
    fake_wheel(cache / "wheels" / "ab" / "cd", "native")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PIP_FIND_LINKS": str(native.parent), "PIP_CACHE_DIR": str(cache)}
    result = make("llama", f"VENV={venv}", f"LLAMA_WHEELS={ours}", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    build = subprocess.run(
        [venv / "bin" / "python", "-c", "import llama_cpp; print(llama_cpp.BUILD)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert build.stdout.strip() == "portable"
