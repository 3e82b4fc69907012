"""A tiny model whose shapes stress FSDP2 sharding, and the training loop the sharding tests run
under ``torchrun --nproc_per_node=2`` (``main``) and in one process (``run``).

The shapes are chosen so that 2 ranks cut through blocks: 3 key/value heads of size 2 (6 rows,
3 per rank: the middle head is split), a fused QKV of 18 rows whose middle K head straddles the cut,
11 vocabulary rows (6 + 5), a gain of one element (rank 1 holds nothing of it), a 3-D tensor
and a ``Conv1D``-style (in, out) matrix whose blocks run along dim 1 (every rank holds part of
every block).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from optarena.optim import FusedPart, ParamInfo, Role, create

VOCAB, DIM, HEAD_DIM = 11, 8, 2
Q_HEADS, KV_HEADS = 6, 3
FUSED_Q_HEADS = 3
BATCH, SEQ = 4, 5
STEPS = 20
HESSIAN_EVERY = 4

# Every registered optimizer with hyperparameters that make each rule do all its work (weight
# decay on, a frozen phase that ends inside the run, Sophia's Hessian updates, classic
# Adafactor's parameter scaling and update clipping).
OPTIMIZERS: dict[str, dict] = {
    "adamw": {"lr": 1e-2, "weight_decay": 0.1},
    "adam-mini": {"lr": 1e-2, "weight_decay": 0.1},
    "adalayer": {"lr": 1e-2},
    "adafactor": {"lr": 1e-2, "weight_decay": 0.1},
    "adafactor-classic": {"lr": None, "beta1": 0.9, "weight_decay": 0.1},
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1},
    "sgd-ema": {"lr": 0.1},
    "lion": {"lr": 1e-3, "weight_decay": 0.1},
    "signum": {"lr": 1e-3},
    "sophia": {"lr": 1e-3, "bs": 20, "hessian_interval": HESSIAN_EVERY},
    "adam-frozen": {"lr": 1e-2, "precondition_steps": 5, "unfrozen_roles": ["output", "norm"]},
    "hybrid-adalayer-last-ln": {"lr": 0.1},
    "hybrid-adafactor-last-ln": {"lr": 0.1},
}


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, DIM)
        self.q_proj = nn.Linear(DIM, Q_HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=True)
        self.o_proj = nn.Linear(Q_HEADS * HEAD_DIM, DIM, bias=False)
        fused = (FUSED_Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
        self.qkv = nn.Linear(DIM, fused, bias=False)
        self.qkv_out = nn.Linear(FUSED_Q_HEADS * HEAD_DIM, DIM, bias=False)
        self.norm = nn.Parameter(torch.ones(DIM))
        self.gain = nn.Parameter(torch.ones(1))
        self.mix = nn.Parameter(torch.randn(3, 4, DIM) * 0.3)
        self.conv1d = nn.Parameter(torch.randn(DIM, 10) * 0.3)  # (in, out): blocks on dim 1
        self.down = nn.Linear(10, DIM, bias=False)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int):
        b, t, _ = q.shape
        q = q.view(b, t, heads, HEAD_DIM).transpose(1, 2)
        k = k.view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = v.view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return y.transpose(1, 2).reshape(b, t, heads * HEAD_DIM)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx)
        h = F.rms_norm(x, (DIM,)) * self.norm
        x = x + self.o_proj(self._attend(self.q_proj(h), self.k_proj(h), self.v_proj(h), Q_HEADS))
        q, k, v = self.qkv(h).split(
            [FUSED_Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1
        )
        x = x + self.qkv_out(self._attend(q, k, v, FUSED_Q_HEADS))
        x = x + torch.einsum("btd,aed->bte", x, self.mix).tanh().mean(-1, keepdim=True)
        x = x + self.down(torch.tanh(x @ self.conv1d)) * self.gain
        return self.lm_head(x)


def partition() -> dict[str, ParamInfo]:
    """The roles, stated here so that the test does not depend on the partition heuristics."""
    fused = (
        FusedPart(Role.Q, FUSED_Q_HEADS * HEAD_DIM, FUSED_Q_HEADS),
        FusedPart(Role.K, KV_HEADS * HEAD_DIM, KV_HEADS),
        FusedPart(Role.V, KV_HEADS * HEAD_DIM, KV_HEADS),
    )
    roles = {
        "tok_emb.weight": dict(role=Role.EMBEDDING),
        "q_proj.weight": dict(role=Role.Q, heads=Q_HEADS),
        "k_proj.weight": dict(role=Role.K, heads=KV_HEADS),
        "v_proj.weight": dict(role=Role.V, heads=KV_HEADS),
        "v_proj.bias": dict(role=Role.BIAS),
        "o_proj.weight": dict(role=Role.O),
        "qkv.weight": dict(role=Role.QKV, parts=fused),
        "qkv_out.weight": dict(role=Role.O),
        "norm": dict(role=Role.NORM),
        "gain": dict(role=Role.NORM),
        "mix": dict(role=Role.OTHER),
        "conv1d": dict(role=Role.MLP, out_dim=1),
        "down.weight": dict(role=Role.MLP),
        "lm_head.weight": dict(role=Role.OUTPUT),
    }
    shapes = {n: tuple(p.shape) for n, p in ToyModel().named_parameters()}
    assert set(shapes) == set(roles), set(shapes) ^ set(roles)
    return {n: ParamInfo(n, shapes[n], **kw) for n, kw in roles.items()}


def batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the step's batch (the same global batch at every world size)."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    share = BATCH // world
    tokens = tokens[rank * share : (rank + 1) * share]
    return tokens[:, :-1], tokens[:, 1:]


def new_model(dtype: torch.dtype) -> ToyModel:
    torch.manual_seed(0)
    return ToyModel().to(dtype)


def train(model: nn.Module, name: str, rank: int = 0, world: int = 1, steps: int = STEPS):
    """``steps`` optimizer steps of ``name`` on ``model`` (plain, DDP or fully_shard-ed)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    opt = create(name, inner.named_parameters(), partition=partition(), **OPTIMIZERS[name])
    for step in range(1, steps + 1):
        x, y = batch(step, rank, world)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        interval = getattr(opt, "hessian_interval", None)
        if interval and step % interval == 0:  # a second loss, as Sophia's sampled labels
            logits = model(x).flatten(0, 1)
            F.cross_entropy(logits, (y.flatten() + 1) % VOCAB).backward()
            opt.update_hessian()
            opt.zero_grad(set_to_none=True)
    return opt


def run(name: str, dtype: torch.dtype = torch.float64):
    """The single-process reference: ``(model, optimizer)`` after ``STEPS`` steps."""
    model = new_model(dtype)
    return model, train(model, name)


def main() -> None:
    """Under torchrun: every optimizer on the sharded model, for each mode in ``MODES`` (comma
    separated: ``fsdp``, ``hsdp`` — replicated over the 2 ranks, sharded within groups of 1,
    the layout of HSDP across nodes — or ``ddp``). Rank 0 saves the full parameters to
    ``OUT/<mode>/<name>.pt``; in ``fsdp`` every rank also saves the optimizer through DCP."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    modes, out = sys.argv[1].split(","), Path(sys.argv[2])
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else list(OPTIMIZERS)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for mode in modes:
        if mode == "fsdp1":
            refuse_fsdp1(out / mode, rank)
            continue
        report = {}
        for name in names:
            model = new_model(torch.float64)
            if mode == "fsdp":
                fully_shard(model)
            elif mode == "hsdp":
                mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
                fully_shard(model, mesh=mesh)
            else:
                model = DistributedDataParallel(model)
            opt = train(model, name, rank, world)
            params = {}
            for n, p in model.named_parameters():
                full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
                params[n.removeprefix("module.")] = full.detach().clone()
            if mode == "fsdp":
                report[name] = sorted(
                    k
                    for state in opt.state.values()
                    for k, v in state.items()
                    if hasattr(v, "to_local")
                )
                state = {"optim": get_optimizer_state_dict(model, opt)}
                dcp.save(state, checkpoint_id=out / "dcp" / name)
            if rank == 0:
                (out / mode).mkdir(parents=True, exist_ok=True)
                torch.save(params, out / mode / f"{name}.pt")
        if rank == 0:
            (out / mode / "sharded_state_keys.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def refuse_fsdp1(out: Path, rank: int) -> None:
    """FSDP1 with flattened parameters, and with ``use_orig_params`` (flattened views): the
    optimizer must refuse both on construction. Rank 0 writes the messages."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    refused = {}
    for key, orig in (("flat", False), ("orig", True)):
        model = FullyShardedDataParallel(
            new_model(torch.float64), device_id=torch.device("cpu"), use_orig_params=orig
        )
        try:
            create("adam-mini", model.named_parameters(), partition={})
        except ValueError as err:
            refused[key] = str(err)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "refused.json").write_text(json.dumps(refused))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
