"""Per-sample, per-tensor squared gradient norms inside one batched backward pass.

Forward hooks record each ruled module's inputs and outputs; one `torch.autograd.grad` call asks
for the gradients of the summed NLL with respect to those outputs (so no parameter gradient is
ever materialised); each module's rule turns them into per-sample norms. Parameters no rule can
cover exactly (no rule for the module, a module run twice, a parameter shared or also used
outside its module, an output changed in place) go to the vmap engine, and `explain` says why.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fimood.engine.result import GradNorms, trainable_parameters
from fimood.engine.rules import RULES
from fimood.engine.vmap import vmap_grad_norms

logger = logging.getLogger(__name__)


@dataclass
class _Call:
    """One forward call of a ruled module."""

    inputs: tuple
    outputs: tuple
    versions: list[int]  # in-place version counters of the recorded tensors, to detect later changes
    first_node: int  # autograd nodes created during the call have sequence numbers in [first_node, last_node)
    last_node: int = -1


@dataclass
class _Recording:
    nll: Tensor
    calls: dict[str, list[_Call]] = field(default_factory=lambda: defaultdict(list))


def _next_sequence_number() -> int:
    """The sequence number the next autograd node will get (a throwaway node reads the counter)."""
    with torch.enable_grad():
        probe = torch.zeros((), requires_grad=True) * 1.0
    return probe.grad_fn._sequence_nr() + 1


def _tensors(values: tuple) -> list[Tensor]:
    return [v for v in values if isinstance(v, Tensor)]


def _record(model: nn.Module, ruled: dict[str, nn.Module], x: Tensor, seeds: Tensor | None) -> _Recording:
    """Run the forward pass with hooks on every ruled module."""
    calls: dict[str, list[_Call]] = defaultdict(list)

    def pre_hook(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            calls[name].append(_Call(inputs=inputs, outputs=(), versions=[], first_node=_next_sequence_number()))

        return hook

    def post_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            call = calls[name][-1]
            call.outputs = output if isinstance(output, tuple) else (output,)
            call.versions = [t._version for t in _tensors(call.inputs) + _tensors(call.outputs)]
            call.last_node = _next_sequence_number() - 1

        return hook

    handles = []
    try:
        for name, module in ruled.items():
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook(name)))
        with torch.enable_grad():
            nll = model.nll(x, seeds)
    finally:
        for handle in handles:
            handle.remove()
    return _Recording(nll=nll, calls=calls)


def _consumer_sequence_numbers(loss: Tensor, params: dict[int, str]) -> dict[str, list[int]]:
    """For each parameter, the sequence numbers of the autograd nodes that read it."""
    consumers: dict[str, list[int]] = defaultdict(list)
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None and id(variable) in params:
                consumers[params[id(variable)]].append(node._sequence_nr())
            stack.append(child)
    return consumers


def _plan(model: nn.Module, x: Tensor, seeds: Tensor | None) -> tuple[_Recording, dict[str, str | None], dict]:
    """Record a forward pass and decide, per trainable parameter, its rule or the reason it falls back.

    Returns the recording, {parameter name: None if a rule covers it, else the reason}, and the
    ruled modules by name.
    """
    params = trainable_parameters(model)
    owners: dict[int, list[tuple[str, nn.Module]]] = defaultdict(list)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners[id(param)].append((module_name, module))
    ruled = {
        name: module
        for name, module in model.named_modules()
        if type(module) in RULES and any(p.requires_grad for p in module.parameters(recurse=False))
    }
    recording = _record(model, ruled, x, seeds)
    consumers = _consumer_sequence_numbers(recording.nll.sum(), {id(p): name for name, p in params})
    reasons: dict[str, str | None] = {}
    for name, param in params:
        module_names = {module_name for module_name, _ in owners[id(param)]}
        module_name, module = owners[id(param)][0]
        calls = recording.calls.get(module_name, [])
        if len(module_names) > 1:
            reasons[name] = f"shared by modules {sorted(module_names)}"
        elif type(module) not in RULES:
            reasons[name] = f"no rule for {type(module).__name__}"
        elif len(calls) != 1:
            reasons[name] = f"{type(module).__name__} ran {len(calls)} times in one forward pass"
        elif not all(isinstance(t, Tensor) for t in calls[0].outputs) or not _tensors(calls[0].inputs):
            reasons[name] = f"{type(module).__name__} takes or returns something other than tensors"
        elif any(t.shape[0] != x.shape[0] for t in calls[0].outputs if t.dim() > 0):
            reasons[name] = f"{type(module).__name__} does not see one row per sample"
        elif any(not calls[0].first_node <= seq <= calls[0].last_node for seq in consumers.get(name, [])):
            reasons[name] = "also used outside its module's forward"
        else:
            reasons[name] = None
    return recording, reasons, ruled


def _changed_in_place(call: _Call) -> bool:
    tensors = _tensors(call.inputs) + _tensors(call.outputs)
    return any(t._version != version for t, version in zip(tensors, call.versions, strict=True))


def hooks_grad_norms(model: nn.Module, x: Tensor, seeds: Tensor | None = None) -> GradNorms:
    """Per-sample, per-tensor squared gradient norms from one forward and one backward pass."""
    recording, reasons, ruled = _plan(model, x, seeds)
    loss = recording.nll.sum()
    name_of = {module: name for name, module in ruled.items()}
    covered_calls = {}
    for param_name, reason in reasons.items():
        if reason is None:
            module_name = param_name.rpartition(".")[0]
            call = recording.calls[module_name][0]
            if _changed_in_place(call):
                reasons[param_name] = "an input or output was changed in place after the forward call"
            else:
                covered_calls[module_name] = call
    targets = [t for call in covered_calls.values() for t in call.outputs if t.requires_grad]
    grads = iter(torch.autograd.grad(loss, targets, allow_unused=True) if targets else ())
    sq_norms: dict[str, Tensor] = {}
    for module_name, call in covered_calls.items():
        grad_outputs = tuple(next(grads) if t.requires_grad else None for t in call.outputs)
        module = ruled[module_name]
        with torch.no_grad():
            rule_norms = RULES[type(module)](module, call.inputs, call.outputs, grad_outputs)
        prefix = f"{name_of[module]}." if name_of[module] else ""
        sq_norms.update({f"{prefix}{name}": value for name, value in rule_norms.items()})
    fallback = [name for name, reason in reasons.items() if reason is not None]
    if fallback:
        logger.debug(
            "hooks engine: %d of %d tensors fall back to vmap: %s",
            len(fallback),
            len(reasons),
            {name: reasons[name] for name in fallback},
        )
        sq_norms.update(zip(fallback, vmap_grad_norms(model, x, seeds, only=fallback).sq_norms.unbind(1), strict=True))
    names = list(reasons)
    return GradNorms(
        sq_norms=torch.stack([sq_norms[name] for name in names], dim=1), nll=recording.nll.detach(), names=names
    )


def explain(model: nn.Module, x: Tensor, seeds: Tensor | None = None) -> dict[str, str]:
    """How the hooks engine computes each trainable tensor: "rule <function>" or "vmap fallback: <why>"."""
    _, reasons, ruled = _plan(model, x, seeds)
    described = {}
    for name, reason in reasons.items():
        if reason is None:
            module = ruled[name.rpartition(".")[0]]
            described[name] = f"rule {RULES[type(module)].__name__}"
        else:
            described[name] = f"vmap fallback: {reason}"
    return described
