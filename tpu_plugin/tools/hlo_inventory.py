"""The kernels of one compiled step program, named: what each is, where its ops come from.

A decode step's time on a memory-bound accelerator is the bytes it moves plus a fixed cost per
kernel launch (a few microseconds each on a GPU), so the number of kernels per layer is a
quantity to watch like the bytes. This module reads a compiled program's optimized HLO
(``compiled.as_text()``, or the ``*after_optimizations.txt`` file of an ``--xla_dump_to``
dump) and lists its top-level instructions, the ones a backend launches as kernels (fusions,
library calls, custom calls such as the Pallas kernels, copies, collectives, loops), each with

- ``role``: what it does, from its opcode and the source of its ops (``matmul``, ``attention``,
  ``rmsnorm``, ``rope``, ``kv_write``, ``qkv_split``, ``relayout``, ...; :func:`classify`),
- ``sources``: the innermost plugin function of each op inside it (the HLO's stack frames, which
  JAX records per op: ``RMSNorm.__call__``, ``apply_rope``, ``write_kv_pages``, ...),
- ``weights``: the parameters it reads (the jitted function's argument names).

:func:`tpu_plugin.tools.hlo_trace.join_trace` adds a profiler trace's time per kernel (events
carry the HLO instruction name as their ``hlo_op`` stat on GPU), so every kernel of a step is
named and timed.
Used by ``benchmarks/decode_hlo.py`` and ``benchmarks/step_profile.py``; tested in
``tests/tools/test_hlo_inventory.py``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

# Instructions that launch nothing: values, views and bookkeeping.
_FREE = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
    "domain",
}
# Ops that do no work of their own; they do not vote on a kernel's role.
_TRIVIAL = _FREE | {"broadcast", "reshape", "iota", "fusion"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_LOOPS = ("while", "conditional", "call")
# Innermost source function (HLO stack frame) -> role, first match wins (see classify).
_SOURCE_ROLES = (
    ("write_kv_pages", "kv_write"),
    ("apply_rope", "rope"),
    ("RotaryEmbedding", "rope"),
    ("RMSNorm", "rmsnorm"),
    ("rms_norm", "rmsnorm"),
    ("SelfAttention._project", "qkv_split"),  # slicing the fused q/k/v result apart
    ("ragged_paged_attention", "attention"),
    ("paged_attention", "attention"),
    ("GatedMLP", "activation"),
    ("activation", "activation"),
    ("sample", "sampler"),
    ("Embedding", "embedding"),
    ("DecoderLayer", "residual"),
    ("token_layout", "step_metadata"),
    ("query_blocks", "step_metadata"),
    ("merge_prev_tokens", "step_metadata"),
    ("compute_logits", "logits"),
)
# Helpers whose ops belong to their caller's role (a fused projection's slicing of its result).
_TRANSPARENT = ("Fusion.", "FusedLinear.")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[^\s=]+)\s*=\s*(?P<rest>.*)$")
_HEADER = re.compile(r"^(?P<entry>ENTRY\s+)?%(?P<name>[^\s(]+)\s*\(.*\{\s*$")
_TABLE_ROW = re.compile(r"^(\d+)\s+(.*)$")


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    text: str  # the full line, for attributes

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=(%?[\w.\-]+|\"[^\"]*\")", self.text)
        return m.group(1).strip('"').lstrip("%") if m else None

    @property
    def stack_frame(self) -> int | None:
        m = re.search(r"stack_frame_id=(\d+)", self.text)
        return int(m.group(1)) if m else None

    @property
    def op_name(self) -> str | None:
        m = re.search(r'op_name="((?:[^"\\]|\\.)*)"', self.text)
        return m.group(1) if m else None

    @property
    def operands(self) -> list[str]:
        head = self.text.split(f" {self.opcode}(", 1)
        if len(head) < 2:
            return []
        depth, out = 1, []
        for i, ch in enumerate(head[1]):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                out = re.findall(r"%([\w.\-]+)", head[1][:i])
                break
        return out


@dataclasses.dataclass
class Kernel:
    """One launched instruction of the program and what it is made of."""

    name: str
    opcode: str  # "fusion", "custom-call", "copy", "while", ...
    kind: str  # fusion kind (kLoop, kInput, kOutput, kCustom) or custom-call target; "" else
    role: str
    sources: tuple[str, ...]  # innermost plugin functions of its ops
    weights: tuple[str, ...]  # parameters it reads
    ops: dict[str, int]  # opcode -> count inside it (fused computation or loop body)
    inner_kernels: int = 0  # for loops: kernels launched inside the body per iteration
    children: tuple[str, ...] = ()  # for loops: those kernels' names (a trace names them)


class HloModule:
    """The computations of one optimized HLO text, and its stack-frame tables."""

    def __init__(self, text: str):
        self.computations: dict[str, list[Instruction]] = {}
        self.entry = ""
        self._frames: dict[int, tuple[int, int]] = {}  # frame -> (location, parent)
        self._locations: dict[int, tuple[str, str, int]] = {}  # -> (file, function, line)
        tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
        table, current = None, None
        for line in text.splitlines():
            if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                table = line
                continue
            if table and _TABLE_ROW.match(line):
                key, value = _TABLE_ROW.match(line).groups()
                tables[table][int(key)] = value
                continue
            table = None if not line.strip() or line.startswith(("%", "ENTRY")) else table
            header = _HEADER.match(line)
            if header:
                current = header.group("name")
                self.computations[current] = []
                if header.group("entry"):
                    self.entry = current
                continue
            if line.startswith("}"):
                current = None
                continue
            m = _INSTR.match(line)
            if m and current is not None:
                self.computations[current].append(Instruction(m["name"], _opcode(m["rest"]), line))
        files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
        functions = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
        for key, value in tables["FileLocations"].items():
            fields = dict(re.findall(r"(\w+)=(\d+)", value))
            self._locations[key] = (
                files.get(int(fields.get("file_name_id", 0)), "?"),
                functions.get(int(fields.get("function_name_id", 0)), "?"),
                int(fields.get("line", 0)),
            )
        for key, value in tables["StackFrames"].items():
            fields = dict(re.findall(r"(\w+)=(\d+)", value))
            self._frames[key] = (
                int(fields.get("file_location_id", 0)),
                int(fields.get("parent_frame_id", 0)),
            )

    def source(self, frame: int | None) -> str | None:
        """The innermost function of the plugin (``tpu_plugin/`` or ``kernels/``) on ``frame``'s
        stack; JAX's own frames are skipped."""
        seen = set()
        while frame and frame not in seen:
            seen.add(frame)
            location, parent = self._frames.get(frame, (0, 0))
            file, function, _ = self._locations.get(location, ("?", "?", 0))
            ours = "/tpu_plugin/" in file or "/kernels/" in file or "tpu_kernels" in file
            if ours and not function.startswith(_TRANSPARENT):
                return function
            frame = parent if parent != frame else 0
        return None

    def called(self, instruction: Instruction) -> list[str]:
        """Computations an instruction runs (fusion body, loop body and condition, branches)."""
        names = []
        for key in ("calls", "body", "condition", "to_apply"):
            value = instruction.attr(key)
            if value and value in self.computations:
                names.append(value)
        m = re.search(r"branch_computations=\{([^}]*)\}", instruction.text)
        if m:
            names += [n.strip().lstrip("%") for n in m.group(1).split(",")]
        return names


def _opcode(rest: str) -> str:
    """The opcode after an instruction's result type (which may be a parenthesised tuple)."""
    end = rest.find(" ")
    if rest.startswith("("):
        depth = 0
        for end, ch in enumerate(rest, start=1):  # noqa: B007 (the end is used after)
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
    m = re.match(r"\s*([\w\-]+)\(", rest[end:])
    return m.group(1) if m else "?"


def _inner(module: HloModule, names: Iterable[str]) -> list[Instruction]:
    """Every instruction of ``names`` and of the computations they call (fusions nest)."""
    out, stack, seen = [], list(names), set()
    while stack:
        name = stack.pop()
        if name in seen or name not in module.computations:
            continue
        seen.add(name)
        for instr in module.computations[name]:
            out.append(instr)
            if instr.opcode == "fusion":
                stack += module.called(instr)
    return out


def source_role(source: str) -> str | None:
    """The role an op has by its innermost plugin function, if that function has one."""
    for needle, role in _SOURCE_ROLES:
        if needle in source:
            return role
    return None


def _loop_body(module: HloModule, names: list[str]) -> list[Instruction]:
    """The launched instructions of a loop's (or call's) computations, nested loops included."""
    out, stack, seen = [], list(names), set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for instr in module.computations.get(name, []):
            if instr.opcode in _FREE or instr.opcode.endswith("-done"):
                continue
            out.append(instr)
            if instr.opcode in _LOOPS:
                stack += module.called(instr)
    return out


def classify(opcode: str, kind: str, ops: dict[str, int], sources: dict[str, int]) -> str:
    """The role of a kernel from its opcode, what it contains and where its ops come from.

    Matmuls and custom calls first (a matmul fusion that also holds a norm's epilogue is still
    the matmul), then collectives and loops, then the role most of its ops' source functions
    have (``sources``: function -> ops), then plain copies.
    """
    target = kind.lower()
    if opcode == "custom-call":
        if "tpu_custom_call" in target or "triton" in target or "mosaic" in target:
            return "pallas"
        if "gemm" in target or "matmul" in target or "cublas" in target:
            return "matmul"
        return "custom-call"
    if opcode.startswith(_COLLECTIVES):
        return "collective"
    if opcode.endswith("-start"):  # TPU: an asynchronous DMA (copy or slice between memories)
        return "async_copy"
    if opcode in _LOOPS:
        return "attention" if any("attention" in s for s in sources) else "loop"
    if opcode in ("dot", "convolution") or ops.get("dot") or ops.get("convolution"):
        return "matmul"
    if "triton_gemm" in kind or "cublas" in target:
        return "matmul"
    votes: collections.Counter[str] = collections.Counter()
    for source, n in sources.items():
        role = source_role(source)
        if role is not None:
            votes[role] += n
    if votes:
        return votes.most_common(1)[0][0]
    if opcode in ("copy", "transpose") or set(ops) <= {"copy", "transpose"}:
        return "relayout"
    for op in ("scatter", "gather", "concatenate", "reduce"):
        if ops.get(op) or opcode == op:
            return op
    return "other"


def copies_of(text: str, shapes: Iterable[Sequence[int]]) -> int:
    """How many ``copy`` instructions of optimized HLO text produce an array of one of
    ``shapes`` (any element type, any layout): a buffer the compiler could not update in place,
    e.g. MoE offload's expert cache (``benchmarks/offload_cache_copies.py``)."""
    total = 0
    for shape in shapes:
        dims = ",".join(map(str, shape))
        total += len(re.findall(r"= \w+\[" + dims + r"\]\S* copy\(", text))
    return total


def inventory(text: str) -> list[Kernel]:
    """The launched instructions of the entry computation, in program order (module doc)."""
    module = HloModule(text)
    params = {
        i.name: (i.op_name or i.name)
        for i in module.computations.get(module.entry, [])
        if i.opcode == "parameter"
    }
    # A bitcast of a parameter (a 2-D view of a fused weight) launches nothing: its readers
    # read the parameter.
    for i in module.computations.get(module.entry, []):
        if i.opcode == "bitcast" and i.operands and i.operands[0] in params:
            params[i.name] = params[i.operands[0]]
    kernels = []
    for instr in module.computations.get(module.entry, []):
        # An asynchronous op's "-done" half waits for its "-start": one launch, counted once.
        if instr.opcode in _FREE or instr.opcode.endswith("-done"):
            continue
        called = module.called(instr)
        inner = _inner(module, called)
        ops = collections.Counter(i.opcode for i in inner if i.opcode not in _FREE)
        counted = [i for i in [instr, *inner] if i.opcode not in _TRIVIAL]
        source_ops = collections.Counter(
            s for i in counted if (s := module.source(i.stack_frame)) is not None
        )
        sources = sorted(source_ops)
        kind = instr.attr("kind") or instr.attr("custom_call_target") or ""
        if instr.opcode == "fusion" and '"kind":"__triton_gemm"' in instr.text:
            kind = "__triton_gemm"
        weights = tuple(
            _short(params[o]) for o in instr.operands if o in params and "params" in params[o]
        )
        body = _loop_body(module, called) if instr.opcode in _LOOPS else []
        kernels.append(
            Kernel(
                name=instr.name,
                opcode=instr.opcode,
                kind=kind,
                role=classify(instr.opcode, kind, ops, source_ops),
                sources=tuple(sources),
                weights=weights,
                ops=dict(ops),
                inner_kernels=len(body),
                children=tuple(i.name for i in body),
            )
        )
    return kernels


def _short(op_name: str) -> str:
    """``params['model']['layers'][0]['mlp']['gate_proj']['weight'].value`` ->
    ``model.layers.0.mlp.gate_proj.weight``."""
    parts = re.findall(r"\[\\?'?([^\]\\']+)\\?'?\]", op_name)
    return ".".join(parts) if parts else op_name


def summary(kernels: list[Kernel], num_layers: int) -> dict:
    """Counts by role, per program and per layer (a role's count / ``num_layers``); TPU's
    asynchronous DMAs (``async_copy``) are counted apart from the kernels."""
    roles = collections.Counter(k.role for k in kernels)
    return {
        "kernels": sum(n for role, n in roles.items() if role != "async_copy"),
        "per_layer": round(len(kernels) / max(1, num_layers), 2),
        "roles": dict(sorted(roles.items(), key=lambda kv: -kv[1])),
        "roles_per_layer": {
            role: round(n / max(1, num_layers), 2)
            for role, n in sorted(roles.items(), key=lambda kv: -kv[1])
        },
        "matmul_weights": sorted(
            {".".join(w.split(".")[-2:]) for k in kernels if k.role == "matmul" for w in k.weights}
        ),
    }


def per_layer(small: list[Kernel], small_layers: int, big: list[Kernel], big_layers: int) -> dict:
    """Exact kernels per decoder layer, by role: the difference between two compiles of the
    same model with ``small_layers`` and ``big_layers`` layers, divided by the difference
    (what does not repeat per layer, such as the embedding or the step's metadata, cancels)."""
    a = collections.Counter(k.role for k in small)
    b = collections.Counter(k.role for k in big)
    span = big_layers - small_layers
    roles = {r: (b[r] - a[r]) / span for r in sorted(set(a) | set(b)) if b[r] != a[r]}
    fixed = {r: a[r] - small_layers * roles.get(r, 0.0) for r in a}
    return {
        "per_layer": dict(sorted(roles.items(), key=lambda kv: -kv[1])),
        "kernels_per_layer": sum(v for r, v in roles.items() if r != "async_copy"),
        "outside_layers": {r: v for r, v in sorted(fixed.items(), key=lambda kv: -kv[1]) if v},
    }


def format_table(kernels: list[Kernel], num_layers: int, title: str) -> str:
    """A markdown table of the roles: count per program and per layer, and their sources."""
    by_role: dict[str, list[Kernel]] = collections.defaultdict(list)
    for k in kernels:
        by_role[k.role].append(k)
    launched = len(kernels) - len(by_role.get("async_copy", []))
    lines = [
        f"{title}: {launched} kernels ({launched / max(1, num_layers):.1f} per layer, "
        f"{num_layers} layers) + {len(by_role.get('async_copy', []))} async copies",
        "",
        "| role | kernels | per layer | made of (innermost plugin functions) |",
        "|---|---|---|---|",
    ]
    for role, items in sorted(by_role.items(), key=lambda kv: -len(kv[1])):
        sources = collections.Counter(s for k in items for s in k.sources)
        made = ", ".join(s for s, _ in sources.most_common(4)) or "-"
        lines.append(f"| {role} | {len(items)} | {len(items) / max(1, num_layers):.1f} | {made} |")
    return "\n".join(lines)


def format_per_layer(delta: dict, title: str) -> str:
    """The exact per-layer counts of :func:`per_layer` as a markdown table."""
    lines = [
        f"{title}: {delta['kernels_per_layer']:.1f} kernels per layer",
        "",
        "| role | per layer |",
        "|---|---|",
    ]
    lines += [f"| {role} | {n:g} |" for role, n in delta["per_layer"].items()]
    return "\n".join(lines)


# ---- one decode program of the engine, compiled (CPU/GPU devices here, or a TPU topology) ----


def decode_engine(
    options: Any, *, batch: int, context: int, topology: str | None = None
) -> tuple[Any, Any, Any]:
    """``(engine, step, lower)``: the engine's runner with abstract parameters
    (:class:`tpu_plugin.tools.tpu_aot.AbstractEngine`), an abstract decode step of ``batch``
    sequences at ``context`` tokens of KV, and a function lowering the runner's own forward
    for it. ``topology`` (``v6e:1x1``) compiles for TPU with the Mosaic kernels; None for this
    process's devices with the kernels this backend runs. Call inside
    :func:`tpu_plugin.tools.tpu_aot.tpu_kernels` for a topology.
    """
    import jax
    import numpy as np

    from tpu_plugin.runner import compile as buckets_of
    from tpu_plugin.tools import plan as planner
    from tpu_plugin.tools import tpu_aot

    tp = options.tensor_parallel_size
    devices = tpu_aot.topology_devices(topology) if topology else jax.devices()
    engine = tpu_aot.AbstractEngine(tpu_aot.engine_config(options), devices[:tp])
    runner = engine.runner
    pages_per_seq = -(-context // runner.block_size)
    engine.set_kv(batch * pages_per_seq + 2)
    bucket = planner._decode_bucket(runner, batch, context)
    async_scheduling = engine.vllm_config.scheduler_config.async_scheduling
    prev = np.zeros(runner.max_num_seqs, np.int32) if async_scheduling else None
    step = buckets_of.dummy_step(bucket, engine.num_blocks, runner.block_size, prev)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=engine.plan.replicated), step
    )
    lower = engine._lowering(engine.forward.lower, engine.params, engine.kv_caches, abstract)
    return engine, step, lower


def with_layers(model: str, layers: int) -> str:
    """A temporary directory holding ``model``'s config with ``layers`` decoder layers (and
    its per-layer lists cut to match), for :func:`per_layer`; no weights are needed."""
    import json
    import os
    import tempfile

    from tpu_plugin.tools import tpu_aot

    with open(os.path.join(tpu_aot.model_directory(model), "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] = layers
    for key in ("layer_types", "mlp_only_layers"):
        if isinstance(config.get(key), list) and key == "layer_types":
            config[key] = config[key][:layers]
    directory = tempfile.mkdtemp(prefix="hlo-inventory-")
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return directory


def compile_inventory(
    model: str, args: argparse.Namespace, layers: int | None = None
) -> tuple[list[Kernel], int, str]:
    """``(kernels, num_layers, hlo text)`` of one decode program of ``model`` (``layers``:
    with that many decoder layers)."""
    import contextlib

    from tpu_plugin.tools import tpu_aot

    options = tpu_aot.EngineOptions(
        model=with_layers(model, layers) if layers else model,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_model_len or 2 * args.context,
        max_num_seqs=max(args.batch, 1),
        max_num_batched_tokens=max(args.batch, 16),
        dtype=args.dtype,
    )
    kernels_of = tpu_aot.tpu_kernels() if args.topology else contextlib.nullcontext()
    with kernels_of:
        engine, _, lower = decode_engine(
            options, batch=args.batch, context=args.context, topology=args.topology
        )
        text = lower().compile().as_text()
    return inventory(text), engine.runner.num_layers, text


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tpu_plugin.tools.hlo_inventory", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", required=True, help="checkpoint directory or config JSON")
    parser.add_argument("--topology", default=None, help="TPU topology (v6e:1x1); default: here")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--layers",
        type=int,
        nargs=2,
        default=None,
        metavar=("A", "B"),
        help="compile with A and B decoder layers and print the exact per-layer counts",
    )
    parser.add_argument("--hlo", default=None, help="write the optimized HLO text here")
    parser.add_argument("--json", default=None, help="write the inventory (every kernel) here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import json

    args = parse_args(argv)
    if args.topology:  # as the planner: this host's own backend is its CPU (tools/plan.py)
        import jax

        from tpu_plugin import envs

        envs.default_device("cpu")
        jax.config.update("jax_platforms", "cpu")
    where = args.topology or "this host's backend"
    title = f"decode batch {args.batch} at context {args.context}, {where}"
    out: dict[str, Any] = {}
    if args.layers:
        (a, la, _), (b, lb, text) = (compile_inventory(args.model, args, n) for n in args.layers)
        delta = per_layer(a, la, b, lb)
        print(format_per_layer(delta, title))
        out["per_layer"] = delta
        kernels, layers = b, lb
    else:
        kernels, layers, text = compile_inventory(args.model, args)
    print(format_table(kernels, layers, title))
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(text)
    if args.json:
        out |= {
            "summary": summary(kernels, layers),
            "kernels": [dataclasses.asdict(k) for k in kernels],
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
