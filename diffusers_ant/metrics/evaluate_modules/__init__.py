"""`evaluate` metric modules, loaded by path: `evaluate.load(diffusers_ant.metrics.metric_module_path(name))`.

The package markers (`__init__.py`) only make setuptools ship these files; `evaluate` imports each
module file on its own.
"""
