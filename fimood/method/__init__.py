"""The method: from a likelihood model and rows to OOD scores, with no Ray and no lake in sight.

`features` (per-row log gradient norms and NLL), `statistics` (mergeable sufficient statistics),
`scoring` (the rules), `detector` (the estimator and the saved artifact), `reduce` (the streamed fit),
`splits` (fit vs calibration rows), `baselines` and `metrics`.
"""
