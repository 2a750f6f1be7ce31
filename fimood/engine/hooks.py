"""Per-sample, per-tensor squared gradient norms inside one batched backward pass.

Forward hooks record what each ruled module's rule reads (its inputs or its outputs) and put a
gradient hook on its outputs. One backward pass runs from the summed NLL down to the input (and
to the outputs that do not depend on it, such as Glow's log-dets); each rule runs as soon as its
output gradients are complete, so no parameter gradient is materialised and nothing outlives its
use. Parameters no rule covers exactly (no rule for the module, a module run twice, a parameter
shared or also used outside its module, a tensor a rule reads changed in place) go to the vmap
engine; `explain` says why.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from fimood.engine.result import GradNorms, trainable_parameters
from fimood.engine.rules import RULE_READS, RULES
from fimood.engine.vmap import vmap_grad_norms

logger = logging.getLogger(__name__)


@dataclass
class _Output:
    """What the engine remembers of one module output without keeping it alive."""

    node: object  # grad_fn
    index: int  # output_nr
    requires_grad: bool
    rows: int | None  # leading dimension, None for a scalar
    reaches_input: bool


@dataclass
class _Call:
    """One forward call of a ruled module, and the output gradients its rule waits for."""

    inputs: tuple  # kept only when the rule reads inputs
    outputs: tuple  # each output kept when the rule reads outputs or the output has no path to x, else None
    meta: list[_Output]
    n_tensor_inputs: int
    all_tensors: bool
    kept_versions: list[tuple[Tensor, int]]  # kept tensors and their in-place version counters
    first_node: int  # autograd nodes created during the call have sequence numbers in [first_node, last_node]
    last_node: int
    module_name: str
    covered: bool = False
    grads: dict[int, Tensor] = field(default_factory=dict)
    pending: set[int] = field(default_factory=set)


@dataclass
class _Plan:
    nll: Tensor
    calls: dict[str, _Call]  # covered modules by name, with their single call
    modules: dict[str, nn.Module]
    reasons: dict[str, str | None]  # trainable parameter → None (a rule covers it) or why it falls back
    consumed: set[tuple[object, int]]  # (node, output index) pairs read by some node of the graph
    handles: list[RemovableHandle]
    sq_norms: dict[str, Tensor] = field(default_factory=dict)


def _next_sequence_number() -> int:
    """The sequence number the next autograd node will get (a throwaway node reads the counter)."""
    with torch.enable_grad():
        probe = torch.zeros((), requires_grad=True) * 1.0
    return probe.grad_fn._sequence_nr() + 1


def _reaches(x: Tensor) -> Callable[[object], bool]:
    """A memoised test: does the backward pass from this node reach the leaf `x`?"""
    memo: dict[object, bool] = {}

    def reaches(root: object) -> bool:
        if root is None:
            return False
        stack = [root]
        while stack:
            node = stack[-1]
            if node in memo:
                stack.pop()
                continue
            children = [child for child, _ in node.next_functions if child is not None]
            unknown = [child for child in children if child not in memo]
            if unknown:
                stack.extend(unknown)
                continue
            memo[node] = getattr(node, "variable", None) is x or any(memo[child] for child in children)
            stack.pop()
        return memo[root]

    return reaches


def _record(
    model: nn.Module, ruled: dict[str, nn.Module], x: Tensor, seeds: Tensor | None, sq_norms_sink
) -> tuple[Tensor, dict[str, list[_Call]], list[RemovableHandle]]:
    """Run the forward pass with hooks on every ruled module; gradient hooks stay on until removed."""
    calls: dict[str, list[_Call]] = defaultdict(list)
    starts: dict[str, int] = {}
    reaches = _reaches(x)
    grad_handles: list[RemovableHandle] = []

    def pre_hook(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            starts[name] = _next_sequence_number()

        return hook

    def post_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            outputs = output if isinstance(output, tuple) else (output,)
            all_tensors = all(isinstance(t, Tensor) for t in outputs)
            meta = (
                [
                    _Output(
                        node=t.grad_fn,
                        index=t.output_nr,
                        requires_grad=t.requires_grad,
                        rows=t.shape[0] if t.dim() > 0 else None,
                        reaches_input=t.requires_grad and reaches(t.grad_fn),
                    )
                    for t in outputs
                    if isinstance(t, Tensor)
                ]
                if all_tensors
                else []
            )
            reads_outputs = RULE_READS[type(module)] == "outputs"
            kept_outputs = (
                tuple(t if reads_outputs or not m.reaches_input else None for t, m in zip(outputs, meta, strict=True))
                if all_tensors
                else ()
            )
            kept_inputs = () if reads_outputs else inputs
            kept = [t for t in (*kept_inputs, *kept_outputs) if isinstance(t, Tensor)]
            call = _Call(
                inputs=kept_inputs,
                outputs=kept_outputs,
                meta=meta,
                n_tensor_inputs=sum(isinstance(t, Tensor) for t in inputs),
                all_tensors=all_tensors,
                kept_versions=[(t, t._version) for t in kept],
                first_node=starts[name],
                last_node=_next_sequence_number() - 1,
                module_name=name,
            )
            calls[name].append(call)
            for k, t in enumerate(outputs if all_tensors else ()):
                if t.requires_grad:
                    grad_handles.append(t.register_hook(_grad_catcher(call, k, ruled[name], sq_norms_sink)))

        return hook

    handles = []
    try:
        for name, module in ruled.items():
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook(name)))
        with torch.enable_grad():
            nll = model.nll(x, seeds)
    except BaseException:
        for handle in grad_handles:
            handle.remove()
        raise
    finally:
        for handle in handles:
            handle.remove()
    return nll, calls, grad_handles


def _traverse(loss: Tensor, params: dict[int, str]) -> tuple[dict[str, list[int]], set[tuple[object, int]]]:
    """One pass over the autograd graph from `loss`: for each parameter the sequence numbers of the
    nodes that read it, and every (node, output index) pair that some node reads."""
    consumers: dict[str, list[int]] = defaultdict(list)
    consumed: set[tuple[object, int]] = set()
    seen: set[object] = set()
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, output_nr in node.next_functions:
            if child is None:
                continue
            consumed.add((child, output_nr))
            variable = getattr(child, "variable", None)
            if variable is not None and id(variable) in params:
                consumers[params[id(variable)]].append(node._sequence_nr())
            stack.append(child)
    return consumers, consumed


def _plan(model: nn.Module, x: Tensor, seeds: Tensor | None) -> _Plan:
    """Record a forward pass and decide, per trainable parameter, its rule or the reason it falls back."""
    params = trainable_parameters(model)
    owners: dict[int, set[str]] = defaultdict(set)
    modules = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners[id(param)].add(module_name)
            modules[module_name] = module
    ruled = {
        name: module
        for name, module in model.named_modules()
        if type(module) in RULES and any(p.requires_grad for p in module.parameters(recurse=False))
    }
    sq_norms: dict[str, Tensor] = {}
    nll, calls, handles = _record(model, ruled, x, seeds, sq_norms)
    consumers, consumed = _traverse(nll.sum(), {id(p): name for name, p in params})
    reasons: dict[str, str | None] = {}
    covered: dict[str, _Call] = {}
    for name, param in params:
        module_name = name.rpartition(".")[0]
        module_type = type(modules[module_name]).__name__
        module_calls = calls.get(module_name, [])
        call = module_calls[0] if len(module_calls) == 1 else None
        if len(owners[id(param)]) > 1:
            reasons[name] = f"shared by modules {sorted(owners[id(param)])}"
        elif type(modules[module_name]) not in RULES:
            reasons[name] = f"no rule for {module_type}"
        elif call is None:
            reasons[name] = f"{module_type} ran {len(module_calls)} times in one forward pass"
        elif not call.all_tensors or call.n_tensor_inputs == 0:
            reasons[name] = f"{module_type} takes or returns something other than tensors"
        elif any(m.rows is not None and m.rows != x.shape[0] for m in call.meta):
            reasons[name] = f"{module_type} does not see one row per sample"
        elif any(not call.first_node <= seq <= call.last_node for seq in consumers.get(name, [])):
            reasons[name] = "also used outside its module's forward"
        elif any(t._version != version for t, version in call.kept_versions):
            reasons[name] = "a tensor its rule reads was changed in place after the forward call"
        else:
            reasons[name] = None
            covered[module_name] = call
    return _Plan(
        nll=nll, calls=covered, modules=ruled, reasons=reasons, consumed=consumed, handles=handles, sq_norms=sq_norms
    )


def _run_rule(call: _Call, module: nn.Module, sq_norms: dict[str, Tensor]) -> None:
    """Apply a module's rule to its recorded call, then let go of everything the call kept."""
    grad_outputs = tuple(call.grads.get(k) for k in range(len(call.meta)))
    with torch.no_grad():
        rule_norms = RULES[type(module)](module, call.inputs, call.outputs, grad_outputs)
    call.grads, call.inputs, call.outputs, call.kept_versions = {}, (), (), []
    sq_norms.update({_qualified(call.module_name, name): value for name, value in rule_norms.items()})


def _qualified(module_name: str, param_name: str) -> str:
    """The parameter's name as `model.named_parameters()` gives it."""
    return f"{module_name}.{param_name}" if module_name else param_name


def _grad_catcher(call: _Call, index: int, module: nn.Module, sq_norms: dict[str, Tensor]):
    """A tensor hook that stores one output gradient and runs the rule once all have arrived."""

    def catch(grad: Tensor) -> None:
        if not call.covered:
            return
        call.grads[index] = grad
        call.pending.discard(index)
        if not call.pending:
            _run_rule(call, module, sq_norms)

    return catch


class StrictModeError(ValueError):
    """In strict mode, a tensor that no rule covers is an error instead of a `vmap` fallback."""


def hooks_grad_norms(model: nn.Module, x: Tensor, seeds: Tensor | None = None, strict: bool = False) -> GradNorms:
    """Per-sample, per-tensor squared gradient norms from one forward and one backward pass.

    `strict`: raise `StrictModeError` instead of falling back to `vmap` for tensors no rule covers.
    """
    x = x.detach().requires_grad_(torch.is_floating_point(x))  # the leaf the backward pass runs down to
    plan = _plan(model, x, seeds)
    fallback = {name: reason for name, reason in plan.reasons.items() if reason is not None}
    if strict and fallback:
        for handle in plan.handles:
            handle.remove()
        _refuse(fallback)
    try:
        extra_inputs = []
        for module_name, call in plan.calls.items():
            call.covered = True
            call.pending = {
                k for k, m in enumerate(call.meta) if m.requires_grad and (m.node, m.index) in plan.consumed
            }
            if not call.pending:  # the loss does not reach this module: its gradients are zero
                plan.sq_norms.update(
                    {
                        _qualified(module_name, name): p.new_zeros(x.shape[0])
                        for name, p in plan.modules[module_name].named_parameters(recurse=False)
                        if p.requires_grad
                    }
                )
            # Outputs with no path to x are only reached if the backward pass is asked for them.
            extra_inputs += [call.outputs[k] for k in call.pending if not call.meta[k].reaches_input]
        inputs = ([x] if x.requires_grad else []) + extra_inputs
        if inputs:
            torch.autograd.grad(plan.nll.sum(), inputs, allow_unused=True)
    finally:
        for handle in plan.handles:
            handle.remove()
    missed = [name for name, reason in plan.reasons.items() if reason is None and name not in plan.sq_norms]
    if missed:  # a rule that should have run did not: never a silent zero or a KeyError
        raise RuntimeError(f"the hooks engine planned a rule for {missed} but computed no norm; use the 'vmap' engine")
    fallback = list(fallback)
    if fallback:
        logger.debug(
            "hooks engine: %d of %d tensors fall back to vmap: %s",
            len(fallback),
            len(plan.reasons),
            {name: plan.reasons[name] for name in fallback},
        )
        fallback_norms = vmap_grad_norms(model, x.detach(), seeds, only=fallback).sq_norms
        plan.sq_norms.update(zip(fallback, fallback_norms.unbind(1), strict=True))
    names = list(plan.reasons)
    return GradNorms(
        sq_norms=torch.stack([plan.sq_norms[name] for name in names], dim=1), nll=plan.nll.detach(), names=names
    )


def _refuse(fallback: dict[str, str], most: int = 5) -> None:
    """Strict mode's error: the tensors no rule covers (tensor → why), the first few named."""
    shown = "; ".join(f"{name} ({reason})" for name, reason in list(fallback.items())[:most])
    more = f"; and {len(fallback) - most} more" if len(fallback) > most else ""
    raise StrictModeError(f"strict mode: no rule covers {len(fallback)} tensors: {shown}{more}")


def check_covered(model: nn.Module, x: Tensor, seeds: Tensor | None = None) -> None:
    """Raise `StrictModeError` when a rule covers not every trainable tensor (checked on inputs like `x`)."""
    plan = _plan(model, x.detach().requires_grad_(torch.is_floating_point(x)), seeds)
    for handle in plan.handles:
        handle.remove()
    fallback = {name: reason for name, reason in plan.reasons.items() if reason is not None}
    if fallback:
        _refuse(fallback)


def explain(model: nn.Module, x: Tensor, seeds: Tensor | None = None) -> dict[str, str]:
    """How the hooks engine computes each trainable tensor: "rule <function>" or "vmap fallback: <why>"."""
    plan = _plan(model, x.detach().requires_grad_(torch.is_floating_point(x)), seeds)
    for handle in plan.handles:
        handle.remove()
    described = {}
    for name, reason in plan.reasons.items():
        if reason is None:
            module = plan.modules[name.rpartition(".")[0]]
            described[name] = f"rule {RULES[type(module)].__name__}"
        else:
            described[name] = f"vmap fallback: {reason}"
    return described
