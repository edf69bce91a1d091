# Marks a package so that setuptools ships fid.py; load it with evaluate.load(metric_module_path("fid")).
