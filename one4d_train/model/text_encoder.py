"""Text conditioning: the frozen UMT5 encoder, precomputed embeddings, the empty prompt and text dropout.

Wan's text context is always `TEXT_LEN` (512) rows: the encoder's outputs for a prompt's tokens (its
closing `</s>` included), then zeros for every position past the prompt's length - exactly what Wan's
`T5EncoderModel` + `WanModel` (and diffusers' `WanPipeline._get_t5_prompt_embeds`) produce.
Prompts are cleaned as Wan does with `clean='whitespace'` (HTML entities unescaped, runs of whitespace
collapsed); the optional ftfy repair step is left out so results do not depend on what is installed.

Where a sample has no precomputed embedding and no text encoder is configured, its context is the
empty-prompt embedding: the encoder's output for "" when known (`empty` given, e.g. loaded from
`ModelConfig.empty_prompt_embedding`), otherwise all zeros of the configured width - a stand-in that only
suits random-weight runs, since a real Wan checkpoint was trained with the true empty-prompt embedding.
"""
from __future__ import annotations

import html
import logging
import re
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from one4d_train.configtools import ConfigError
from one4d_train.model.pretrained import first_line, load_complete

TEXT_LEN = 512
log = logging.getLogger(__name__)


def clean_prompt(text: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


def pad_text_embedding(emb: torch.Tensor, text_len: int = TEXT_LEN) -> torch.Tensor:
    """A precomputed embedding [L, D] (or [B, L, D]) truncated or zero-padded to `text_len` rows."""
    emb = emb[..., :text_len, :]
    pad = emb.new_zeros(*emb.shape[:-2], text_len - emb.shape[-2], emb.shape[-1])
    return torch.cat([emb, pad], dim=-2)


def apply_text_dropout(emb: torch.Tensor, p: float, generator: torch.Generator | None,
                       empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace whole prompts of emb [B, L, D] by the empty-prompt embedding `empty` [L, D] with probability p
    each (classifier-free guidance training). Returns (embeddings, dropped [B] bool)."""
    dropped = torch.rand(emb.shape[0], generator=generator, device=_gen_device(generator)).to(emb.device) < p
    out = torch.where(dropped[:, None, None], empty.to(emb)[None], emb)
    return out, dropped


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


class UMT5TextEncoder:
    """Frozen UMT5 encoder + tokenizer. `encode(prompts) -> [B, text_len, d_model]` (4096 for umt5-xxl)."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, text_len: int = TEXT_LEN,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.device = torch.device(device)
        self._empty: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, path: str, tokenizer_path: str = "", dtype: torch.dtype = torch.float32,
                        **kwargs) -> "UMT5TextEncoder":
        from transformers import AutoTokenizer

        model = load_complete(UMT5EncoderModel, path, "text encoder", dtype=dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"tokenizer {tokenizer_path or path}: no UMT5 tokenizer there (tokenizer.json, or "
                             f"spiece.model with sentencepiece installed): {first_line(exc)}") from None
        return cls(model, tokenizer, dtype=dtype, **kwargs)

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self._encode(prompts)[0]

    def encode_rows(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Each prompt's own rows [L_i, D] (its tokens, `</s>` included): what a shard stores as `emb.npy`."""
        hidden, lengths = self._encode(prompts)
        return [h[:n] for h, n in zip(hidden, lengths.tolist())]

    @torch.no_grad()
    def _encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=self.text_len,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        lengths = mask.sum(1)
        keep = torch.arange(self.text_len, device=self.device)[None] < lengths[:, None]
        return hidden * keep[..., None], lengths

    @property
    def empty_embedding(self) -> torch.Tensor:
        """The embedding of "" [text_len, D], computed once."""
        if self._empty is None:
            self._empty = self.encode([""])[0]
        return self._empty


class TextConditioning:
    """The text context of a batch: precomputed embeddings where the sample has one, else the encoder on its
    caption, else the empty prompt; plus text dropout towards the empty prompt."""

    def __init__(self, encoder: UMT5TextEncoder | None = None, dim: int = 4096, text_len: int = TEXT_LEN,
                 empty: torch.Tensor | None = None, load_encoder: Callable[[], UMT5TextEncoder] | None = None):
        """`load_encoder` (instead of `encoder`): builds the encoder at its first use (a caption without a stored
        embedding, or the empty prompt when `empty` is not given), so a run whose samples all carry embeddings and
        which has the empty prompt's never loads it."""
        self._encoder, self._load = encoder, load_encoder
        self.text_len = encoder.text_len if encoder is not None else text_len
        self.dim = encoder.dim if encoder is not None else dim
        self._empty_copies: dict[torch.device, torch.Tensor] = {}
        self.encoded_captions = 0  # captions the encoder ran on (samples without a stored embedding)
        # set for an encoder off the training device (in host memory, slow): a warning logged at the 1st, 10th,
        # 100th, ... caption it encodes, and a cache of the last `cache_size` captions' rows (eval repeats its own)
        self.slow_encode_warning = ""
        self.cache_size = 0
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        if empty is not None:
            self._empty = pad_text_embedding(empty.float(), self.text_len)
        elif not self.has_encoder:
            self._empty = torch.zeros(self.text_len, self.dim)
        else:
            self._empty = None

    @property
    def encoder(self) -> UMT5TextEncoder | None:
        if self._encoder is None and self._load is not None:
            log.info("building the text encoder")
            encoder = self._load()
            if encoder.dim != self.dim:
                raise ValueError(f"text encoder width {encoder.dim} != backbone text_dim {self.dim}")
            self._encoder, self._load = encoder, None
        return self._encoder

    @property
    def has_encoder(self) -> bool:
        """An encoder is configured (loaded, or loaded at its first use)."""
        return self._encoder is not None or self._load is not None

    @property
    def empty(self) -> torch.Tensor:
        return self._empty if self._empty is not None else self.encoder.empty_embedding

    def empty_on(self, device: torch.device) -> torch.Tensor:
        """The empty-prompt embedding on `device` (copied there once)."""
        if device not in self._empty_copies:
            self._empty_copies[device] = self.empty.to(device)
        return self._empty_copies[device]

    def __call__(self, captions: Sequence[str], text_embs: Sequence[torch.Tensor | None] | None = None,
                 dropout: float = 0.0, generator: torch.Generator | None = None,
                 keys: Sequence[str] | None = None) -> torch.Tensor:
        """The padded text contexts [B, text_len, dim] of a batch: stored embeddings where given, else the encoded
        captions (the empty prompt's for an empty caption); `keys` name the samples in errors."""
        text_embs = list(text_embs) if text_embs is not None else [None] * len(captions)
        for i, e in enumerate(text_embs):
            if e is not None and e.shape[-1] != self.dim:
                raise ValueError(f"sample {keys[i] if keys else i}: its stored text embedding is {e.shape[-1]} wide, "
                                 f"the backbone's text input {self.dim} (model.preset): use shards without stored "
                                 "embeddings or with embeddings of that width")
        rows: list[torch.Tensor | None] = [pad_text_embedding(e.float(), self.text_len) if e is not None else None
                                           for e in text_embs]
        # captions that clean to "" are the empty prompt, whose embedding is computed once
        missing = [i for i, r in enumerate(rows) if r is None and clean_prompt(captions[i])]
        if missing and not self.has_encoder:  # it trained as the empty prompt, silently
            i = missing[0]
            raise ConfigError(f"key 'model.text_encoder': sample {keys[i] if keys else i} has a caption "
                              f"({captions[i][:60]!r}) but no stored text embedding, and no text encoder is set, so "
                              f"its caption would count as the empty prompt: set model.text_encoder, or store an "
                              f"embedding for every captioned sample (the manifest's text_embedding, or one4d "
                              f"encode-latents with a text encoder)")
        if missing and self.has_encoder:
            for i in missing:
                if captions[i] in self._cache:
                    self._cache.move_to_end(captions[i])
                    rows[i] = pad_text_embedding(self._cache[captions[i]], self.text_len)
            self._encode_missing(captions, rows, [i for i in missing if rows[i] is None])
        # assembled where the stored embeddings are (the training device), else where the empty prompt is
        device = next((e.device for e in text_embs if e is not None), self.empty.device)
        empty = self.empty_on(device)
        batch = torch.stack([(r if r is not None else empty).to(device) for r in rows])
        if batch.shape[-1] != self.dim:
            raise ValueError(f"text embedding width {batch.shape[-1]} != configured {self.dim}")
        return apply_text_dropout(batch, dropout, generator, empty)[0] if dropout > 0 else batch

    def _encode_missing(self, captions: Sequence[str], rows: list, todo: list[int]) -> None:
        if not todo:
            return
        before = self.encoded_captions
        self.encoded_captions += len(todo)
        if self.slow_encode_warning and (before == 0 or len(str(before)) != len(str(self.encoded_captions))):
            log.warning("%s: %d so far", self.slow_encode_warning, self.encoded_captions)
        for i, r in zip(todo, self.encoder.encode_rows([captions[i] for i in todo])):
            rows[i] = pad_text_embedding(r, self.text_len)
            if self.cache_size:
                self._cache[captions[i]] = r.clone()
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)


def batch_text_embeddings(batch: dict) -> list[torch.Tensor | None] | None:
    """The stored text embeddings of a collated batch, one per sample (None where a sample had none: its length
    in `text_emb_len` is 0), each cut to its own length; None when no sample had one."""
    embs = batch.get("text_emb")
    if embs is None:
        return None
    if "text_emb_len" not in batch:
        return list(embs)
    return [e[:n] if n else None for e, n in zip(embs, batch["text_emb_len"].tolist())]


def build_text_conditioning(encoder: str = "", tokenizer: str = "", empty_prompt_embedding: str = "",
                            dim: int = 4096, dtype: torch.dtype = torch.float32,
                            device: str | torch.device = "cpu",
                            make_encoder: Callable[[], UMT5TextEncoder] | None = None,
                            stored_empty: torch.Tensor | None = None) -> TextConditioning:
    """From `ModelConfig.text_encoder` / `tokenizer` / `empty_prompt_embedding` (all optional) and the
    backbone's text width. `make_encoder` builds the encoder instead of loading `encoder` (the tiny tower).
    `stored_empty` (the empty prompt's embedding stored with the shards; a configured `empty_prompt_embedding`
    wins): the encoder is built at its first use instead of here."""
    empty = torch.from_numpy(np.load(empty_prompt_embedding, allow_pickle=False)) if empty_prompt_embedding else None
    if not (encoder or make_encoder):
        return TextConditioning(dim=dim, empty=empty)
    load = make_encoder or (lambda: UMT5TextEncoder.from_pretrained(encoder, tokenizer, dtype=dtype, device=device))
    cond = TextConditioning(dim=dim, empty=empty if empty is not None else stored_empty, load_encoder=load)
    if stored_empty is None:
        cond.encoder  # built (and its width checked) now
    return cond


def tiny_tokenizer(words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline with UMT5's special ids (pad 0, `</s>` 1 appended, unk 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    base = ["a", "the", "cat", "dog", "runs", "on", "grass", "camera", "moves", "left", "right", "street", "car"]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in list(base) + list(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_umt5(seed: int = 0, d_model: int = 64, vocab_size: int = 64) -> UMT5EncoderModel:
    """The UMT5 encoder architecture with a small random config, for tests and the CPU demo."""
    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                        num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0)
    return UMT5EncoderModel(config).eval()
