"""Every file path a job or a message names is resolved inside the party's own workspace or run folder.

A job is written by whoever submits it; a site runs it. So a path from a job config (encoder, decoder,
checkpoint folder, summary, PSI job id, output folder) is a relative path under a folder the party chose,
never absolute and never climbing out with '..'. The check is on the name itself: a symbolic link that the
site's operator placed in its own workspace (e.g. checkpoints on another disk) is the operator's choice and is
followed.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from split_unet.errors import ProtocolError, SplitUNetError


def inside(folder: str | Path, name: object, *, site: str, field: str, where: str = "workspace",
           error: type[SplitUNetError] = ProtocolError) -> Path:
    """``folder / name`` for a relative ``name`` without '..'; ``error`` naming the site and field otherwise.

    ``{site}`` in ``name`` becomes the site's name (plain replacement: a job's string is never a format string).
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise error(f"expected a relative path in the site's {where}, got {name!r}", site=site, field=field)
    relative = PurePosixPath(name.replace("{site}", site))
    if relative.is_absolute() or ".." in relative.parts or "\\" in name or not relative.parts:
        raise error(f"'{name}' must be a path relative to the {where} (absolute paths and '..' are refused)",
                    site=site, field=field)
    return Path(folder) / relative
