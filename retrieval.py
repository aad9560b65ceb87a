"""
Zero-shot and fine-tuned image-text retrieval, the way X-FM evaluates it (docs/METHOD.md §7.3): ITC ranks every pair, then
the ITM head re-scores the top k candidates of each query, and every pair outside the top k scores -100.
train.py runs it on the held-out pairs at the end of pre-training; finetune.py's retrieval task uses it too.
"""
import numpy as np
import torch

import data
import formats


def load_retrieval_set(path, tok, image_size, caption_len, bad, image_root=""):
    """Held-out pairs with images deduplicated, for retrieval: image (Ni,3,S,S), ids/att (Nt,T),
    txt2img (Nt,) and img2txt (Ni lists of text indices). Reads formats.parse_test_pairs: pairs files, ALBEF's
    test JSON and the test split of Karpathy's dataset_*.json. Unreadable images are reported and dropped."""
    index, images, seqs, txt2img, img2txt = {}, [], [], [], []
    for item in formats.parse_test_pairs(path, bad, image_root):
        p = item["image"]
        if p not in index:
            try:
                images.append(data.eval_transform(formats.load_image(p), image_size))
                index[p] = len(images) - 1
                img2txt.append([])
            except Exception as e:
                bad.report("unreadable image", item["where"], f"{p}: {e}", action="dropped with its captions")
                index[p] = None
        if index[p] is not None:
            img2txt[index[p]].append(len(seqs))
            txt2img.append(index[p])
            seqs.append(tok.encode(item["caption"], caption_len))
    if not images:
        raise ValueError(f"{path}: no readable image-text pair for retrieval")
    ids = data.pad_seqs(seqs, tok.pad_id)
    return {"image": torch.stack(images), "ids": ids, "att": data.padding_mask(seqs, ids.shape[1]),
            "txt2img": torch.tensor(txt2img, dtype=torch.long), "img2txt": img2txt}


@torch.no_grad()
def rerank(model, sim, t, att, v, k, autocast, query_is_text=True):
    """ITM re-scoring of each query's ITC top k. sim (Nq, Nc): ITC scores of queries x candidates; t, att the
    texts' states and mask, v the images' outputs (the queries' side indexed by query, the other by candidate).
    -> (Nq, Nc): the ITM "match" logit for each query's k best candidates by ITC, -100 for every other pair."""
    out = torch.full_like(sim, -100.0)
    top = sim.topk(k, dim=1).indices                                       # (Nq, k)
    for q in range(sim.shape[0]):
        cand = top[q]
        if query_is_text:
            tt, aa, vv = t[q].expand(k, -1, -1), att[q].expand(k, -1), v[cand]
        else:
            tt, aa, vv = t[cand], att[cand], v[q].expand(k, -1, -1)
        with autocast():
            logit = model.itm_head(model.fuse(tt, aa, vv)[:, 0])[:, 1]      # ITM "match" logit
        out[q, cand] = logit.float()
    return out


@torch.no_grad()
def evaluate_retrieval(model, rs, device, k, batch_size, autocast):
    """rs: load_retrieval_set output. Returns R@1/5/10 for text->image and image->text, with ITM
    re-ranking (the official procedure: the top k by ITC get the ITM positive logit, every other pair -100)
    and by ITC alone."""
    model.eval()
    chunks = lambda n: [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    with autocast():
        v = torch.cat([model.encode_image(rs["image"][s].to(device)) for s in chunks(len(rs["image"]))])
        t = torch.cat([model.encode_text(rs["ids"][s].to(device), rs["att"][s].to(device)) for s in chunks(len(rs["ids"]))])
        f_t, f_v = model.itc_features(t, v)
    att = rs["att"].to(device)
    itc = (f_t @ f_v.t()).float()                                          # (Nt, Ni) text x image
    k = min(k, itc.shape[1], itc.shape[0])

    txt2img, img2txt = rs["txt2img"].to(device), rs["img2txt"]

    def rank(scores, right):
        """How many wrong candidates score at least as high as the best right one. Ties count against the right
        one: outside the re-ranked top k every candidate scores -100, so a right one there ranks behind them all."""
        wrong = torch.ones_like(scores, dtype=torch.bool)
        wrong[right] = False
        return int((scores[wrong] >= scores[right].max()).sum())

    def recall(sim, rights):  # a query is right at n if one of its right candidates ranks in the top n
        ranks = torch.tensor([rank(sim[q], rights[q]) for q in range(sim.shape[0])])
        return {f"r{n}": float((ranks < n).float().mean()) * 100 for n in (1, 5, 10)}

    def recall_t2i(sim):  # one right image per caption
        return recall(sim, [[int(i)] for i in txt2img])

    def recall_i2t(sim):  # every caption of the image is right
        return recall(sim, img2txt)

    res = {}
    for name, r in recall_t2i(itc).items():
        res[f"t2i_itc_{name}"] = r
    for name, r in recall_i2t(itc.t()).items():
        res[f"i2t_itc_{name}"] = r
    for name, r in recall_t2i(rerank(model, itc, t, att, v, k, autocast)).items():
        res[f"t2i_{name}"] = r
    for name, r in recall_i2t(rerank(model, itc.t().contiguous(), t, att, v, k, autocast, query_is_text=False)).items():
        res[f"i2t_{name}"] = r
    res["t2i_chance_r1"] = 100.0 / itc.shape[1]
    res["i2t_chance_r1"] = float(np.mean([len(x) for x in img2txt])) * 100.0 / itc.shape[0]
    model.train()
    return res
