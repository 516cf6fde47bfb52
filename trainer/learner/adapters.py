"""LoRA adapters through `peft`: wrapping the student, the EMA teacher's adapter, and what leaves
the learner (the adapter alone, or the merged weights under the base model's names).

The student's adapter is peft's `default`. An EMA teacher is a second adapter, `ema`, on the same
frozen base, so the learner holds one copy of the base weights whatever the teacher is:
`initial` = the base with no adapter, `ema` = the base with `ema`, `live` = the base with `default`.
Teacher forwards select their adapter per call through peft's `adapter_names` argument (no adapter
switching, so nothing changes which parameters train), and always run with dropout off.
"""

import contextlib
from dataclasses import dataclass

import torch

from trainer.config import LoraConfig

STUDENT = "default"
EMA = "ema"
BASE = "__base__"  # peft's name for "no adapter" in `adapter_names`
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class AdapterPayload:
    """What an adapter-only sync sends: peft's config and its state dict (peft names, no adapter name)."""

    config: object
    """A `peft.LoraConfig`."""
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def save(self, directory: str) -> None:
        """Writes peft's on-disk format (`adapter_config.json`, `adapter_model.safetensors`)."""
        from safetensors.torch import save_file
        self.config.save_pretrained(directory)
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, f"{directory}/adapter_model.safetensors")


def peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    targets = cfg.target_modules
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none", task_type="CAUSAL_LM",
                          target_modules="all-linear" if targets == ["all-linear"] else list(targets))


def wrap(model, cfg: LoraConfig, ema: bool):
    """The student as a `PeftModel` (base frozen, adapter `default` trainable); with `ema`, a second,
    frozen adapter `ema` that starts equal to the student's."""
    from peft import get_peft_model
    model = get_peft_model(model, peft_config(cfg))
    if ema:
        model.add_adapter(EMA, peft_config(cfg))
        with torch.no_grad():
            for phi, theta in zip(adapter_parameters(model, EMA), adapter_parameters(model, STUDENT), strict=True):
                phi.copy_(theta)
                phi.requires_grad_(False)
    return model


def adapter_parameters(model, adapter: str) -> list[torch.nn.Parameter]:
    """The adapter's parameters in a fixed order (peft keys them `...lora_A.<adapter>.weight`)."""
    return [p for name, p in model.named_parameters() if f".{adapter}." in name and "lora_" in name]


def teacher_adapter(weights: str) -> str:
    """Which adapter plays the teacher on the learner: the base (`initial`), `ema`, or the student (`live`)."""
    return {"initial": BASE, "ema": EMA, "live": STUDENT}[weights]


@contextlib.contextmanager
def adapter_dropout(model, on: bool):
    """Switches the student adapter's dropout modules to training mode for one forward (the rest of the
    model stays in eval mode: its own dropout is off, see `Learner.train_step`)."""
    modules = [m for name, m in model.named_modules() if name.endswith(f"lora_dropout.{STUDENT}")]
    for m in modules:
        m.train(on)
    try:
        yield
    finally:
        for m in modules:
            m.train(False)


def adapter_payload(model, adapter: str) -> AdapterPayload:
    """The adapter's weights (CPU copies) and config, in the form peft saves and vLLM loads."""
    from peft import get_peft_model_state_dict
    tensors = get_peft_model_state_dict(model, adapter_name=adapter)
    return AdapterPayload(config=model.peft_config[adapter],
                          tensors={k: v.detach().to("cpu", copy=True) for k, v in tensors.items()})


@torch.no_grad()
def merged_state_dict(model, adapter: str) -> dict[str, torch.Tensor]:
    """Base weights + the adapter's delta (peft's `get_delta_weight`), under the base model's own
    checkpoint names: what `save_pretrained` writes and vLLM reloads. Computed on copies, so the
    learner's base weights are never merged into and unmerged (which would not round-trip exactly)."""
    from peft.tuners.lora import LoraLayer
    base = model.get_base_model()
    merged = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        merged[key.replace(".base_layer.", ".")] = tensor.detach().to("cpu", copy=True)
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            weight = module.get_base_layer().weight
            merged[f"{name}.weight"] = (weight + module.get_delta_weight(adapter).to(weight.dtype)).detach().to("cpu")
    return merged


def vllm_max_lora_rank(r: int) -> int:
    """The smallest rank bound vLLM accepts that holds r."""
    for bound in VLLM_MAX_LORA_RANKS:
        if bound >= r:
            return bound
    raise ValueError(f"LoRA rank {r} is above vLLM's largest ({VLLM_MAX_LORA_RANKS[-1]})")
