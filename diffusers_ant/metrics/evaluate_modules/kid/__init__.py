# Marks a package so that setuptools ships kid.py; load it with evaluate.load(metric_module_path("kid")).
