"""Research: the detection study and its report, the monitor study and its rivals, the benchmarks.

It may import the product (`fimood.monitor`, `fimood.passes`, `fimood.method`, ...) and onboarding; nothing in
the product imports it. `fimood study`, `fimood monitor-study` and `fimood benchmark*` run it.
"""
