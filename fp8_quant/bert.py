"""A BERT sentence encoder in plain PyTorch, built from a Hugging Face folder (``config.json``, ``vocab.txt``,
``model.safetensors``), with its WordPiece tokenizer.

Why here: the ``sensitivity`` command needs a real text encoder it can build from a safetensors file without
``transformers`` (this library's only dependency is torch), and the quality tests need real published weights
(sentence-transformers' all-MiniLM-L6-v2 ships as a package). Its linears are ``nn.Linear``, as in
``transformers``' ``BertModel``, whose outputs it reproduces (checked by a test where ``transformers`` is installed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        values = json.loads(path.read_text())
        if values.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: model_type {values.get('model_type')!r} is not a BERT encoder")
        if values.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {values['hidden_act']!r} is not supported (gelu only)")
        required = [name for name, field in cls.__dataclass_fields__.items() if field.default is dataclasses.MISSING]
        missing = [name for name in required if not isinstance(values.get(name), int)]
        if missing:
            raise ValueError(f"{path}: missing or not an integer: {', '.join(missing)}")
        return cls(**{name: values[name] for name in cls.__dataclass_fields__ if name in values})


class _Layer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.heads = config.num_attention_heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, nn.Linear(width, width))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(width, width)
        self.attention.output.LayerNorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(width, config.intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(config.intermediate_size, width)
        self.output.LayerNorm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        attention = self.attention.self

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = heads(attention.query(x)), heads(attention.key(x)), heads(attention.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // self.heads) + mask
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, width)
        x = self.attention.output.LayerNorm(self.attention.output.dense(context) + x)
        hidden = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(self.output.dense(hidden) + x)


class BertEncoder(nn.Module):
    """``forward(input_ids, attention_mask)`` -> last hidden state ``[B, T, hidden]``; ``pooled=True`` gives the
    sentence embedding of sentence-transformers (mean over real tokens, L2-normalised) instead."""

    def __init__(self, config: BertConfig, pooled: bool = False) -> None:
        super().__init__()
        self.config = config
        self.pooled = pooled
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embeddings.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embeddings.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.embeddings.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeddings = self.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = embeddings.word_embeddings(input_ids) + embeddings.position_embeddings(positions)[None]
        x = embeddings.LayerNorm(x + embeddings.token_type_embeddings.weight[0])
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.encoder.layer:
            x = layer(x, mask)
        if not self.pooled:
            return x
        weights = attention_mask[..., None].to(x.dtype)
        return F.normalize((x * weights).sum(1) / weights.sum(1).clamp(min=1e-9), dim=-1)


def load_bert(folder: str | Path, pooled: bool = False) -> BertEncoder:
    """The encoder of a Hugging Face BERT folder (``config.json`` and ``model.safetensors``), in float32."""
    from safetensors.torch import load_file

    folder = Path(folder)
    model = BertEncoder(BertConfig.from_file(folder / "config.json"), pooled)
    state = {key.removeprefix("bert."): value for key, value in load_file(str(folder / "model.safetensors")).items()}
    state = {key: value.float() for key, value in state.items() if not key.endswith("position_ids")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [key for key in unexpected if not key.startswith("pooler.")]
    if missing or unexpected:
        raise ValueError(f"{folder}: not a BERT checkpoint (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


class WordPieceTokenizer:
    """BERT's uncased tokenizer: lower case, accents stripped, punctuation split, greedy longest-match WordPiece."""

    def __init__(self, vocab_file: str | Path, max_length: int = 256) -> None:
        words = Path(vocab_file).read_text(encoding="utf-8").splitlines()
        self.vocab = {word: index for index, word in enumerate(words)}
        self.max_length = max_length
        special = ("[CLS]", "[SEP]", "[PAD]", "[UNK]")
        missing = [token for token in special if token not in self.vocab]
        if missing:
            raise ValueError(f"{vocab_file}: not a BERT WordPiece vocabulary (no {', '.join(missing)})")
        self.cls, self.sep, self.pad, self.unk = (self.vocab[token] for token in special)

    def ids(self, text: str) -> list[int]:
        pieces = [self.cls]
        for word in _basic_words(text):
            pieces.extend(self._word_pieces(word))
        return [*pieces[: self.max_length - 1], self.sep]

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """A padded batch: ``{"input_ids", "attention_mask"}`` (the keyword arguments of ``BertEncoder``)."""
        rows = [self.ids(text) for text in texts]
        width = max(len(row) for row in rows)
        input_ids = torch.tensor([row + [self.pad] * (width - len(row)) for row in rows])
        attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _word_pieces(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        pieces, start = [], 0
        while start < len(word):
            for stop in range(len(word), start, -1):
                piece = word[start:stop] if start == 0 else "##" + word[start:stop]
                if piece in self.vocab:
                    pieces.append(self.vocab[piece])
                    start = stop
                    break
            else:
                return [self.unk]
        return pieces


def _basic_words(text: str) -> list[str]:
    text = unicodedata.normalize("NFD", text.lower())
    words, current = [], []
    for char in text:
        category = unicodedata.category(char)
        if category == "Mn" or char in "\x00\ufffd" or (category.startswith("C") and char not in "\t\n\r"):
            continue  # accents, control characters
        if char.isspace() or _is_punctuation(char) or _is_cjk(char):
            if current:
                words.append("".join(current))
                current = []
            if not char.isspace():
                words.append(char)
        else:
            current.append(char)
    if current:
        words.append("".join(current))
    return words


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF))


def _is_cjk(char: str) -> bool:
    return any(lo <= ord(char) <= hi for lo, hi in _CJK_RANGES)
