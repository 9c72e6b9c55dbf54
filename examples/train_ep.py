"""Expert-parallel training with moecc under torchrun: every rank runs this same script.

    torchrun --nproc-per-node 4 examples/train_ep.py [--steps 20] [--ep 4] [--save model.pt]

Each rank builds the same model (same seed), `moecc.compile(model, ep=...)` keeps that rank's experts and
inserts the dispatch/combine all-to-alls and the gradient synchronisation, and an ordinary optimizer trains
the rank's parameters on the rank's own batches, with the gradients clipped by the whole model's norm. With
--save, the trained model's whole state (every rank's experts) is written as the eager model's state dict.
gloo on CPU, NCCL with one GPU per rank.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import moecc
from moecc.examples import deepseek_style
from moecc.testing import lm_loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ep", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--save", default=None, help="write the whole model's state dict here (rank 0)")
    args = parser.parse_args()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")

    model, (ids,) = deepseek_style.build(seed=0, tokens=args.tokens)
    model = moecc.compile(model.to(device), ep=args.ep)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)  # each rank its own data
    for step in range(args.steps):
        batch = torch.randint(0, 64, ids.shape, generator=gen).to(device)
        loss = lm_loss(model(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        model.clip_grad_norm_(1.0)  # the whole model's norm, the same factor on every rank
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step}: loss {mean.item() / world:.4f}", flush=True)
    if rank == 0:
        mesh = model.session.mesh
        n_params = sum(p.numel() for p in model.parameters())
        print(f"done: mesh dp={mesh.dp} x ep={mesh.ep}, {n_params:,} parameters on rank 0")
    if args.save:
        state = model.full_state_dict()  # a collective: every rank takes part
        if rank == 0:
            torch.save(state, args.save)  # loads into deepseek_style.build()'s model, without moecc
            print(f"saved {len(state)} tensors to {args.save}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
