"""The distribution lists every package and keeps kernels/ free of vLLM and the plugin."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = set()
    for top, name in (("tpu_plugin", "tpu_plugin"), ("kernels", "tpu_kernels")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    assert found == listed


def test_kernels_import_neither_vllm_nor_the_plugin():
    pattern = re.compile(r"^\s*(import|from)\s+(vllm|tpu_plugin)\b", re.M)
    offenders = [p for p in (ROOT / "kernels").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
