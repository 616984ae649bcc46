"""Tiny Hugging Face models built offline, for tests of the ``transformers`` backend.

The models have random weights: they exercise every code path (tokenising, batching,
decoding, streaming, stop strings) in well under a second, but what they say means
nothing. Weights are seeded, so a model built twice with the same seed is the same model.

    path = build_tiny_causal_lm(tmp_path / "lm")          # task: generation
    path = build_tiny_classifier(tmp_path / "clf")        # task: classification

The tokenizer is a word-level ``tokenizers`` tokenizer trained on :data:`SENTENCES`
(words outside them are ``<unk>``), wrapped in ``PreTrainedTokenizerFast``. Decoding joins
words with spaces, so a completion's token count is its number of words.

Needs the ``hf`` extra (torch, transformers, tokenizers).
"""

from __future__ import annotations

import os
from pathlib import Path

# No test may reach the Hugging Face hub; set before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "a man is playing a guitar on the stage",
    "the stock market fell sharply today",
    "she reads a book in the garden every morning",
    "we will meet at the station at noon",
    "shoal serves models on many machines",
)
UNK, PAD, EOS = "<unk>", "<pad>", "<eos>"
LABELS = ("negative", "positive")


def build_tiny_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`SENTENCES`, saved with ``save_pretrained`` into ``path``."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[UNK, PAD, EOS], min_frequency=1, show_progress=False)
    tokenizer.train_from_iterator(SENTENCES, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, unk_token=UNK, pad_token=PAD, eos_token=EOS, model_max_length=64
    )
    path.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(path))
    return wrapped


def build_tiny_causal_lm(path: Path, *, seed: int = 0, n_positions: int = 64) -> Path:
    """A 2-layer GPT-2 with random weights and the tiny tokenizer, saved into ``path``; returns ``path``.

    ``n_positions`` is the longest prompt plus completion the model takes, in tokens.
    """
    tokenizer = build_tiny_tokenizer(path)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Untied, the output layer does not just favour the last input token: greedy text varies.
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(str(path))
    return path


def build_tiny_classifier(path: Path, *, seed: int = 0, labels: tuple[str, ...] = LABELS) -> Path:
    """A 2-layer BERT sequence classifier with random weights and the tiny tokenizer; returns ``path``."""
    tokenizer = build_tiny_tokenizer(path)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    model.save_pretrained(str(path))
    return path
