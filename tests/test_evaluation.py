"""Evaluation split over the ranks gives one process's results: zero-shot retrieval (ITC ranking, ITM re-ranking
of the top k, the recalls) and finetune.predict, in 2 gloo processes whose shares are uneven (so the last share is
padded for the gather); and the batched ITM re-ranking equals re-ranking one query at a time."""
import json
import os
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from PIL import Image

import finetune
from lib import formats
from lib import retrieval
from lib import runtime
import train
from conftest import gloo_group, rendezvous, tiny_config
from model import XFM

# 10 images, 13 captions; k = 2 and 4 rows per forward (2 queries per ITM call) -> shares (rank 0 | rank 1) of
# 8 | 2 images, 8 | 5 texts, 8 | 5 text queries, 6 | 4 image queries. finetune.predict: 11 examples in batches
# of 3 -> 6 | 5.
N_IMAGES, TWO_CAPTIONS, K, BS = 10, (1, 4, 7), 2, 4
N_EXAMPLES, EVAL_BS = 11, 3


class CharTokenizer:
    """A stand-in for tokenizer.Tokenizer: <s>, one id per character (in the tiny model's 64 words), </s>."""
    pad_id = 1

    def encode(self, text, max_len):
        return [0] + [5 + ord(c) % 59 for c in text][:max_len - 2] + [2]


def held_out_set(folder):
    """N_IMAGES random 32 x 32 images with one caption each (two for TWO_CAPTIONS), as a pairs file."""
    g = torch.Generator().manual_seed(0)
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    with open(os.path.join(folder, "pairs.jsonl"), "w") as f:
        for i in range(N_IMAGES):
            pixels = (torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()
            Image.fromarray(pixels).save(os.path.join(folder, "img", f"{i}.png"))
            caps = [f"picture {i} of {N_IMAGES}"] + ([f"another look at {i}"] if i in TWO_CAPTIONS else [])
            f.write(json.dumps({"image": f"img/{i}.png", "caption": caps}) + "\n")
    return os.path.join(folder, "pairs.jsonl")


def examples():
    """finetune.Examples of N_EXAMPLES token lists of different lengths, each with a label."""
    recs = [{"ids": [0] + [5 + (3 * i + j) % 50 for j in range(2 + i % 4)] + [2], "label": i} for i in range(N_EXAMPLES)]
    return finetune.Examples(recs, lambda r: {"ids": r["ids"], "label": torch.tensor(r["label"])}, pad_id=1)


def evaluate(rank, world, folder):
    """Retrieval and finetune.predict as rank `rank` of `world` -> {scores, recalls, predict, n}."""
    torch.manual_seed(0)  # the same tiny model in every process
    model = XFM(tiny_config()).eval()
    rs = retrieval.load_retrieval_set(os.path.join(folder, "pairs.jsonl"), CharTokenizer(), 32, 16,
                                      formats.BadInput(verbose=False))
    sc = retrieval.scores(model, rs, torch.device("cpu"), K, BS, nullcontext, rank, world)
    emb = nn.Embedding(64, 4)
    cfg = SimpleNamespace(eval_batch_size=EVAL_BS, num_workers=0, task="toy")
    env = SimpleNamespace(rank=rank, world=world, master=rank == 0, device=torch.device("cpu"), autocast=nullcontext)
    fn = lambda m, b: (m(b["ids"]) * b["att"][..., None]).sum(1)         # (B, 4)  # noqa: E731
    out, gold = finetune.predict(cfg, env, emb, examples(), fn, target="label")
    return {"scores": sc, "recalls": retrieval.recalls(sc, rs), "predict": (out, gold),
            "n": (len(rs["image"]), len(rs["ids"]))}


def _worker(rank, meet, folder):
    with gloo_group(rank, 2, meet, timeout_s=30):
        res = evaluate(rank, 2, folder)
        # 3 rows in batches of 4: rank 1's share is empty (None); bf16, as under --amp=bf16
        rows = torch.arange(6, dtype=torch.bfloat16).view(3, 2)
        res["empty_share"] = runtime.gather_shares(rows if rank == 0 else None, 3, rank, 2, unit=4)
        torch.manual_seed(0)  # train.py's end-of-run evaluation under --fsdp: a plain copy of the model on every rank
        model = XFM(tiny_config())
        runtime.shard(train.LossModel(model, True), model)
        res["unsharded"] = runtime.unsharded(model, lambda: XFM(tiny_config())).state_dict()
        torch.save(res, os.path.join(folder, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """(one process's results, [rank 0's, rank 1's] in 2 gloo processes) on the same set and model; each rank's
    also holds runtime.unsharded's copy of a model sharded over the 2 ranks."""
    folder = str(tmp_path_factory.mktemp("evaldist"))
    held_out_set(folder)
    mp.spawn(_worker, args=(rendezvous(), folder), nprocs=2, join=True)
    return evaluate(0, 1, folder), [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in (0, 1)]


def test_shares_are_uneven_whole_batches():
    """The setting the 2-process tests rely on: each rank's share is whole batches, the last one shorter."""
    assert [list(runtime.share(10, r, 2, BS)) for r in (0, 1)] == [list(range(8)), [8, 9]]
    assert [len(runtime.share(13, r, 2, BS)) for r in (0, 1)] == [8, 5]
    assert [len(runtime.share(N_EXAMPLES, r, 2, EVAL_BS)) for r in (0, 1)] == [6, 5]
    assert [len(runtime.share(1, r, 3)) for r in range(3)] == [1, 0, 0]


def test_gather_with_an_empty_share_two_processes(one_and_two):
    """A rank with no rows (fewer batches than ranks) takes part in the gather with rank 0's shape and dtype."""
    for res in one_and_two[1]:
        assert torch.equal(res["empty_share"], torch.arange(6, dtype=torch.bfloat16).view(3, 2))


def test_retrieval_two_processes_equals_one(one_and_two):
    """Every rank gets one process's ITC scores and ITM logits (the same batches: equal up to float rounding, and
    -100 at the same pairs) and exactly its recalls, ITC-only and ITM re-ranked."""
    one, two = one_and_two
    assert one["n"] == (N_IMAGES, N_IMAGES + len(TWO_CAPTIONS))
    for res in two:
        assert res["recalls"] == one["recalls"]
        for name in ("itc", "t2i", "i2t"):
            assert res["scores"][name].shape == one["scores"][name].shape, name
            assert torch.equal(res["scores"][name] == -100, one["scores"][name] == -100), name
            assert torch.allclose(res["scores"][name], one["scores"][name], rtol=1e-5, atol=1e-5), name
    assert (one["scores"]["t2i"] > -100).sum(1).eq(K).all()                 # the top k of each query re-ranked


def test_predict_two_processes_equals_one(one_and_two):
    """finetune.predict split over 2 ranks (6 | 5 examples) gives every rank one process's outputs and targets,
    in the dataset's order."""
    one, two = one_and_two
    out, gold = one["predict"]
    assert out.shape == (N_EXAMPLES, 4) and gold.tolist() == list(range(N_EXAMPLES))
    for res in two:
        assert torch.allclose(res["predict"][0], out, rtol=1e-6, atol=1e-6) and torch.equal(res["predict"][1], gold)


def rerank_one_query_at_a_time(model, sim, t, att, v, k, query_is_text=True):
    """The plain version of retrieval.rerank: one fusion call per query on its k candidates."""
    out = torch.full_like(sim, -100.0)
    top = sim.topk(k, dim=1).indices
    for q in range(sim.shape[0]):
        cand = top[q]
        if query_is_text:
            tt, aa, vv = t[q].expand(k, -1, -1), att[q].expand(k, -1), v[cand]
        else:
            tt, aa, vv = t[cand], att[cand], v[q].expand(k, -1, -1)
        out[q, cand] = model.itm_head(model.fuse(tt, aa, vv)[:, 0])[:, 1].float()
    return out


@torch.no_grad()
def test_batched_rerank_equals_one_query_at_a_time():
    """retrieval.rerank with 2 queries x 3 candidates per fusion call (7 rows allowed; the last call holds one
    query) gives each query's own ITM logits, both ways, on texts with padding."""
    torch.manual_seed(0)
    model = XFM(tiny_config()).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 64, (5, 9), generator=g)
    att = (torch.arange(9)[None] < torch.tensor([9, 4, 6, 3, 7])[:, None]).long()  # 5 texts of different lengths
    t = model.encode_text(ids, att)                                        # (5, 9, D)
    v = model.encode_image(torch.randn(6, 3, 32, 32, generator=g))        # (6, 1+P, D)
    sim = torch.randn(5, 6, generator=g)                                   # texts x images
    for query_is_text, s, tv in ((True, sim, (t, att, v)), (False, sim.t().contiguous(), (t, att, v))):
        want = rerank_one_query_at_a_time(model, s, *tv, 3, query_is_text)
        got = retrieval.rerank(model, s, *tv, 3, nullcontext, query_is_text, batch_size=7)
        assert torch.equal(got == -100, want == -100)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


def test_unsharded_gives_every_rank_the_plain_model(one_and_two):
    """runtime.unsharded of an FSDP-sharded model: every rank gets the whole model, as it was before sharding (the
    temperature 0-dim again)."""
    torch.manual_seed(0)
    want = XFM(tiny_config()).state_dict()
    for res in one_and_two[1]:
        got = res["unsharded"]
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
