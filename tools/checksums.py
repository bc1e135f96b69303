# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
SHA-256 checksums of a model folder: `visiontrim-convert` writes them to `checksums.sha256` (the `sha256sum`
format, so `sha256sum -c checksums.sha256` checks them too), and `python -m visiontrim verify PATH` checks them. A
weight file damaged mid-file still loads and answers nonsense; its checksum tells.
"""

import argparse
import hashlib
import re
from pathlib import Path

from .arguments import UsageError, existing_folder


MANIFEST = "checksums.sha256"
# A `sha256sum` line: the digest, a space, then a space (text mode) or `*` (binary mode), then the file name.
MANIFEST_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")
UNLISTED = "NOT IN MANIFEST"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as reader:
        for block in iter(lambda: reader.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_checksums(folder: Path, pattern: str = "**/*", known: dict[str, str] | None = None) -> dict[str, str]:
    """
    `{relative path: SHA-256}` of the files of `folder` matching `pattern`, the manifest itself left out; the files in
    `known` (already hashed: weight files are large) are not read again.
    """
    known = known or {}
    files = sorted(path for path in folder.glob(pattern) if path.is_file() and path.name != MANIFEST)
    names = [path.relative_to(folder).as_posix() for path in files]
    return {name: known.get(name) or sha256_of(path) for name, path in zip(names, files, strict=True)}


def write_manifest(folder: Path, known: dict[str, str] | None = None) -> dict[str, str]:
    """Writes `checksums.sha256` for every file of `folder` (reusing the `known` checksums); returns what it wrote."""
    checksums = folder_checksums(folder, known=known)
    (folder / MANIFEST).write_text("".join(f"{digest}  {name}\n" for name, digest in checksums.items()))
    return checksums


def verify_folder(folder: Path) -> dict[str, str]:
    """
    `{entry: status}`: "OK", "FAILED" or "MISSING" for every file `checksums.sha256` lists, "MALFORMED" for a line
    that is not `<64 hex digits>  <file>` (keyed `line N`), and "NOT IN MANIFEST" for every file of the folder the
    manifest does not list.
    """
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise UsageError(f"argument path: {folder} holds no {MANIFEST} (visiontrim-convert writes one)")
    results = {}
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        entry = MANIFEST_LINE.fullmatch(line)
        if entry is None:
            results[f"line {number}"] = "MALFORMED"
            continue
        digest, name = entry.group(1).lower(), entry.group(2)
        path = folder / name
        results[name] = "MISSING" if not path.is_file() else ("OK" if sha256_of(path) == digest else "FAILED")
    present = sorted(
        path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST
    )
    results.update({name: UNLISTED for name in present if name not in results})
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=existing_folder, help="a model folder written by visiontrim-convert")


def run(args: argparse.Namespace) -> None:
    manifest = Path(args.path) / MANIFEST
    results = verify_folder(Path(args.path))
    for name, status in results.items():
        print(f"{name}: {status}")
    unlisted = [name for name, status in results.items() if status == UNLISTED]
    checked = {name: status for name, status in results.items() if status != UNLISTED}
    if unlisted:
        print(f"{len(unlisted)} files of the folder are not in {manifest}, so not checked: {unlisted}")
    bad = [name for name, status in checked.items() if status != "OK"]
    if bad:
        raise SystemExit(f"{len(bad)} of {len(checked)} files do not match {manifest}: {bad}")
    print(f"all {len(checked)} files match {manifest}")
