"""The CI model matrix: .buildkite/models.yaml -> generate.py -> Buildkite steps -> run_local.py.

Buildkite itself is not available here, so the pipeline is checked at schema level, every
command is checked to point at real files and real test selections, and the cpu queue is run
for one cheap step through run_local.py, the way the agent would run it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BUILDKITE = ROOT / ".buildkite"
# Command-step attributes Buildkite accepts (https://buildkite.com/docs/pipelines/configure/
# step-types/command-step); anything else would be rejected by `pipeline upload`.
STEP_KEYS = {
    "agents", "allow_dependency_failure", "artifact_paths", "branches", "cancel_on_build_failing",
    "command", "commands", "concurrency", "concurrency_group", "depends_on", "env", "if", "key",
    "label", "notify", "parallelism", "plugins", "priority", "retry", "skip", "soft_fail",
    "timeout_in_minutes",
}  # fmt: skip
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
STEP_KEY = re.compile(r"[A-Za-z0-9_:-]+")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    """generate.py as a module (.buildkite is a dot-folder, not a package)."""
    name = "buildkite_generate"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BUILDKITE / "generate.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs a .buildkite script with this interpreter, from the repository root."""
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def generated() -> dict[str, Any]:
    """The pipeline exactly as the bootstrap step produces it (the CLI's stdout)."""
    proc = run_script(".buildkite/generate.py")
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def known_plugin_env() -> set[str]:
    """TPU_PLUGIN_* names the code reads: envs.py, plus install.sh's TPU_PLUGIN_TARGET."""
    sources = (ROOT / "tpu_plugin" / "envs.py").read_text() + (
        ROOT / "scripts/install.sh"
    ).read_text()
    return set(re.findall(r"TPU_PLUGIN_[A-Z_]+", sources))


def check_command_step(step: dict[str, Any], queues: set[str]) -> None:
    """Schema-level checks Buildkite's upload would make, plus this project's conventions."""
    assert set(step) <= STEP_KEYS, f"unknown step attributes {set(step) - STEP_KEYS}"
    assert isinstance(step.get("label"), str) and step["label"].strip()
    assert STEP_KEY.fullmatch(step.get("key", "")) and not UUID.fullmatch(step["key"])
    assert ("command" in step) != ("commands" in step), "exactly one of command/commands"
    commands = step.get("commands", step.get("command"))
    commands = [commands] if isinstance(commands, str) else commands
    assert commands and all(isinstance(c, str) and c.strip() for c in commands)
    assert step["agents"]["queue"] in queues
    timeout = step.get("timeout_in_minutes")
    assert isinstance(timeout, int) and not isinstance(timeout, bool) and timeout > 0
    env = step.get("env", {})
    assert all(ENV_NAME.fullmatch(k) and isinstance(v, str) for k, v in env.items()), env
    unknown = {k for k in env if k.startswith("TPU_PLUGIN_")} - known_plugin_env()
    assert not unknown, f"{step['key']}: env names nothing reads: {unknown}"
    assert step.get("soft_fail", False) in (True, False)


def test_generated_pipeline_is_valid_buildkite_yaml(gen, generated):
    from tpu_plugin import envs

    assert set(generated) == {"steps"} and generated["steps"]
    keys = [step["key"] for step in generated["steps"]]
    assert len(keys) == len(set(keys)), "step keys must be unique"
    for step in generated["steps"]:
        check_command_step(step, set(gen.QUEUES))
        env, queue = step["env"], step["agents"]["queue"]
        assert (
            env["TPU_PLUGIN_DEVICE"] == gen.QUEUES[queue]
            and env["TPU_PLUGIN_DEVICE"] in envs.DEVICES
        )
        assert env["TPU_PLUGIN_MODEL_IMPL"] in envs.MODEL_IMPLS
        assert step["commands"][0] == gen.SETUP_COMMAND


def test_steps_follow_models_yaml(gen, generated):
    """Every declared model x path x queue x check is a step, or a reported non-applicable
    pair; soft_fail appears exactly where models.yaml declares it."""
    raw = yaml.safe_load((BUILDKITE / "models.yaml").read_text())["models"]
    steps = {s["key"]: s for s in generated["steps"]}
    _, skipped = gen.build_steps(gen.load_models())
    for entry in raw:
        soft = entry.get("soft_fail", False)
        for path in entry["paths"]:
            for queue in entry["queues"]:
                for check in entry["checks"]:
                    key = gen.step_key(entry["arch"], path, queue, check)
                    if key not in steps:
                        assert f"{entry['arch']} {check} ({path}, {queue}): no command" in skipped
                        continue
                    declared = soft is True or (isinstance(soft, list) and queue in soft)
                    assert steps.pop(key).get("soft_fail", False) == declared, key
    assert not steps, f"steps no entry asked for: {list(steps)}"


def test_commands_use_files_and_flags_that_exist(generated):
    for step in generated["steps"]:
        for command in step["commands"]:
            argv = shlex.split(command)
            files = [a.split("::")[0] for a in argv if re.match(r"(tests|benchmarks|scripts)/", a)]
            assert files, f"{command!r} names no script or test path"
            for name in files:
                assert (ROOT / name).exists(), f"{command!r}: {name} does not exist"
            if argv[:2] == [".venv/bin/python", files[0]]:  # a script: its flags must exist
                source = (ROOT / files[0]).read_text()
                for flag in (a for a in argv if a.startswith("--")):
                    assert f'"{flag}"' in source, f"{files[0]} has no {flag}"


# slow: 52 s (collects every CI step's selection); the default suite stays under ~30 minutes
@pytest.mark.slow
def test_pytest_selections_collect_tests(generated):
    """Every pytest command collects at least one test (one process, so imports are paid once)."""
    selections = sorted(
        {
            json.dumps(shlex.split(c)[3:])
            for step in generated["steps"]
            for c in step["commands"]
            if c.startswith(".venv/bin/python -m pytest")
        }
    )
    script = textwrap.dedent(
        """
        import contextlib, io, json, sys
        import pytest
        counts = {}
        for args in json.loads(sys.argv[1]):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *json.loads(args)])
            counts[args] = sum("::" in line for line in out.getvalue().splitlines())
        print(json.dumps(counts))
        """
    )
    proc = run_script("-c", script, json.dumps(selections), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(counts) == set(selections)
    assert all(n > 0 for n in counts.values()), f"selections that pick no test: {counts}"


def test_every_registered_architecture_has_a_matrix_entry(gen):
    missing = gen.missing_architectures(gen.load_models(), gen.registered_architectures())
    assert not missing, (
        f"registered in tpu_plugin/models/registry.py but not tested by CI: {missing}; add each "
        "with `.venv/bin/python .buildkite/generate.py add-model --arch <arch> --recipe random "
        "--paths jax --queues cpu tpu-v5e tpu-v6e --checks parity`"
    )


def test_bootstrap_pipeline_lints_tests_and_uploads_the_matrix():
    pipeline = yaml.safe_load((BUILDKITE / "pipeline.yml").read_text())
    assert set(pipeline) == {"steps"}
    commands = []
    for step in pipeline["steps"]:
        check_command_step(step, {"cpu"})
        cmds = step.get("commands", step.get("command"))
        commands.append(" && ".join([cmds] if isinstance(cmds, str) else cmds))
    assert any(".venv/bin/ruff check ." in c and "ruff format --check ." in c for c in commands)
    assert any(c == "scripts/test.sh" for c in commands)
    upload = [c for c in commands if "buildkite-agent pipeline upload" in c]
    assert len(upload) == 1 and ".buildkite/generate.py > model-matrix.yml" in upload[0]
    assert upload[0].endswith("buildkite-agent pipeline upload model-matrix.yml")


@pytest.fixture
def models_copy(tmp_path) -> Path:
    """models.yaml without its Qwen2 entry, so a registered architecture can be added back."""
    text = (BUILDKITE / "models.yaml").read_text()
    copy = tmp_path / "models.yaml"
    copy.write_text(text[: text.index("  - arch: Qwen2ForCausalLM")])
    return copy


def test_add_model_command_appends_a_valid_entry(gen, models_copy):
    before = models_copy.read_text()
    proc = run_script(
        ".buildkite/generate.py", "--models", str(models_copy), "add-model",
        "--arch", "Qwen2ForCausalLM", "--recipe", "random", "--paths", "jax",
        "--queues", "cpu,tpu-v5e", "--checks", "parity", "--soft-fail", "tpu-v5e",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = models_copy.read_text()
    assert text.startswith(before), "existing entries and comments are kept"
    entry = gen.parse_models(text, "copy", None)[-1]
    assert entry == gen.ModelEntry(
        "Qwen2ForCausalLM", ("random",), ("jax",), ("cpu", "tpu-v5e"), ("parity",),
        select="qwen2", soft_fail=("tpu-v5e",),
    )  # fmt: skip
    out = run_script(".buildkite/generate.py", "--models", str(models_copy))
    steps = {s["key"]: s for s in yaml.safe_load(out.stdout)["steps"]}
    assert "soft_fail" not in steps["parity-qwen2forcausallm-jax-cpu"]
    assert steps["parity-qwen2forcausallm-jax-tpu-v5e"]["soft_fail"] is True


BASE = dict(arch="Qwen2ForCausalLM", recipes=["random"], select="qwen2", paths=["jax"])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(queues=["tpu-v4"], checks=["parity"]), "unknown queues tpu-v4; choose from: cpu"),
        (dict(queues=["cpu"], checks=["speed"]), "unknown checks speed; choose from: parity"),
        (dict(queues=["cpu"], checks=["parity"], paths=["pytorch"]), "unknown paths pytorch"),
        (dict(queues=["cpu"], checks=["parity"], arch="LlamaForCausalLM"), "already has an entry"),
        (dict(queues=["cpu"], checks=["parity"], arch="GPT2LMHeadModel"), "not in tpu_plugin"),
        (
            dict(queues=["cpu"], checks=["e2e"]),
            "check e2e has no command .* runs with: recipe smollm2 on cpu",
        ),
        (dict(queues=["cpu"], checks=["parity"], select=None), "'select' .* is required"),
        (dict(queues=["cpu"], checks=["parity"], soft_fail=["gpu-h100"]), "unknown soft_fail"),
        (dict(queues=["cpu"], checks=["parity"], timeout=0), "'timeout' must be minutes"),
        (dict(queues=["cpu"], checks=["parity"], colour="red"), "unknown keys colour"),
    ],
)
def test_add_model_rejects_bad_entries(gen, models_copy, change, message):
    before = models_copy.read_text()
    with pytest.raises(gen.MatrixError, match=message):
        gen.add_model({**BASE, **change}, models_copy, collect_check=False)
    assert models_copy.read_text() == before, "a rejected entry leaves the file untouched"


def test_add_model_rejects_a_selector_that_picks_no_test(gen, models_copy):
    raw = {**BASE, "queues": ["cpu"], "checks": ["parity"], "select": "no_such_model_xyz"}
    with pytest.raises(gen.MatrixError, match="picks no test in tests/models"):
        gen.add_model(raw, models_copy)


def test_run_local_dry_run_is_the_generators_output(generated):
    proc = run_script(".buildkite/run_local.py", "--queue", "cpu", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    cpu_steps = [s for s in generated["steps"] if s["agents"]["queue"] == "cpu"]
    assert yaml.safe_load(proc.stdout)["steps"] == cpu_steps


# slow: 68 s (runs a whole CPU step through run_local.py)
@pytest.mark.slow
def test_run_local_runs_a_cpu_step_and_records_it(tmp_path):
    """Qwen2 parity on the cpu queue, end to end (about a minute on two cores).

    ``--skip-setup``: the step's ``scripts/install.sh --no-run`` would (re)install .venv on a
    machine whose install stamp is missing; everything after it runs exactly as in CI.
    """
    matrix = tmp_path / "support_matrix.md"
    proc = run_script(
        ".buildkite/run_local.py", "--queue", "cpu", "--model", "Qwen2ForCausalLM",
        "--check", "parity", "--skip-setup", "--quiet", "--matrix", str(matrix),
        "--log-dir", str(tmp_path / "logs"), timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(matrix.with_suffix(".json").read_text())["parity-qwen2forcausallm-jax-cpu"]
    assert record["result"] == "pass" and record["duration_s"] > 0 and record["setup"] == "skipped"
    page = matrix.read_text()
    assert re.search(
        r"\| Qwen2ForCausalLM \| parity \| jax \| cpu, .* \| pass \(cpu\)\* \| 20", page
    )
    assert "| LlamaForCausalLM | parity | jax |" in page and "not run" in page
    assert "2 passed" in (tmp_path / "logs" / "parity-qwen2forcausallm-jax-cpu.log").read_text()
