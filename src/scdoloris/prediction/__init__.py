"""The prediction layer shared by Doloris and every baseline (torch-free).

A prediction is the same three steps whatever makes the cells: resolve the request (perturbation
labels, doses, cell types), draw or take the source control cells (seeded), and assemble the
predicted cells as an AnnData (or write them into the given cells in place). Only the step in
between, turning source cells into predicted cells, differs: a shift for the baselines, the
diffusion bridge for Doloris.
"""

from ._output import InplaceKeys, PredictedCells, check_keys_free, predicted_anndata, write_inplace
from ._request import Request, dose_text, resolve_cell_types, resolve_request
from ._sources import Sources, check_source_cells, draw_controls, given_cells
from ._streams import condition_stream

__all__ = [
    "InplaceKeys",
    "PredictedCells",
    "Request",
    "Sources",
    "check_keys_free",
    "check_source_cells",
    "condition_stream",
    "dose_text",
    "draw_controls",
    "given_cells",
    "predicted_anndata",
    "resolve_cell_types",
    "resolve_request",
    "write_inplace",
]
