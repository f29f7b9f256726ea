"""LoRSU's layers never wait for the device inside a training step: no ``.item()``, ``bool(tensor)``, ``int(tensor)``
or ``.tolist()`` in their forward or backward (the precomputed fc1 pattern holds every number backward needs).
Checked on CPU by making those calls fail; on CUDA they would be the synchronisations that stall the GPU."""

from __future__ import annotations

import torch
from torch import nn

from peft_lorsu.lorsu.layer import HeadLoRALinear
from peft_lorsu.lorsu.sparse import SparseLinear

SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def layers(device: str) -> list[nn.Module]:
    torch.manual_seed(0)
    q = HeadLoRALinear(nn.Linear(32, 32), "default", r=4, lora_alpha=8, heads=[0, 2], head_dim=8, train_bias=True)
    k = HeadLoRALinear(nn.Linear(32, 32), "default", r=4, lora_alpha=8, heads=[0, 2], head_dim=8, factor_owner=q)
    indices = torch.randperm(64 * 32)[:200].sort().values
    fc1 = SparseLinear(nn.Linear(32, 64), "default", num_values=200, indices=indices, train_bias=True, init=False)
    return [m.to(device) for m in (q, k, fc1)]


def test_forward_and_backward_do_not_synchronise(device, monkeypatch):
    q, k, fc1 = layers(device)
    x = torch.randn(2, 5, 32, device=device, requires_grad=True)

    def step():
        return (q(x).square().sum() + k(x).sum() + fc1(x).square().sum()).backward()

    step()  # warm: the fc1 pattern is computed once, here
    grads = [p.grad.clone() for p in (*q.parameters(), *fc1.parameters()) if p.requires_grad]

    def refuse(self, *args, **kwargs):
        raise AssertionError("a host synchronisation inside the training step")

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for layer in (q, k, fc1):
        layer.zero_grad()
    step()
    monkeypatch.undo()
    again = [p.grad for p in (*q.parameters(), *fc1.parameters()) if p.requires_grad]
    for before, after in zip(grads, again):
        torch.testing.assert_close(after, before)
