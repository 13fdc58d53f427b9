"""Buildkite model-matrix generator: one model list in, pipeline steps out.

    python .buildkite/generate.py                 # pipeline YAML on stdout (what CI uploads)
    python .buildkite/generate.py check           # validate models.yaml against the registry
    python .buildkite/generate.py add-model --arch Qwen3ForCausalLM --recipe random \\
        --paths jax --queues cpu tpu-v5e tpu-v6e --checks parity

`.buildkite/models.yaml` lists every supported architecture once, with the test checkpoints
(recipes), model paths, agent queues and checks it runs. This file owns the vocabulary (which
queues, paths, recipes and checks exist) and the mapping from a check to the real command it
runs, so adding a model never means writing pipeline YAML by hand, and every model on the
same queue runs exactly the same commands. `run_local.py` executes this generator's output,
so there is no second copy of the mapping.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODELS_FILE = ROOT / ".buildkite" / "models.yaml"

# Every step first makes sure .venv matches requirements/ (a no-op when its stamp is current).
SETUP_COMMAND = "scripts/install.sh --no-run"
PYTHON = ".venv/bin/python"
PYTEST = f"{PYTHON} -m pytest"

# Buildkite agent queue -> TPU_PLUGIN_DEVICE (and TPU_PLUGIN_TARGET, the install target).
QUEUES: dict[str, str] = {"cpu": "cpu", "tpu-v5e": "tpu", "tpu-v6e": "tpu", "gpu-h100": "gpu"}
# Model path -> TPU_PLUGIN_MODEL_IMPL.
PATHS: dict[str, str] = {"jax": "jax", "torchax": "torchax"}
RECIPES: dict[str, str] = {
    "random": "small random-weight checkpoint of the real architecture, made by the tests",
    "smollm2": "the embedded SmolLM2-135M-Instruct (real weights, tokenizer, chat template)",
}
ANY_DEVICE = "*"
ENTRY_KEYS = ("arch", "recipes", "select", "paths", "queues", "checks", "soft_fail", "timeout")


@dataclass(frozen=True)
class Check:
    """What a check means: per recipe and device, the command that runs it.

    A recipe/device pair without a command is not applicable (e.g. there is no TPU
    benchmark script yet); the generator reports such pairs instead of inventing a step.
    """

    description: str
    timeout_minutes: int
    commands: dict[str, dict[str, str]]  # recipe -> device (or ANY_DEVICE) -> command template

    def command(self, recipe: str, device: str) -> str | None:
        """The command template for ``recipe`` on ``device``, or None when not applicable."""
        by_device = self.commands.get(recipe, {})
        return by_device.get(device, by_device.get(ANY_DEVICE))


CHECKS: dict[str, Check] = {
    "parity": Check(
        description="logits and greedy tokens against HF transformers (PyTorch fp32)",
        timeout_minutes=20,
        commands={
            "random": {ANY_DEVICE: f"{PYTEST} tests/models -k {{select}}"},
            "smollm2": {
                ANY_DEVICE: f"{PYTEST} tests/e2e/test_offline.py -k smollm2_greedy_matches_hf"
            },
        },
    ),
    "e2e": Check(
        description="vllm.LLM generate/chat, chunked prefill, prefix caching; vllm serve + openai",
        timeout_minutes=30,
        commands={
            # test_serve.py starts `vllm serve --device cpu`, so it only means something on cpu.
            "smollm2": {
                "cpu": f"{PYTEST} tests/e2e",
                ANY_DEVICE: f"{PYTEST} tests/e2e/test_offline.py",
            },
        },
    ),
    # The engine's programs through the real TPU compiler (libtpu) for one generation, from a
    # CPU agent: tests/tpu builds them from the runner with abstract weights (no TPU needed).
    **{
        f"tpu-compile-{generation}": Check(
            description=f"every program start-up precompiles compiles for TPU {generation} "
            "(libtpu, Mosaic kernels; abstract weights)",
            timeout_minutes=20,
            commands={
                "random": {
                    "cpu": f"{PYTEST} tests/tpu/test_tpu_compile.py -m 'slow or not slow' "
                    f"-k '{{arch}} and {generation}'"
                }
            },
        )
        for generation in ("v5e", "v6e")
    },
    "benchmark": Check(
        description="offline greedy throughput, plugin vs HF transformers in the same run",
        timeout_minutes=30,
        commands={
            "smollm2": {
                "cpu": f"{PYTHON} benchmarks/bench_cpu_offline.py --requests 1 16 --new-tokens 64"
            },
        },
    ),
}


class MatrixError(ValueError):
    """models.yaml (or a new entry) is invalid; the message lists every problem found."""


@dataclass(frozen=True)
class ModelEntry:
    """One architecture's row in the matrix, validated."""

    arch: str
    recipes: tuple[str, ...]
    paths: tuple[str, ...]
    queues: tuple[str, ...]
    checks: tuple[str, ...]
    select: str | None = None
    soft_fail: bool | tuple[str, ...] = False
    timeout: int | dict[str, int] | None = None

    def soft_fails_on(self, queue: str) -> bool:
        """True when failures of this model on ``queue`` were declared not to fail the build."""
        return self.soft_fail is True or (
            isinstance(self.soft_fail, tuple) and queue in self.soft_fail
        )

    def timeout_for(self, check: str) -> int:
        """Step timeout in minutes: the entry's override, else the check's default."""
        if isinstance(self.timeout, int):
            return self.timeout
        if isinstance(self.timeout, dict) and check in self.timeout:
            return self.timeout[check]
        return CHECKS[check].timeout_minutes


def _names(raw: Any, field: str, valid: Sequence[str], where: str, errors: list[str]) -> tuple:
    """A non-empty list of known, distinct names; problems are appended to ``errors``."""
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        errors.append(f"{where}: '{field}' must be a non-empty list of: {', '.join(valid)}")
        return ()
    unknown = [n for n in raw if n not in valid]
    if unknown:
        errors.append(
            f"{where}: unknown {field} {', '.join(map(str, unknown))}; "
            f"choose from: {', '.join(valid)}"
        )
    if len(set(map(str, raw))) != len(raw):
        errors.append(f"{where}: '{field}' lists a name twice")
    return tuple(n for n in raw if n in valid)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def parse_entry(raw: Any, where: str, errors: list[str]) -> ModelEntry | None:
    """Validates one models.yaml entry; returns None (with ``errors`` filled) if unusable."""
    if not isinstance(raw, dict):
        errors.append(f"{where}: an entry must be a mapping with keys {', '.join(ENTRY_KEYS)}")
        return None
    start = len(errors)
    unknown = sorted(set(raw) - set(ENTRY_KEYS))
    if unknown:
        errors.append(f"{where}: unknown keys {', '.join(unknown)}; valid: {', '.join(ENTRY_KEYS)}")
    arch = raw.get("arch")
    if not isinstance(arch, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", arch):
        errors.append(f"{where}: 'arch' must be a Hugging Face architecture name, got {arch!r}")
        arch = str(arch)
    where = f"{where} ({arch})"
    recipes = _names(raw.get("recipes"), "recipes", list(RECIPES), where, errors)
    paths = _names(raw.get("paths"), "paths", list(PATHS), where, errors)
    queues = _names(raw.get("queues"), "queues", list(QUEUES), where, errors)
    checks = _names(raw.get("checks"), "checks", list(CHECKS), where, errors)

    select = raw.get("select")
    if select is not None and (not isinstance(select, str) or not select.strip()):
        errors.append(f"{where}: 'select' must be a non-empty pytest -k expression")
    needs_select = any(
        "{select}" in (CHECKS[c].command(r, ANY_DEVICE) or "") for c in checks for r in recipes
    )
    if needs_select and not select:
        errors.append(f"{where}: 'select' (pytest -k expression for tests/models) is required")

    soft_fail: bool | tuple[str, ...] = False
    raw_soft = raw.get("soft_fail", False)
    if isinstance(raw_soft, bool):
        soft_fail = raw_soft
    else:
        soft_fail = _names(raw_soft, "soft_fail", list(queues), where, errors)

    timeout = raw.get("timeout")
    if timeout is not None and not _positive_int(timeout):
        if not isinstance(timeout, dict) or not all(
            k in checks and _positive_int(v) for k, v in timeout.items()
        ):
            errors.append(
                f"{where}: 'timeout' must be minutes (a positive integer) or "
                f"{{check: minutes}} for checks among {', '.join(checks)}"
            )
            timeout = None

    for check in checks:  # every declared check must run somewhere
        if not any(CHECKS[check].command(r, QUEUES[q]) for r in recipes for q in queues):
            runs = [
                f"recipe {r} on {'any queue' if d == ANY_DEVICE else d + ' queues'}"
                for r, by_device in CHECKS[check].commands.items()
                for d in by_device
            ]
            errors.append(
                f"{where}: check {check} has no command for recipes {', '.join(recipes)} on "
                f"queues {', '.join(queues)}; it runs with: {'; '.join(runs)}"
            )
    if len(errors) > start:
        return None
    return ModelEntry(arch, recipes, paths, queues, checks, select, soft_fail, timeout)


def registered_architectures() -> list[str]:
    """``tpu_plugin.models.registry.supported_architectures()`` from this checkout."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tpu_plugin.models.registry import supported_architectures

    return supported_architectures()


def parse_models(text: str, where: str, registry: Sequence[str] | None) -> list[ModelEntry]:
    """Validates a whole models.yaml text; raises MatrixError listing every problem.

    With ``registry`` given, every entry must name a registered architecture: a matrix entry
    for a model the plugin cannot load would only produce red steps.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise MatrixError(f"{where}: not valid YAML: {error}") from error
    if (
        not isinstance(data, dict)
        or set(data) != {"models"}
        or not isinstance(data["models"], list)
    ):
        raise MatrixError(f"{where}: must hold exactly one key, 'models', with a list of entries")
    errors: list[str] = []
    entries: list[ModelEntry] = []
    seen: set[str] = set()
    for i, raw in enumerate(data["models"]):
        entry = parse_entry(raw, f"{where} entry {i + 1}", errors)
        if entry is None:
            continue
        if entry.arch in seen:
            errors.append(f"{where}: {entry.arch} is listed twice; one entry per architecture")
        elif registry is not None and entry.arch not in registry:
            errors.append(
                f"{where}: {entry.arch} is not in tpu_plugin.models.registry (registered: "
                f"{', '.join(registry)}); register the port before adding it to the matrix"
            )
        seen.add(entry.arch)
        entries.append(entry)
    if errors:
        raise MatrixError("\n".join(errors))
    return entries


def load_models(path: Path = MODELS_FILE, check_registry: bool = True) -> list[ModelEntry]:
    """Reads and validates models.yaml (against the registry unless told not to)."""
    registry = registered_architectures() if check_registry else None
    return parse_models(path.read_text(), path.name, registry)


def missing_architectures(models: Sequence[ModelEntry], registry: Sequence[str]) -> list[str]:
    """Registered architectures without a matrix entry (CI would never test them)."""
    listed = {m.arch for m in models}
    return [arch for arch in registry if arch not in listed]


def step_key(arch: str, path: str, queue: str, check: str) -> str:
    """A stable Buildkite step key (letters, digits and dashes only)."""
    return f"{check}-{arch.lower()}-{path}-{queue}"


def build_steps(models: Sequence[ModelEntry]) -> tuple[list[dict[str, Any]], list[str]]:
    """The matrix's command steps, plus a note for each combination that has no command.

    One step per model x path x queue x check; its commands run every recipe of the model
    that the check applies to on that device.
    """
    steps: list[dict[str, Any]] = []
    skipped: list[str] = []
    for model in models:
        for path in model.paths:
            for queue in model.queues:
                device = QUEUES[queue]
                for check in model.checks:
                    templates = [CHECKS[check].command(r, device) for r in model.recipes]
                    select = shlex.quote(model.select or "")
                    commands = [t.format(select=select, arch=model.arch) for t in templates if t]
                    commands = list(dict.fromkeys(commands))
                    if not commands:
                        skipped.append(f"{model.arch} {check} ({path}, {queue}): no command")
                        continue
                    step: dict[str, Any] = {
                        "label": f"{model.arch} {check} ({path}, {queue})",
                        "key": step_key(model.arch, path, queue, check),
                        "agents": {"queue": queue},
                        "env": {
                            "TPU_PLUGIN_DEVICE": device,
                            "TPU_PLUGIN_TARGET": device,
                            "TPU_PLUGIN_MODEL_IMPL": PATHS[path],
                            "MATRIX_ARCH": model.arch,
                            "MATRIX_CHECK": check,
                        },
                        "commands": [SETUP_COMMAND, *commands],
                        "timeout_in_minutes": model.timeout_for(check),
                    }
                    if model.soft_fails_on(queue):
                        step["soft_fail"] = True
                    steps.append(step)
    keys = [s["key"] for s in steps]
    if len(set(keys)) != len(keys):
        raise MatrixError(f"duplicate step keys: {sorted(k for k in keys if keys.count(k) > 1)}")
    return steps, skipped


def render(path: Path = MODELS_FILE) -> str:
    """The pipeline YAML that CI uploads (skipped combinations listed as comments)."""
    steps, skipped = build_steps(load_models(path))
    header = [
        f"# Generated by .buildkite/generate.py from {path.name}; do not edit.",
        f"# {len(steps)} steps.",
        *[f"# not applicable: {note}" for note in skipped],
    ]
    body = yaml.safe_dump({"steps": steps}, sort_keys=False, width=1000, default_flow_style=False)
    return "\n".join(header) + "\n" + body


def default_select(arch: str) -> str:
    """The usual pytest -k selector for an architecture: Qwen3ForCausalLM -> qwen3."""
    return re.sub(r"For(CausalLM|ConditionalGeneration)$", "", arch).lower()


def collected_tests(select: str) -> int:
    """How many tests in tests/models the selector picks (pytest --collect-only, on cpu)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/models", "-k", select],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TPU_PLUGIN_DEVICE": "cpu"},
    )
    if proc.returncode not in (0, 5):
        raise MatrixError(
            f"pytest --collect-only failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return sum(1 for line in proc.stdout.splitlines() if "::" in line)


def entry_yaml(raw: dict[str, Any]) -> str:
    """One entry in models.yaml's own style (flow lists), so appending keeps the file readable."""

    def value(v: Any) -> str:
        if isinstance(v, list | tuple):
            return "[" + ", ".join(map(str, v)) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {x}" for k, x in v.items()) + "}"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str) and not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            return json.dumps(v)
        return str(v)

    lines = []
    for i, key in enumerate(k for k in ENTRY_KEYS if not _unset(raw.get(k))):
        lines.append(f"{'  - ' if i == 0 else '    '}{key}: {value(raw[key])}")
    return "\n".join(lines) + "\n"


def add_model(
    raw: dict[str, Any],
    path: Path = MODELS_FILE,
    registry: Sequence[str] | None = None,
    collect_check: bool = True,
) -> ModelEntry:
    """Validates ``raw`` as a new entry and appends it to ``path``; raises MatrixError.

    The file is written only when the new whole file validates, so a rejected entry never
    leaves models.yaml half-edited. ``collect_check`` makes sure the parity selector picks
    at least one test, since an empty selection would fail in CI, far from the typo.
    """
    registry = list(registered_architectures() if registry is None else registry)
    raw = {k: v for k, v in raw.items() if not _unset(v)}
    errors: list[str] = []
    entry = parse_entry(raw, "new entry", errors)
    if entry is not None and entry.arch not in registry:
        errors.append(
            f"{entry.arch} is not in tpu_plugin.models.registry (registered: "
            f"{', '.join(registry)}); register the port first"
        )
    text = path.read_text()
    existing = parse_models(text, path.name, registry)
    if raw.get("arch") in {m.arch for m in existing}:
        errors.append(f"{raw['arch']} already has an entry in {path.name}; edit that entry")
    if errors:
        raise MatrixError("\n".join(errors))
    assert entry is not None
    if collect_check and entry.select and "parity" in entry.checks and "random" in entry.recipes:
        if collected_tests(entry.select) == 0:
            raise MatrixError(
                f"select {entry.select!r} picks no test in tests/models; add the model's "
                "parity tests first or pass --select with a -k expression that picks them"
            )
    new_text = text + ("" if text.endswith("\n") else "\n") + entry_yaml(raw)
    updated = parse_models(new_text, path.name, registry)
    if len(updated) != len(existing) + 1 or updated[-1] != entry:
        raise MatrixError(f"{path.name} must end with its 'models:' list to append an entry")
    path.write_text(new_text)
    return entry


def _unset(value: Any) -> bool:
    """An option the user did not give (a zero timeout is kept, so validation rejects it)."""
    return value is None or value is False or value == [] or value == ""


def _split(values: Sequence[str] | None) -> list[str]:
    """Accepts both ``--queues cpu tpu-v5e`` and ``--queues cpu,tpu-v5e``."""
    return [v for value in values or [] for v in value.split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: emit the pipeline (default), ``check``, or ``add-model``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=MODELS_FILE, help="models.yaml to read")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("generate", help="print the pipeline YAML (the default)")
    sub.add_parser("check", help="validate models.yaml; fail on registered archs not listed")
    add = sub.add_parser("add-model", help="append a validated entry to models.yaml")
    add.add_argument("--arch", required=True, help="registered architecture, e.g. Qwen3ForCausalLM")
    add.add_argument("--recipe", nargs="+", required=True, help=f"of: {', '.join(RECIPES)}")
    add.add_argument("--paths", nargs="+", required=True, help=f"of: {', '.join(PATHS)}")
    add.add_argument("--queues", nargs="+", required=True, help=f"of: {', '.join(QUEUES)}")
    add.add_argument("--checks", nargs="+", required=True, help=f"of: {', '.join(CHECKS)}")
    add.add_argument("--select", help="pytest -k expression for tests/models (default: arch)")
    add.add_argument("--soft-fail", nargs="*", help="queues allowed to fail (none given: all)")
    add.add_argument("--timeout", type=int, help="minutes per step (default: per check)")
    add.add_argument(
        "--no-collect-check", action="store_true", help="skip checking that --select picks tests"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "add-model":
            recipes = _split(args.recipe)
            checks = _split(args.checks)
            select = args.select
            if select is None and "random" in recipes and "parity" in checks:
                select = default_select(args.arch)
            soft = None if args.soft_fail is None else (_split(args.soft_fail) or True)
            raw = {
                "arch": args.arch,
                "recipes": recipes,
                "select": select,
                "paths": _split(args.paths),
                "queues": _split(args.queues),
                "checks": checks,
                "soft_fail": soft,
                "timeout": args.timeout,
            }
            entry = add_model(raw, args.models, collect_check=not args.no_collect_check)
            steps, _ = build_steps([entry])
            print(f"added {entry.arch} to {args.models}: {len(steps)} steps", file=sys.stderr)
        elif args.command == "check":
            models = load_models(args.models)
            missing = missing_architectures(models, registered_architectures())
            if missing:
                print(
                    f"registered but not in {args.models.name}: {', '.join(missing)}; add each "
                    "with `python .buildkite/generate.py add-model --arch ...`",
                    file=sys.stderr,
                )
                return 1
            steps, _ = build_steps(models)
            print(f"{args.models.name}: {len(models)} models, {len(steps)} steps", file=sys.stderr)
        else:
            sys.stdout.write(render(args.models))
    except MatrixError as error:
        print(f"generate.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
