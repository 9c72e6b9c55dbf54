"""Train the tiny Mixtral-style example with moecc for a few steps: the smallest end-to-end use.

python examples/train_tiny.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import moecc
from moecc.examples.mixtral_style import build


def main(steps: int = 3) -> None:
    model, (input_ids,) = build(seed=0, dtype=torch.float32, tokens=32)
    model = moecc.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        logits = model(input_ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
