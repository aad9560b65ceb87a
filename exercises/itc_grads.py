"""
Exercise 4 of EXERCISES.md: the ITC gradient when the batch is split over W processes, four ways.

    python exercises/itc_grads.py                                            # W = 1: every variant is exact
    torchrun --standalone --nproc_per_node=2 exercises/itc_grads.py          # W = 2 (gloo on the CPU)
    torchrun --standalone --nproc_per_node=4 exercises/itc_grads.py          # W = 4

One fixed batch of N = 12 image-text pairs goes through two small projections (the stand-in for the encoders'
ITC heads) and a learnable temperature. The reference is one process on all N pairs. Each rank then takes its
N / W rows and computes ITC one way; the gradients are averaged over the ranks (what DDP does) and compared
with the reference, separately for the projections (the encoders) and for the temperature.

    global       losses.itc_loss: local queries x keys gathered WITH autograd (losses.gather_with_grad)
    nograd       N x N logits from a plain all-gather, this rank's slice put back with its graph
                 (open_clip's default; X-FM's official ITC has the same effect, docs/METHOD.md §6.2)
    local_keys   local queries x gathered keys, only this rank's keys keep their graph (torchmultimodal LOCAL)
    local_only   no gather at all: each rank contrasts its own N / W pairs (fewer negatives, another loss)

Theory: docs/METHOD.md §6.2. The script exits with status 1 if `global` does not match the reference.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import losses  # noqa: E402

N, DIM_IN, DIM_OUT = 12, 16, 8


def setup(seed=0):
    """The same projections, temperature and batch on every rank."""
    torch.manual_seed(seed)
    proj_v, proj_t = torch.nn.Linear(DIM_IN, DIM_OUT), torch.nn.Linear(DIM_IN, DIM_OUT)
    proj_t.load_state_dict(proj_v.state_dict())  # a half-trained model: the two towers roughly agree ...
    temp = torch.nn.Parameter(torch.tensor(0.07))
    x_v = torch.randn(N, DIM_IN)
    x_t = x_v + 0.8 * torch.randn(N, DIM_IN)  # ... and a caption is a noisy view of its image
    return proj_v, proj_t, temp, x_v, x_t


def rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def with_own_slice(local, gathered, start):
    """The gathered tensor (no graph) with this rank's rows replaced by the local tensor (with its graph)."""
    return torch.cat([gathered[:start], local, gathered[start + len(local):]])


def itc_variant(name, f_v, f_t, temp):
    """This rank's ITC loss under one of the four variants. f_v, f_t (B, E): this rank's normalised rows."""
    rank, world = rank_and_world()
    B = len(f_v)
    start = rank * B
    if name == "global":
        return losses.itc_loss(f_v, f_t, temp)
    if name == "local_only":
        y = torch.arange(B)
        s = f_v @ f_t.t() / temp
        return 0.5 * (F.cross_entropy(s, y) + F.cross_entropy(s.t(), y))
    all_v = with_own_slice(f_v, losses.gather_no_grad(f_v.detach()), start)  # (N, E)
    all_t = with_own_slice(f_t, losses.gather_no_grad(f_t.detach()), start)
    if name == "nograd":  # every rank computes the whole N x N loss
        y = torch.arange(len(all_v))
        s = all_v @ all_t.t() / temp
        return 0.5 * (F.cross_entropy(s, y) + F.cross_entropy(s.t(), y))
    if name == "local_keys":  # this rank's B queries against all N keys
        y = torch.arange(B) + start
        return 0.5 * (F.cross_entropy(f_v @ all_t.t() / temp, y) + F.cross_entropy(f_t @ all_v.t() / temp, y))
    raise ValueError(name)


def grads(name, rows):
    """(loss, projection gradient, temperature gradient) of this rank's rows, averaged over the ranks like DDP."""
    proj_v, proj_t, temp, x_v, x_t = setup()
    f_v, f_t = F.normalize(proj_v(x_v[rows]), dim=-1), F.normalize(proj_t(x_t[rows]), dim=-1)
    loss = itc_variant(name, f_v, f_t, temp)
    g = torch.autograd.grad(loss, [*proj_v.parameters(), *proj_t.parameters(), temp])
    g_proj, g_temp, loss = torch.cat([x.flatten() for x in g[:-1]]), g[-1].clone(), loss.detach().clone()
    _, world = rank_and_world()
    if world > 1:
        for x in (loss, g_proj, g_temp):
            dist.all_reduce(x)
            x /= world
    return loss, g_proj, g_temp


def main():
    # the reference first, before any process group exists: one process, all N rows
    ref_loss, ref_proj, ref_temp = grads("global", slice(0, N))
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank, world = rank_and_world()
    if N % world:
        raise SystemExit(f"error: N = {N} rows do not split over {world} processes (use 1, 2, 3, 4 or 6)")
    rows = slice(rank * N // world, (rank + 1) * N // world)
    out = {name: grads(name, rows) for name in ("global", "nograd", "local_keys", "local_only")}
    ok = torch.allclose(out["global"][1], ref_proj, atol=1e-6) and torch.allclose(out["global"][2], ref_temp, atol=1e-6)
    if rank == 0:
        print(f"ITC on N = {N} pairs split over W = {world} process(es), {N // world} rows each; gradients averaged "
              f"over the ranks (DDP) and compared with one process on all {N} rows")
        print(f"reference: loss {ref_loss:.4f}  |grad projections| {ref_proj.norm():.4e}  grad temperature {ref_temp:+.4e}")
        print(f"{'variant':<12} {'loss':>8} {'|g| / |g_ref|':>14} {'cos(g, g_ref)':>14} {'temp grad / ref':>16}")
        for name, (loss, g_proj, g_temp) in out.items():
            ratio = float(g_proj.norm() / ref_proj.norm())
            cos = float(F.cosine_similarity(g_proj, ref_proj, dim=0))
            print(f"{name:<12} {loss:8.4f} {ratio:14.4f} {cos:14.4f} {float(g_temp / ref_temp):16.4f}")
        print("global matches the reference" if ok else "ERROR: the global ITC gradient does not match the reference")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
