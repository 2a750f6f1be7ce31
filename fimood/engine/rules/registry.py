"""The one table of norm rules, filled by the `register_rule` decorator."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

# (module, inputs, outputs, grad_outputs) -> {own parameter name: (B,) squared norm of its per-sample gradient}
NormRule = Callable[[nn.Module, tuple, tuple[Tensor, ...], tuple[Tensor | None, ...]], dict[str, Tensor]]

RULES: dict[type[nn.Module], NormRule] = {}
# What a rule reads besides the output gradients: "inputs" or "outputs". The engine keeps only that
# alive until the rule runs, so peak memory stays near a plain backward pass.
RULE_READS: dict[type[nn.Module], str] = {}


def register_rule(*module_types: type[nn.Module], reads: str = "inputs") -> Callable[[NormRule], NormRule]:
    """Register `fn` as the norm rule for exactly these module types (subclasses need their own entry)."""
    if reads not in ("inputs", "outputs"):
        raise ValueError(f"reads must be 'inputs' or 'outputs', got {reads!r}")

    def add(fn: NormRule) -> NormRule:
        for module_type in module_types:
            RULES[module_type] = fn
            RULE_READS[module_type] = reads
        return fn

    return add


def trainable(module: nn.Module, name: str) -> bool:
    """True when the module has a parameter `name` that needs a feature (present and requires_grad)."""
    param = getattr(module, name, None)
    return isinstance(param, nn.Parameter) and param.requires_grad
