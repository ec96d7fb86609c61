"""The monitoring cosines (iter_cosines, best_class) against x_hat @ normalize(w).T.

They divide the products by the centres' norms instead of writing normalized centres; a
centre whose squares overflow float32 takes the normalizing path.
"""

import pytest
import torch
import torch.nn.functional as F

import margin_ext as mx


def _centres(huge: bool):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 16, generator=g)
    w[3] = 0.0  # a zero centre: cosine 0, as F.normalize gives
    w[5] *= 1e-30
    if huge:
        w[11] *= 1e30  # its squared norm is inf in float32
    return w


@pytest.mark.parametrize("huge", [False, True], ids=["ordinary", "a-centre-past-float32-squares"])
def test_cosines_are_those_of_normalized_centres(huge):
    w = _centres(huge)
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(1))
    expected = F.normalize(x.double(), dim=1) @ F.normalize(w.double(), dim=1).T
    chunks = list(mx.iter_cosines(x, w, chunk_size=10))
    assert [start for start, _ in chunks] == [0, 10, 20, 30]
    cosines = torch.cat([cos for _, cos in chunks], dim=1)
    assert cosines.dtype == torch.float32 and torch.isfinite(cosines).all()
    # float32 against the float64 reference: a few ulps of a sum of 16 products
    torch.testing.assert_close(cosines.double(), expected, rtol=0, atol=1e-6)
    best, index = mx.best_class(x, w, chunk_size=10)
    assert torch.equal(index, expected.argmax(dim=1))
    torch.testing.assert_close(best.double(), expected.max(dim=1).values, rtol=0, atol=1e-6)
