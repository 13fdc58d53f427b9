"""bf16 vs int8 / fp8 weights: plugin decode tok/s on the Llama-3-8B shape, one GPU call.

    python3 benchmarks/bench_quantized.py [--smoke] [--batches 1 32]
        [--schemes bf16 int8-w8a16 int8-w8a8 fp8]   (default: bf16 int8-w8a16 fp8)

1. copy bandwidth of the GPU (the roofline's bandwidth, gpu_suite.copy_bandwidth);
2. a Llama-3-8B-shaped bf16 checkpoint with random weights (gpu_suite.write_checkpoint), and
   from it compressed-tensors INT8 checkpoints quantized on the GPU (int8 weights, one
   float32 scale per output row, lm_head kept bf16): ``int8-w8a16`` (pack-quantized, the
   format llm-compressor writes for INT8 weight-only and the one vLLM's parser takes) and
   ``int8-w8a8`` (int-quantized, activations int8 per token at run time: its W8A8 recipe);
3. the plugin through ``vllm.LLM`` on each: ``bf16`` (the reference, same run), the INT8
   checkpoints (read from their config.json) and ``fp8`` (the bf16 checkpoint with
   ``quantization="fp8"``: e4m3 weights made at load, weight-only); decode tok/s timed by
   ``decode_timing.time_decode`` (a warm-up, then timed runs repeated until they compile nothing);
4. the HBM roofline per scheme: (weight bytes a decode step reads at that scheme's width +
   the bf16 KV bytes) / copy bandwidth.

The table prints last; partial results go to $OUT/bench_quantized.json after each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_suite  # noqa: E402  (sets TPU_PLUGIN_DEVICE=gpu before vLLM is imported)

RESULTS = gpu_suite.RESULTS
PLAN_CONFIG = "examples/plan_configs/llama-3-8b-int8-w8a8.json"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# llm-compressor's W8A8 INT8 recipe as config.json holds it (int8 weights, a scale per row,
# int8 activations per token; vLLM's parser refuses int8 weights in the int-quantized format
# without activations): the planner's example config carries the same entry
INT8_W8A8 = json.load(
    open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", PLAN_CONFIG))
)["quantization_config"]


def save() -> None:
    with open(os.path.join(gpu_suite.OUT, "bench_quantized.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def int8_w8a16_config() -> dict:
    """INT8 weight-only as llm-compressor writes it: pack-quantized, four values an int32."""
    group = dict(INT8_W8A8["config_groups"]["group_0"], format="pack-quantized")
    group.pop("input_activations")
    return dict(INT8_W8A8, format="pack-quantized", config_groups={"group_0": group})


def write_int8_checkpoint(src: str, dst: str, packed: bool = False) -> int:
    """``src`` (bf16) with every decoder linear weight as int8 + per-row scale
    (``max|w| / 127``, compressed-tensors' channel scheme); returns the weight bytes.
    ``packed``: W8A16 in the pack-quantized format (``weight_packed``, four values to an int32
    by compressed-tensors' ``pack_to_int32``), else W8A8."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = int8_w8a16_config() if packed else INT8_W8A8
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    total, weight_map = 0, {}
    shards = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))
    for name in shards:
        shard = {}
        for key, tensor in load_file(os.path.join(src, name)).items():
            module = key.rpartition(".")[0]
            if key.endswith(".weight") and module.rpartition(".")[2] in LINEAR:
                w = tensor.to(device, torch.float32)
                scale = w.abs().amax(dim=1, keepdim=True) / 127.0
                q = torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8)
                shard[f"{module}.weight_scale"] = scale.cpu()
                if packed:  # the format's own packer (its wheel travels to the device)
                    shard[f"{module}.weight_packed"] = pack_to_int32(q, 8).cpu()
                    shard[f"{module}.weight_shape"] = torch.tensor(list(q.shape))
                else:
                    shard[key] = q.cpu()
            else:
                shard[key] = tensor
        save_file(shard, os.path.join(dst, name))
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def read_bytes_per_step(config, scheme: str) -> int:
    """Weight bytes one decode step reads: the decoder's linear weights at the scheme's width
    (1 byte for int8 / fp8, plus a float32 scale per row), the bf16 lm_head and norms; the
    input embedding is gathered, not read."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    rows = layers * (2 * h + 2 * kv + 2 * i + h)
    width, scales = (2, 0) if scheme == "bf16" else (1, 4 * rows)
    norms = (2 * layers + 1) * h * 2
    return linear * width + scales + config.vocab_size * h * 2 + norms


def roofline(config, scheme: str, batch: int, context: float, bw: float) -> float:
    head_dim = config.hidden_size // config.num_attention_heads
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
    return batch / ((read_bytes_per_step(config, scheme) + batch * context * kv_bytes) / bw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2-layer model, small shapes")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument(
        "--schemes",
        nargs="+",
        choices=("bf16", "int8-w8a16", "int8-w8a8", "fp8"),
        default=["bf16", "int8-w8a16", "fp8"],
    )
    args = parser.parse_args()
    # The warm-up run compiles the few step shapes decode uses: start-up's full precompile
    # (103 programs, 76 s on the H200 host) left no time for the second engine in one call.
    os.environ.setdefault("TPU_PLUGIN_PRECOMPILE", "0")
    batches = args.batches or ([1, 4] if args.smoke else [1, 32])
    prompt_len, new_tokens = (64, 32) if args.smoke else (512, 128)

    bw = gpu_suite.copy_bandwidth()
    RESULTS["copy_bw_bytes_s"] = bw
    config = gpu_suite.llama_config(args.smoke)
    bf16_dir = "/tmp/llama-smoke" if args.smoke else "/tmp/llama-3-8b-random"
    int8_dirs = {scheme: f"{bf16_dir}-{scheme}" for scheme in ("int8-w8a16", "int8-w8a8")}
    start = time.perf_counter()
    RESULTS["weight_bytes_bf16"] = gpu_suite.write_checkpoint(bf16_dir, config)
    for scheme, path in int8_dirs.items():
        if scheme in args.schemes:
            packed = scheme == "int8-w8a16"
            RESULTS[f"weight_bytes_{scheme}"] = write_int8_checkpoint(bf16_dir, path, packed)
    RESULTS["checkpoints_s"] = time.perf_counter() - start
    save()
    engines = {
        "bf16": (bf16_dir, {}),
        "int8-w8a16": (int8_dirs["int8-w8a16"], {}),
        "int8-w8a8": (int8_dirs["int8-w8a8"], {}),
        "fp8": (bf16_dir, {"quantization": "fp8"}),
    }
    for scheme in args.schemes:
        path, engine = engines[scheme]
        try:
            gpu_suite.bench_plugin(
                path,
                batches,
                prompt_len,
                new_tokens,
                config.vocab_size,
                label=scheme,
                profile=False,
                **engine,
            )
        except Exception as error:  # the other schemes' rows still print
            RESULTS[f"{scheme}_error"] = f"{type(error).__name__}: {str(error)[:400]}"
            print(scheme, "failed:", RESULTS[f"{scheme}_error"], flush=True)
        save()

    context = prompt_len + new_tokens / 2
    print(
        f"\ncopy bandwidth {bw / 1e12:.2f} TB/s; prompts {prompt_len}, {new_tokens} new tokens; "
        "weights read per step: "
        + ", ".join(f"{s} {read_bytes_per_step(config, s) / 1e9:.2f} GB" for s in args.schemes)
    )
    print("| batch | scheme | decode tok/s | vs bf16 | roofline tok/s | % of roofline |")
    print("|---|---|---|---|---|---|")
    for batch in batches:
        reference = RESULTS.get(f"bf16@{batch}", {}).get("decode_tok_s")
        for scheme in args.schemes:
            roof = roofline(config, scheme, batch, context, bw)
            got = RESULTS.get(f"{scheme}@{batch}", {}).get("decode_tok_s")
            if got is None:
                print(f"| {batch} | {scheme} | failed | - | {roof:.0f} | - |")
                continue
            ratio = f"{got / reference:.2f}x" if reference else "-"
            share = f"{100 * got / roof:.0f}%"
            compiles = RESULTS[f"{scheme}@{batch}"]["compiles_in_timed_runs"]
            flag = f" ({compiles} compiles in the timed runs: not a figure)" if compiles else ""
            print(f"| {batch} | {scheme} | {got:.1f}{flag} | {ratio} | {roof:.0f} | {share} |")
    save()


if __name__ == "__main__":
    main()
