# Marks a package so that setuptools ships precision_recall.py; load it with evaluate.load(metric_module_path("precision_recall")).
