"""Allow-listed site-packages for the sandbox.

The sandbox's interpreter runs in isolated mode without `site` (`python -I -S`), so only the
standard library is importable. A task that needs a third-party package (a reasoning-gym verifier
needs reasoning_gym, sympy, ...) names it; the package and every installed distribution it
requires (transitively, extras left out) are linked into one folder that goes on the sandbox's
`sys.path`. Nothing else from the trainer's environment (torch, transformers, grpokit itself) is
on that path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from functools import cache
from importlib import metadata
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def _module_distributions() -> dict[str, list[str]]:
    return dict(metadata.packages_distributions())


def _required_names(dist: metadata.Distribution) -> list[str]:
    names = []
    for requirement in dist.requires or []:
        spec, _, marker = requirement.partition(";")
        if "extra" in marker:  # optional extras are not needed to import the package
            continue
        match = _NAME.match(spec.strip())
        if match:
            names.append(match.group(0))
    return names


def distribution_closure(packages: Iterable[str]) -> list[metadata.Distribution]:
    """The installed distributions providing `packages` and all they require.

    Args:
        packages: Import names (`"reasoning_gym"`) or distribution names (`"reasoning-gym"`).

    Returns:
        The distributions, each once; requirements that are not installed (platform-specific
        ones, usually) are left out.

    Raises:
        ValueError: A requested package is not installed.
    """
    by_module = _module_distributions()
    queue: list[str] = []
    for package in packages:
        found = by_module.get(package.split(".")[0])
        if found:
            queue.extend(found)
            continue
        try:
            metadata.distribution(package)
        except metadata.PackageNotFoundError:
            raise ValueError(
                f"sandbox: package {package!r} is not installed, so it cannot be allowed into the "
                "sandbox; install it or remove it from the sandbox's packages."
            ) from None
        queue.append(package)
    seen: dict[str, metadata.Distribution] = {}
    while queue:
        name = queue.pop()
        if _canonical(name) in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[_canonical(name)] = dist
        queue.extend(_required_names(dist))
    return list(seen.values())


def _top_level_entries(dist: metadata.Distribution) -> set[Path]:
    """The distribution's top-level files and folders in site-packages (modules, packages, their
    vendored `*.libs` folders, and the `.dist-info` folder so that `importlib.metadata` works)."""
    entries = set()
    for file in dist.files or []:
        first = file.parts[0]
        if first in ("..", "__pycache__") or first.endswith(".pth"):
            continue
        path = Path(str(dist.locate_file(first)))
        if path.exists():
            entries.add(path)
    return entries


def link_packages(dest: Path, packages: Iterable[str]) -> Path:
    """Create `dest` holding symbolic links to `packages` and their requirements.

    Returns:
        `dest`, to be put on the sandbox's `sys.path`.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for dist in distribution_closure(packages):
        for entry in _top_level_entries(dist):
            link = dest / entry.name
            if not link.exists():
                os.symlink(entry, link)
    return dest
