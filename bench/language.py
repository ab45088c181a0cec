"""Text models of the benchmarks, offline: the Python standard library's own ``.py`` files as a byte-level corpus,
a small GPT-2 language model and a small BERT classifier built from configs with random weights (transformers,
the ``hf`` extra; nothing is downloaded).

The corpus is the top level of the running Python's stdlib folder (``sysconfig``'s ``stdlib`` path; no
``site-packages``, no subfolders), sorted by name; ``corpus_identity`` names the files and hashes their bytes so a
published figure says which text it was measured on.
"""

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

BYTES = 256
PAD, BOS, CLS = 256, 257, 258  # special tokens after the 256 byte values
VOCAB = 259


@dataclass
class Corpus:
    """The stdlib's top-level ``.py`` files: their names, their bytes joined, and an identity to publish."""

    root: str
    files: List[str]  # names relative to root, sorted
    sizes: List[int]
    text: bytes  # every file's bytes, in ``files`` order, each followed by a newline

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text).hexdigest()

    @property
    def identity(self) -> dict:
        """JSON-able: where the text came from, which files, how many bytes, and their hash."""
        return {"root": self.root, "num_files": len(self.files), "num_bytes": len(self.text),
                "sha256": self.sha256, "files": list(self.files)}


def stdlib_corpus(max_files: Optional[int] = None) -> Corpus:
    """The running Python's stdlib ``*.py`` files (top level only), sorted; the first ``max_files`` if given."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(root.glob("*.py"))[:max_files]
    if not paths:
        raise FileNotFoundError(f"no .py files under the stdlib path {root}")
    chunks = [p.read_bytes() + b"\n" for p in paths]
    return Corpus(str(root), [p.name for p in paths], [len(c) for c in chunks], b"".join(chunks))


def encode(text: bytes) -> np.ndarray:
    """Bytes as token ids 0..255 (int64)."""
    return np.frombuffer(text, dtype=np.uint8).astype(np.int64)


def windows(tokens: np.ndarray, length: int, count: Optional[int] = None, start: int = 0) -> np.ndarray:
    """Non-overlapping windows of ``length`` tokens from ``start``: [count, length] int64 (as many as fit if
    ``count`` is None)."""
    fit = (tokens.size - start) // length
    count = fit if count is None else count
    if count > fit:
        raise ValueError(f"{count} windows of {length} tokens need {count * length} tokens; {tokens.size - start} left")
    return tokens[start:start + count * length].reshape(count, length).copy()


def gpt2_config(n_embd: int = 192, n_layer: int = 4, n_head: int = 4, n_positions: int = 128, dropout: float = 0.0):
    """A byte-level GPT-2 config: with the defaults about 1.9 M parameters, wte tied to lm_head."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                      n_inner=4 * n_embd, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                      bos_token_id=BOS, eos_token_id=BOS, pad_token_id=PAD, tie_word_embeddings=True)


def build_gpt2(seed: int = 0, **config) -> torch.nn.Module:
    """``GPT2LMHeadModel`` from ``gpt2_config(**config)``, random weights from ``seed``, eager attention."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = gpt2_config(**config)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg)


def bert_config(hidden: int = 128, layers: int = 2, heads: int = 2, max_positions: int = 128, num_labels: int = 2):
    """A small byte-level BERT classifier config (about 0.5 M parameters with the defaults), no dropout."""
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=2 * hidden, max_position_embeddings=max_positions, num_labels=num_labels,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD)


def build_bert(seed: int = 0, **config) -> torch.nn.Module:
    """``BertForSequenceClassification`` from ``bert_config(**config)``, random weights from ``seed``."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = bert_config(**config)
    cfg._attn_implementation = "eager"
    return BertForSequenceClassification(cfg)


def classification_windows(corpus: Corpus, length: int, count: int, seed: int = 0):
    """``count`` windows of ``length - 1`` bytes after a CLS token, each labelled 1 if it comes from a file whose
    name starts with ``_`` (the stdlib's private modules) and 0 otherwise: a real, learnable-ish binary task.
    Returns (input_ids [count, length], labels [count])."""
    rng = np.random.default_rng(seed)
    ends = np.cumsum(corpus.sizes)
    starts = ends - np.asarray(corpus.sizes)
    tokens = encode(corpus.text)
    ids = np.empty((count, length), np.int64)
    labels = np.empty(count, np.int64)
    usable = [i for i, size in enumerate(corpus.sizes) if size > length]
    for row in range(count):
        f = usable[int(rng.integers(len(usable)))]
        at = int(rng.integers(starts[f], ends[f] - length))
        ids[row, 0] = CLS
        ids[row, 1:] = tokens[at:at + length - 1]
        labels[row] = int(corpus.files[f].startswith("_"))
    return ids, labels
