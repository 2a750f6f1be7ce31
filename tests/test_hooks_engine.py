"""The hooks engine on whole models: equal to the loop, with exact fallbacks where no rule applies."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rel_close, tiny_glow
from torch import nn

from fimood.engine import StrictModeError, check_covered, explain, grad_norms
from fimood.models import Glow, GroupSum, LikelihoodModel
from fimood.models.glow import ActNorm


def assert_hooks_equal_loop(model, x, seeds=None):
    assert_rel_close(grad_norms(model, x, seeds, "hooks").sq_norms, grad_norms(model, x, seeds, "loop").sq_norms)


@pytest.mark.parametrize(
    ("preset", "image_shape"), [("tiny", (1, 28, 28)), ("small", (1, 28, 28)), ("paper", (3, 32, 32))]
)
def test_hooks_equals_loop_on_glow_presets(preset, image_shape):
    torch.manual_seed(0)
    model = Glow.from_preset(preset, image_shape).double()
    x = torch.rand(2, *image_shape, dtype=torch.float64)
    model.initialize(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert_hooks_equal_loop(model, x, torch.arange(2))
    assert all(how.startswith("rule") for how in explain(model, x).values())


def test_hooks_equals_loop_on_colour_glow_with_three_levels():
    model = tiny_glow(image_shape=(3, 8, 8))
    assert_hooks_equal_loop(model, torch.rand(2, 3, 8, 8, dtype=torch.float64), torch.tensor([4, 5]))


def test_a_module_with_no_rule_falls_back_exactly(user_model):
    x = torch.randn(4, 1, 4, 6, dtype=torch.float64)
    assert_hooks_equal_loop(user_model, x)
    how = explain(user_model, x)
    assert how["shared"] == "vmap fallback: no rule for OddUserModel"
    assert how["row_linear.weight"] == "rule linear_sq_norms" and how["norm.weight"] == "rule group_norm_sq_norms"


class CalledTwice(LikelihoodModel):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def nll(self, x, seeds=None):
        return self.head(torch.tanh(self.layer(torch.tanh(self.layer(x))))).squeeze(-1) ** 2


class TiedWeights(LikelihoodModel):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 3, bias=False)
        self.decoder = nn.Linear(3, 4, bias=False)
        self.decoder.weight = nn.Parameter(self.encoder.weight.T.clone())
        self.encoder_again = self.encoder  # the same module under two names

    def nll(self, x, seeds=None):
        h = torch.tanh(self.encoder(x))
        return (self.decoder(h) - x).pow(2).sum(1) + self.encoder_again(x).sum(1)


class UsedOutside(LikelihoodModel):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def nll(self, x, seeds=None):
        h = torch.tanh(self.layer(x))
        return F.linear(h, self.layer.weight).pow(2).sum(1)  # the weight's second use, outside the module


class InPlaceAfter(LikelihoodModel):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 1)

    def nll(self, x, seeds=None):
        return self.head(self.act(self.layer(x))).squeeze(-1).pow(2)


class SelfAttention(LikelihoodModel):
    """Attention written with Linear projections (as diffusers does) next to torch's MultiheadAttention."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8)
        self.to_out = nn.Linear(8, 6)
        self.mha = nn.MultiheadAttention(6, 2, batch_first=True)

    def nll(self, x, seeds=None):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        h = self.to_out(F.scaled_dot_product_attention(q, k, v)) + x
        h, _ = self.mha(h, h, h)
        return h.pow(2).flatten(1).sum(1)


@pytest.mark.parametrize(
    ("model_type", "shape", "expected"),
    [
        (CalledTwice, (3, 4), {"layer.weight": "ran 2 times", "head.weight": "rule"}),
        (TiedWeights, (3, 4), {"encoder.weight": "shared by modules", "decoder.weight": "rule"}),
        (UsedOutside, (3, 4), {"layer.weight": "used outside", "layer.bias": "rule"}),
        (InPlaceAfter, (3, 4), {"head.weight": "rule"}),
        (
            SelfAttention,
            (2, 5, 6),
            {
                "to_q.weight": "rule",
                "mha.in_proj_weight": "no rule for MultiheadAttention",
                "mha.out_proj.weight": "NonDynamicallyQuantizableLinear ran 0 times",
            },
        ),
    ],
)
def test_odd_models_are_exact_and_explained(model_type, shape, expected):
    torch.manual_seed(0)
    model = model_type().double()
    x = torch.randn(*shape, dtype=torch.float64)
    assert_hooks_equal_loop(model, x)
    how = explain(model, x)
    for name, text in expected.items():
        assert text in how[name], (name, how[name])


class InPlaceAfterActNorm(LikelihoodModel):
    def __init__(self):
        super().__init__()
        self.actnorm = ActNorm(3)

    def nll(self, x, seeds=None):
        y, log_det = self.actnorm(x)
        y.relu_()  # changes the output the ActNorm rule reads
        return y.pow(2).flatten(1).sum(1) - log_det


def test_a_tensor_a_rule_reads_changed_in_place_falls_back(caplog):
    torch.manual_seed(0)
    model = InPlaceAfterActNorm().double()
    with torch.no_grad():
        model.actnorm.logs.add_(0.3)
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    with caplog.at_level("DEBUG", logger="fimood.engine.hooks"):
        assert_hooks_equal_loop(model, x)
    assert "changed in place" in caplog.text and "actnorm.logs" in caplog.text


def test_an_output_changed_in_place_by_the_next_layer_still_uses_its_rule():
    torch.manual_seed(0)
    model = InPlaceAfter().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    assert_hooks_equal_loop(model, x)
    assert explain(model, x)["layer.weight"] == "rule linear_sq_norms"


def test_grouped_rows_fall_back_to_exact_per_group_norms(glow64):
    x = torch.rand(2, 3, 1, 8, 8, dtype=torch.float64)
    seeds = torch.arange(6).reshape(2, 3)
    grouped = GroupSum(glow64)
    assert_hooks_equal_loop(grouped, x, seeds)
    assert all("does not see one row per sample" in how for how in explain(grouped, x, seeds).values())


def test_auto_uses_hooks_and_agrees_with_vmap(glow64):
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    assert_rel_close(grad_norms(glow64, x, method="auto").sq_norms, grad_norms(glow64, x, method="vmap").sq_norms)


def test_fallback_leaves_the_model_intact():
    model = TiedWeights().double()
    before = dict(model.named_parameters(remove_duplicate=False))
    grad_norms(model, torch.randn(2, 4, dtype=torch.float64), method="hooks")
    after = dict(model.named_parameters(remove_duplicate=False))
    assert before.keys() == after.keys() and all(after[name] is p for name, p in before.items())


class UnusedBranch(LikelihoodModel):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(3, 1), nn.Linear(3, 2)

    def nll(self, x, seeds=None):
        self.unused(x)  # computed, never reaches the loss
        return self.used(x).squeeze(-1).pow(2)


def test_a_ruled_module_the_loss_does_not_reach_gets_zero_norms_of_the_model_dtype():
    model = UnusedBranch().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    hooks = grad_norms(model, x, method="hooks")
    assert_hooks_equal_loop(model, x)
    unused = [hooks.names.index(name) for name in ("unused.weight", "unused.bias")]
    assert (hooks.sq_norms[:, unused] == 0).all() and hooks.sq_norms.dtype == torch.float64
    assert explain(model, x)["unused.weight"] == "rule linear_sq_norms"


def test_strict_mode_refuses_a_fallback_and_names_the_tensors(user_model, glow64):
    x = torch.randn(3, *user_model.image_shape, dtype=torch.float64)
    with pytest.raises(StrictModeError, match=r"strict mode: no rule covers 1 tensors: shared \("):
        grad_norms(user_model, x, method="hooks", strict=True)
    with pytest.raises(StrictModeError, match="shared"):
        check_covered(user_model, x)
    assert grad_norms(user_model, x, method="hooks").sq_norms.shape == (3, 6)  # not strict: the exact fallback
    x = torch.rand(2, *glow64.image_shape, dtype=torch.float64)
    check_covered(glow64, x)
    assert_rel_close(grad_norms(glow64, x, strict=True).sq_norms, grad_norms(glow64, x, method="loop").sq_norms)


def test_the_pipelines_strict_check_refuses_an_uncovered_model(user_model):
    """`fit` and `score` run this check on the driver, before Ray starts."""
    from fimood import passes
    from fimood.passes import actors

    with pytest.raises(StrictModeError, match="shared"):
        actors.check_strict(user_model, passes.PipelineConfig(strict=True))
    actors.check_strict(user_model, passes.PipelineConfig())  # not strict: nothing to check


def test_a_rule_that_computes_no_norm_for_a_planned_tensor_is_a_clear_error(monkeypatch):
    from fimood.engine.rules import registry

    class Forgetful(nn.Linear):
        pass

    monkeypatch.setitem(registry.RULES, Forgetful, lambda module, inputs, outputs, grads: {"weight": grads[0].sum(1)})
    monkeypatch.setitem(registry.RULE_READS, Forgetful, "inputs")

    class Model(LikelihoodModel):
        def __init__(self):
            super().__init__()
            self.layer = Forgetful(3, 2)  # its rule forgets the bias

        def nll(self, x, seeds=None):
            return self.layer(x).pow(2).sum(1)

    with pytest.raises(RuntimeError, match=r"planned a rule for \['layer.bias'\] but computed no norm"):
        grad_norms(Model(), torch.randn(4, 3), method="hooks")
