"""On-disk cache of converted models, so only the first load pays for the conversion.

Layout: ``$FASTEM_CACHE/<kind>/<name>-<fingerprint>/`` (kind ``whisper`` or ``lm``) holding what ``save_pretrained`` writes
(safetensors weights, configs, processor files) plus ``fastem_cache.json``, a manifest listing
every file with its size and modification time. The fingerprint hashes the source files' names,
sizes and mtimes and :data:`CONVERTER_VERSION`, so a reinstalled weights package or a changed
converter gets a fresh entry.

Entries are built in a temporary sibling directory and renamed into place, so a crash never
leaves a half-written entry under the final name. An entry whose manifest is missing, or whose
files are missing, of another size or modified since, is treated as corrupt: removed and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

__all__ = ["CONVERTER_VERSION", "MANIFEST", "cache_root", "fingerprint", "entry_dir", "is_valid", "remove", "new_build_dir",
           "commit", "remove_stale", "load_or_build"]

logger = logging.getLogger(__name__)

#: Bump when the conversion output changes: old cache entries then stop matching.
CONVERTER_VERSION = "2"
MANIFEST = "fastem_cache.json"
T = TypeVar("T")


def cache_root() -> Path:
    """``$FASTEM_CACHE`` if set, else ``~/.cache/fastem``."""
    return Path(os.environ.get("FASTEM_CACHE") or Path.home() / ".cache" / "fastem").expanduser()


def fingerprint(files: Iterable[Path], extra: str = "") -> str:
    """Short hash of the files' names, sizes and mtimes (cheap: the contents are not read)."""
    h = hashlib.sha256(f"fastem-converter-{CONVERTER_VERSION}|{extra}".encode())
    for f in files:
        st = Path(f).stat()
        h.update(f"|{Path(f).name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("._") or "model"


def entry_dir(name: str, fp: str, kind: str = "whisper") -> Path:
    """Where the entry for model ``name`` (of ``kind``) with source fingerprint ``fp`` lives."""
    return cache_root() / kind / f"{_slug(name)}-{fp}"


def _file_states(directory: Path) -> dict[str, list[int]]:
    states = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            st = path.stat()
            states[path.relative_to(directory).as_posix()] = [st.st_size, st.st_mtime_ns]
    return states


def is_valid(directory: Path, required: Iterable[str] = ()) -> bool:
    """True when ``directory`` is a complete entry: manifest present and every file unchanged."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        recorded = manifest["files"]
        if any(name not in recorded for name in required):
            return False
        for rel, (size, mtime_ns) in recorded.items():
            st = (directory / rel).stat()
            if st.st_size != size or st.st_mtime_ns != mtime_ns:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def remove(directory: Path) -> None:
    """Delete an entry (or a temporary build directory), ignoring what is already gone."""
    shutil.rmtree(directory, ignore_errors=True)


def new_build_dir(final: Path) -> Path:
    """A fresh temporary directory next to ``final`` (same filesystem, so the rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def commit(tmp: Path, final: Path, name: str) -> Path:
    """Write the manifest into ``tmp`` and rename it to ``final``.

    If another process committed ``final`` first (and it is valid), keep theirs and drop ours.
    """
    manifest = {"name": name, "converter_version": CONVERTER_VERSION, "files": _file_states(tmp)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    if final.exists() and not is_valid(final):
        remove(final)
    try:
        os.rename(tmp, final)
    except OSError:
        if not is_valid(final):
            raise
        logger.debug("cache entry %s was committed concurrently; discarding %s", final, tmp)
        remove(tmp)
    return final


def remove_stale(name: str, keep: Path) -> None:
    """Remove other entries of model ``name`` (older fingerprints) once ``keep`` is committed."""
    prefix = f"{_slug(name)}-"
    for other in keep.parent.glob(prefix + "*"):
        # Only directories that are entries of this very name: <slug>-<16 hex digits>.
        suffix = other.name[len(prefix):]
        if other != keep and other.is_dir() and len(suffix) == 16 and all(c in "0123456789abcdef" for c in suffix):
            logger.info("removing stale cache entry %s", other)
            remove(other)


def load_or_build(name: str, sources: Sequence[Path], *, kind: str, required: Iterable[str], load: Callable[[Path], T],
                  build: Callable[[], T], save: Callable[[T, Path], None]) -> tuple[T, str, str]:
    """``(value, how, where)``: the model loaded from its valid cache entry (``how == "cache"``), or built from
    its ``sources`` (``"converted"``) and saved into a fresh entry, ``where`` its path (``""`` when the cache
    could not be written: it is an optimisation, the value is returned all the same).  An entry that is
    incomplete, modified or fails to ``load`` is removed and rebuilt."""
    required = tuple(required)
    entry = entry_dir(name, fingerprint(sources, extra=name), kind)
    if entry.exists():
        if is_valid(entry, required):
            try:
                return load(entry), "cache", str(entry)
            except Exception as exc:  # corrupt in a way the manifest could not see
                logger.warning("cache entry %s failed to load (%s); rebuilding it", entry, exc)
        else:
            logger.warning("cache entry %s is incomplete or modified; rebuilding it", entry)
        remove(entry)
    value = build()
    tmp = None
    try:
        tmp = new_build_dir(entry)
        save(value, tmp)
        commit(tmp, entry, name)
        remove_stale(name, keep=entry)
        where = str(entry)
    except OSError as exc:  # read-only or full disk
        if tmp is not None:
            remove(tmp)
        logger.warning("could not write the model cache under %s (%s); the next load converts again", entry.parent, exc)
        where = ""
    return value, "converted", where
