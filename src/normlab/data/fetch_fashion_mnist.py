"""Put Fashion-MNIST's four IDX files under ``<root>/FashionMNIST/raw/`` (``make data-fashion-mnist``).

In order, stopping at the first that works: files already at the root (torchvision's layout or
flat) are used; the files of Debian's ``dataset-fashion-mnist`` package are linked if it is
installed; the package is installed with apt-get when running as root; torchvision downloads
them where there is internet. Otherwise one line says what each step found, and the exit code
is 2. Whatever is found is read once, so bad files are named here rather than at training.

    python -m normlab.data.fetch_fashion_mnist --root data
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence

from normlab.data.fashion_mnist import (
    FILES,
    TORCHVISION_SUBDIR,
    candidate_folders,
    download,
    find_files,
    load_split,
)
from normlab.errors import ConfigError

DEBIAN_PACKAGE = "dataset-fashion-mnist"
APT_TIMEOUT_S = 600
# Every name the four files may have.
STEMS = [stem + ext for pair in FILES.values() for stem in pair for ext in ("", ".gz")]


def package_files() -> dict[str, str] | None:
    """``{file name: path}`` of the four ``.gz`` files the Debian package installed (from
    ``dpkg -L``), or None when it is not installed."""
    if shutil.which("dpkg") is None:
        return None
    listing = subprocess.run(
        ["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, check=False
    )
    if listing.returncode != 0:
        return None
    wanted = {stem for stem in STEMS if stem.endswith(".gz")}
    found = {
        os.path.basename(line): line
        for line in listing.stdout.splitlines()
        if os.path.basename(line) in wanted and os.path.isfile(line)
    }
    return found if len(found) == len(wanted) else None


def link_into(root: str, files: dict[str, str]) -> str:
    """Symlink ``files`` into ``root/FashionMNIST/raw/``; returns that folder."""
    folder = os.path.join(root, TORCHVISION_SUBDIR)
    os.makedirs(folder, exist_ok=True)
    for name, source in files.items():
        target = os.path.join(folder, name)
        if os.path.islink(target) or os.path.exists(target):
            os.remove(target)
        os.symlink(source, target)
    return folder


def _run(command: list[str]) -> str | None:
    """None if ``command`` succeeds, else why not (one phrase). Its output streams to ours as it
    runs (apt's downloads can take minutes); its errors are kept for the phrase."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"running `{' '.join(command)}` (at most {APT_TIMEOUT_S} s)", flush=True)
    try:
        done = subprocess.run(
            command, stderr=subprocess.PIPE, text=True, env=env, timeout=APT_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return f"`{' '.join(command)}` took over {APT_TIMEOUT_S} s"
    if done.returncode == 0:
        return None
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"`{' '.join(command)}` failed: {last}"


def apt_install() -> str | None:
    """Install the Debian package with apt-get; None on success, else why not (one phrase)."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "not root"
    install = ["apt-get", "install", "-y", "-q", DEBIAN_PACKAGE]
    if _run(install) is None:
        return None
    # A fresh machine may have no package lists yet.
    return _run(["apt-get", "update", "-q"]) or _run(install)


def check(root: str) -> str:
    """Read all four files (DataError naming a bad one); a one-line summary of what is there."""
    files = find_files(root)
    counts = {split: len(load_split(*paths)[1]) for split, paths in files.items()}
    folder = os.path.dirname(files["train"][0])
    return f"{counts['train']:,} training and {counts['test']:,} test images in {folder}"


def fetch(root: str) -> str:
    """Make the files available under ``root``; what was done, or ConfigError saying what
    every step found."""
    folders = candidate_folders(root)
    if any(os.path.exists(os.path.join(f, stem)) for f in folders for stem in STEMS):
        # Some or all files are there: use them, or say what is wrong with them (replacing
        # a user's files is not this command's call).
        return f"Fashion-MNIST: using {check(root)}"
    tried = [f"no IDX files in {' or '.join(folders)}"]

    files = package_files()
    if files is None:
        tried.append(f"Debian package {DEBIAN_PACKAGE} not installed")
        problem = apt_install()
        if problem is None:
            files = package_files()
            problem = None if files else "installed, but dpkg -L lists no IDX files"
        if problem is not None:
            tried.append(f"apt-get install {DEBIAN_PACKAGE}: {problem}")
    if files is not None:
        link_into(root, files)
        return f"Fashion-MNIST: linked {DEBIAN_PACKAGE}'s files; {check(root)}"

    try:
        download(root)
    except ConfigError as e:
        tried.append(str(e))
    else:
        return f"Fashion-MNIST: downloaded; {check(root)}"
    raise ConfigError("Fashion-MNIST not available: " + "; ".join(tried))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data", help="data.root of the runs (default: data)")
    args = parser.parse_args(argv)
    try:
        print(fetch(os.path.expanduser(args.root)))
    except ConfigError as e:
        print(f"normlab: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
