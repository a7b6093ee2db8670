"""The scale benchmark: LLaDA-8B's proportions at any size, checkpoints in the released sharded layout, and
one build + serve measured per precision, each in its own process."""

import json

import llada_v
from benchmarks import scale
from llada_v.weights import INDEX_FILE


def test_scaled_config_has_llada_8b_proportions():
    lm = scale.scaled_config(8e9).language
    assert (lm.hidden_size, lm.num_hidden_layers, lm.intermediate_size, lm.vocab_size) == (4096, 32, 12288, 126464)
    small = scale.scaled_config(1e9).language
    assert abs(scale.parameter_count(small) - 1e9) < 0.1e9
    assert small.hidden_size // small.num_attention_heads == 128 and small.intermediate_size == 3 * small.hidden_size


def test_random_checkpoint_is_a_sharded_checkpoint_the_loader_takes(tmp_path, monkeypatch):
    monkeypatch.setattr(scale, "SHARD_BYTES", 2 << 20)
    cfg = scale.scaled_config(6e6)
    total = scale.write_random_checkpoint(cfg, tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and index["metadata"]["total_size"] == total
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    model = llada_v.load_model(tmp_path / "ckpt")
    assert sum(p.numel() for p in model.parameters()) == scale.parameter_count(cfg.language) == total // 2
    assert len(llada_v.load_tokenizer(tmp_path / "ckpt")) == cfg.language.vocab_size


def test_scale_benchmark_measures_build_and_serve(tmp_path, capsys):
    assert scale.main(["--params", "6e6", "--precision", "fp32", "int8", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["precision"] for r in rows] == ["fp32", "int8"]
    for row in rows:
        assert row["build_peak_rss_gb"] > row["engines_weight_gb"] > 0
        assert row["build_fixed_rss_gb"] > row["build_start_rss_gb"] > 0  # the fixed cost: a build, not imports
        assert row["serve_peak_rss_gb"] > 0 and row["serve_loaded_over_weights"] > 0
        assert {"tracing denoiser", "validating denoiser with ONNX Runtime"} <= set(row["build_steps"])
        # steps shorter than the 50 ms sampling period may have no sample on a model this small
        assert set(row["build_step_peak_rss_gb"]) <= set(row["build_steps"])
        assert row["projected_8b"]["weights_gb"] > row["engines_weight_gb"]
    assert rows[1]["engines_weight_gb"] < rows[0]["engines_weight_gb"]
    assert "| 0.01B | int8 |" in capsys.readouterr().out
