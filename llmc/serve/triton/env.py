"""The environment a real Triton Inference Server needs to run llmc models.

Triton's Python backend runs `model.py` in a stub process that links libpython and imports the
model's packages from one Python environment. Measured facts about Triton 2.51 (the server
inside the PyPI wheel nvidia-pytriton==0.7.0) that shape this module:

- numpy 2 in the model's environment silently corrupts tensors passed through the 2.51 stub,
  so the model environment must have numpy<2. llmc's main environment keeps numpy 2; the model
  therefore runs in a SEPARATE venv that llmc creates and owns ($LLMC_CACHE/triton-env).
- nvidia-pytriton pins numpy<2 too; it is installed `--no-deps` into that venv, only for the
  tritonserver binary and the Python backend files.
- `--backend-directory` must be a directory laid out by us: `python/` with the backend .so,
  `triton_python_backend_utils.py` and the stub built for the running Python (symlinks work).
- The stub links libpython3.X.so.1.0: LD_LIBRARY_PATH must point at the LIBDIR of the very
  Python the venv was made from, or the stub fails in obscure ways.
- PYTHONPATH is ignored by the stub; the venv is selected with EXECUTION_ENV_PATH in
  config.pbtxt (and its bin/ first on PATH).

`ensure_triton_env()` is idempotent and fast once done (a stamp file records what was
installed); `scripts/setup.sh` calls it so CI gets the Triton tests too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmc.default_model import cache_dir
from llmc.errors import LlmcError, UnsupportedError

PYTRITON = "nvidia-pytriton==0.7.0"  # ships tritonserver 2.51 (manylinux_2_35, Python 3.8-3.13)
TRITON_VERSION = "2.51"
MIN_GLIBC = (2, 35)
# The model venv gets llmc's own dependencies (so whatever the runtime imports is there, and a
# new dependency reaches it without touching this file) except the compile-time giants the
# serving path never imports, with numpy pinned below 2. transformers stays: it loads the
# tokenizer (and runs without torch); jinja2 renders chat templates.
NOT_FOR_SERVING = {"torch", "nvidia-modelopt"}
EXTRA_PACKAGES = ["numpy>=1.26,<2", "jinja2"]
STAMP = ".llmc-triton-env.json"


def _requirement_name(req: str) -> str:
    import re

    return re.split(r"[ ;<>=!~\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def model_packages() -> list[str]:
    """pip requirements of the model venv: llmc's dependencies from its pyproject.toml (a source
    checkout) or its installed metadata, minus NOT_FOR_SERVING, numpy<2."""
    import llmc

    deps: list[str] = []
    pyproject = Path(llmc.__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        deps = list(tomllib.loads(pyproject.read_text()).get("project", {}).get("dependencies", []))
    else:
        from importlib.metadata import PackageNotFoundError, requires

        try:
            deps = [r for r in requires("llmc") or [] if "extra ==" not in r]
        except PackageNotFoundError:
            pass
    if not deps:
        raise UnsupportedError("cannot tell llmc's dependencies (no pyproject.toml, llmc not installed)")
    keep = [d for d in deps if _requirement_name(d) not in NOT_FOR_SERVING | {"numpy"}]
    return EXTRA_PACKAGES + keep


@dataclass(frozen=True)
class TritonEnv:
    """Paths of a ready Triton environment."""

    root: Path            # the venv (EXECUTION_ENV_PATH)
    python: Path          # its interpreter
    libdir: Path          # LIBDIR of the base Python (holds libpython3.X.so.1.0)
    tritonserver: Path    # the server binary from the wheel
    backend_dir: Path     # --backend-directory laid out by us (python/ -> wheel files)

    def server_environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for the tritonserver process: libpython and the wheel's libs found, the
        venv's bin/ first on PATH, and nothing of the caller's venv leaking in."""
        env = dict(os.environ if base is None else base)
        for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(key, None)
        libs = [str(self.libdir)]  # the wheel's own libraries are found through its RPATH
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        env["PATH"] = os.pathsep.join([str(self.root / "bin"), env.get("PATH", "/usr/bin:/bin")])
        return env


def triton_env_dir() -> Path:
    return cache_dir() / "triton-env"


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library, or None when it is not glibc."""
    text = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    if not text or not text.startswith("glibc "):
        return None
    major, minor = text.split()[1].split(".")[:2]
    return int(major), int(minor)


def check_platform() -> None:
    """The wheel is manylinux_2_35 x86_64/aarch64: refuse early, in one line, elsewhere."""
    if not sys.platform.startswith("linux"):
        raise UnsupportedError(f"the Triton server wheel ({PYTRITON}) runs on Linux only")
    glibc = glibc_version()
    if glibc is None or glibc < MIN_GLIBC:
        have = "not glibc" if glibc is None else f"glibc {glibc[0]}.{glibc[1]}"
        raise UnsupportedError(f"the Triton server wheel ({PYTRITON}) needs glibc >= "
                               f"{MIN_GLIBC[0]}.{MIN_GLIBC[1]}; this machine has {have}")


def base_python() -> tuple[Path, Path, str]:
    """(interpreter, LIBDIR, 'X.Y') of the Python that llmc runs on, outside any venv.

    The stub is linked against libpython of exactly this version, and the venv is made from
    this interpreter, so the stub and the venv agree."""
    exe = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    lib = libdir / (sysconfig.get_config_var("INSTSONAME") or f"libpython{ver}.so.1.0")
    if not lib.exists():
        raise UnsupportedError(f"Triton's Python stub needs a shared libpython ({lib} is missing); "
                               f"use a Python built with --enable-shared")
    return exe, libdir, ver


def _spec() -> dict:
    exe, libdir, ver = base_python()
    return {"python": str(exe), "libdir": str(libdir), "version": ver, "pytriton": PYTRITON,
            "packages": model_packages()}


def _spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pip(python: Path, *args: str, quiet: bool) -> None:
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *(["-q"] if quiet else []), *args]
    proc = subprocess.run(cmd, capture_output=quiet, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] if quiet else []
        raise UnsupportedError(f"cannot install the Triton environment ({' '.join(args)}): "
                               f"{tail[0] if tail else 'pip failed'}")


def _wheel_dir(root: Path, ver: str) -> Path:
    return root / "lib" / f"python{ver}" / "site-packages" / "pytriton" / "tritonserver"


def _layout_backend_dir(root: Path, ver: str) -> Path:
    """backends/python/ with symlinks to the wheel's backend .so, utils and the stub for `ver`."""
    wheel = _wheel_dir(root, ver)
    links = {
        "libtriton_python.so": wheel / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": wheel / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": wheel / "python_backend_stubs" / ver / "triton_python_backend_stub",
    }
    out = root / "llmc-backends" / "python"
    out.mkdir(parents=True, exist_ok=True)
    for name, target in links.items():
        if not target.exists():
            raise UnsupportedError(f"the {PYTRITON} wheel has no {target.relative_to(wheel)} "
                                   f"for Python {ver}")
        link = out / name
        if link.is_symlink() or link.exists():
            if link.resolve() == target.resolve():
                continue
            link.unlink()
        link.symlink_to(target)
    return out.parent


def venv_base(root: Path) -> str | None:
    """The interpreter the venv at `root` was made from (pyvenv.cfg's `executable`, resolved), or
    None when there is no readable pyvenv.cfg."""
    try:
        lines = (root / "pyvenv.cfg").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "executable":
            return str(Path(value.strip()).resolve())
    return None


def _env_from(root: Path, spec: dict) -> TritonEnv:
    ver = spec["version"]
    return TritonEnv(root=root, python=root / "bin" / "python", libdir=Path(spec["libdir"]),
                     tritonserver=_wheel_dir(root, ver) / "bin" / "tritonserver",
                     backend_dir=root / "llmc-backends")


def find_triton_env() -> TritonEnv | None:
    """The ready environment, or None when `ensure_triton_env()` has not completed yet."""
    root = triton_env_dir()
    try:
        spec = _spec()
        stamp = json.loads((root / STAMP).read_text())
    except (OSError, ValueError, LlmcError):
        return None
    return _env_from(root, spec) if stamp.get("hash") == _spec_hash(spec) else None


def ensure_triton_env(quiet: bool = True) -> TritonEnv:
    """Create (once) the venv Triton runs llmc models in; return its paths.

    Only package registries are used (pip). Safe to call concurrently: a file lock serialises
    creators and the stamp is written last."""
    check_platform()
    env = find_triton_env()
    if env is not None:
        return env
    spec = _spec()
    root = triton_env_dir()
    with _lock(root.parent / "triton-env.lock"):
        env = find_triton_env()
        if env is not None:
            return env
        made = (root / "bin" / "python").exists()
        # A venv made from another interpreter (the spec changed because llmc now runs on another
        # Python) is remade: the stub links the libpython of `spec`, and the venv's packages must
        # be that Python's (measured: a pyenv 3.11.7 venv under a Debian 3.11.2 llmc fails to load
        # every model). `--clear` empties only this directory, which llmc created.
        if not made or venv_base(root) != spec["python"]:
            clear = ["--clear"] if made else []
            proc = subprocess.run([spec["python"], "-m", "venv", *clear, str(root)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise UnsupportedError(f"cannot create the Triton venv {root}: {proc.stderr.strip()[-200:]}")
        python = root / "bin" / "python"
        _pip(python, *spec["packages"], quiet=quiet)
        _pip(python, "--no-deps", PYTRITON, quiet=quiet)
        _layout_backend_dir(root, spec["version"])
        env = _env_from(root, spec)
        if not env.tritonserver.exists():
            raise UnsupportedError(f"the {PYTRITON} wheel has no tritonserver binary at {env.tritonserver}")
        (root / STAMP).write_text(json.dumps({"hash": _spec_hash(spec), **spec}, indent=1))
        return env


def main() -> None:
    """`python -m llmc.serve.triton.env`: create the environment and print where it is."""
    try:
        env = ensure_triton_env(quiet="-v" not in sys.argv)
    except LlmcError as exc:
        print(f"triton environment not set up: {exc}", file=sys.stderr)
        sys.exit(0 if "--optional" in sys.argv else 2)
    print(f"triton environment ready: {env.root} (tritonserver {TRITON_VERSION})")


if __name__ == "__main__":
    main()
