"""Norm rules, one small function per layer type; importing this package registers them all."""

from fimood.engine.rules import conv, glow, linear, normalization
from fimood.engine.rules.registry import RULE_READS, RULES, NormRule, register_rule

__all__ = ["RULES", "RULE_READS", "NormRule", "conv", "glow", "linear", "normalization", "register_rule"]
