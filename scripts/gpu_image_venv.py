"""A virtualenv holding only what the GPU machine's image has, for `make gpu-smoke-dry`.

The image has python, torch, transformers, peft, accelerate, pandas, pyarrow, safetensors, pillow and numpy (and
what they require), and nothing else: no polars, dagster, mlflow, trl or datasets. This builds such an environment
offline from the project's own virtualenv: a new venv (same interpreter, no pip) whose site-packages links each
of those distributions and their required dependencies (extras left out), nothing more. The versions are the
project's (the image pins torch 2.11 and transformers 5.17): the dry run checks what the smoke path imports, not
version differences.

    python scripts/gpu_image_venv.py var/gpu-image-venv      # then var/gpu-image-venv/bin/python ...
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

IMAGE_PACKAGES = ("torch", "transformers", "peft", "accelerate", "pandas", "pyarrow", "safetensors", "pillow",
                  "numpy")
ABSENT = ("polars", "dagster", "mlflow", "trl", "datasets")


def closure(names: tuple[str, ...]) -> dict[str, metadata.Distribution]:
    """The distributions `names` need: each one and, recursively, its requirements without extras whose
    environment markers hold here."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, metadata.Distribution] = {}
    pending = list(names)
    while pending:
        name = canonicalize_name(pending.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional platform dependency that is not installed here
        found[name] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return found


def top_level_entries(dist: metadata.Distribution) -> set[str]:
    """The names a distribution puts directly in site-packages (packages, modules, its .dist-info)."""
    entries = set()
    for file in dist.files or []:
        first = file.parts[0]
        if first not in ("..", "__pycache__") and not first.endswith(".pth"):
            entries.add(first)
    return entries


def build(target: Path) -> list[str]:
    """Create the venv at `target` (replacing it); returns the distributions it links."""
    dists = closure(IMAGE_PACKAGES)
    if any(name in dists for name in ABSENT):
        raise SystemExit(f"the image's packages require one of {ABSENT}: {sorted(set(dists) & set(ABSENT))}")
    source = Path(sysconfig.get_paths()["purelib"])
    if target.exists():
        shutil.rmtree(target)
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(target)],
                   check=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = target / "lib" / version / "site-packages"
    for dist in dists.values():
        for entry in top_level_entries(dist):
            link, origin = site / entry, source / entry
            if origin.exists() and not link.exists():
                link.symlink_to(origin)
    return sorted(dists)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    names = build(args.target)
    print(f"{args.target}: {len(names)} distributions ({', '.join(names)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
