"""Benchmarks behind performance claims (`python -m distcls.bench MODE`). Each mode is a module with
`add_arguments(parser)` and `run(args) -> dict`.

TEMPORARY scaffolding of the `imagefolder` branch: the bench package with its registry lands from
another branch; there `imagefolder.py` is registered as one more mode.
"""
