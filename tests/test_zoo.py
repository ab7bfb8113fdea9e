"""The model zoo: builds, shapes, parameter counts, torch.export, and the real weights."""

from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgecl.models.zoo import ZOO, ZooEntry, build, count_params
from edgecl.models.zoo.efficientnet_lite import lite0_weights_path, map_lite0_state_dict
from edgecl.models.zoo.minilm import load_minilm_state_dict, minilm_zip_path

torch.set_num_threads(1)

# name -> (output shape at batch 2, exact parameter count, published figure's range).
# Exact counts equal the Keras references' trainable counts (hand-checked layer by layer);
# MobileNetV2-1.0 equals torchvision's 3,504,872; EfficientNet-Lite0 equals the weight file;
# MiniLM is 22.7M published minus the unused [CLS] pooler (147,840).
EXPECTED = {
    "ds-cnn": ((2, 12), 23_756, (23_000, 25_000)),
    "resnet8": ((2, 10), 78_186, (77_000, 79_000)),
    "mobilenet-v1-0.25": ((2, 2), 216_322, (200_000, 225_000)),
    "fc-autoencoder": ((2, 640), 267_928, (260_000, 275_000)),
    "mobilenet-v2": ((2, 1000), 3_504_872, (3_400_000, 3_600_000)),
    "efficientnet-lite0": ((2, 1000), 4_652_008, (4_600_000, 4_700_000)),
    "minilm": ((2, 384), 22_565_376, (22_400_000, 22_800_000)),
}

_CACHE: dict[str, torch.nn.Module] = {}


def _model(name: str) -> torch.nn.Module:
    """Default builds, shared across tests (the pretrained ones take a second each to load)."""
    if name not in _CACHE:
        _CACHE[name] = build(name)
    return _CACHE[name]


def test_registry_names_and_entries():
    assert list(ZOO) == list(EXPECTED)
    for name, entry in ZOO.items():
        assert isinstance(entry, ZooEntry) and entry.name == name
        assert entry.input_dtype in ("float32", "int64")
        assert entry.source and entry.features
    assert [n for n, e in ZOO.items() if e.pretrained] == ["efficientnet-lite0", "minilm"]
    with pytest.raises(ValueError, match="valid names: ds-cnn, resnet8"):
        build("resnet-9000")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_build_forward_params_export(name: str):
    entry, model = ZOO[name], _model(name)
    shape, exact, (lo, hi) = EXPECTED[name]
    assert not model.training
    assert model.zoo_meta["name"] == name and model.zoo_meta["input_shape"] == entry.input_shape
    n = count_params(model)
    assert n == exact and lo <= n <= hi
    x = entry.example(batch=2)
    assert x.dtype == getattr(torch, entry.input_dtype)
    with torch.no_grad():
        y = model(x)
    assert tuple(y.shape) == shape and torch.isfinite(y).all()
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), y)
    # No op outside the importer's set sneaks in (attention by hand, no SDPA, no in-place).
    ops = {str(node.target) for node in ep.graph.nodes if node.op == "call_function"}
    names = [op.split(".")[1] for op in ops if op.startswith("aten.")]
    assert not [n for n in names if "scaled_dot_product" in n or n.endswith("_")], names


@pytest.mark.parametrize("name", ["ds-cnn", "resnet8", "mobilenet-v1-0.25", "mobilenet-v2"])
def test_feature_point_is_the_last_linear_input(name: str):
    model = _model(name)
    assert model.classifier.in_features == model.zoo_meta["feature_dim"]


def test_autoencoder_bottleneck_features():
    model = _model("fc-autoencoder")
    with torch.no_grad():
        z = model.encoder(ZOO["fc-autoencoder"].example(batch=2))
    assert z.shape == (2, 8) and model.zoo_meta["feature_dim"] == 8


def test_seeded_init_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = build("resnet8", seed=1), build("resnet8", seed=1), build("resnet8", seed=2)
    assert torch.rand(1) == before
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.stem.conv.weight, c.stem.conv.weight)


def test_factory_kwargs():
    assert count_params(build("mobilenet-v2", width=0.35)) == 1_677_128  # published ~1.7M
    assert build("mobilenet-v2", width=0.35, input_size=160).zoo_meta["input_shape"] == (3, 160, 160)
    assert build("ds-cnn", num_classes=35).classifier.out_features == 35
    with pytest.raises(ValueError, match="no pretrained weights"):
        build("resnet8", pretrained=True)


# --- EfficientNet-Lite0: real ImageNet weights ---------------------------------------------


def test_efficientnet_lite0_weights_load_strictly():
    model = _model("efficientnet-lite0")
    sd = map_lite0_state_dict(torch.load(lite0_weights_path(), map_location="cpu", weights_only=True))
    assert set(sd) == set(model.state_dict())
    model.load_state_dict(sd, strict=True)
    # BN running statistics came from the file, not the (0, 1) defaults.
    assert not torch.allclose(model.head.bn.running_var, torch.ones(1280))
    torch.testing.assert_close(model.blocks[3].dw.bn.running_mean, sd["blocks.3.dw.bn.running_mean"])
    # TF "SAME" padding: asymmetric explicit pads on exactly the five stride-2 convs at 224.
    assert sum(m.pad is not None for m in model.modules() if hasattr(m, "pad")) == 5


def _smooth_image(size: int = 224) -> torch.Tensor:
    """A smooth colour gradient with a soft blob, preprocessed as the model expects."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    blob = torch.exp(-((xx - 0.5) ** 2 + (yy - 0.55) ** 2) / 0.05)
    rgb = torch.stack([0.3 + 0.5 * blob, 0.4 + 0.4 * yy, 0.8 - 0.5 * xx * blob]) * 255
    return ((rgb - 127.0) / 128.0).unsqueeze(0)


def test_efficientnet_lite0_output_is_sane():
    model = _model("efficientnet-lite0")
    assert model.zoo_meta["preprocessing"]["mean"] == (127.0, 127.0, 127.0)
    with torch.no_grad():
        p = model(_smooth_image()).softmax(-1)[0]
    entropy = -(p * p.clamp_min(1e-12).log()).sum().item()
    assert torch.isfinite(p).all()
    assert 0.5 < entropy < math.log(1000) - 0.5  # neither one-hot nor uniform
    assert p.max() < 0.99


def test_efficientnet_lite0_recognises_a_real_photo():
    """scikit-learn's china.jpg (a Chinese palace) is ImageNet class 698, 'palace'."""
    pil = pytest.importorskip("PIL.Image")
    datasets = pytest.importorskip("sklearn.datasets")
    img = pil.fromarray(datasets.load_sample_image("china.jpg"))  # 640x427
    w, h = img.size
    img = img.resize((round(w * 256 / h), 256), pil.BILINEAR)
    left = (img.size[0] - 224) // 2
    arr = np.asarray(img.crop((left, 16, left + 224, 240)), dtype=np.float32)
    x = ((torch.from_numpy(arr) - 127.0) / 128.0).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        p = _model("efficientnet-lite0")(x).softmax(-1)[0]
    assert p.argmax().item() == 698 and p.max() > 0.2


def test_efficientnet_lite0_new_head_keeps_backbone():
    model = build("efficientnet-lite0", num_classes=10)
    ref = _model("efficientnet-lite0")
    assert model.classifier.out_features == 10
    assert torch.equal(model.stem.conv.weight, ref.stem.conv.weight)
    assert count_params(build("efficientnet-lite0", pretrained=False, tf_padding=False)) == 4_652_008


# --- MiniLM: real all-MiniLM-L6-v2 weights --------------------------------------------------


def _tokenize(sentences: list[str], seq_len: int = 32) -> torch.Tensor:
    """Whole-word lookups in the model's own WordPiece vocab (every test word is in it)."""
    with zipfile.ZipFile(minilm_zip_path()) as zf:
        vocab = json.loads(zf.read("tokenizer.json"))["model"]["vocab"]
    rows = []
    for s in sentences:
        ids = [vocab["[CLS]"], *(vocab[w] for w in s.split()), vocab["[SEP]"]]
        rows.append(ids + [vocab["[PAD]"]] * (seq_len - len(ids)))
    return torch.tensor(rows)


def _reference_bert(sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """A straightforward BertModel + masked mean pooling (what sentence-transformers computes)."""
    mask = (ids != 0).float()
    n = ids.shape[1]
    x = (sd["embeddings.word_embeddings.weight"][ids] + sd["embeddings.position_embeddings.weight"][:n]
         + sd["embeddings.token_type_embeddings.weight"][0])

    def lin(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.linear(t, sd[p + ".weight"], sd[p + ".bias"])

    def norm(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.layer_norm(t, (384,), sd[p + ".weight"], sd[p + ".bias"], 1e-12)

    x = norm(x, "embeddings.LayerNorm")
    for i in range(6):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + "attention.self." + m).view(*ids.shape, 12, 32).transpose(1, 2)
                   for m in ("query", "key", "value"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(32) + (1 - mask)[:, None, None, :] * -1e9
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(*ids.shape, 384)
        x = norm(x + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        h = lin(F.gelu(lin(x, p + "intermediate.dense")), p + "output.dense")
        x = norm(x + h, p + "output.LayerNorm")
    return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


SENTENCES = ["a man is playing a guitar", "a person plays the guitar on stage",
             "the stock market fell sharply today", "shares dropped in trading this afternoon"]


def test_minilm_loads_real_weights_and_matches_reference():
    model = _model("minilm")
    sd = load_minilm_state_dict()
    torch.testing.assert_close(model.embeddings.word.weight, sd["embeddings.word_embeddings.weight"])
    torch.testing.assert_close(model.layers[5].ffn_norm.bias, sd["encoder.layer.5.output.LayerNorm.bias"])
    ids = _tokenize(SENTENCES)
    with torch.no_grad():
        ours, ref = model(ids), _reference_bert(sd, ids)
    # Ours is the masked mean times n_tokens / seq_len (no data-dependent division).
    n_tokens = (ids != 0).sum(1, keepdim=True)
    torch.testing.assert_close(ours * 32 / n_tokens, ref, atol=1e-4, rtol=1e-4)


def test_minilm_embeddings_are_semantic():
    with torch.no_grad():
        e = F.normalize(_model("minilm")(_tokenize(SENTENCES)), dim=-1)
    sim = e @ e.T
    assert sim[0, 1] > 0.4 and sim[2, 3] > 0.4  # paraphrases (measured ~0.6-0.65)
    assert max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3]) < 0.2  # unrelated (measured < 0)
    # Random id sequences: one that shares half its tokens with two others is closer to both
    # than any two unrelated ones are to each other (measured 0.52 / 0.72 vs at most 0.42).
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(1000, 30000, (4, 32), generator=g)
    mixed = torch.cat([rand[1, :16], rand[0, 16:]])[None]
    with torch.no_grad():
        r = F.normalize(_model("minilm")(torch.cat([rand, mixed])), dim=-1)
    rsim = r @ r.T
    unrelated = max(rsim[i, j].item() for i in range(4) for j in range(i + 1, 4))
    assert rsim[4, 0] > unrelated and rsim[4, 1] > unrelated


def test_minilm_seq_len_and_head():
    model = build("minilm", pretrained=False, seq_len=16, num_classes=5)
    assert model.zoo_meta["input_shape"] == (16,) and model.zoo_meta["input_dtype"] == "int64"
    with torch.no_grad():
        assert model(torch.randint(1, 30000, (2, 16))).shape == (2, 5)
