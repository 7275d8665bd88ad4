"""Download, cache and verify remote data files (standard library + tqdm only)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

CACHE_ENV = "SCDOLORIS_CACHE"
_CHUNK = 1 << 20
_TIMEOUT_S = 60


class ChecksumError(OSError):
    """A downloaded or cached file does not have the expected SHA-256.

    Raised by the downloading loaders (:func:`~scdoloris.datasets.norman2019` and the like)
    when a download is corrupted or a cached file was changed; nothing corrupt is kept or loaded.
    It is an :class:`OSError`, so ``except OSError`` catches it along with network errors.

    Examples
    --------
    >>> import scdoloris as sd
    >>> issubclass(sd.datasets.ChecksumError, OSError)
    True
    >>> try:  # doctest: +SKIP
    ...     adata = sd.datasets.norman2019()
    ... except sd.datasets.ChecksumError as error:
    ...     print(error)  # names the file and how to get a good copy
    """


def get_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory for downloaded data sets.

    ``cache_dir`` when given, else the environment variable ``SCDOLORIS_CACHE``, else ``~/.cache/scdoloris``.
    """
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "scdoloris"
    return Path(cache_dir).expanduser()


def sha256sum(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _temporary_file(directory: Path, name: str) -> Iterator[Path]:
    """A temporary file in ``directory`` (same file system as the cache, so renaming it is atomic), removed on exit."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _download_to(url: str, dest: Path, description: str) -> str:
    """Stream ``url`` into ``dest`` with a progress bar; return the SHA-256 of what was received."""
    request = urllib.request.Request(url, headers={"User-Agent": "scdoloris (python urllib)"})
    digest = hashlib.sha256()
    received = 0
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response, open(dest, "wb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise OSError(f"Incomplete download from {url}: received {received} of {total} bytes.")
    return digest.hexdigest()


def find_member(archive: zipfile.ZipFile, member: str) -> str:
    """Name of the single entry of ``archive`` whose file name is ``member`` (in any folder)."""
    names = [
        n
        for n in archive.namelist()
        if not n.endswith("/") and not n.startswith("__MACOSX/") and n.rsplit("/", 1)[-1] == member
    ]
    if len(names) != 1:
        found = "no such file" if not names else f"several: {names}"
        raise FileNotFoundError(f"Expected exactly one {member!r} in {archive.filename}, found {found}.")
    return names[0]


def _extract_member(archive_path: Path, member: str, dest: Path) -> None:
    with zipfile.ZipFile(archive_path) as archive:
        name = find_member(archive, member)
        with archive.open(name) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)


def _verify_cached(path: Path) -> None:
    """Check a cached file against the SHA-256 recorded next to it when it was stored."""
    sidecar = _sidecar(path)
    if not sidecar.exists():
        # Stored by hand, or the process stopped between storing it and recording its hash: trust on first use.
        _atomic_write_text(sidecar, f"{sha256sum(path)}  {path.name}\n")
        return
    expected = sidecar.read_text().split()[0]
    actual = sha256sum(path)
    if actual != expected:
        raise ChecksumError(
            f"The cached file {path} is corrupt or was changed: its SHA-256 is {actual}, but {expected} was recorded "
            f"in {sidecar} when it was downloaded. Delete {path} to download it again, or pass path= to a local copy."
        )


def fetch(
    name: str,
    url: str,
    *,
    sha256: str | None,
    member: str | None,
    cache_dir: str | os.PathLike | None,
    download: bool,
    description: str,
) -> Path:
    """Path of the cached file ``name``, downloading (and unzipping) it first when it is not cached.

    Parameters
    ----------
    name
        File name in the cache directory.
    url
        Where to download from.
    sha256
        Expected SHA-256 of the download (the archive, when ``member`` is given). ``None``: not known in
        advance; the download is accepted, its hash is shown in a warning, and the stored file is verified
        on every later use against the hash recorded at download time.
    member
        File name inside a zip archive to extract (found in any folder of the archive); ``None`` when
        ``url`` serves the file itself.
    cache_dir
        See :func:`get_cache_dir`.
    download
        Whether to download when the file is not cached; ``False`` raises :class:`FileNotFoundError`.
    description
        Data set name for messages and the progress bar.

    Notes
    -----
    The download goes to a temporary file in the cache directory and is renamed into place only after
    it has been verified (and unzipped), so an interrupted or failed download leaves nothing behind.
    The SHA-256 of the stored file is recorded in ``<name>.sha256`` next to it and checked on each use.
    """
    directory = get_cache_dir(cache_dir)
    target = directory / name
    if target.exists():
        _verify_cached(target)
        return target
    if not download:
        raise FileNotFoundError(
            f"{description} is not in the cache ({target} does not exist). Call with download=True to download it "
            f"from {url}, or pass path= to a local copy."
        )
    directory.mkdir(parents=True, exist_ok=True)
    with _temporary_file(directory, name) as raw:
        try:
            actual = _download_to(url, raw, description)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            raise ConnectionError(
                f"Could not download {description} from {url} ({error}); nothing was stored. Check the network "
                "connection and try again, or download the file yourself and pass path= to the local copy."
            ) from error
        if sha256 is not None and actual != sha256.lower():
            raise ChecksumError(
                f"The download of {description} from {url} has SHA-256 {actual}, expected {sha256}; nothing was "
                f"stored in {directory}. The file on the server may have changed or the transfer was corrupted: try "
                "again, or download it yourself and pass path= to the local copy."
            )
        if sha256 is None:
            warnings.warn(
                f"No published SHA-256 is known for {description} ({url}); the download's SHA-256 is {actual}. "
                f"The stored file's hash is recorded in {_sidecar(target)} and checked on every later use.",
                UserWarning,
                stacklevel=3,
            )
        if member is None:
            stored = raw
            _finish(stored, target)
        else:
            with _temporary_file(directory, name) as stored:
                _extract_member(raw, member, stored)
                _finish(stored, target)
    return target


def _finish(stored: Path, target: Path) -> None:
    # Record the hash first: a crash before the rename leaves only a sidecar, overwritten by the next download.
    _atomic_write_text(_sidecar(target), f"{sha256sum(stored)}  {target.name}\n")
    os.replace(stored, target)
