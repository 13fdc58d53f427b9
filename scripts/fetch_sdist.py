"""Fetches the one sdist a hash-pinned requirements file names, verifies it, prints its path.

Why not ``pip download``: pip prepares the sdist's metadata before it saves the file (build
isolation, ~80 s for vLLM, which imports torch in its setup.py), and building it through pip's
resolver compares the built wheel's version with the requested one, which rejects vLLM's
``0.32.0+empty`` local version on some pip releases. Fetching the file from the package index's
simple API (PEP 503, the one every mirror serves; ``PIP_INDEX_URL`` is honoured) and checking
its sha256 here keeps the pin exact with nothing in between.

Usage: ``python scripts/fetch_sdist.py requirements/vllm.txt DEST_DIR``
"""

from __future__ import annotations

import hashlib
import html.parser
import os
import re
import sys
import urllib.parse
import urllib.request
from pathlib import Path

_PIN = re.compile(r"^\s*([A-Za-z0-9_.-]+)==([^\s;]+)\s+--hash=sha256:([0-9a-f]{64})")


class _LinkParser(html.parser.HTMLParser):
    """Collects the ``href`` of every anchor of a PEP 503 project page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.links.append(href)


def read_pin(requirements: Path) -> tuple[str, str, str]:
    """The (name, version, sha256) of the file's only hash-pinned requirement."""
    pins = [m.groups() for line in requirements.read_text().splitlines() if (m := _PIN.match(line))]
    if len(pins) != 1:
        raise SystemExit(
            f"fetch_sdist: {requirements} must pin exactly one package by hash, found {len(pins)}"
        )
    return pins[0]


def sdist_url(name: str, version: str, index: str) -> str:
    """The sdist's download address on the index's project page."""
    page_url = f"{index.rstrip('/')}/{re.sub(r'[-_.]+', '-', name).lower()}/"
    with urllib.request.urlopen(page_url, timeout=120) as response:
        parser = _LinkParser()
        parser.feed(response.read().decode())
    stem = f"{re.sub(r'[-.]+', '_', name)}-{version}".lower()
    for link in parser.links:
        filename = urllib.parse.urlparse(link).path.rsplit("/", 1)[-1].lower()
        if filename in (f"{stem}.tar.gz", f"{stem}.zip"):
            return urllib.parse.urljoin(page_url, link)
    raise SystemExit(f"fetch_sdist: {page_url} lists no sdist of {name} {version}")


def main() -> None:
    requirements, dest = Path(sys.argv[1]), Path(sys.argv[2])
    name, version, expected = read_pin(requirements)
    url = sdist_url(name, version, os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple"))
    target = dest / urllib.parse.urlparse(url).path.rsplit("/", 1)[-1]
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=600) as response, target.open("wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != expected:
        target.unlink()
        raise SystemExit(
            f"fetch_sdist: {url} has sha256 {digest.hexdigest()}, {requirements} pins {expected}"
        )
    print(target)


if __name__ == "__main__":
    main()
