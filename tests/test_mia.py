"""The membership-inference figure: SalUn's SVC, fit fast on rounded confidences, stable over shadow draws."""

import numpy as np
import torch
from sklearn.svm import SVC

from unlearn.evaluation import MIA_GRID, mia_efficacy, mia_from_confidences


def confidences(rng, n, sharpness):
    """True-label confidences of a well-trained classifier: most near 1, a tail towards 0."""
    return np.clip(1 - rng.exponential(sharpness, n) ** 2, 0.01, 1.0).astype(np.float32)


def test_the_rounded_fit_predicts_what_the_reference_fit_predicts():
    rng = np.random.default_rng(0)
    members, non_members = confidences(rng, 1500, 0.20), confidences(rng, 1500, 0.26)
    forget = np.linspace(0.0, 1.0, 401).astype(np.float32)
    features = np.concatenate([members, non_members])[:, None]
    sides = np.concatenate([np.ones(1500), np.zeros(1500)])
    reference = SVC(C=3, kernel="rbf", gamma="auto").fit(features, sides)
    expected = (reference.predict(forget[:, None]) == 0).mean()
    assert 0.05 < expected < 0.95  # the grid straddles the decision boundary: the comparison can fail
    assert abs(mia_from_confidences(members, non_members, forget) - expected) <= 2 / forget.size
    assert MIA_GRID >= 1000


def test_efficacy_is_stable_over_shadow_draws_where_members_and_non_members_barely_differ():
    """The MNIST case: members' confidence 0.939 against 0.941 for test samples; at 2,000 a side
    the SVC flipped between 'all members' and 'all non-members' from draw to draw."""
    rng = np.random.default_rng(1)
    pool, test = confidences(rng, 40_000, 0.250), confidences(rng, 10_000, 0.252)
    forget = confidences(rng, 100, 0.251)

    def efficacies(per_side):
        values = []
        for draw in range(5):
            pick = np.random.default_rng([7, draw])
            members, non_members = pick.choice(pool.size, per_side, replace=False), pick.choice(test.size, per_side, replace=False)
            values.append(mia_from_confidences(pool[members], test[non_members], forget))
        return values

    assert np.std(efficacies(2_000)) > 0.2  # the old sizes: the figure jumps between draws
    assert np.std(efficacies(10_000)) <= 0.05, efficacies(10_000)


def test_mia_efficacy_reports_the_mean_and_spread_of_its_draws():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, 4)).astype(np.float32)
    y = rng.integers(0, 3, 600)
    mean, std = mia_efficacy(model, x[:300], y[:300], x[300:500], y[300:500], x[500:], y[500:], draws=4, seed=3)
    assert 0.0 <= mean <= 1.0 and 0.0 <= std <= 0.5
    assert (mean, std) == mia_efficacy(model, x[:300], y[:300], x[300:500], y[300:500], x[500:], y[500:], draws=4, seed=3)
