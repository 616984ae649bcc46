"""A long text cut to the beginning a truncating tokenizer reads, without tokenizing it whole.

An encoder truncates each text to its ``max_length`` tokens, but a tokenizer normalises and
splits the whole text before it truncates: one 20 MB text held a replica's model thread
8-15 s, every other request of the replica waiting, to be read as its first 256 tokens.

:func:`truncation_cut` tokenizes a bounded beginning instead, and keeps it only where the
tokens the model reads are certain to be those of the whole text. Tokenizers split a text
into words first (at whitespace and punctuation: BERT's, byte-level BPE's and
SentencePiece's pre-tokenizers do) and tokenize each word alone, so cutting a text changes
the tokens of the word the cut falls in, and of the whitespace before it (byte-level BPE
joins a run of spaces to the word after it), and no others. The kept tokens are therefore
those of the whole text when they all come from words before the cut beginning's last two.
Where tokens are no longer than the vocabulary's longest this holds for a beginning of
``2 * (max_length + 1) * longest`` characters; where it does not (a long word a WordPiece
vocabulary reads as one ``[UNK]``, text the tokenizer drops) the text is refused rather
than tokenized whole.
"""

from __future__ import annotations

from typing import Any

from shoal.errors import InvalidArgument

# Characters a token is taken to cover at most when the tokenizer has no vocabulary to
# measure (no ``get_vocab``): more than the longest tokens of common vocabularies.
UNMEASURED_TOKEN_CHARS = 256


def longest_token(tokenizer: Any) -> int:
    """Characters of the vocabulary's longest token; 0 for a tokenizer without ``get_vocab``."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return 0
    return max(map(len, vocab), default=0)


def cut_length(max_length: int, longest: int) -> int:
    """The characters of a text :func:`truncation_cut` tokenizes at most:
    ``2 * (max_length + 1) * longest``, ``longest`` :data:`UNMEASURED_TOKEN_CHARS` where 0."""
    return 2 * (max_length + 1) * (longest or UNMEASURED_TOKEN_CHARS)


def truncation_cut(
    tokenizer: Any, text: str, max_length: int, longest: int, *, name: str = "the text"
) -> str:
    """``text`` itself when it has at most :func:`cut_length` characters; else its beginning
    of that many characters (its end, for a tokenizer that truncates on the left), which the
    tokenizer truncated to ``max_length`` reads as the same tokens as the whole text.

    Only the beginning is tokenized. Raises InvalidArgument, naming the text as ``name``,
    when the tokens ``max_length`` keeps reach into the beginning's last two words, so that
    they could differ from the whole text's: a long run of characters the tokenizer reads as
    few tokens. For a tokenizer that does not say which word a token comes from (no
    ``word_ids``), the beginning must make more than twice ``max_length`` tokens instead.
    Safe to call from any one thread at a time per tokenizer, as the tokenizer is.
    """
    head = cut_length(max_length, longest)
    if len(text) <= head:
        return text
    left = getattr(tokenizer, "truncation_side", "right") == "left"
    cut = text[-head:] if left else text[:head]
    encoding = tokenizer(cut, truncation=False, verbose=False)
    kept = max(1, max_length - tokenizer.num_special_tokens_to_add(pair=False))
    try:
        words = [w for w in encoding.word_ids() if w is not None]
    except ValueError:  # a tokenizer without word ids
        tokens = len(encoding["input_ids"]) - tokenizer.num_special_tokens_to_add(pair=False)
        if tokens > 2 * kept:
            return cut
        found = f"{tokens} tokens"
    else:
        if left:
            words = [words[-1] - w for w in reversed(words)]
        if len(words) > kept and words[kept - 1] < words[-1] - 1:
            return cut
        found = f"{len(words)} tokens in {words[-1] + 1 if words else 0} words"
    side = "last" if left else "first"
    raise InvalidArgument(
        f"{name} has {len(text)} characters, more than {head}, and its {side} {head} make {found}: "
        f"too few to tell the {max_length} tokens the model reads from them alone (a long word "
        f"read as one token, or characters the tokenizer drops); send its {side} {head} "
        "characters or fewer"
    )
