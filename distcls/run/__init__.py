"""One training run: its components built from the config (components.py), the run itself: setup,
the epoch loop, records, the summary (runner.py), its edge checks (checks.py), and its out_dir's lock
and output-path checks (outputs.py)."""
