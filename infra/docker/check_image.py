"""Check an image's Python environment at the end of its build (infra/docker/install.sh):

- every pin of requirements-runtime.lock is installed at that version (a local label such as
  +cpu or +cu130 aside: the torch index picks the build);
- no package that only the dev extra needs (requirements.lock minus the runtime lock: pytest,
  ruff, moto, Flask, cfn-lint, prefect-kubernetes, ...) got in;
- cuda: torch was built for CUDA_MAJOR and no installed distribution is built for another CUDA
  major (e.g. `tensorrt_cu13` next to a CUDA 12 torch, which loads two CUDA runtimes), and
  TensorRT imports;
- the project imports.

    python infra/docker/check_image.py cpu|cuda      (cuda reads CUDA_MAJOR)

Exit 1 with every problem listed.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from importlib.metadata import distributions
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
# `-cu12`, `_cu13`, `-cu12-libs`: the CUDA major a wheel was built for, in its name.
CUDA_SUFFIX = re.compile(r"[-_]cu(\d+)(?:[-_]|$)")


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, version = line.split("==")
            out[canonicalize_name(name)] = version
    return out


def installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}


def lock_problems(have: dict[str, str], runtime: dict[str, str],
                  full: dict[str, str]) -> list[str]:
    problems = []
    for name, pinned in sorted(runtime.items()):
        got = have.get(name)
        if got is None:
            problems.append(f"{name}=={pinned} from the runtime lock is not installed")
        elif Version(got).public != Version(pinned).public:
            problems.append(f"{name} is {got}, the runtime lock pins {pinned}")
    dev_only = sorted(set(have) & (set(full) - set(runtime)))
    if dev_only:
        problems.append("dev-only packages installed: " + ", ".join(dev_only))
    return problems


def foreign_cuda(names: list[str], major: int) -> list[str]:
    """The distributions built for a CUDA major other than `major`."""
    out = []
    for name in names:
        found = CUDA_SUFFIX.search(name)
        if found and int(found.group(1)) != major:
            out.append(name)
    return sorted(out)


def cuda_problems(have: dict[str, str], major: int) -> list[str]:
    problems = []
    import torch

    built = torch.version.cuda
    if not built or int(built.split(".")[0]) != major:
        problems.append(f"torch {torch.__version__} is built for CUDA {built}, not {major}")
    mixed = foreign_cuda(list(have), major)
    if mixed:
        problems.append(f"built for another CUDA major than {major}: " + ", ".join(mixed))
    try:
        import tensorrt
    except ImportError as exc:
        problems.append(f"tensorrt does not import: {exc}")
    else:
        print(f"check_image: torch {torch.__version__}, tensorrt {tensorrt.__version__}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("cpu", "cuda"):
        print("usage: check_image.py cpu|cuda", file=sys.stderr)
        return 2
    have = installed()
    problems = lock_problems(have, pins(ROOT / "requirements-runtime.lock"),
                             pins(ROOT / "requirements.lock"))
    if argv[0] == "cuda":
        problems += cuda_problems(have, int(os.environ["CUDA_MAJOR"]))
    for module in ("components.config", "flows.deploy", "flows.pipeline"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # any import failure is a broken image
            problems.append(f"{module} does not import: {exc!r}")
    if problems:
        print("check_image: the image's environment is wrong:\n- " + "\n- ".join(problems),
              file=sys.stderr)
        return 1
    print(f"check_image: {argv[0]} environment matches requirements-runtime.lock")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
