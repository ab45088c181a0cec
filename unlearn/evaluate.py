"""Evaluation: the seed's forgotten/rest cells, UA/RA/TA, and membership inference.

MIA efficacy follows SalUn (OPTML-Group/Unlearn-Saliency): an SVC (rbf, C=3) trained
on the true-label confidence of retained training samples (members) against test
samples (non-members), applied to the forget set; efficacy is the share of forget
samples it calls non-members (higher = more forgotten).
"""

import numpy as np
import torch

EVAL_BATCH = 1024
MIA_METHOD = "SalUn SVC(rbf, C=3) on true-label confidence; members=retained train, non-members=test"


@torch.no_grad()
def predict(model, x, batch=EVAL_BATCH):
    """Logits of the model on x, as a float32 CPU tensor [N, classes], in batches."""
    device = next(model.parameters()).device
    model.eval()
    outputs = [model(torch.as_tensor(x[i : i + batch]).to(device)).float().cpu() for i in range(0, len(x), batch)]
    return torch.cat(outputs) if outputs else torch.empty(0)


def accuracy(model, x, y):
    if len(y) == 0:
        return float("nan")
    return float((predict(model, x).argmax(1).numpy() == y).mean())


def per_sample_stats(model, x, y):
    """(correct bool [N], loss [N], true-label confidence [N])."""
    if len(y) == 0:
        return np.zeros(0, np.bool_), np.zeros(0, np.float32), np.zeros(0, np.float32)
    logits = predict(model, x)
    target = torch.as_tensor(y)
    loss = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    confidence = torch.softmax(logits, 1).gather(1, target[:, None])[:, 0]
    return (logits.argmax(1) == target).numpy(), loss.numpy(), confidence.numpy()


def mia_efficacy(model, retained_x, retained_y, test_x, test_y, forget_x, forget_y, max_per_side=2000, seed=0):
    """SalUn's MIA efficacy (see module doc); members/non-members subsampled to max_per_side each."""
    from sklearn.svm import SVC

    rng = np.random.default_rng(seed)
    count = min(len(retained_y), len(test_y), max_per_side)
    members = rng.choice(len(retained_y), count, replace=False)
    non_members = rng.choice(len(test_y), count, replace=False)
    _, _, conf_in = per_sample_stats(model, retained_x[members], retained_y[members])
    _, _, conf_out = per_sample_stats(model, test_x[non_members], test_y[non_members])
    _, _, conf_forget = per_sample_stats(model, forget_x, forget_y)
    features = np.concatenate([conf_in, conf_out])[:, None]
    labels = np.concatenate([np.ones(count), np.zeros(count)])
    classifier = SVC(C=3, kernel="rbf", gamma="auto").fit(features, labels)
    return float((classifier.predict(conf_forget[:, None]) == 0).mean())


def evaluate(model, data, forget_keys, forget_class=None, excluded=None, retained_limit=None, seed=0):
    """Every metric of a forget request on one model.

    ``excluded``: every training sample not retained (default: the forget set); a chain
    of requests excludes what earlier requests forgot too.

    forgotten_acc / rest_acc: the seed's cells, on the test set (class requests: the
    class / every other class; sample requests: the forget samples / the test set).
    ua / ra / ta: accuracy on the forget set, the retained training set, the test set.
    """
    retained = np.setdiff1d(np.arange(len(data)), forget_keys if excluded is None else excluded)
    if retained_limit is not None and retained.size > retained_limit:
        retained = np.sort(np.random.default_rng(seed).choice(retained, retained_limit, replace=False))
    forget_x, forget_y = data.train_x[forget_keys], data.train_y[forget_keys]
    ua = accuracy(model, forget_x, forget_y)
    ta = accuracy(model, data.test_x, data.test_y)
    if forget_class is not None:
        in_class = data.test_y == forget_class
        forgotten_acc = accuracy(model, data.test_x[in_class], data.test_y[in_class])
        rest_acc = accuracy(model, data.test_x[~in_class], data.test_y[~in_class])
    else:
        forgotten_acc, rest_acc = ua, ta
    return {
        "forgotten_acc": forgotten_acc,
        "rest_acc": rest_acc,
        "ua": ua,
        "ra": accuracy(model, data.train_x[retained], data.train_y[retained]),
        "ta": ta,
        "mia_efficacy": mia_efficacy(model, data.train_x[retained], data.train_y[retained], data.test_x,
                                     data.test_y, forget_x, forget_y, seed=seed),
        "mia_method": MIA_METHOD,
        "forget_loss": float(per_sample_stats(model, forget_x, forget_y)[1].mean()) if len(forget_keys) else None,
    }
