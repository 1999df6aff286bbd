"""A DKM small enough to work out by hand: 4 scalar weights, 2 centroids, tau = 1, one k-means iteration.

The expected numbers below are derived on paper from the DKM definition (Cho et al., ICLR 2022), not from the
engine's code, so a bug shared by the engine and its plain-autograd reference (``dkm_reference``) still shows up.

Setup: weights ``x = (0, 1/2, 1, 2)``, centroids ``c = (0, 1)``, ``tau = 1``, ``kmeans_max_iter = 1``.

Attention ``a_ik = softmax_k(-(x_i - c_k)^2 / tau)``; with two centroids ``a_i0 = s(l_i0 - l_i1)``, ``s`` the
logistic function, and ``l_i0 - l_i1 = (x_i - 1)^2 - x_i^2 = 1 - 2 x_i``:

    x = 0:   a = (s(1),  s(-1))       = (0.7310585786300049, 0.2689414213699951)
    x = 1/2: a = (s(0),  s(0))        = (1/2, 1/2)
    x = 1:   a = (s(-1), s(1))
    x = 2:   a = (s(-3), s(3))        = (0.04742587317756678, 0.9525741268224334)

Centroid update ``c'_k = S_k / Z_k`` with ``Z_k = sum_i a_ik``, ``S_k = sum_i a_ik x_i`` (using s(t) + s(-t) = 1):

    Z_0 = 3/2 + s(-3),  S_0 = 1/4 + s(-1) + 2 s(-3)   ->  c'_0 = 0.39665432662356426
    Z_1 = 3/2 + s(3),   S_1 = 1/4 + s(1) + 2 s(3)     ->  c'_1 = 1.1768071760645438

Output ``y_i = a_i0 c'_0 + a_i1 c'_1`` (the attention of the last iteration times the updated centroids).

Gradient of ``L = sum_i g_i y_i`` with ``g = (1, -2, 1/2, 3)``. Only ``a_j.`` depends on ``x_j``:
``da_j0/dx_j = a_j0 a_j1 * 2 (c_0 - c_1) / tau = -2 a_j0 a_j1`` and ``da_j1/dx_j = +2 a_j0 a_j1``; and
``dc'_k/dx_j = (a_jk + (x_j - c'_k) da_jk/dx_j) / Z_k``. With ``G_k = sum_i g_i a_ik``:

    dL/dx_j = g_j * 2 a_j0 a_j1 (c'_1 - c'_0)  +  sum_k G_k (a_jk + (x_j - c'_k) da_jk/dx_j) / Z_k
"""

import math

import pytest
import torch
from torch import nn

from dkm_palett import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig
from dkm_palett.dkm_math import DKMParams, dkm_reference
from dkm_palett.palettizer import fake_palettizers

X = (0.0, 0.5, 1.0, 2.0)
C0 = (0.0, 1.0)
G = (1.0, -2.0, 0.5, 3.0)

# The hand results (see the module docstring), to 1e-15.
EXPECTED_CENTROIDS = (0.39665432662356426, 1.1768071760645438)
EXPECTED_OUTPUT = (0.606469742838073, 0.786730751344054, 0.9669917598500349, 1.1398077459678386)
EXPECTED_GRAD = (0.11431186706429905, -0.6136841509980819, 0.8257674625208506, 1.2545183494867396)


def _s(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t))


def test_the_hand_derivation_gives_the_written_numbers():
    """The closed forms of the docstring, evaluated step by step, give the literals the other tests use."""
    a = [(_s(1), _s(-1)), (0.5, 0.5), (_s(-1), _s(1)), (_s(-3), _s(3))]
    z = (1.5 + _s(-3), 1.5 + _s(3))
    s = (0.25 + _s(-1) + 2 * _s(-3), 0.25 + _s(1) + 2 * _s(3))
    c = (s[0] / z[0], s[1] / z[1])
    assert c == pytest.approx(EXPECTED_CENTROIDS, abs=1e-15)
    assert [ai0 * c[0] + ai1 * c[1] for ai0, ai1 in a] == pytest.approx(EXPECTED_OUTPUT, abs=1e-15)
    g_k = [sum(g * ai[k] for g, ai in zip(G, a)) for k in (0, 1)]
    grad = []
    for xj, gj, (aj0, aj1) in zip(X, G, a):
        da = (-2 * aj0 * aj1, 2 * aj0 * aj1)
        own = gj * 2 * aj0 * aj1 * (c[1] - c[0])
        through_centroids = sum(g_k[k] * ((aj0, aj1)[k] + (xj - c[k]) * da[k]) / z[k] for k in (0, 1))
        grad.append(own + through_centroids)
    assert grad == pytest.approx(EXPECTED_GRAD, abs=1e-15)


def test_reference_matches_the_hand_numbers():
    x = torch.tensor(X, dtype=torch.float64).reshape(1, 4, 1).requires_grad_()
    c0 = torch.tensor(C0, dtype=torch.float64).reshape(1, 2, 1)
    out, c = dkm_reference(x, c0, DKMParams(tau=1.0, max_iter=1, epsilon=0.0))
    (grad,) = torch.autograd.grad(out, x, torch.tensor(G, dtype=torch.float64).reshape(1, 4, 1))
    assert c.flatten().tolist() == pytest.approx(EXPECTED_CENTROIDS, rel=1e-12)
    assert out.flatten().tolist() == pytest.approx(EXPECTED_OUTPUT, rel=1e-12)
    assert grad.flatten().tolist() == pytest.approx(EXPECTED_GRAD, rel=1e-12)


def _hand_layer(dtype: torch.dtype, **config):
    """``Linear(1, 4)`` whose 4 weights are X, one 1-bit DKM layer on it, centroids set to C0 (training mode)."""
    model = nn.Linear(1, 4, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(X).reshape(4, 1))
    cfg = ModuleDKMPalettizerConfig(n_bits=1, weight_threshold=0, palett_tau=1.0, kmeans_max_iter=1,
                                    palett_epsilon=0.0, **config)
    DKMPalettizer(model, DKMPalettizerConfig(global_config=cfg)).prepare(inplace=True)
    (_, _, _, layer), = fake_palettizers(model)
    layer.centroids.copy_(torch.tensor(C0).reshape(1, 2, 1))
    layer.initialized.fill_(True)
    return model.train(), layer


@pytest.mark.parametrize("dtype,impl,tol", [
    (torch.float32, "dense", 1e-6),
    (torch.float32, "auto", 1e-6),
    (torch.float16, "auto", 1e-3),   # fp16 weights: the binned DKM with one bin per value (exact up to fp16 output)
    (torch.float16, "binned", 1e-3),
], ids=["fp32-dense", "fp32-auto", "fp16-auto", "fp16-binned"])
def test_the_layer_matches_the_hand_numbers(dtype, impl, tol):
    """The DKM layer in training: forward output, centroid update (its stored centroids) and the gradient that
    reaches the weight."""
    model, layer = _hand_layer(dtype, dkm_impl=impl)
    weight = model.weight  # runs the DKM forward once
    (weight.float().flatten() * torch.tensor(G)).sum().backward()
    original = model.parametrizations.weight.original
    assert weight.dtype == dtype
    assert weight.detach().float().flatten().tolist() == pytest.approx(EXPECTED_OUTPUT, rel=tol)
    assert layer.centroids.flatten().tolist() == pytest.approx(EXPECTED_CENTROIDS, rel=tol)
    assert original.grad.float().flatten().tolist() == pytest.approx(EXPECTED_GRAD, rel=tol)
