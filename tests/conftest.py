"""Shared test fixtures: a tiny random-init Llama with a tokenizer trained in the test, and ../shared."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may download
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def uvicorn_in_thread(app):
    """The ASGI ``app`` under uvicorn on a free local port in a thread; yields its base URL once /health answers,
    and stops the server on leaving."""
    import httpx2 as httpx
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_local_port(), log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{srv.config.port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        yield url
    finally:
        srv.should_exit = True
        t.join(timeout=10)


def shared_dir() -> Path | None:
    p = Path(os.environ.get("TUNELAB_SHARED") or ROOT.parent / "shared")
    return p if p.is_dir() else None


@pytest.fixture
def shared() -> Path:
    p = shared_dir()
    if p is None:
        pytest.skip("../shared is absent (set TUNELAB_SHARED)")
    return p


COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
ADJECTIVES = ["small", "big", "old", "young", "happy", "sleepy", "fast", "slow", "tiny", "loud"]
ANIMALS = ["cat", "dog", "bird", "fish", "frog", "bear", "lion", "duck"]


def write_color_data(path: Path, n: int, seed: int = 0) -> Path:
    """Alpaca records with a learnable rule: every animal has one fixed color."""
    rng = random.Random(seed)
    rule = {a: COLORS[i] for i, a in enumerate(ANIMALS)}
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, adj = rng.choice(ANIMALS), rng.choice(ADJECTIVES)
            q = rng.choice(["What color is the {j} {a}?", "Tell me the color of the {j} {a}.",
                            "Which color does the {j} {a} have?"])
            f.write(json.dumps({"instruction": q.format(a=a, j=adj), "input": "",
                                "output": f"The {adj} {a} is {rule[a]}."}) + "\n")
    return path


def make_tiny_model(folder: Path, corpus: list[str]) -> Path:
    """A random-init 2-layer Llama and a BPE tokenizer trained on ``corpus``: built here, nothing downloaded."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                      tie_word_embeddings=True,
                      # Large enough weights that frozen embeddings allow confident logits: with the
                      # default 0.02, LoRA (which cannot grow the embeddings) plateaus near uniform.
                      initializer_range=0.25)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    data = write_color_data(d / "corpus.jsonl", 200, seed=123)
    corpus = [json.loads(l)["instruction"] + " " + json.loads(l)["output"] for l in data.read_text().splitlines()]
    corpus += ["### User:", "### Assistant:", "system user assistant"]
    return make_tiny_model(d / "model", corpus)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run the real tunelab CLI in a subprocess."""
    import subprocess

    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)


TOPICS = {
    "animal": ANIMALS,
    "food": ["bread", "apple", "cheese", "soup", "rice", "cake", "pear", "egg"],
    "vehicle": ["car", "bus", "train", "bike", "boat", "plane", "truck", "tram"],
    "weather": ["rain", "snow", "wind", "fog", "sun", "storm", "hail", "frost"],
}


# Animal groups: a topic rule in the words the tiny Llama's tokenizer (trained on color data) knows.
ANIMAL_TOPICS = {"pets": ["cat", "dog"], "birds": ["bird", "duck"], "water": ["fish", "frog"], "wild": ["bear", "lion"]}


def write_topic_data(path: Path, n: int, seed: int = 0, label_field: str = "label",
                     topics: dict | None = None) -> Path:
    """Labelled texts (JSONL or CSV by suffix) with a learnable rule: the noun's topic is the label."""
    import csv

    topics = topics or TOPICS
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(topics))
        text = rng.choice(["I really like the {j} {w}.", "Tell me about the {j} {w} please.",
                           "Where is the {j} {w}?", "My friend saw a {j} {w} today."])
        rows.append({"text": text.format(j=rng.choice(ADJECTIVES), w=rng.choice(topics[label])), label_field: label})
    with open(path, "w", encoding="utf-8", newline="") as f:
        if path.suffix == ".csv":
            w = csv.DictWriter(f, fieldnames=["text", label_field])
            w.writeheader()
            w.writerows(rows)
        else:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def make_tiny_bert(folder: Path, corpus: list[str]) -> Path:
    """A random-init 2-layer BERT encoder (saved as a bare BertModel, like all-MiniLM-L6-v2) and a
    WordPiece tokenizer trained on ``corpus``: built here, nothing downloaded."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    # No dropout: at this size it keeps the model from learning the rule in a few epochs.
    cfg = BertConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=64, pad_token_id=fast.pad_token_id,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tinybert")
    data = write_topic_data(d / "corpus.jsonl", 300, seed=321)
    corpus = [json.loads(l)["text"] for l in data.read_text().splitlines()]
    return make_tiny_bert(d / "model", corpus)
