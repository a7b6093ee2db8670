"""The benchmark commands run end to end on the shipped engines (tiny settings; no timing is asserted)."""

import json

import numpy as np
import pytest
from safetensors import safe_open

from benchmarks import bench_model
from benchmarks import engines as engines_bench
from benchmarks import refresh_interval, serving
from benchmarks.bench_model import IMAGE_SIZE, bench_config, text_bench_config, write_checkpoint
from benchmarks.common import load_requests, token_agreement
from benchmarks.demo_model.evaluate import is_exact_match
from exporter import load_manifest
from llada_v import SHIPPED_MODEL_DIR, SpecialTokens, load_model, load_tokenizer
from llada_v.image_processing import preprocess

TINY = ["--gen-length", "8", "--block-length", "4", "--requests", "2", "--warmup", "0"]


def test_refresh_interval_writes_table_json_and_plot(engines_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert refresh_interval.main(["--engines", str(engines_dir), "--intervals", "1", "2", "--out", str(out), *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {s["row"]: s for s in results["summaries"]}
    raw = {r["row"]: r for r in results["raw"]}
    assert list(rows) == ["baseline (no cache)", "prefix r=1", "prefix r=2", "dual r=1", "dual r=2"]
    assert rows["baseline (no cache)"]["cached_forwards"] == 0
    for label in ("prefix r=1", "dual r=1"):  # a refresh every step is exactly the uncached loop
        assert rows[label]["agreement"] == 1.0 and rows[label]["cached_forwards"] == 0
    assert rows["dual r=2"]["cached_forwards"] > 0
    # Every summary is what its raw runs say: the speedup over the baseline's medians, the share of tokens equal to
    # the baseline's, and (engines built from the shipped model, whose labelled set scores every row) exact match.
    answers = [r.answer for r in load_requests(2, with_answers=True)]
    baseline = raw["baseline (no cache)"]
    for label, row in raw.items():
        assert len(row["seconds"]) == 2
        assert rows[label]["speedup"] == pytest.approx(np.median(baseline["seconds"]) / np.median(row["seconds"]))
        same = [sum(x == y for x, y in zip(a, b)) / max(len(a), len(b)) if a or b else 1.0
                for a, b in zip(row["answers"], baseline["answers"])]
        assert rows[label]["agreement"] == pytest.approx(np.mean(same))
        assert rows[label]["accuracy"] == pytest.approx(np.mean([is_exact_match(t, a) for t, a in
                                                                 zip(row["texts"], answers)]))
    assert results["machine"]["cpu"]
    assert (out / "refresh_interval.png").stat().st_size > 1000
    assert "baseline (no cache)" in capsys.readouterr().out


def test_refresh_interval_threshold_rows(engines_dir, tmp_path):
    out = tmp_path / "out"
    assert refresh_interval.main(["--engines", str(engines_dir), "--cache", "dual", "--intervals", "2",
                                  "--thresholds", "0.5", "--out", str(out), "--gen-length", "16", "--block-length",
                                  "16", "--requests", "2", "--warmup", "0"]) == 0
    rows = {s["row"]: s for s in json.loads((out / "results.json").read_text())["summaries"]}
    assert list(rows) == ["baseline (no cache)", "dual r=2", "threshold 0.5", "dual r=2 threshold 0.5"]
    assert rows["threshold 0.5"]["threshold"] == 0.5 and rows["threshold 0.5"]["cached_forwards"] == 0
    # The shipped model is confident: parallel decoding takes fewer denoiser calls than one token per step
    # (its short answers end at the first step).
    baseline_calls = rows["baseline (no cache)"]["full_forwards"]
    for label in ("threshold 0.5", "dual r=2 threshold 0.5"):
        assert rows[label]["full_forwards"] + rows[label]["cached_forwards"] < baseline_calls


def test_refresh_interval_policy_rows_and_their_plot(engines_dir, tmp_path):
    out = tmp_path / "out"
    assert refresh_interval.main(["--engines", str(engines_dir), "--cache", "dual", "--intervals", "1", "4",
                                  "--drift-thresholds", "1e9", "--committed", "1", "--out", str(out),
                                  *TINY]) == 0
    rows = {s["row"]: s for s in json.loads((out / "results.json").read_text())["summaries"]}
    assert list(rows) == ["baseline (no cache)", "dual r=1", "dual r=4", "dual drift 1e+09", "dual committed 1"]
    assert rows["dual drift 1e+09"]["refresh"] == "drift" and rows["dual drift 1e+09"]["refresh_interval"] == 4
    # A drift never reached refreshes once per block (4 steps here), like r=4; one token a refresh is r=1.
    for policy, fixed in (("dual drift 1e+09", "dual r=4"), ("dual committed 1", "dual r=1")):
        assert {k: rows[policy][k] for k in ("full_forwards", "cached_forwards", "agreement")} == \
            {k: rows[fixed][k] for k in ("full_forwards", "cached_forwards", "agreement")}
    assert (out / "refresh_policies.png").stat().st_size > 1000


def test_refresh_interval_torch_rows_start_with_the_plain_pytorch_loops(tmp_path):
    out = tmp_path / "out"
    assert refresh_interval.main(["--engines", str(SHIPPED_MODEL_DIR), "--backend", "torch", "--cache", "dual",
                                  "--intervals", "2", "4", "--out", str(out), *TINY]) == 0
    rows = {s["row"]: s for s in json.loads((out / "results.json").read_text())["summaries"]}
    assert list(rows) == ["plain PyTorch loop", "Fast-dLLM dual loop", "baseline (no cache)", "dual r=2", "dual r=4"]
    plain, ours = rows["plain PyTorch loop"], rows["baseline (no cache)"]
    assert ours["agreement"] == 1.0  # the runtime's uncached loop gives the tokens of LLaDA's plain loop
    assert ours["full_forwards"] == plain["full_forwards"] and ours["cached_forwards"] == 0
    # 8 steps over 2 blocks: r=4 refreshes once per block, as Fast-dLLM's loop does, and is compared with it
    assert rows["dual r=4"]["vs_fast_dllm"] > 0 and rows["dual r=2"]["vs_fast_dllm"] is None
    assert rows["dual r=4"]["full_forwards"] == rows["Fast-dLLM dual loop"]["full_forwards"]
    assert "accuracy" in ours and "f1" in ours  # the shipped checkpoint: its labelled set scores every row


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_fast_dllm_loops_are_the_runtime_at_one_refresh_per_block(no_eot_model_dir, cache):
    """Token for token on a model that never stops early, so every block is decoded through the cache."""
    from benchmarks.common import load_requests
    from benchmarks.fast_dllm_loops import cached_loop
    from runtime import GenerationConfig, Pipeline
    from runtime import Request as RuntimeRequest
    from runtime.generation.timing import StageTimer

    pipe = Pipeline.load(no_eot_model_dir, backend="torch")
    config = GenerationConfig(gen_length=16, block_length=8, steps=16, cache=cache, refresh_interval=8)
    for request in load_requests(3, with_answers=False):
        ours = pipe.generate(request.prompt, image=request.image, config=config)
        (prompt,) = pipe.embed_prompts([RuntimeRequest(request.prompt, request.image)], StageTimer(pipe.runner.device))
        answer, full, cached = cached_loop(pipe.runner.model, prompt, pipe.special, 16, 8, 16, cache)
        assert answer[0].tolist() == list(ours.token_ids) and len(ours.token_ids) == 16
        assert (full, cached) == (ours.stats["full_forwards"], ours.stats["cached_forwards"]) == (2, 14)


def test_refresh_interval_plain_model_must_be_the_engines_source(engines_dir, no_eot_model_dir, tmp_path, capsys):
    code = refresh_interval.main(["--engines", str(engines_dir), "--plain-model", str(no_eot_model_dir),
                                  "--out", str(tmp_path), *TINY])
    assert code == 2 and "not the checkpoint" in capsys.readouterr().err


def test_refresh_interval_rejects_bad_settings(engines_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        refresh_interval.main(["--engines", str(engines_dir), "--intervals", "0"])
    assert exit_info.value.code == 2
    code = refresh_interval.main(["--engines", str(engines_dir), "--gen-length", "10", "--block-length", "4",
                                  "--out", str(tmp_path)])
    assert code == 2 and "block_length" in capsys.readouterr().err


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_engines_compares_backends_per_stage(engines_dir, tmp_path, cache):
    out = tmp_path / "out"
    assert engines_bench.main(["--model", str(SHIPPED_MODEL_DIR), "--engines", str(engines_dir), "--out", str(out),
                               "--cache", cache, "--refresh-interval", "2", *TINY]) == 0
    timings = json.loads((out / "engines.json").read_text())["timings"]
    for backend in ("torch", "onnxruntime"):
        for run in timings[backend]:
            # Each stage's time is where it ran: the cached forwards only with a cache, every other stage always.
            for stage in ("preprocess", "vision", "projector", "full_forward", "remasking"):
                assert run[stage] > 0, (backend, stage)
            assert (run["cached_forward"] > 0) == (cache != "none")
            assert run["seconds"] > run["full_forward"] + run["cached_forward"]


def test_bench_model_prompt_is_dominated_by_image_tokens(tmp_path):
    cfg = bench_config()
    tiles = preprocess(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8), cfg)
    side = cfg.vision.patches_per_side
    assert tiles.grid == (1, 1)
    assert side * side + side * (side + 1) >= 729  # global view + one grid tile with its row ends
    model = load_model(write_checkpoint(tmp_path / "ckpt"))
    eot = SpecialTokens.from_tokenizer(load_tokenizer(tmp_path / "ckpt")).eot
    assert model.denoiser.lm_head.weight[eot].abs().sum() == 0


def test_text_bench_model_is_a_llada_checkpoint_in_the_released_layout(tmp_path, capsys):
    assert bench_model.main(["--text", "--out", str(tmp_path / "bench")]) == 0
    checkpoint = tmp_path / "bench" / "checkpoint"
    assert "d_model" in json.loads((checkpoint / "config.json").read_text())
    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        assert all(key.startswith("model.transformer.") for key in f.keys())
    model = load_model(checkpoint)
    assert model.config == text_bench_config() and model.config.language == bench_config().language  # every row
    special = SpecialTokens.from_tokenizer(load_tokenizer(checkpoint))
    for never in (special.eot, *special.banned_at_masked):  # so LLaDA's rules and the research loops agree
        assert model.denoiser.lm_head.weight[never].abs().sum() == 0
    assert load_manifest(tmp_path / "bench" / "engines")["parts"].keys() == {"denoiser"}
    # The refresh-interval benchmark asks it the questions without images; the plain loops answer as the runtime.
    out = tmp_path / "dial"
    assert refresh_interval.main(["--engines", str(tmp_path / "bench" / "engines"), "--plain-model", str(checkpoint),
                                  "--intervals", "1", "--cache", "dual", "--out", str(out), *TINY]) == 0
    summaries = {s["row"]: s for s in json.loads((out / "results.json").read_text())["summaries"]}
    exact = [s for s in summaries.values() if s["cache"] == "none" or s["refresh_interval"] == 1]
    assert len(exact) == 3 and all(s["agreement"] == 1.0 for s in exact), summaries


def test_serving_benchmark_measures_both_servers_with_the_same_load(engines_dir, tmp_path, capsys):
    out = tmp_path / "serving"
    assert serving.main(["--engines", str(engines_dir), "--concurrency", "1", "3", "--requests", "3",
                         "--max-batch", "3", "--gen-length", "8", "--block-length", "8", "--out", str(out)]) == 0
    report = json.loads((out / "serving.json").read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["identical_answers"] == level["requests"] == 3
        for server in ("batched", "single"):
            row = level[server]
            assert row["tokens_per_second"] > 0 and row["latency_p95"] >= row["latency_p50"] > 0
            assert len(row["answers"]) == 3
    assert (out / "serving.png").stat().st_size > 1000
    assert "--max-batch 3" in capsys.readouterr().out


def test_precisions_benchmark_compares_engines_with_the_baselines_tokens(tmp_path, capsys):
    from benchmarks import precisions

    assert precisions.main(["--model", str(SHIPPED_MODEL_DIR), "--precisions", "fp32", "int8", "--requests", "2",
                            "--warmup", "0", "--gen-length", "8", "--block-length", "8", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "precisions.json").read_text())
    rows = {r["precision"]: r for r in report["rows"]}
    # Each row is what its runs say, against fp32's: the ratio of median seconds, the share of equal tokens.
    seconds, tokens = report["seconds"], report["tokens"]
    assert rows["int8"]["speedup_vs_baseline"] == pytest.approx(np.median(seconds["fp32"]) / np.median(seconds["int8"]))
    same = [sum(a == b for a, b in zip(x, y)) / max(len(x), len(y)) if x or y else 1.0
            for x, y in zip(tokens["int8"], tokens["fp32"])]
    assert rows["int8"]["token_agreement"] == pytest.approx(np.mean(same))
    assert rows["int8"]["engines_weight_mb"] < rows["fp32"]["engines_weight_mb"] / 2
    assert all(r["loaded_rss_mb"] > 0 and r["peak_rss_mb"] > 0 for r in rows.values())
    assert "| int8 |" in capsys.readouterr().out
    assert token_agreement([1, 2, 3], [1, 5]) == 1 / 3 and token_agreement([], []) == 1.0


def test_gpu_check_says_there_is_no_gpu_and_its_harness_runs_on_the_cpu(tmp_path, capsys):
    import torch

    from benchmarks import gpu_check

    if not torch.cuda.is_available():
        assert gpu_check.main(["--out", str(tmp_path / "none")]) == 0
        assert "no CUDA GPU is visible to torch" in capsys.readouterr().out and not (tmp_path / "none").exists()
    assert gpu_check.main(["--self-check", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    answered = {row["path"] + " " + row["decoding"]: row for row in report["answers"] if "decoding" in row}
    for decoding in ("uncached", "dual r=4"):  # fp32 everywhere gives the CPU reference's tokens
        for path in ("torch cpu fp32", "onnxruntime cpu fp32"):
            assert answered[f"{path} {decoding}"]["token_agreement"] == 1.0
    assert not [row for row in report["answers"] if "failed" in row]
    assert {row["kernel"] for row in report["kernels"]} == {"cached_attention", "remask_topk"}
    assert all(row["max_abs_err"] < 1e-3 and row.get("same_commits", True) for row in report["kernels"])
    for timing in report["speed"]["passes"].values():
        assert timing["ms_per_layer"] > 0 and timing["weight_read_floor_ms_per_layer"] > 0
    assert "| pass | ms per layer |" in capsys.readouterr().out


def test_hostile_load_measures_a_client_alone_and_under_attack(engines_dir, tmp_path, capsys):
    from benchmarks import hostile_load

    assert hostile_load.main(["--engines", str(engines_dir), "--requests", "3", "--gen-length", "8", "--half-open",
                              "20", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "hostile_load.json").read_text())
    assert list(report["phases"]) == ["alone", "refused", "crowded"]
    assert report["same_answers"] == {"alone": 3, "refused": 3, "crowded": 3}
    assert report["healthy_after"] and report["server_log_tracebacks"] == 0 and report["server_peak_rss_mb"] > 0
    expected = {"steps 1e10": {"400"}, "padded-square bomb": {"413"}, "20 images of 8192x8192": {"400"},
                "16 MB prompt": {"400"}, "no key": {"401"}, "1 MB header": {"400", "ReadError", "RemoteProtocolError"},
                "1600x1200 image requests (valid)": {"200", "503"}, "half-open connections": {"closed by the server"}}
    for phase in ("refused", "crowded"):
        replies = report["hostile_replies"][phase]
        assert {"steps 1e10", "no key"} <= set(replies)
        for attack, counts in replies.items():
            assert set(counts) <= expected[attack], (phase, attack, counts)
    assert "| under pathological attack |" in capsys.readouterr().out
