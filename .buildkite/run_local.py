"""Runs one queue's model-matrix steps on this machine, exactly as the Buildkite agent would.

    python .buildkite/run_local.py --queue cpu [--model Qwen2ForCausalLM] [--check parity]
        [--skip-setup] [--dry-run] [--matrix docs/support_matrix.md]

The steps come from ``generate.py``'s own output (the YAML CI uploads), so a local run and a
CI run cannot drift apart: same commands, same env, same timeout, joined into one ``bash -e``
script as the agent does. Each step's result, date and duration go into a JSON file next to
the matrix page (``docs/support_matrix.json``), and ``docs/support_matrix.md`` is regenerated
from the whole pipeline plus the last recorded results, so the page shows what was last seen
working on a real machine, and what was never run here.

``--skip-setup`` drops the ``scripts/install.sh --no-run`` command every step starts with; use
it on a machine whose ``.venv`` was set up another way (the run is recorded as such).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MATRIX = ROOT / "docs" / "support_matrix.md"
NOT_APPLICABLE = "# not applicable: "


def load_generator() -> ModuleType:
    """Imports .buildkite/generate.py (a dot-folder is not a package, so by file path)."""
    spec = importlib.util.spec_from_file_location(
        "buildkite_generate", Path(__file__).with_name("generate.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def pipeline(generator: ModuleType, models: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The generator's rendered YAML, parsed: its steps and its not-applicable notes."""
    text = generator.render(models)
    notes = [
        line[len(NOT_APPLICABLE) :] for line in text.splitlines() if line.startswith(NOT_APPLICABLE)
    ]
    return yaml.safe_load(text)["steps"], notes


def select_steps(
    steps: list[dict[str, Any]], queue: str, model: str | None, check: str | None
) -> list[dict[str, Any]]:
    """The steps of ``queue``, narrowed by architecture and check; raises naming the options."""
    on_queue = [s for s in steps if s["agents"]["queue"] == queue]
    if not on_queue:
        queues = sorted({s["agents"]["queue"] for s in steps})
        raise SystemExit(f"run_local.py: no steps on queue {queue!r}; queues: {', '.join(queues)}")
    chosen = [
        s
        for s in on_queue
        if (model is None or s["env"]["MATRIX_ARCH"].lower() == model.lower())
        and (check is None or s["env"]["MATRIX_CHECK"] == check)
    ]
    if not chosen:
        options = sorted(
            {
                f"--model {s['env']['MATRIX_ARCH']} --check {s['env']['MATRIX_CHECK']}"
                for s in on_queue
            }
        )
        raise SystemExit(
            f"run_local.py: nothing on queue {queue} matches; choose from:\n  "
            + "\n  ".join(options)
        )
    return chosen


def step_commands(step: dict[str, Any]) -> list[str]:
    """``command`` or ``commands`` of a Buildkite step, as a list."""
    commands = step.get("commands", step.get("command"))
    return [commands] if isinstance(commands, str) else list(commands)


def commit() -> str:
    """Short HEAD, with ``+dirty`` when the tree has changes (the result is of that tree)."""

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _pump(stream: TextIO, sinks: Sequence[TextIO], tail: collections.deque[str]) -> None:
    """Copies the step's output to the console and the log, keeping the last lines."""
    for line in stream:
        for sink in sinks:
            sink.write(line)
            sink.flush()
        tail.append(line)


def run_step(
    step: dict[str, Any], setup_command: str, skip_setup: bool, log_dir: Path, echo: bool
) -> dict[str, Any]:
    """Runs one step as the agent does (``bash -e -c`` of its commands, with its env)."""
    commands = step_commands(step)
    if skip_setup:
        commands = [c for c in commands if c != setup_command]
    env = {**os.environ, **{k: str(v) for k, v in step.get("env", {}).items()}}
    timeout_s = 60 * int(step["timeout_in_minutes"])
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{step['key']}.log"
    print(f"--- {step['label']}", flush=True)
    for command in commands:
        print(f"$ {command}", flush=True)
    date = dt.datetime.now(dt.UTC)
    start = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            ["bash", "-e", "-c", "\n".join(commands)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, so a timeout ends all it started
        )
        assert proc.stdout is not None
        sinks = [log, sys.stdout] if echo else [log]
        pump = threading.Thread(target=_pump, args=(proc.stdout, sinks, tail), daemon=True)
        pump.start()
        timed_out = False
        try:
            exit_code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            exit_code = proc.returncode
        pump.join(timeout=10)
    duration = time.monotonic() - start
    if timed_out:
        result = "timeout"
    elif exit_code == 0:
        result = "pass"
    else:
        result = "fail"
    if result != "pass" and step.get("soft_fail"):
        result = f"soft-fail ({result})"
    if result != "pass" and not echo:
        sys.stdout.write("".join(tail))
    print(f"=== {step['key']}: {result} in {duration:.0f} s (log: {log_path})", flush=True)
    return {
        "arch": step["env"]["MATRIX_ARCH"],
        "check": step["env"]["MATRIX_CHECK"],
        "path": step["env"]["TPU_PLUGIN_MODEL_IMPL"],
        "queue": step["agents"]["queue"],
        "result": result,
        "exit_code": exit_code,
        "date": date.isoformat(timespec="seconds"),
        "duration_s": round(duration, 1),
        "commit": commit(),
        "setup": "skipped" if skip_setup else "run",
        "commands": commands,
    }


def format_duration(seconds: float) -> str:
    """``47 s`` or ``3 min 05 s``: readable in a table cell."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def write_matrix(
    path: Path, steps: list[dict[str, Any]], notes: list[str], results: dict[str, dict[str, Any]]
) -> None:
    """Regenerates the support-matrix page: one row per model x check x path, CI's queues,
    and the last local result of each. Rows come from the pipeline, not from the results,
    so a model that was never run locally still shows up (as "not run")."""
    rows: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for step in steps:
        env = step["env"]
        rows.setdefault(
            (env["MATRIX_ARCH"], env["MATRIX_CHECK"], env["TPU_PLUGIN_MODEL_IMPL"]), []
        ).append(step)
    lines = [
        "# Support matrix",
        "",
        "Generated by `.buildkite/run_local.py` from `.buildkite/models.yaml` (through",
        "`.buildkite/generate.py`, the same steps CI runs) and the last local results in",
        f"`{path.with_suffix('.json').name}`; do not edit by hand. Re-run a row with",
        "`.venv/bin/python .buildkite/run_local.py --queue cpu --model <model> --check <check>`.",
        "",
        "| model | check | path | CI queues | last local result | date (UTC) | duration | commit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    skipped_setup = False
    for (arch, check, impl), row_steps in rows.items():
        queues = ", ".join(
            s["agents"]["queue"] + (" (soft-fail)" if s.get("soft_fail") else "") for s in row_steps
        )
        done = [results[s["key"]] for s in row_steps if s["key"] in results]
        if not done:
            lines.append(f"| {arch} | {check} | {impl} | {queues} | not run | | | |")
            continue
        last = max(done, key=lambda r: r["date"])
        mark = "*" if last["setup"] == "skipped" else ""
        skipped_setup |= bool(mark)
        date = last["date"][:16].replace("T", " ")
        shown = last["result"]
        if check.startswith("tpu-compile") and shown == "pass":
            shown = "compiles"  # the TPU compiler's verdict, from a cpu agent
        lines.append(
            f"| {arch} | {check} | {impl} | {queues} | {shown} ({last['queue']}){mark} "
            f"| {date} | {format_duration(last['duration_s'])} | {last['commit']} |"
        )
    if skipped_setup:
        lines += ["", "\\* run with `--skip-setup`: the existing `.venv` was used as it was."]
    if notes:
        lines += ["", "Not applicable (the check has no command for that device yet):", ""]
        lines += [f"- {note.removesuffix(': no command')}" for note in notes]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: select steps, run them, record results, regenerate the matrix page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", required=True, help="agent queue to play, e.g. cpu")
    parser.add_argument("--model", help="architecture, e.g. Qwen2ForCausalLM (default: all)")
    parser.add_argument("--check", help="parity, e2e or benchmark (default: all)")
    parser.add_argument("--models", type=Path, help="models.yaml (default: .buildkite/models.yaml)")
    parser.add_argument("--matrix", type=Path, default=DEFAULT_MATRIX, help="page to write")
    parser.add_argument("--skip-setup", action="store_true", help="do not run scripts/install.sh")
    parser.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    parser.add_argument("--quiet", action="store_true", help="log only; print output on failure")
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "tpu-plugin-run-local",
        help="where each step's full output goes",
    )
    args = parser.parse_args(argv)
    generator = load_generator()
    try:
        steps, notes = pipeline(generator, args.models or generator.MODELS_FILE)
    except generator.MatrixError as error:
        print(f"run_local.py: {error}", file=sys.stderr)
        return 2
    chosen = select_steps(steps, args.queue, args.model, args.check)
    if args.dry_run:
        print(yaml.safe_dump({"steps": chosen}, sort_keys=False, width=1000), end="")
        return 0

    results_path = args.matrix.with_suffix(".json")
    results: dict[str, dict[str, Any]] = {}
    if results_path.exists():
        results = json.loads(results_path.read_text())
    failed = []
    for step in chosen:
        record = run_step(
            step, generator.SETUP_COMMAND, args.skip_setup, args.log_dir, not args.quiet
        )
        results[step["key"]] = record
        if record["result"] in ("fail", "timeout"):
            failed.append(step["key"])
        # Written after every step, so an interrupted run still keeps what finished.
        keys = {s["key"] for s in steps}
        results = {k: v for k, v in results.items() if k in keys}  # drop removed models
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        write_matrix(args.matrix, steps, notes, results)
    print(f"{len(chosen) - len(failed)}/{len(chosen)} steps passed; wrote {args.matrix}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
