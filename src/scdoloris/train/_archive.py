"""The integrity check of a torch archive (a checkpoint or a saved model): torch writes CRCs it never reads."""

from __future__ import annotations

import zipfile


def damaged_member(path: str) -> str | None:
    """The first member of the zip archive at ``path`` whose bytes fail their CRC-32, or ``None``.

    torch writes a CRC-32 of every member (``torch.save``, Lightning checkpoints) but never checks
    them when it loads, so flipped bytes inside a tensor load silently as other weights. Archives
    written with ``torch.serialization.set_crc32_options(False)`` store 0 for every CRC: they are
    not checked (``None``).

    Raises
    ------
    zipfile.BadZipFile, OSError, EOFError
        The archive's directory or a member's header is damaged.
    """
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        if all(m.CRC == 0 for m in members) and any(m.file_size for m in members):
            return None  # written without CRCs (an empty member's CRC is 0 as well)
        return archive.testzip()
