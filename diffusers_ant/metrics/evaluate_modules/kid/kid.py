"""KID as an `evaluate` metric module, on feature vectors (Binkowski et al., ICLR 2018).

Load it offline by path: `evaluate.load(diffusers_ant.metrics.metric_module_path("kid"))`.
"""

import evaluate

from diffusers_ant.metrics.evaluate_support import feature_schemas
from diffusers_ant.metrics.evaluate_support import stack_features
from diffusers_ant.metrics.functional import kid

_DESCRIPTION = """
Kernel Inception Distance on whatever features are passed: the unbiased MMD^2 between generated
(`predictions`) and real (`references`) features with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets. Near 0 means the same distribution.
"""

_CITATION = """
@inproceedings{binkowski2018demystifying,
  title={Demystifying MMD GANs},
  author={Binkowski, Mikolaj and Sutherland, Danica J. and Arbel, Michael and Gretton, Arthur},
  booktitle={ICLR},
  year={2018}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: features of generated images, one row per image; or a list of (N, D) matrices.
    references: features of real images, one row per image; or a list of (M, D) matrices.
    subsets: number of random subsets (default 100).
    subset_size: rows per subset (default: min(1000, half the smaller set); at most half the smaller set).
    seed: seed of the subset draws (default 0).
Returns:
    kid_mean, kid_std: mean of MMD^2 over the subsets, and its spread between disjoint subsets
        (the sampling spread of a KID on subset_size samples).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Kid(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=feature_schemas(),
        )

    def _compute(self, predictions, references, subsets=100, subset_size=None, seed=0):
        mean, std = kid(stack_features(references), stack_features(predictions), subsets=subsets, subset_size=subset_size, seed=seed)
        return {"kid_mean": mean, "kid_std": std}
