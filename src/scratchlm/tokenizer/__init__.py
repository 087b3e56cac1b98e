"""Byte-level BPE written from scratch: training, encoding (reference + tiktoken), files.

    from scratchlm.tokenizer import Tokenizer, train_bpe
    tok = Tokenizer.train(["corpus.txt"], vocab_size=4096)
    ids = tok.encode("Hello world<|endoftext|>")
    tok.save("my_tokenizer"); tok = Tokenizer.load("my_tokenizer")
"""

from scratchlm.tokenizer.files import TOKENIZER_FILES
from scratchlm.tokenizer.pretokenize import PATTERNS
from scratchlm.tokenizer.tokenizer import ENDOFTEXT, Tokenizer
from scratchlm.tokenizer.train import train_bpe

__all__ = ["ENDOFTEXT", "PATTERNS", "TOKENIZER_FILES", "Tokenizer", "train_bpe"]
