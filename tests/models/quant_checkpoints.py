"""Small quantized checkpoints made with the formats' own library (compressed-tensors).

A random fp32 checkpoint (``tests.conftest.make_random_checkpoint``) is loaded into HF
transformers, compressed-tensors attaches a quantization scheme to its linear layers, the weight
scales (and zero points) are computed from each weight's min/max with compressed-tensors' own
``calculate_qparams``, and ``ModelCompressor`` compresses and saves it, writing the
``quantization_config`` into config.json: the same files llm-compressor writes. HF transformers
then loads them back with its compressed-tensors integration, which is the reference the
plugin's logits and greedy tokens are compared with.
"""

from __future__ import annotations

from pathlib import Path

# name -> (weights, input activations, format); the arguments of compressed-tensors'
# QuantizationArgs
SCHEMES = {
    "fp8-w8a16": (dict(num_bits=8, type="float", strategy="channel"), None, "float-quantized"),
    "fp8-w8a8": (
        dict(num_bits=8, type="float", strategy="channel"),
        dict(num_bits=8, type="float", strategy="token", dynamic=True),
        "float-quantized",
    ),
    "fp8-w8a8-static": (
        dict(num_bits=8, type="float", strategy="tensor"),
        dict(num_bits=8, type="float", strategy="tensor", dynamic=False),
        "float-quantized",
    ),
    "int8-w8a16": (dict(num_bits=8, type="int", strategy="channel"), None, "int-quantized"),
    "int8-w8a8": (
        dict(num_bits=8, type="int", strategy="channel"),
        dict(num_bits=8, type="int", strategy="token", dynamic=True),
        "int-quantized",
    ),
    # int8 weight-only as llm-compressor writes it (W8A16 recipe): four values to an int32
    "int8-w8a16-packed": (
        dict(num_bits=8, type="int", strategy="channel"),
        None,
        "pack-quantized",
    ),
    "int4-w4a16": (
        dict(num_bits=4, type="int", strategy="group", group_size=32),
        None,
        "pack-quantized",
    ),
    "int4-w4a16-asym": (
        dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False),
        None,
        "pack-quantized",
    ),
}


def quantize_checkpoint(src: Path, dst: Path, scheme: str, calibration: list[list[int]]) -> Path:
    """``src`` (an fp32 checkpoint) quantized with ``SCHEMES[scheme]``, saved to ``dst``.

    Static activation scales are calibrated on ``calibration`` prompts (each linear layer's
    input absmax over them, as llm-compressor's observers do).
    """
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    weights, acts, fmt = SCHEMES[scheme]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    config = QuantizationConfig(
        config_groups={
            "group_0": QuantizationScheme(
                targets=["Linear"],
                weights=QuantizationArgs(**weights),
                input_activations=QuantizationArgs(**acts) if acts else None,
            )
        },
        ignore=["lm_head"],
        format=fmt,
        quantization_status=QuantizationStatus.FROZEN,
    )
    apply_quantization_config(model, config)
    absmax: dict[str, float] = {}
    hooks = []
    if acts and not acts.get("dynamic", False):
        for name, module in model.named_modules():
            if getattr(module, "quantization_scheme", None) is not None:

                def hook(module, args, name=name):
                    absmax[name] = max(absmax.get(name, 0.0), float(args[0].abs().max()))

                hooks.append(module.register_forward_pre_hook(hook))
        # calibrate unquantized: the hooks see full-precision inputs
        with torch.no_grad(), _disabled_quantization(model):
            for prompt in calibration:
                model(torch.tensor([prompt]))
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme_of = getattr(module, "quantization_scheme", None)
            if scheme_of is None:
                continue
            args = scheme_of.weights
            w = module.weight
            if args.strategy == "group":
                groups = w.reshape(w.shape[0], -1, args.group_size)
                lo, hi = groups.amin(-1), groups.amax(-1)
            elif args.strategy == "channel":
                lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
            else:
                lo, hi = w.amin().reshape(1), w.amax().reshape(1)
            scale, zero = calculate_qparams(lo, hi, args)
            module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(
                module.weight_scale.shape
            )
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(
                    module.weight_zero_point.shape
                )
            if name in absmax:
                ia = scheme_of.input_activations
                bound = torch.tensor([absmax[name]])
                s, _ = calculate_qparams(-bound, bound, ia)
                module.input_scale.data = s.to(module.input_scale.dtype).reshape(
                    module.input_scale.shape
                )
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(dst)
    compressor.update_config(str(dst))
    return dst


class _disabled_quantization:
    """Runs the model with compressed-tensors' fake quantization off (calibration)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        from compressed_tensors.quantization import disable_quantization

        self.model.apply(disable_quantization)

    def __exit__(self, *exc):
        from compressed_tensors.quantization import enable_quantization

        self.model.apply(enable_quantization)
