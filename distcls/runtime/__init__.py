"""The process's runtime: launcher detection and the process group (dist.py), SLURM nodelists
(nodelist.py), stop signals (signals.py), host <-> device copies (copies.py), atomic file writes and
weights-only reads (atomic_files.py), and the code a config names: name -> builder registries with
`pkg.module:function` plug-ins (plugins.py, for datasets and models)."""
