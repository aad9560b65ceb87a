"""
The tokenizer of xfm: byte-level BPE with RoBERTa's special tokens (<s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4), a thin
wrapper around the `tokenizers` library. get_tokenizer trains one on a data folder's texts (or loads a given one).
A BERT WordPiece tokenizer.json (Hugging Face FLAVA's: [CLS] [PAD] [SEP] [UNK] [MASK], pad id 0) is read too,
its special tokens found by name;
train.py saves it in the run folder and in each checkpoint (a resumed run reads it there), so a run folder is a
complete --init for finetune.py. data.py masks what it encodes (docs/METHOD.md §4.1, §5).

The official X-FM text normalisation (normalize_text) is a property of the tokenizer, off unless a run turns it
on (train.py / finetune.py --text_norm, or for_official_weights): then encode applies it to every caption and
question, in pre-training, fine-tuning and retrieval alike, and the tokenizer.json carries it (docs/METHOD.md §10.1).
"""
import json
import os
import re

from lib import formats

# DataLoader workers fork after the tokenizer may have used its Rust thread pool; keep it single-threaded
# so the fork is safe and the library does not print a warning per worker.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

# -----------------------------------------------------------------------------
# The official X-FM text normalisation (its dataset/utils.py pre_caption and pre_question)

MAX_WORDS = 30                                 # the official captions and questions keep their first 30 words
PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~/-]")  # each becomes a space
TEXT_NORM = "xfm"                              # its name in a tokenizer.json that has it on


def normalize_text(text, max_words=MAX_WORDS):
    """A caption or question as the official X-FM code feeds it to its tokenizer: lowercased; each of
    , . ' ! ? " ( ) * # : ; ~ - / replaced by a space; runs of whitespace made one space, none at either end;
    cut to its first max_words words (None: no cut). "A Red-Circle." -> "a red circle"."""
    words = PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(words[:max_words])


# -----------------------------------------------------------------------------
# Tokenizer: byte-level BPE, RoBERTa's special tokens


class Tokenizer:
    """A thin wrapper over a `tokenizers` tokenizer.json. Special ids are looked up by string, never assumed."""

    SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # RoBERTa order: a trained vocab gets ids 0..4
    # the same roles (cls, pad, sep, unk, mask) under BERT's names, as in a WordPiece tokenizer.json
    BERT_SPECIALS = ("[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]")

    def __init__(self, hf, text_norm=False):
        # text_norm: encode applies normalize_text to captions and questions (not to documents)
        self.text_norm = bool(text_norm)
        # we add <s> ... </s> ourselves, so a trained tokenizer and RoBERTa's behave the same
        hf.no_truncation()
        hf.no_padding()
        self.hf = hf
        # the first set of names the vocabulary holds whole: RoBERTa's, else BERT's
        for names in (self.SPECIALS, self.BERT_SPECIALS):
            ids = {t: hf.token_to_id(t) for t in names}
            if None not in ids.values():
                break
        else:
            lacks = [[t for t in names if hf.token_to_id(t) is None] for names in (self.SPECIALS, self.BERT_SPECIALS)]
            raise ValueError(f"tokenizer lacks special tokens {lacks[0]} (RoBERTa's names) or {lacks[1]} (BERT's)")
        self.cls_id, self.pad_id, self.sep_id, self.unk_id, self.mask_id = ids.values()
        self.special_ids = set(ids.values())
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, texts, vocab_size, path, text_norm=False):
        """Byte-level BPE (as RoBERTa's) trained on texts, saved to path. A small corpus such as the toy world
        runs out of merges early, so the resulting `vocab_size` can be below the one asked for. Each text is cut
        to formats.MAX_TEXT_CHARS characters, as the readers cut it: one long word costs BPE training time that
        grows faster than its length. With text_norm the BPE learns the normalised texts (without the word
        cut), the form in which it reads captions and questions."""
        if text_norm:
            texts = [normalize_text(t[:formats.MAX_TEXT_CHARS], max_words=None) for t in texts]
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(cls.SPECIALS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator((t[:formats.MAX_TEXT_CHARS] for t in texts), trainer)
        tok = cls(hf, text_norm)
        tok.save(path)
        return tok

    def save(self, path):
        """tokenizer.json: the `tokenizers` library's file, or with text_norm on, to_json's wrapper of it."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if self.text_norm:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write(self.to_json())
        else:
            self.hf.save(path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: a crash never leaves half a tokenizer.json

    @classmethod
    def load(cls, path, text_norm=None):
        """The tokenizer.json at path; text_norm True or False overrides the file's own setting (None keeps
        it). A file that is none (not UTF-8, not a `tokenizers` JSON, or without RoBERTa's or BERT's special
        tokens) stops the run with one line naming it."""
        if not os.path.isfile(path):
            raise SystemExit(f"error: no tokenizer at {path}")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: {path}: cannot be read as UTF-8 text ({e})")
        return cls.from_json(text, path, text_norm)

    def to_json(self):
        """The whole tokenizer as one string: what rank 0 sends the other ranks and a checkpoint holds. The
        `tokenizers` library's JSON; with text_norm on, {"text_norm": "xfm", "tokenizer": that JSON} (the library
        refuses a key of its own JSON that it does not know)."""
        if not self.text_norm:
            return self.hf.to_str()
        return json.dumps({"text_norm": TEXT_NORM, "tokenizer": json.loads(self.hf.to_str())}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text, where="the tokenizer's JSON", text_norm=None):
        """A tokenizer from to_json's string (text_norm as in load); one that is none stops the run with one
        line naming where."""
        text, own_norm = unwrap(text, where)
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 (the tokenizers library raises a bare Exception for a bad file)
            first = str(e).strip().split("\n")[0][:160]
            raise SystemExit(f"error: {where}: not a tokenizer.json of the tokenizers library ({first})")
        try:
            return cls(hf, own_norm if text_norm is None else text_norm)
        except ValueError as e:                                            # no RoBERTa or BERT special tokens
            raise SystemExit(f"error: {where}: {e}")

    def encode(self, text, max_len, document=False):
        """<s> tokens </s>, truncated to max_len with </s> kept last. The text is cut to formats.MAX_TEXT_CHARS
        first, as the readers cut it, so no text costs more than a bounded time. With text_norm, a caption or
        question is normalised (normalize_text); a document (text-only pre-training, text classification)
        never is, as in the official code."""
        text = text[:formats.MAX_TEXT_CHARS]
        if self.text_norm and not document:
            text = normalize_text(text)
        body = self.hf.encode(text, add_special_tokens=False).ids[: max_len - 2]
        return [self.cls_id] + body + [self.sep_id]

    def decode(self, ids):
        return self.hf.decode(list(ids), skip_special_tokens=True).strip()

    def random_token(self, rng):
        while True:  # specials are few, so this rarely loops
            t = int(rng.integers(self.vocab_size))
            if t not in self.special_ids:
                return t


def unwrap(text, where):
    """to_json's string -> (the `tokenizers` library's JSON, whether text_norm is on)."""
    if not re.match(r'\s*\{\s*"text_norm"', text):                     # the library's own JSON: off
        return text, False
    try:
        d = json.loads(text)
    except ValueError as e:
        raise SystemExit(f"error: {where}: not valid JSON ({e})")
    if not isinstance(d, dict) or set(d) != {"text_norm", "tokenizer"} or d["text_norm"] != TEXT_NORM:
        raise SystemExit(f"error: {where}: a text_norm wrapper needs exactly the keys text_norm "
                         f"(\"{TEXT_NORM}\") and tokenizer")
    return json.dumps(d["tokenizer"], ensure_ascii=False), True


def for_official_weights(path):
    """The tokenizer of a model converted from official X-FM weights: the tokenizer.json at path (their
    RoBERTa's) with the official normalisation on, as those weights were trained; save() it into the export."""
    return Tokenizer.load(path, text_norm=True)


def corpus_texts(data_dir, image_root=""):
    """Every caption, region phrase and text document of a folder (not the test pairs), tar shards included
    (lib/shards.py): the tokenizer corpus."""
    from lib import shards  # (imported here: lib/shards.py imports data.py and torch, which a tokenizer needs nowhere else)
    src, quiet = formats.find_sources(data_dir), formats.BadInput(verbose=False)
    texts = [r["caption"] for r in formats.parse_pairs(src["pair"], quiet, image_root)] if "pair" in src else []
    for rec in formats.parse_regions(src["region"], quiet, image_root) if "region" in src else []:
        texts += rec["captions"] + [c for r in rec["regions"] for c in r["captions"]]
    texts += formats.parse_texts(src["text"], quiet) if "text" in src else []
    return texts + list(shards.corpus_texts(data_dir))


def get_tokenizer(data_dir, run_dir, vocab_size, tokenizer_path=None, image_root="", text_norm=False):
    """Load tokenizer_path, else train one on the folder's texts and save it as run_dir/tokenizer.json (a
    tokenizer.json already there is replaced, never reused: it may belong to another run or another data folder).
    text_norm turns the official normalisation on; off, a loaded file keeps its own setting.
    Under DDP rank 0 calls it and sends the others its JSON (runtime.rank0_shares), so they need no shared folder."""
    if tokenizer_path:
        return Tokenizer.load(tokenizer_path, text_norm or None)
    path = os.path.join(run_dir, "tokenizer.json")
    texts = corpus_texts(data_dir, image_root)
    if not texts:  # a BPE trained on nothing is bytes only, and a run on it learns far more slowly
        raise SystemExit(f"error: no texts in {data_dir} to train a tokenizer on (formats: lib/formats.py, lib/shards.py)")
    return Tokenizer.train(texts, vocab_size, path, text_norm)
