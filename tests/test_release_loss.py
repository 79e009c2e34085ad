"""`feature_drifting_loss` against numbers the authors' release computed (`tools/release_loss_fixtures.py` ran its JAX
`drift_loss` on the problems stored in the fixture): the loss of every problem, the gradient with respect to the
generated features, the feature scale and each temperature's mean squared force, to 1e-5 relative in float32."""
from pathlib import Path
import numpy as np
import pytest
import torch
from drifting_nb.drift import feature_drift, feature_drifting_loss

FIXTURE = np.load(Path(__file__).parent / "fixtures" / "release" / "drift_loss.npz")
CASES = [str(c) for c in FIXTURE["cases"]]

def case(name):
    return {k.split("/", 1)[1]: torch.from_numpy(FIXTURE[k]) for k in FIXTURE.files if k.startswith(name + "/")}

def rel(a, b): return ((a - b).norm() / b.norm()).item()

@pytest.mark.parametrize("name", CASES)
def test_loss_and_gradient_match_the_release(name):
    c = case(name)
    taus = tuple(round(t, 6) for t in c["taus"].tolist())
    neg, w = (c["neg"], c["neg_weight"]) if c["neg"].shape[1] else (None, None)
    gen = c["gen"].clone().requires_grad_()
    loss, info = feature_drifting_loss(gen, c["pos"], neg, w, taus=taus)
    loss.backward()
    V, _ = feature_drift(c["gen"], c["pos"], neg, w, taus=taus)
    errs = dict(loss=rel(loss.detach(), c["loss"].mean()), per_problem=rel(V.pow(2).mean((1, 2)), c["loss"]),
                grad=rel(gen.grad, c["grad"]), scale=rel(info["mean_dist"], c["scale"]),
                force_per_tau=rel(info["drift_norm"].square(), c["loss_R"]))
    assert max(errs.values()) < 1e-5, errs
