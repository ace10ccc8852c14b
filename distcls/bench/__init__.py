"""`python -m distcls.bench MODE [options] [--out FILE]`: the measurements behind performance claims.

One module per mode (see `MODES` in `distcls/bench/__main__.py`). A mode module exposes
`add_arguments(parser)` (its own options) and `run(args) -> dict` (the JSON result, written as is
to --out); it may also expose `render(result)` to print a table instead of the JSON. Numbers are
measurements, never test thresholds.
"""
