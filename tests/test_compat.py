"""The tensornetwork compatibility fixes: pytorch qr/rq/svd/eigh on current torch."""

import warnings

import tensornetwork as tn
import torch

import tnlm  # noqa: F401  (applies the patches)
import tnlm._compat as compat


def test_patches_applied_and_idempotent():
    assert compat.PATCHED
    assert compat.apply_tensornetwork_patches() is True


def test_pytorch_backend_decompositions_without_warnings():
    be = tn.backends.backend_factory.get_backend("pytorch")
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, r = be.qr(x, pivot_axis=1)
        assert torch.allclose(torch.einsum("ab,bcd->acd", q, r), x)
        r2, q2 = be.rq(x, pivot_axis=1)
        assert torch.allclose(torch.einsum("ab,bcd->acd", r2, q2), x)
        u, s, vh, rest = be.svd(x, pivot_axis=1)
        assert torch.allclose(torch.einsum("ab,b,bcd->acd", u, s, vh), x)
        assert rest.numel() == 0
        u, s, vh, rest = be.svd(x, pivot_axis=1, max_singular_values=2)
        assert u.shape == (6, 2) and vh.shape == (2, 4, 5) and rest.numel() == 4
        m = x.reshape(6, 20)
        w, v = be.eigh(m @ m.T)
        assert torch.allclose(v @ torch.diag(w) @ v.T, m @ m.T)
