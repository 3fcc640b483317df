"""Check that requirements.lock pins every runtime dependency of pyproject.toml.

    python check_lock.py [PYPROJECT [LOCK]]

Each ``[project] dependencies`` entry must have an exact ``name==version`` pin in
the lock file, and the pinned version must satisfy the entry (checked when the
``packaging`` library is available). Prints one line; exits 1 when the lock is
stale: regenerate it with scripts/container/lock.sh.
"""

from __future__ import annotations

import re
import sys
import tomllib


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(argv: list[str]) -> int:
    pyproject = argv[0] if argv else "pyproject.toml"
    lock = argv[1] if len(argv) > 1 else "requirements.lock"
    with open(pyproject, "rb") as handle:
        deps: list[str] = tomllib.load(handle)["project"].get("dependencies", [])
    with open(lock, encoding="utf-8") as handle:
        pins = {
            normalize(m[1]): m[2]
            for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", handle.read(), re.M)
        }
    try:
        from packaging.requirements import Requirement
    except ImportError:
        Requirement = None  # type: ignore[assignment,misc]
    problems = []
    for dep in deps:
        name = normalize(re.split(r"[\s<>=!~;\[(]", dep, maxsplit=1)[0])
        if name not in pins:
            problems.append(f"{name} is not pinned")
        elif Requirement is not None and pins[name] not in Requirement(dep).specifier:
            problems.append(f"{name}=={pins[name]} does not satisfy {dep!r}")
    if problems:
        print(f"{lock} is stale ({'; '.join(problems)}): run scripts/container/lock.sh")
        return 1
    print(f"{lock} pins all {len(deps)} runtime dependencies of {pyproject}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
