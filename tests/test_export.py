"""Hugging Face export and import: logits equal transformers' Llama, and --init-from works."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import micro_model, micro_train

from onebox.data import BatchLoader, dataset_info
from onebox.errors import OneboxError
from onebox.export import export_hf, load_hf, model_from_hf
from onebox.model import Transformer
from onebox.training import train

transformers = pytest.importorskip("transformers")


def _hf_logits(folder, idx):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(idx).logits


@pytest.mark.parametrize(
    "changes",
    [dict(), dict(kv_heads=1, activation="relu2"), dict(tie_embeddings=False, kv_heads=4)],
    ids=["gqa-swiglu-tied", "mqa-relu2", "mha-untied"],
)
def test_exported_logits_equal_transformers(tmp_path, corpus_dir, changes):
    torch.manual_seed(0)
    config = micro_model(**changes)
    model = Transformer(config).eval()
    tokenizer_json = (corpus_dir / "tokenizer.json").read_text()
    export_hf(model.state_dict(), config, tokenizer_json, tmp_path / "hf")
    idx = torch.randint(0, config.vocab_size, (2, 48))
    with torch.no_grad():
        ours = model(idx)
    theirs = _hf_logits(tmp_path / "hf", idx)
    assert (ours - theirs).abs().max().item() <= 1e-4
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= names


def test_exported_tokenizer_loads_in_transformers(tmp_path, corpus_dir):
    config = micro_model()
    export_hf(Transformer(config).state_dict(), config, (corpus_dir / "tokenizer.json").read_text(), tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "To be, or not to be"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == "<|endoftext|>"


def test_softcap_is_refused_on_export(tmp_path):
    config = micro_model(logit_softcap=30.0)
    with pytest.raises(OneboxError, match="soft-cap"):
        export_hf(Transformer(config).state_dict(), config, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_import_round_trip(tmp_path):
    torch.manual_seed(1)
    config = micro_model(tie_embeddings=False)
    model = Transformer(config).eval()
    export_hf(model.state_dict(), config, None, tmp_path / "hf", dtype="float32")
    back, tokenizer = model_from_hf(tmp_path / "hf")
    idx = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        assert torch.equal(model(idx), back(idx))
    assert tokenizer is None


def test_init_from_a_folder_written_by_transformers(tmp_path, corpus_dir):
    hf_config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(2)
    reference = transformers.LlamaForCausalLM(hf_config).eval()
    reference.save_pretrained(tmp_path / "theirs")
    config, state, _ = load_hf(tmp_path / "theirs")
    assert (config.dim, config.kv_heads, config.tie_embeddings) == (64, 2, True)
    ours, _ = model_from_hf(tmp_path / "theirs")
    idx = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        assert (ours(idx) - reference(idx).logits).abs().max().item() <= 1e-4


def test_train_init_from_starts_at_the_imported_weights(tmp_path, corpus_dir):
    hf_config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(3)
    reference = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        reference.model.embed_tokens.weight.mul_(40)  # far from uniform, so a fresh init could not match
    reference.save_pretrained(tmp_path / "theirs")
    run = micro_train(tmp_path / "run", corpus_dir, init_from=str(tmp_path / "theirs"), max_steps=2, eval_every=0)
    train(micro_model(), run, show_progress=False)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    x, y = BatchLoader(dataset_info(corpus_dir).train_shards, 4, 64, seed=run.seed).next_batch()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(reference(x).logits.view(-1, 512), y.reshape(-1)).item()
    assert expected > 7.0 and abs(first - expected) < 1e-4


def test_import_refuses_what_onebox_cannot_run(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    shape = {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    cases = [
        ({"model_type": "gpt2", **shape}, "model_type 'gpt2'"),
        ({"model_type": "llama"}, "no valid vocab_size"),
        ({"model_type": "llama", **shape, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type = 'yarn'"),
        (
            {"model_type": "llama", **shape, "rope_scaling": {"rope_type": "llama3"}},
            "llama3 RoPE settings are incomplete",
        ),
        ({"model_type": "llama", **shape, "hidden_act": "gelu"}, "hidden_act = 'gelu'"),
        ({"model_type": "mistral", **shape, "attention_bias": True}, "attention_bias = True"),
    ]
    for config, needle in cases:
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(OneboxError, match=needle):
            load_hf(folder)
    with pytest.raises(OneboxError, match="not a folder"):
        load_hf(tmp_path / "missing")


# --- an export never deletes what it did not write ----------------------------------------------


def _export(config, out, **kwargs):
    return export_hf(Transformer(config).state_dict(), config, None, out, **kwargs)


def test_export_refuses_a_folder_of_the_users_files_and_leaves_them(tmp_path):
    config = micro_model()
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(OneboxError, match="not empty and holds no earlier export"):
            _export(config, target, force=force)
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no staging folder left beside it


def test_export_into_the_run_folder_or_onto_a_file_is_refused(tmp_path, corpus_dir):
    from onebox.cli import main

    run = tmp_path / "run"
    train(micro_model(), micro_train(run, corpus_dir, max_steps=2, eval_every=0), show_progress=False)
    before = sorted(p.name for p in run.iterdir())
    assert main(["export", str(run), str(run)]) == 1
    assert main(["export", str(run), str(run), "--force"]) == 1
    assert sorted(p.name for p in run.iterdir()) == before
    (tmp_path / "file.bin").write_text("x")
    assert main(["export", str(run), str(tmp_path / "file.bin")]) == 1
    assert (tmp_path / "file.bin").read_text() == "x"


def test_force_replaces_only_an_earlier_exports_own_files(tmp_path):
    config = micro_model()
    target = tmp_path / "hf"
    _export(config, target)
    (target / "README.md").write_text("my model card")
    (target / "tokenizer.json").write_text(
        "stale"
    )  # an earlier export's file the new one does not write (no tokenizer now)
    manifest = json.loads((target / "onebox-export.json").read_text())
    manifest["files"].append("tokenizer.json")
    (target / "onebox-export.json").write_text(json.dumps(manifest))
    with pytest.raises(OneboxError, match="--force"):
        _export(config, target)
    _export(config, target, force=True)
    names = {p.name for p in target.iterdir()}
    assert "README.md" in names and (target / "README.md").read_text() == "my model card"
    assert "tokenizer.json" not in names and {"config.json", "model.safetensors", "onebox-export.json"} <= names


def test_export_uses_the_umask_and_writes_no_max_length(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        _export(micro_model(), tmp_path / "hf")
    finally:
        os.umask(old)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o755
    assert {(p.stat().st_mode & 0o777) for p in (tmp_path / "hf").iterdir()} == {0o644}
    assert "max_length" not in json.loads((tmp_path / "hf" / "generation_config.json").read_text())


def test_a_file_that_is_no_checkpoint_is_refused(tmp_path):
    from onebox.checkpoint import load_checkpoint

    for content in (b"\x80\x02}q\x00.", b"not a pickle at all", bytes(range(256)) * 4):
        (tmp_path / "x.pt").write_bytes(content)
        with pytest.raises(OneboxError, match="checkpoint|not a onebox"):
            load_checkpoint(tmp_path / "x.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "y.pt")
    with pytest.raises(OneboxError, match="not a onebox checkpoint"):
        load_checkpoint(tmp_path / "y.pt")


def test_a_large_export_is_written_in_shards_that_transformers_and_onebox_read(tmp_path, monkeypatch):
    """Past the shard size the weights go to model-0000i-of-0000n.safetensors with an index (as save_pretrained
    writes them), each shard serialised alone: transformers loads the folder with onebox's logits, import round-trips."""
    import onebox.export

    monkeypatch.setattr(onebox.export, "SHARD_BYTES", 200_000)
    torch.manual_seed(2)
    config = micro_model(tie_embeddings=False)
    model = Transformer(config).eval()
    export_hf(model.state_dict(), config, None, tmp_path / "hf", dtype="float32")
    shards = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    idx = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(tmp_path / "hf", idx), model(idx), rtol=1e-4, atol=1e-4)
        back, _ = model_from_hf(tmp_path / "hf")
        assert torch.equal(back(idx), model(idx))
