"""FID as an `evaluate` metric module, on feature vectors (Heusel et al., NeurIPS 2017).

Load it offline by path: `evaluate.load(diffusers_ant.metrics.metric_module_path("fid"))`.
The features come from a feature extractor (`diffusers_ant.metrics.get_feature_extractor`); with a
domain classifier ("mnist5k", ...) the result is a domain FID, not Inception FID.
"""

import evaluate

from diffusers_ant.metrics.evaluate_support import feature_schemas
from diffusers_ant.metrics.evaluate_support import stack_features
from diffusers_ant.metrics.functional import fid_from_features

_DESCRIPTION = """
Frechet Inception Distance, computed on whatever features are passed: the Frechet distance between
Gaussians fitted to the generated (`predictions`) and real (`references`) feature vectors. Its value
depends on the feature extractor: with a domain classifier it is a "domain FID", comparable only
with other domain FIDs from the same extractor and sample count. With Inception features it is
comparable with published FIDs only for pytorch-fid's Inception weights.
"""

_CITATION = """
@inproceedings{heusel2017gans,
  title={GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium},
  author={Heusel, Martin and Ramsauer, Hubert and Unterthiner, Thomas and Nessler, Bernhard and Hochreiter, Sepp},
  booktitle={NeurIPS},
  year={2017}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: features of generated images, one row per image; or a list of (N, D) matrices.
    references: features of real images, one row per image; or a list of (M, D) matrices (use this
        form when the two sets differ in size: `predictions=[fake], references=[real]`).
    eps: diagonal offset used when the covariance product is singular.
Returns:
    fid: the Frechet distance (lower is better).
Examples:
    >>> fid = evaluate.load(metric_module_path("fid"))
    >>> fid.compute(predictions=fake_features, references=real_features)["fid"]
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Fid(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=feature_schemas(),
        )

    def _compute(self, predictions, references, eps=1e-6):
        return {"fid": fid_from_features(stack_features(references), stack_features(predictions), eps=eps)}
