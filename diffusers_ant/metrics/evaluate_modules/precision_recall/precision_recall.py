"""Improved precision and recall as an `evaluate` metric module (Kynkaanniemi et al., NeurIPS 2019).

Load it offline by path: `evaluate.load(diffusers_ant.metrics.metric_module_path("precision_recall"))`.
"""

import evaluate

from diffusers_ant.metrics.evaluate_support import feature_schemas
from diffusers_ant.metrics.evaluate_support import stack_features
from diffusers_ant.metrics.functional import precision_recall

_DESCRIPTION = """
Improved precision and recall on whatever features are passed. Each set's manifold is the union of
balls reaching each sample's k-th nearest neighbour. Precision: fraction of generated samples
(`predictions`) inside the real manifold (quality). Recall: fraction of real samples (`references`)
inside the generated manifold (coverage; low recall means dropped modes). The paper used VGG-16
features; values on other features are comparable only with values on the same features.
"""

_CITATION = """
@inproceedings{kynkaanniemi2019improved,
  title={Improved Precision and Recall Metric for Assessing Generative Models},
  author={Kynkaanniemi, Tuomas and Karras, Tero and Laine, Samuli and Lehtinen, Jaakko and Aila, Timo},
  booktitle={NeurIPS},
  year={2019}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: features of generated images, one row per image; or a list of (N, D) matrices.
    references: features of real images, one row per image; or a list of (M, D) matrices.
    k: the neighbour that sets each ball's radius (default 3, as in the paper).
    batch_size: rows per block of the distance computation (bounds memory).
Returns:
    precision, recall: fractions in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PrecisionRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=feature_schemas(),
        )

    def _compute(self, predictions, references, k=3, batch_size=1024):
        precision, recall = precision_recall(stack_features(references), stack_features(predictions), k=k, batch_size=batch_size)
        return {"precision": precision, "recall": recall}
