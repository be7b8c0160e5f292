"""Nearest-class-mean evaluation against a hand computation with a linear feature extractor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from flatminima.continual.nme import ClassPrototypes, features, nme_accuracy, nme_correct


def model_and_head():
    extractor = nn.Linear(3, 2, bias=False)
    head = nn.Linear(2, 5)
    with torch.no_grad():
        extractor.weight.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]))
    model = nn.Sequential(extractor, nn.Dropout(0.5), head).to(torch.float64)
    return model, head


X = torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 1.0], [1.0, 1.0, 1.0],
                  [-1.0, 0.0, 0.0]], dtype=torch.float64)
Y = torch.tensor([0, 0, 1, 1, 2, 2])


def unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def test_prototypes_and_predictions_by_hand():
    model, head = model_and_head()
    model.train()
    # h(x) = W x with W = [[1, 0, 1], [0, 2, 0]]: rows of X map to
    # (1, 0), (2, 2), (0, 2), (1, 1), (2, 2), (-1, 0); φ = h / ‖h‖
    phi = [unit(v) for v in ([1, 0], [2, 2], [0, 2], [1, 1], [2, 2], [-1, 0])]
    f = features(model, head, X)
    np.testing.assert_allclose(f.numpy(), np.stack(phi), rtol=0, atol=1e-15)
    assert model.training and model[1].training and not head._forward_pre_hooks  # modes back, hook gone

    protos = ClassPrototypes()
    protos.update(model, head, [(X[:3], Y[:3]), (X[3:], Y[3:])], classes=[0, 1])  # class 2 samples ignored
    mu0 = (phi[0] + phi[1]) / 2
    mu1 = (phi[2] + phi[3]) / 2
    np.testing.assert_allclose(protos.means[0].numpy(), mu0, atol=1e-15)
    np.testing.assert_allclose(protos.means[1].numpy(), mu1, atol=1e-15)
    assert protos.counts == {0: 2, 1: 2} and protos.classes == [0, 1]

    # test points and their cosine with the normalised prototypes
    xt = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.3, 0.2, 0.3]], dtype=torch.float64)
    yt = torch.tensor([0, 1, 1])
    ht = [[1.0, 0.2], [0.0, 2.0], [0.6, 0.4]]
    want = []
    for h in ht:
        cos = [float(unit(h) @ unit(mu)) for mu in (mu0, mu1)]
        want.append(int(np.argmax(cos)))
    correct_by_hand = sum(int(p == t) for p, t in zip(want, yt.tolist()))
    acc, n = nme_accuracy(model, head, protos, xt, yt, allowed_classes=[0, 1], batch_size=2)
    assert n == 3 and acc == pytest.approx(correct_by_hand / 3, abs=1e-15)
    # mu0 points at 22.5°, mu1 at 67.5°; the third point, h = (0.6, 0.4) at 33.7°, is nearer mu0: wrong
    assert want == [0, 1, 0] and correct_by_hand == 2
    assert nme_correct(model, head, protos, [(xt, yt)], [0, 1]) == (correct_by_hand, 3)

    # a new class: its prototype added, the old ones kept as they were (no old data needed)
    old = {c: protos.means[c].clone() for c in (0, 1)}
    protos.update(model, head, [(X[4:], Y[4:])], classes=[2])
    mu2 = (phi[4] + phi[5]) / 2
    np.testing.assert_allclose(protos.means[2].numpy(), mu2, atol=1e-15)
    assert all(torch.equal(old[c], protos.means[c]) for c in (0, 1))
    # restricting to the seen classes changes the argmax: only class 1 allowed → everything predicted 1
    acc1, _ = nme_accuracy(model, head, protos, xt, yt, allowed_classes=[1])
    assert acc1 == pytest.approx(2 / 3)
    assert math.isnan(nme_accuracy(model, head, protos, xt[:0], yt[:0], [0, 1])[0])


def test_bad_input():
    model, head = model_and_head()
    protos = ClassPrototypes()
    with pytest.raises(ValueError, match="classes"):
        protos.update(model, head, [(X, Y)], classes=[0, 3])  # class 3 has no samples
    assert protos.means == {}
    with pytest.raises(ValueError, match="classes"):
        protos.update(model, head, [(X, Y)], classes=[])
    with pytest.raises(ValueError, match="head"):
        features(model, nn.Linear(2, 5), X)
    protos.update(model, head, [(X, Y)], classes=[0])
    with pytest.raises(ValueError, match="allowed_classes"):
        nme_accuracy(model, head, protos, X, Y, allowed_classes=[0, 1])
    with pytest.raises(ValueError, match="Invalid y"):
        nme_accuracy(model, head, protos, X, Y[:2], allowed_classes=[0])


def test_hook_removed_when_forward_fails():
    model, head = model_and_head()
    with pytest.raises(RuntimeError):
        features(model, head, torch.zeros(2, 7, dtype=torch.float64))
    assert not head._forward_pre_hooks and model.training
