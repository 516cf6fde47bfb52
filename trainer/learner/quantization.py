"""Quantization-aware training of the student (`model.quantization`), through torchao's QAT: every
linear layer but the LM head gets its weights fake-quantized in the forward (quantize to integers
group by group, dequantize back) and a straight-through gradient in the backward, so the master
weights stay in full precision and learn what survives quantization. What the engines serve, and
what a checkpoint's `quantized/` export holds, is those quantized weights, dequantized to the
compute dtype: the exact values the learner's forward used.

The LM head stays in full precision (as in most weight-only schemes): with tied embeddings, as in
the toy model, it is the embedding matrix.
"""

import torch

from core.errors import ConfigError
from trainer.config.sections import QuantizationConfig

BITS = {"int8": torch.int8, "int4": torch.int4, "int2": torch.int2}


def _quantized_linear(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")


def prepare(model: torch.nn.Module, cfg: QuantizationConfig) -> torch.nn.Module:
    """Swaps every quantized linear layer for torchao's fake-quantized one, in place; returns the model."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    for name, module in model.named_modules():
        if _quantized_linear(module, name) and module.in_features % cfg.group_size:
            raise ConfigError(f"model.quantization.group_size: {cfg.group_size} does not divide the input size "
                              f"{module.in_features} of {name}")
    weights = IntxFakeQuantizeConfig(BITS[cfg.scheme], group_size=cfg.group_size, is_symmetric=True)
    quantize_(model, QATConfig(weight_config=weights, step="prepare"), filter_fn=_quantized_linear)
    return model


@torch.no_grad()
def quantized_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` (the model's, by checkpoint name) with each fake-quantized layer's weight
    replaced by its quantized value, dequantized: the weights the forward computes with."""
    out = dict(state_dict)
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_fake_quantizer", None)
        if quantizer is not None and f"{name}.weight" in out:
            out[f"{name}.weight"] = quantizer(module.weight).detach().to("cpu", copy=True)
    return out
