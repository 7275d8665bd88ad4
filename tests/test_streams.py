"""A condition's cells depend on the seed and the condition, not on what else is asked (issue 24, item 4).

Every random draw of a prediction comes from a stream per ``(seed, condition, cell type)``: the
mask of the generated cells and the anchored cells' switched-on genes. Asking a condition alone, in
another position of the request, beside other conditions or with another batch size gives its cells
again. The network runs in batches, so the continuous values may differ in the last bits between
batch sizes (another matrix shape); the masks and the cells drawn from them do not.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scdoloris.prediction import condition_stream, resolve_request

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _block(pred, perturbation):
    return pred[pred.obs["perturbation"] == perturbation]


@pytest.mark.parametrize("anchored_cells", ["generated", "sources"])
def test_a_condition_is_predicted_the_same_whatever_else_is_asked(trained_model, held_out_gene, anchored_cells):
    kwargs = {"n_cells": 12, "seed": 3, "n_steps": 5, "anchored_cells": anchored_cells}
    alone = trained_model.predict_perturbation([held_out_gene], **kwargs)
    first = trained_model.predict_perturbation([held_out_gene, "G000+G003", "G001"], **kwargs)
    last = trained_model.predict_perturbation(["G001", "G000+G003", held_out_gene], **kwargs, batch_size=7)
    reference = _block(alone, held_out_gene)
    for other in (first, last):
        block = _block(other, held_out_gene)
        assert list(block.obs["control_cell"]) == list(reference.obs["control_cell"])
        # The masks and the paper's cells: the same draws (values within float32 noise of other batches).
        np.testing.assert_array_equal(block.layers["doloris_mask"], reference.layers["doloris_mask"])
        np.testing.assert_allclose(block.layers["doloris_generated"], reference.layers["doloris_generated"], atol=1e-4)
        # The anchored cells: the same cells switched on, the same values drawn.
        np.testing.assert_array_equal(block.X != 0, reference.X != 0)
        np.testing.assert_allclose(block.X, reference.X, atol=1e-4)
    # The streams are the seed's: another seed draws other masks.
    other_seed = trained_model.predict_perturbation([held_out_gene], **{**kwargs, "seed": 4})
    assert (other_seed.layers["doloris_mask"] != reference.layers["doloris_mask"]).any()


def test_a_combination_has_one_stream_in_either_spelling(trained_model):
    kwargs = {"n_cells": 10, "seed": 1, "n_steps": 5}
    ab = trained_model.predict_perturbation(["G000+G003"], **kwargs)
    ba = trained_model.predict_perturbation(["G003+G000"], **kwargs)
    np.testing.assert_array_equal(ab.layers["doloris_mask"], ba.layers["doloris_mask"])


def test_streams_are_keyed_by_canonical_condition_and_purpose():
    request = resolve_request(["B+A", "C"], ["control"], dose=[[10, 100], 5])
    assert request.conditions == ["A@100+B@10", "C@5"]

    def draw(*key):
        return condition_stream(*key).random(4)

    np.testing.assert_array_equal(draw(0, "A+B", "T", "mask"), draw(0, "A+B", "T", "mask"))
    for other in [(1, "A+B", "T", "mask"), (0, "A+C", "T", "mask"), (0, "A+B", "B", "mask"), (0, "A+B", "T", "cells")]:
        assert not np.array_equal(draw(0, "A+B", "T", "mask"), draw(*other))
    # Stable across processes and machines (CRC-32, not Python's salted hash; numpy's PCG64 is
    # integer arithmetic): a pinned first draw.
    assert condition_stream(0, "A+B", "T", "mask").random() == 0.1932988685317668


REQUEST = ["G000+G003", "G001", "G002+G000", "U001"]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(REQUEST), size=st.integers(1, 4), batch_size=st.sampled_from([3, 17, 1024]))
def test_property_cells_are_invariant_to_request_shape(trained_model, order, size, batch_size):
    """Any subset of the conditions, in any order, at any batch size: each condition's cells are its own."""
    kwargs = {"n_cells": 6, "seed": 5, "n_steps": 3, "anchored_cells": "generated"}
    reference = trained_model.predict_perturbation(REQUEST, **kwargs)
    asked = trained_model.predict_perturbation(list(order[:size]), **kwargs, batch_size=batch_size)
    for perturbation in order[:size]:
        block, expected = _block(asked, perturbation), _block(reference, perturbation)
        np.testing.assert_array_equal(block.layers["doloris_mask"], expected.layers["doloris_mask"])
        np.testing.assert_array_equal(block.X != 0, expected.X != 0)
        np.testing.assert_allclose(block.X, expected.X, atol=1e-4)
