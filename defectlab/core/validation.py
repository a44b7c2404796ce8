"""Validation of a fine-tune: which training images are held back, and their loss at fixed
timesteps with fixed noise, comparable across epochs and across resumes (it draws from its own
generator, never from the training loop's RNG)."""
from __future__ import annotations

import torch

from ..base.errors import DefectlabError
from ..data import dataset
from . import masks


def split(samples: list, per_class: int) -> tuple[list, list]:
    """``(train, val)``: the last ``per_class`` training images of each class validate (0: all do both)."""
    if per_class <= 0:
        return samples, samples
    train, val = [], []
    for label in sorted({s.label for s in samples}):
        members = [s for s in samples if s.label == label]
        if len(members) <= per_class:
            raise DefectlabError(f"class {members[0].defect!r} has {len(members)} training images; "
                                 f"need more than val_per_class={per_class}")
        train += members[:-per_class]
        val += members[-per_class:]
    return train, val


class Validator:
    """Loss on held-out images at fixed timesteps with fixed noise: comparable across epochs."""

    def __init__(self, samples, dcfg, base, objective, timesteps: int, seed: int, device,
                 mask_condition: bool = False, mask_loss: float = 0.0):
        ds = dataset.DefectDataset(samples, dcfg, augment=False)
        images = torch.stack([ds[i]["image"] for i in range(len(ds))]).to(device)
        self.labels = torch.tensor([ds[i]["label"] for i in range(len(ds))], device=device)
        with torch.no_grad():
            self.x0 = base.codec.encode(images)
        gen = torch.Generator().manual_seed(seed + 12345)
        n = objective.num_timesteps
        self.timesteps = torch.linspace(0, n - 1, timesteps + 2)[1:-1].round().long().to(device)
        self.noise = torch.randn((timesteps, *self.x0.shape), generator=gen).to(device)
        self.objective = objective
        # mask_condition: the held-out masks on the latent grid, fed as the extra input channel
        held_masks = torch.stack([ds[i]["mask"] for i in range(len(ds))])
        self.cond = masks.latent_mask(held_masks, self.x0.shape[-2:]).to(device) if mask_condition else None
        # mask_loss: the loss the fine-tune minimises, so that "best" means best at what it trains for
        self.weight = masks.loss_weights(held_masks, self.x0.shape[-2:], mask_loss).to(device) if mask_loss else None

    @torch.no_grad()
    def __call__(self, net) -> float:
        was_training = net.training
        net.eval()
        total = 0.0
        for t, noise in zip(self.timesteps, self.noise):
            tt = t.repeat(len(self.x0))
            xt = self.objective.add_noise(self.x0, noise, tt)
            inp = xt if self.cond is None else torch.cat([xt, self.cond.to(xt)], 1)  # mask channel
            out = net(inp, timestep=tt, class_labels=self.labels).sample
            total += self.objective.loss(out, self.x0, xt, noise, tt, self.weight)[0].mean().item()
        net.train(was_training)
        return total / len(self.timesteps)
