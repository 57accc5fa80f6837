"""Print the pip requirements of a CUDA install (`make install GPU=1`): the project's, dev and
team extras included, with TensorFlow's CUDA build in place of tensorflow-cpu.

tensorflow-cpu and tensorflow both install the `tensorflow` module, and pip cannot leave out a
dependency the project declares: installed together, one overwrites the other's files, and
uninstalling either breaks the one left. So the CUDA install never asks pip for tensorflow-cpu:
it installs this list, then the project with --no-deps.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# The project's own extras, as `transferflow[team]` names them inside another extra.
_SELF = re.compile(r"^transferflow\[(?P<extras>[^\]]+)\]\s*$")
_TENSORFLOW = re.compile(r"^tensorflow(?:-cpu)?\s*(?P<version>[=<>!~][^;]*?)\s*(?:;.*)?$")


def requirements(pyproject: Path = PYPROJECT, extras: tuple[str, ...] = ("dev",)) -> list[str]:
    """The requirement lines, in the order pyproject.toml gives them, with one TensorFlow line."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    lines: list[str] = []
    pending = [*project["dependencies"], *(line for extra in extras for line in optional[extra])]
    while pending:
        line = pending.pop(0)
        own = _SELF.match(line)
        if own:
            for extra in own["extras"].split(","):
                pending[:0] = optional[extra.strip()]
            continue
        tensorflow = _TENSORFLOW.match(line)
        if tensorflow:
            line = f"tensorflow[and-cuda]{tensorflow['version']}"
        if line not in lines:
            lines.append(line)
    return lines


if __name__ == "__main__":
    print("\n".join(requirements(extras=tuple(sys.argv[1:]) or ("dev",))))
