"""Held-out shapes: kept out of training by a hash of their id, measured before and after the run.

For network=vae the loop keeps ``TrainConfig.holdout`` of the shapes (the same meshes at every
resolution and on every rerun: the hash is of the mesh id alone) out of every worker's share. Rank 0
gathers them as the data streams by and, at the last checkpoint, decodes them with the weights the run
started from and with its EMA weights: Chamfer, F1@0.005, F1@0.001 and normal consistency of each
(``pipeline.vae_eval``), written as ``eval.json`` beside the weights.
"""
from __future__ import annotations

import logging
import time
import zlib

import torch

from model.vae import SparseSDFVAE
from pipeline.vae_eval import evaluate

log = logging.getLogger(__name__)

SCALE = 1_000_000


def is_held_out(mesh_id: str, share: float) -> bool:
    return share > 0 and zlib.crc32(b"holdout:" + mesh_id.encode()) % SCALE < share * SCALE


class HeldOutEvaluation:
    """Rank 0's held-out shapes and the weights the run started from (an SS-VAE objective's ``vae.`` keys)."""

    def __init__(self, model_config, initial_state: dict, points: int):
        self.model_config, self.points = model_config, points
        self.initial = {k.removeprefix("vae."): v.detach().float().cpu().clone() for k, v in initial_state.items()}
        self.samples: dict = {}

    def add(self, sample) -> None:
        self.samples.setdefault(sample.mesh_id, sample)

    def _evaluate(self, state: dict, device, when: str) -> dict:
        model = SparseSDFVAE(self.model_config)
        model.load_state_dict(state)
        t = time.time()
        out = evaluate(model.to(device), [self.samples[k] for k in sorted(self.samples)], self.points, device)
        log.info("held-out %s: %d shapes in %.1f s, Chamfer %.5f", when, len(self.samples), time.time() - t,
                 out["chamfer"])
        return out

    @torch.no_grad()
    def run(self, final_state: dict, device) -> dict | None:
        """{"before", "after", "shapes"} over the shapes gathered so far; None when there are none."""
        if not self.samples:
            log.warning("no held-out shape was read before the run ended: nothing to evaluate")
            return None
        after = {k.removeprefix("vae."): v for k, v in final_state.items()}
        return {"shapes": sorted(self.samples), "before": self._evaluate(self.initial, device, "before training"),
                "after": self._evaluate(after, device, "after training")}
