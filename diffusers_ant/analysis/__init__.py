"""The measurements of the papers, offline: task affinity, negative transfer gap, chain of forgetting.

- `affinity`: ANT's task-affinity matrix (cosine similarity of per-timestep gradients, Sec. 3, O1),
  on a timestep grid with bounded memory; written in the form `--clustering gradient` reads.
- `ntg`: ANT's negative transfer gap of interval-trained models (O2).
- `forgetting`: Diff-Tuning's chain-of-forgetting curve.
- `evaluate`: sampling from a saved pipeline and scoring against a dataset (domain FID, KID,
  precision / recall), shared by the above and `train_scripts/evaluate_model.py`; `arguments`: the
  scripts' sampling and scoring flags (a light module: no diffusers before the flags are parsed).
- `plots`: their figures.
- `stats`, `benchmark`: t intervals over seeds and the machinery the benchmark scripts share (logged
  subprocess runs, evaluation workers, real-image folders, relative differences).

Command line: `train_scripts/analyze.py {affinity,ntg,forgetting}` and `train_scripts/evaluate_model.py`.
Submodules are imported on use (`from diffusers_ant.analysis.affinity import affinity_from_folders`),
keeping `import diffusers_ant.analysis` free of diffusers and matplotlib.
"""

__all__ = ["affinity", "arguments", "benchmark", "common", "evaluate", "forgetting", "ntg", "plots", "stats"]
