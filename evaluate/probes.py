"""Linear probes for the absorption measure: one-vs-rest logistic regressions, trained in torch.

`train_probes` is SAEBench's probe training (one probe per class at once, each class's positives
weighted by negatives/positives, Adam with an exponentially decaying learning rate, an optional L1
penalty for the sparse probe on SAE latents); `fit_logistic` is the small balanced L2-regularised
fit it makes with scikit-learn (C = 1, on k ≤ 10 latents), here by L-BFGS on the same objective.
"""

import torch
from torch import Tensor


def pos_weights(labels_N: Tensor, n_classes: int) -> Tensor:
    """[C] negatives / positives of each class (1 for a class with no positive)."""
    positives_C = torch.bincount(labels_N, minlength=n_classes).double()
    return ((len(labels_N) - positives_C) / positives_C.clamp(min=1)).float()


def train_probes(
    x_ND: Tensor, labels_N: Tensor, n_classes: int, *, epochs: int = 50, batch_size: int = 64, lr: float = 1e-2,
    end_lr: float = 1e-5, weight_decay: float = 1e-4, l1: float = 0.0, seed: int = 0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(weights [C, D], biases [C]) of C one-vs-rest logistic probes on rows x_ND."""
    generator = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(x_ND.shape[1], n_classes)
    with torch.no_grad():  # a seeded start, as the batches are
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=generator) / x_ND.shape[1] ** 0.5)
        probe.bias.zero_()
    targets_NC = torch.nn.functional.one_hot(labels_N, n_classes).float()
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weights(labels_N, n_classes))
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=(end_lr / lr) ** (1 / epochs))
    for _ in range(epochs):
        for batch in torch.randperm(len(x_ND), generator=generator).split(batch_size):
            loss = loss_fn(probe(x_ND[batch]), targets_NC[batch])
            if l1:
                loss = loss + l1 * probe.weight.abs().sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        schedule.step()
    return probe.weight.detach(), probe.bias.detach()


def fit_logistic(x_NK: Tensor, y_N: Tensor, C: float = 1.0, steps: int = 100) -> tuple[Tensor, Tensor]:
    """(w [K], b): argmin ½‖w‖² + C·Σ_n c_n·log(1 + exp(−s_n (w·x_n + b))), s = ±1, classes weighted
    to balance (c = N / (2 · count of its class)): scikit-learn's LogisticRegression(class_weight=
    "balanced"), which SAEBench fits on each letter's k main-latent candidates."""
    x_NK, y_N = x_NK.double(), y_N.double()
    n_pos = float(y_N.sum())
    n_neg = len(y_N) - n_pos
    weight_N = torch.where(y_N > 0, len(y_N) / (2 * max(n_pos, 1)), len(y_N) / (2 * max(n_neg, 1)))
    sign_N = 2 * y_N - 1
    w_K = torch.zeros(x_NK.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w_K, b], max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def objective() -> Tensor:
        opt.zero_grad()
        margins_N = sign_N * (x_NK @ w_K + b)
        loss = 0.5 * w_K.square().sum() + C * (weight_N * torch.nn.functional.softplus(-margins_N)).sum()
        loss.backward()
        return loss

    opt.step(objective)
    return w_K.detach().float(), b.detach().float()


def f1_score(predicted_N: Tensor, truth_N: Tensor) -> float:
    """F1 of boolean predictions against boolean truth (0 when nothing is predicted or true)."""
    tp = float((predicted_N & truth_N).sum())
    denominator = float(predicted_N.sum() + truth_N.sum())
    return 2 * tp / denominator if denominator else 0.0
