"""The applications over the library: the demo, the detection study, evaluation, benchmarks, training,
and the bundled demo data. The command line (`fimood.cli`) runs them."""
