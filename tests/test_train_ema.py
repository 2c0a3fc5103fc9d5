"""EMA warm-up: a short run from scratch exports trained weights; a run from another run's EMA keeps the full decay."""
import torch

from pipeline.train.engine import EMA


def _ema_after(steps: int, warmup: bool) -> float:
    lin = torch.nn.Linear(4, 4, bias=False)
    torch.nn.init.zeros_(lin.weight)
    ema = EMA(lin, 0.999, warmup=warmup)
    with torch.no_grad():
        lin.weight.fill_(1.0)  # the trained weights, reached at once
    for t in range(steps):
        ema.update(t)
    return float(ema.shadow["weight"].mean())


def test_warmup_follows_the_weights_in_a_short_run():
    assert _ema_after(20, warmup=True) > 0.99
    assert abs(_ema_after(20, warmup=False) - (1 - 0.999 ** 20)) < 1e-6  # ~2% trained: the old trap
    ema = EMA(torch.nn.Linear(2, 2), 0.999, warmup=True)
    assert ema.decay_at(0) == 0.1 and ema.decay_at(10_000) == 0.999
    assert EMA(torch.nn.Linear(2, 2), 0.999).decay_at(0) == 0.999
