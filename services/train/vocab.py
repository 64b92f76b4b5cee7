"""The byte-level vocabulary shared by the model and the data pipeline.

Bytes need no tokenizer files (nothing to download, nothing to version) and every node maps text to
the same ids; three specials mark document boundaries and padding.
"""

from __future__ import annotations

BYTE_COUNT = 256
BOS = 256
EOS = 257
PAD = 258
VOCAB_SIZE = 259
