"""Train the tiny Mixtral-style example for a few steps (a usage example).

Run from the repository root with ``python examples/train_tiny.py``. When ``moecc`` is importable and provides
``compile``, the model is compiled with ``moecc.compile(model)``; otherwise it trains in eager mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mixtral_style import build

try:
    import moecc
except ImportError:
    moecc = None  # type: ignore[assignment]


def main(steps: int = 3) -> None:
    model, (input_ids,) = build(seed=0, dtype=torch.float32, tokens=32)
    if moecc is not None and hasattr(moecc, "compile"):
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
