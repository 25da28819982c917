"""Token layout of a generative recommender: semantic-ID codes, special and user tokens.

The vocabulary is laid out as

    [PAD, BOS, EOS] [level 0 codes] [level 1 codes] ... [level L-1 codes] [user buckets]

so level ``l`` code ``c`` is token ``offsets[l] + c``. User tokens come last on purpose: a
decoder never emits them, so its output layer can cover only the first
``output_vocab_size`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PAD, BOS, EOS = 0, 1, 2
NUM_SPECIAL = 3


def _as_long(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"modules/tokens.py: `{name}` must hold integers, got {t.dtype}")
    return t.long()


@dataclass
class TokenLayout:
    """Where every kind of token lives in the vocabulary (see the module docstring).

    Args:
        codebook_sizes: number of codes of each semantic-ID level, e.g. ``(256, 256, 256, 8)``.
        num_user_buckets: hashed user tokens (TIGER: 2000); 0 disables them.
    """

    codebook_sizes: tuple[int, ...]
    num_user_buckets: int = 0
    offsets: tuple[int, ...] = field(init=False)

    PAD = PAD
    BOS = BOS
    EOS = EOS

    def __post_init__(self):
        self.codebook_sizes = tuple(int(c) for c in self.codebook_sizes)
        if not self.codebook_sizes or min(self.codebook_sizes) < 1:
            raise ValueError(f"modules/tokens.py: bad codebook_sizes {self.codebook_sizes}")
        if self.num_user_buckets < 0:
            raise ValueError("modules/tokens.py: num_user_buckets must be >= 0")
        offsets, start = [], NUM_SPECIAL
        for size in self.codebook_sizes:
            offsets.append(start)
            start += size
        self.offsets = tuple(offsets)

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def user_offset(self) -> int:
        return NUM_SPECIAL + sum(self.codebook_sizes)

    @property
    def output_vocab_size(self) -> int:
        """Tokens a decoder can emit: specials and codes, not user tokens."""
        return self.user_offset

    @property
    def vocab_size(self) -> int:
        return self.user_offset + self.num_user_buckets

    # ------------------------------------------------------------------ codes <-> tokens
    def _offsets(self, device) -> torch.Tensor:
        return torch.tensor(self.offsets, dtype=torch.long, device=device)

    def _check_codes(self, item_codes: torch.Tensor, name: str = "item_codes") -> torch.Tensor:
        item_codes = _as_long(item_codes, name)
        if item_codes.dim() != 2 or item_codes.shape[1] != self.num_levels:
            raise ValueError(
                f"modules/tokens.py: `{name}` must be (N, {self.num_levels}), got {tuple(item_codes.shape)}"
            )
        sizes = torch.tensor(self.codebook_sizes, device=item_codes.device)
        if item_codes.numel() and ((item_codes < 0) | (item_codes >= sizes)).any():
            raise ValueError(f"modules/tokens.py: `{name}` has a code outside [0, codebook_sizes[l])")
        return item_codes

    def codes_to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., L) codes -> (..., L) token ids."""
        return _as_long(codes, "codes") + self._offsets(torch.as_tensor(codes).device)

    def tokens_to_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., L) token ids -> (..., L) codes; raises if a token is not a code of its level."""
        tokens = _as_long(tokens, "tokens")
        if tokens.shape[-1] != self.num_levels:
            raise ValueError(f"modules/tokens.py: `tokens` last dim must be {self.num_levels}")
        codes = tokens - self._offsets(tokens.device)
        sizes = torch.tensor(self.codebook_sizes, device=tokens.device)
        if ((codes < 0) | (codes >= sizes)).any():
            raise ValueError("modules/tokens.py: `tokens` holds a token that is no code of its level")
        return codes

    def user_tokens(self, user: torch.Tensor) -> torch.Tensor:
        """Hashing trick of TIGER: user id -> one of ``num_user_buckets`` tokens.

        Plain modulo is the hash: user ids are dense integers, for which it spreads users
        evenly, and it is stable across processes and machines (Python's ``hash`` is not).
        """
        if self.num_user_buckets == 0:
            raise ValueError("modules/tokens.py: `user` given but num_user_buckets == 0")
        user = _as_long(user, "user")
        return self.user_offset + torch.remainder(user, self.num_user_buckets)

    # ------------------------------------------------------------------ model inputs
    def encode_history(self, history, item_codes, user=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Histories -> encoder inputs.

        Args:
            history: (n, H) item_ids oldest first, padded with -1 at the end.
            item_codes: (N, L) codes of every item.
            user: optional (n,) user ids; adds one hashed user token in front.

        Returns:
            input_ids (n, [1 +] H * L) and attention_mask (same shape, bool): each item becomes
            its L code tokens; padding items become PAD tokens with mask False.
        """
        item_codes = self._check_codes(item_codes)
        history = _as_long(history, "history").to(item_codes.device)
        if history.dim() != 2:
            raise ValueError(f"modules/tokens.py: `history` must be (n, H), got {tuple(history.shape)}")
        n_items = item_codes.shape[0]
        if history.numel() and ((history < -1) | (history >= n_items)).any():
            raise ValueError(f"modules/tokens.py: `history` has an item_id outside [-1, {n_items})")
        valid = history >= 0
        if (valid[:, 1:] & ~valid[:, :-1]).any():
            raise ValueError("modules/tokens.py: `history` has an item after a -1 (padding goes at the end)")
        tokens = self.codes_to_tokens(item_codes)[history.clamp(min=0)]  # (n, H, L)
        tokens = tokens.masked_fill(~valid[..., None], PAD).flatten(1)
        mask = valid.repeat_interleave(self.num_levels, dim=1)
        if user is not None:
            user_tok = self.user_tokens(user).to(tokens.device).reshape(-1, 1)
            if user_tok.shape[0] != tokens.shape[0]:
                raise ValueError("modules/tokens.py: `user` must have one id per history row")
            tokens = torch.cat([user_tok, tokens], dim=1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        return tokens, mask

    def encode_target(self, target, item_codes, eos: bool = False) -> torch.Tensor:
        """(n,) target item_ids -> (n, L [+ 1]) decoder labels (code tokens [, EOS])."""
        item_codes = self._check_codes(item_codes)
        target = _as_long(target, "target").to(item_codes.device)
        if target.dim() != 1:
            raise ValueError(f"modules/tokens.py: `target` must be (n,), got {tuple(target.shape)}")
        if target.numel() and ((target < 0) | (target >= item_codes.shape[0])).any():
            raise ValueError("modules/tokens.py: `target` has an item_id outside [0, N)")
        labels = self.codes_to_tokens(item_codes)[target]
        if eos:
            labels = torch.cat([labels, torch.full_like(labels[:, :1], EOS)], dim=1)
        return labels

    # ------------------------------------------------------------------ save / load
    def to_dict(self) -> dict:
        return {"codebook_sizes": list(self.codebook_sizes), "num_user_buckets": self.num_user_buckets}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        unknown = set(d) - {"codebook_sizes", "num_user_buckets"}
        if unknown:
            raise ValueError(f"modules/tokens.py: unknown TokenLayout fields {sorted(unknown)}")
        return cls(tuple(d["codebook_sizes"]), int(d.get("num_user_buckets", 0)))
