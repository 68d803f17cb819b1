"""Token ids of captions seen before: a training run reads every caption once an epoch.

Tokenizing is pure (a caption always gives the same ids), and open_clip's BPE tokenizer spends most of its
time cleaning each text (ftfy, HTML unescaping, whitespace) before its own per-word cache helps. In the
training process (``num_workers: 0``) the cache lives as long as the run, so every epoch after the first
looks its captions up; loader workers start from the training process's copy each epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

MAX_CAPTIONS = 1 << 17  # rows kept (int32, context_length each: 40 MB at 77 tokens)


class CachedTokenizer:
    """``tokenizer(texts) -> [B, L]`` int64 ids, the same as ``tokenizer``'s, with each caption's row kept once
    computed (up to ``max_captions``; after that, new captions are tokenized each time)."""

    def __init__(self, tokenizer: Callable[[Sequence[str]], torch.Tensor], max_captions: int = MAX_CAPTIONS):
        self.tokenizer = tokenizer
        self.max_captions = max_captions
        self.rows: dict[str, torch.Tensor] = {}

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return self.tokenizer(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self.rows))
        fresh = {t: ids.to(torch.int32) for t, ids in zip(missing, self.tokenizer(missing))} if missing else {}
        for text, ids in fresh.items():
            if len(self.rows) >= self.max_captions:
                break
            self.rows[text] = ids
        return torch.stack([self.rows[t] if t in self.rows else fresh[t] for t in texts]).to(torch.int64)
