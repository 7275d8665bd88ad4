"""What Doloris keeps of its training data: scale, control statistics, graph features, mask references.

Also the package's one way of reading expression rows as dense arrays (:func:`read_rows`,
:func:`to_dense`, :func:`expression_matrix`), and the rule behind ``gene_graph="auto"`` (:func:`auto_graph`).
"""

from ._mudata import prepare_mudata as prepare_mudata  # used by scdoloris.model
from ._mudata import registered_modality as registered_modality  # used by scdoloris.model
from ._rows import expression_matrix, read_rows, to_dense
from ._rows import is_in_memory as is_in_memory  # used by scdoloris.baselines
from ._rows import subset_rows as subset_rows  # used by scdoloris.model
from ._summary import TrainingSummary, summarize_training_data
from ._summary import summarize_without as summarize_without  # used by scdoloris.model
from ._tokens import auto_graph

__all__ = ["TrainingSummary", "auto_graph", "expression_matrix", "read_rows", "summarize_training_data", "to_dense"]
