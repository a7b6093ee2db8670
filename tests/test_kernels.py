"""Triton kernels against their references, and the references against brute force.

Without a GPU the kernels run in Triton's interpreter (numpy), so sizes stay small.
"""

import math
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read by every @triton.jit, triton.language's own included

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import triton_kernels  # noqa: E402
from triton_kernels import cached_attention, reference, remask_topk  # noqa: E402

if not HAS_CUDA and not isinstance(tl.zeros, InterpretedFunction):
    raise RuntimeError(
        "triton was imported (e.g. by torch._dynamo or torch.export) before this module could set "
        "TRITON_INTERPRET=1, so its kernels cannot run on CPU. Set TRITON_INTERPRET=1 in the environment "
        "or at the top of tests/conftest.py when torch.cuda.is_available() is False.")

DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (dispatch to Triton is for CUDA tensors)")

# Confidence is fp32 arithmetic on the same fp32 values in both paths, for fp16 logits too; only the
# order of the softmax denominator's sum differs (online over vocab tiles), a few ulps.
CONF_RTOL = 1e-5
# Attention: fp32 differs from the fp32 reference only in accumulation order. fp16 runs P @ V with P
# cast to fp16 (as flash attention does) and rounds the output to fp16 (ulp 2**-11 ~ 4.9e-4).
ATTN_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3)}


# --------------------------------------------------------------------------------------------------
# remask_topk

def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _remask_inputs(B, L, V, dtype, seed, p_eligible=0.6):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, L, V, generator=g)).to(dtype)
    eligible = torch.rand(B, L, generator=g) < p_eligible
    return logits.to(DEVICE), eligible.to(DEVICE)


def _k(*values):
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


def _assert_remask_matches(logits, eligible, k, seeds=None, **kwargs):
    """Run kernel and reference (with identically seeded generators when seeds is given) and compare."""
    results = []
    for impl in (remask_topk, reference.remask_topk):
        if seeds is not None:
            kwargs["generator"] = _gen(seeds) if isinstance(seeds, int) else [_gen(s) for s in seeds]
        results.append(impl(logits, eligible, k, **kwargs))
    (x0, conf, commit), (x0_ref, conf_ref, commit_ref) = results
    assert x0.dtype == torch.int64 and conf.dtype == torch.float32 and commit.dtype == torch.bool
    assert torch.equal(x0, x0_ref)
    torch.testing.assert_close(conf, conf_ref, rtol=CONF_RTOL, atol=0)
    assert torch.equal(commit, commit_ref)
    return x0, conf, commit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("V", [1000, 32003])
def test_remask_matches_reference(dtype, V):
    logits, eligible = _remask_inputs(2, 6, V, dtype, seed=V)
    banned = _k(0, 7, V - 1, V - 2)  # includes ids in the masked tail tile
    _, conf, commit = _assert_remask_matches(logits, eligible, _k(2, 100), banned_ids=banned)
    assert torch.isneginf(conf[~eligible]).all()
    assert commit[0].sum() == min(2, int(eligible[0].sum())) and torch.equal(commit[1], eligible[1])


def test_remask_k_zero_and_nothing_eligible():
    logits, eligible = _remask_inputs(2, 5, 1000, torch.float32, seed=1)
    eligible[0] = True
    eligible[1] = False
    _, conf, commit = _assert_remask_matches(logits, eligible, _k(0, 3))
    assert not commit.any()
    assert torch.isneginf(conf[1]).all()


@pytest.mark.parametrize("V", [1000, 32003])
def test_remask_ties(V):
    logits, eligible = _remask_inputs(1, 6, V, torch.float32, seed=2)
    eligible[:] = True
    logits *= 0.1  # all other positions far less confident than the tied ones (1/3 or 1/4 each)
    spike = logits[0, 1].clone()
    # One maximum repeated: in the first tile, in the same lane one 4096-wide tile later, mid-vocab and
    # in the masked tail tile.
    for i in (5, 5 + 4096, V // 2, V - 1):
        if i < V:
            spike[i] = 30.0
    logits[0, 1] = logits[0, 3] = logits[0, 4] = spike  # three positions with one confidence
    x0, _, commit = _assert_remask_matches(logits, eligible, _k(2))
    assert x0[0, 1] == x0[0, 3] == 5
    assert commit[0].tolist() == [False, True, False, True, False, False]


def test_remask_threshold():
    logits, eligible = _remask_inputs(3, 8, 1000, torch.float16, seed=3)
    logits[:, ::3, 17] = 20.0  # positions 0, 3, 6 are near-certain
    eligible[:2] = True
    eligible[2] = False
    _, conf, commit = _assert_remask_matches(logits, eligible, _k(0, 0, 0), threshold=0.5)
    assert commit[0].tolist() == [True, False, False, True, False, False, True, False]
    _, conf, commit = _assert_remask_matches(logits, eligible, _k(0, 0, 0), threshold=1.0)
    # Nothing is above 1.0: exactly the most confident eligible position, none in a row without any.
    assert commit.sum(dim=1).tolist() == [1, 1, 0]
    assert torch.equal(commit[:2].float().argmax(dim=1), conf[:2].argmax(dim=1))


def test_remask_bans_only_at_eligible():
    logits, eligible = _remask_inputs(2, 6, 1000, torch.float32, seed=4)
    logits[..., 999] = 50.0
    x0, _, _ = _assert_remask_matches(logits, eligible, _k(3, 3), banned_ids=_k(999))
    assert (x0[eligible] != 999).all() and (x0[~eligible] == 999).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_remask_temperature_one_generator(dtype):
    logits, eligible = _remask_inputs(2, 6, 32003, dtype, seed=5)
    x0, _, _ = _assert_remask_matches(logits, eligible, _k(2, 2), seeds=123, temperature=1.0,
                                      banned_ids=_k(3, 32002))
    greedy = remask_topk(logits, eligible, _k(2, 2))[0]
    assert not torch.equal(x0, greedy), "temperature 1.0 should change some argmax"


def test_remask_temperature_default_generator():
    logits, eligible = _remask_inputs(2, 4, 1000, torch.float32, seed=13)
    results = []
    for impl in (remask_topk, reference.remask_topk):
        torch.manual_seed(77)
        results.append(impl(logits, eligible, _k(1, 3), temperature=2.0))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][2], results[1][2])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=CONF_RTOL, atol=0)


def test_remask_generator_list_reproduces_single_requests():
    logits, eligible = _remask_inputs(3, 5, 1000, torch.float32, seed=6)
    k = _k(1, 2, 3)
    batch = _assert_remask_matches(logits, eligible, k, seeds=[10, 20, 30], temperature=0.8, threshold=0.2)
    for b, seed in enumerate((10, 20, 30)):
        alone = remask_topk(logits[b:b + 1], eligible[b:b + 1], k[b:b + 1], temperature=0.8, threshold=0.2,
                            generator=_gen(seed))
        for got, want in zip(alone, batch):
            assert torch.equal(got[0], want[b])


def test_remask_reference_against_brute_force():
    B, L, V, T = 2, 4, 9, 0.5
    logits, eligible = _remask_inputs(B, L, V, torch.float32, seed=7)
    logits, eligible = logits.cpu(), eligible.cpu()
    logits[0, 2] = logits[0, 0]  # tied confidences
    logits[1, 1, [2, 6]] = 9.0   # tied argmax
    eligible[0] = True
    banned = {4, 6}
    for temperature, threshold, k in ((0.0, None, [2, 1]), (T, None, [3, 9]), (0.0, 0.3, [0, 0])):
        x0, conf, commit = reference.remask_topk(
            logits, eligible, torch.tensor(k), temperature=temperature, threshold=threshold,
            banned_ids=torch.tensor(sorted(banned)), generator=torch.Generator().manual_seed(99))
        g = torch.Generator().manual_seed(99)
        for b in range(B):
            u = torch.rand((L, V), generator=g, dtype=torch.float32)
            confs = []
            for i in range(L):
                row = [float("-inf") if eligible[b, i] and j in banned else float(logits[b, i, j])
                       for j in range(V)]
                noisy = [row[j] + temperature * -math.log(-math.log(max(float(u[i, j]), 1e-20)))
                         if temperature else row[j] for j in range(V)]
                best = max(range(V), key=lambda j: (noisy[j], -j))
                total = sum(math.exp(r - max(row)) for r in row)
                confs.append(math.exp(row[best] - max(row)) / total if eligible[b, i] else float("-inf"))
                assert x0[b, i] == best
                assert conf[b, i].item() == pytest.approx(confs[i], rel=1e-6)
            order = sorted((i for i in range(L) if eligible[b, i]), key=lambda i: (-confs[i], i))
            if threshold is None:
                chosen = set(order[:k[b]])
            else:
                chosen = {i for i in order if confs[i] > threshold} | set(order[:1])
            assert {i for i in range(L) if commit[b, i]} == chosen


def _official_commits(logits, eligible, k, banned):
    """The official rule (LLaDA-V's modeling_llada.py generate, LLaDA's generate.py), transcribed: bans at
    masked positions, argmax, the softmax in float64, torch.topk of the eligible confidences."""
    logits = logits.float().cpu().clone()
    logits[..., banned] = torch.where(eligible.cpu()[..., None], float("-inf"), logits[..., banned])
    x0 = torch.argmax(logits, dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1).gather(-1, x0[..., None])[..., 0]
    confidence = torch.where(eligible.cpu(), p, float("-inf"))
    commits = torch.zeros_like(eligible.cpu())
    for b in range(len(k)):
        commits[b, torch.topk(confidence[b], int(k[b])).indices] = True
    return commits


def _saturated_logits(complements, V, dtype, seed):
    """A row of logits per entry of `complements`: None gives an ordinary row (3 * N(0, 1)); c gives a row
    whose argmax (at a position-dependent id) has 1 - p close to c: the argmax at 0, the other V - 1 logits
    spread around log(c / (V - 1))."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, c in enumerate(complements):
        if c is None:
            rows.append(3 * torch.randn(V, generator=g))
            continue
        row = math.log(c / (V - 1)) + 0.3 * torch.randn(V, generator=g)
        row[(17 * i + 5) % V] = 0.0
        rows.append(row)
    return torch.stack(rows)[None].to(dtype).to(DEVICE)


# 1 - p from 1e-10 to 1e-6 at eligible positions (float32 rounds p to 1.0 below ~3e-8), and ordinary ones. The
# most confident position is not the lowest of those float32 ties, so ranking by float32 p commits others.
SATURATED = [None, 2e-8, 3e-7, 1e-10, None, 5e-9, 1e-6, 4e-10, 2e-9, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_remask_orders_saturated_confidences_as_float64(dtype, k):
    V = 1000
    logits = _saturated_logits(SATURATED, V, dtype, seed=k)
    eligible = torch.tensor([[True] * 8 + [False, True]], device=DEVICE)
    banned = _k(3, 999)
    float32_p = torch.softmax(logits.float(), dim=-1).amax(dim=-1)[0]
    assert int((float32_p[:8] == 1.0).sum()) >= 4  # the case float32 confidences cannot order
    want = _official_commits(logits, eligible, _k(k), [3, 999])
    for impl in (remask_topk, reference.remask_topk):
        _, conf, commit = impl(logits, eligible, _k(k), banned_ids=banned)
        assert torch.equal(commit.cpu(), want), impl.__module__
        assert conf.max() <= 1.0 and torch.isneginf(conf[~eligible]).all()  # still a probability
    # The official order: 1 - p of 1e-10, 4e-10, 5e-9 (position 8 is not eligible). Ranked by the float32
    # confidence, ties to the lower position, the first commit would be position 1 (1 - p ~ 2e-8).
    assert want[0].nonzero()[:, 0].tolist() == sorted([3, 7, 5][:k]) and float32_p[1] == 1.0


def test_remask_threshold_on_saturated_confidences():
    logits = _saturated_logits(SATURATED, 1000, torch.float32, seed=4)
    eligible = torch.ones(1, len(SATURATED), dtype=torch.bool, device=DEVICE)
    for impl in (remask_topk, reference.remask_topk):
        # Every saturated position is above 0.999; with a threshold of 1.0 none is, and the single most
        # confident one (position 3, 1 - p ~ 1e-10) is committed, not the first position whose p rounds to 1.
        _, conf, commit = impl(logits, eligible, _k(0), threshold=0.999)
        assert torch.equal(commit[0].cpu(), torch.tensor([c is not None for c in SATURATED]))
        _, _, commit = impl(logits, eligible, _k(0), threshold=1.0)
        assert commit[0].nonzero()[:, 0].tolist() == [3]


@pytest.mark.parametrize("bad, match", [
    (dict(eligible=torch.ones(2, 4, dtype=torch.int64)), "eligible must be a bool tensor"),
    (dict(k=torch.tensor([1])), "k must be an int64 tensor of shape \\[2\\]"),
    (dict(threshold=0.0), "threshold must be"),
    (dict(generator=[torch.Generator()]), "sequence of 2 generators"),
    (dict(logits=torch.zeros(2, 4, 10, dtype=torch.bfloat16)), "logits must be .* float16 or float32"),
])
def test_remask_rejects_bad_arguments(bad, match):
    args = dict(logits=torch.zeros(2, 4, 10), eligible=torch.ones(2, 4, dtype=torch.bool),
                k=torch.tensor([1, 1]), threshold=None, generator=None)
    args.update(bad)
    for impl in (remask_topk, reference.remask_topk):
        with pytest.raises(ValueError, match=match):
            impl(args["logits"], args["eligible"], args["k"], threshold=args["threshold"],
                 generator=args["generator"])


# --------------------------------------------------------------------------------------------------
# cached_attention

def _attn_inputs(B, H, Lq, Lk, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype).to(DEVICE) for n in (Lq, Lk, Lk))
    return q, k, v


def _assert_attention_matches(q, k, v, **kwargs):
    out = cached_attention(q, k, v, **kwargs)
    want = reference.cached_attention(q, k, v, **kwargs)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out, want, **ATTN_TOL[q.dtype])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Lq", [1, 7, 32])
def test_attention_matches_reference(dtype, Lq):
    Lk = 300  # not a multiple of the 64-key tile; spread over several splits
    q, k, v = _attn_inputs(2, 2, Lq, Lk, 64, dtype, seed=Lq)
    key_mask = torch.ones(2, Lk, dtype=torch.bool, device=DEVICE)
    key_mask[1, :37] = False  # left padding
    key_mask[0, 100:140] = False
    _assert_attention_matches(q, k, v, kv_lens=_k(Lk, 211), key_mask=key_mask)


@pytest.mark.parametrize("D", [16, 32, 128])
def test_attention_head_dims(D):
    q, k, v = _attn_inputs(1, 2, 7, 130, D, torch.float16, seed=D)
    _assert_attention_matches(q, k, v, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_attention_at_llada_8b_head_dim(dtype):
    """LLaDA-8B's head dim 128 and a 32-query block against a padded cache: the torch backend sends its fp16
    cached pass here on CUDA (bf16 and fp32 go to SDPA); fp32 is the dispatcher's other dtype."""
    Lk = 261
    q, k, v = _attn_inputs(1, 2, 32, Lk, 128, dtype, seed=128)
    key_mask = torch.ones(1, Lk, dtype=torch.bool, device=DEVICE)
    key_mask[0, :45] = False  # left padding
    key_mask[0, 200:232] = False  # the block's stale slots
    _assert_attention_matches(q, k, v, key_mask=key_mask)


@pytest.mark.parametrize("masking", ["none", "kv_lens", "key_mask"])
def test_attention_single_masks(masking):
    q, k, v = _attn_inputs(2, 1, 3, 200, 32, torch.float32, seed=8)
    kwargs = {}
    if masking == "kv_lens":
        kwargs["kv_lens"] = torch.tensor([5, 199], dtype=torch.int32, device=DEVICE)
    if masking == "key_mask":
        kwargs["key_mask"] = torch.rand(2, 200, generator=torch.Generator().manual_seed(8)).to(DEVICE) < 0.3
    _assert_attention_matches(q, k, v, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_fully_masked_rows_give_zeros(dtype):
    q, k, v = _attn_inputs(3, 2, 4, 150, 32, dtype, seed=9)
    key_mask = torch.ones(3, 150, dtype=torch.bool, device=DEVICE)
    key_mask[1] = False
    key_mask[2, 60:] = False
    kv_lens = _k(0, 150, 150)
    # Masked cache slots may hold garbage; it must not reach the output.
    k[1] = float("nan")
    v[1] = float("nan")
    v[2, :, 60:] = float("inf")
    out = _assert_attention_matches(q, k, v, kv_lens=kv_lens, key_mask=key_mask)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert torch.isfinite(out).all()


def test_attention_strided_views():
    B, H, Lq, Lk, S_max, D = 2, 2, 5, 100, 160, 32
    cache = torch.randn(2, B, H, S_max, D, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    q = torch.randn(B, Lq, H, D, generator=torch.Generator().manual_seed(11)).to(DEVICE).transpose(1, 2)
    _assert_attention_matches(q, cache[0, :, :, :Lk], cache[1, :, :, :Lk], kv_lens=_k(100, 64))


def test_attention_reference_against_sdpa():
    B, H, Lq, Lk, D = 3, 2, 3, 10, 16
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Lq, Lk, Lk))
    kv_lens = torch.tensor([10, 7, 0])
    key_mask = torch.rand(B, Lk, generator=g) < 0.7
    key_mask[0, 0] = True
    out = reference.cached_attention(q, k, v, kv_lens=kv_lens, key_mask=key_mask, scale=0.2)
    valid = (torch.arange(Lk)[None, :] < kv_lens[:, None]) & key_mask
    want = F.scaled_dot_product_attention(q[:2], k[:2], v[:2], attn_mask=valid[:2, None, None, :], scale=0.2)
    torch.testing.assert_close(out[:2], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.zeros(1, 2, 3, 48)), "head dim D=48 of q is not supported"),
    (dict(k=torch.zeros(1, 2, 9, 32, dtype=torch.float16)), "k must be a \\[1, 2, Lk, 32\\] torch.float32"),
    (dict(v=torch.zeros(1, 2, 8, 32)), "same Lk"),
    (dict(kv_lens=torch.tensor([1.0])), "kv_lens must be"),
    (dict(key_mask=torch.ones(1, 8, dtype=torch.bool)), "key_mask must be .* shape \\[1, 9\\]"),
])
def test_attention_rejects_bad_arguments(bad, match):
    args = dict(q=torch.zeros(1, 2, 3, 32), k=torch.zeros(1, 2, 9, 32), v=torch.zeros(1, 2, 9, 32),
                kv_lens=None, key_mask=None)
    args.update(bad)
    for impl in (cached_attention, reference.cached_attention):
        with pytest.raises(ValueError, match=match):
            impl(args["q"], args["k"], args["v"], kv_lens=args["kv_lens"], key_mask=args["key_mask"])


# --------------------------------------------------------------------------------------------------
# dispatchers

def _record_calls(monkeypatch, name):
    calls = []
    real = getattr(triton_kernels, name)

    def recorder(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)
    monkeypatch.setattr(triton_kernels, name, recorder)
    return calls


def _small_cases(device):
    logits = torch.randn(1, 3, 50, device=device)
    eligible = torch.ones(1, 3, dtype=torch.bool, device=device)
    k = torch.ones(1, dtype=torch.int64, device=device)
    q, kk, v = (torch.randn(1, 1, n, 16, device=device) for n in (2, 20, 20))
    return (logits, eligible, k), (q, kk, v)


def test_dispatchers_use_reference_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_KERNELS_FORCE", raising=False)
    calls = _record_calls(monkeypatch, "remask_topk") + _record_calls(monkeypatch, "cached_attention")
    remask_args, attn_args = _small_cases("cpu")
    for got, want in zip(triton_kernels.remask(*remask_args), reference.remask_topk(*remask_args)):
        assert torch.equal(got, want)
    assert torch.equal(triton_kernels.attention(*attn_args), reference.cached_attention(*attn_args))
    assert calls == []


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter override is for CPU-only machines")
def test_dispatchers_can_force_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_KERNELS_FORCE", "1")
    remask_calls = _record_calls(monkeypatch, "remask_topk")
    attn_calls = _record_calls(monkeypatch, "cached_attention")
    remask_args, attn_args = _small_cases("cpu")
    triton_kernels.remask(*remask_args)
    triton_kernels.attention(*attn_args)
    assert remask_calls == ["remask_topk"] and attn_calls == ["cached_attention"]


@requires_cuda
def test_dispatchers_pick_triton_for_cuda_tensors(monkeypatch):
    remask_calls = _record_calls(monkeypatch, "remask_topk")
    attn_calls = _record_calls(monkeypatch, "cached_attention")
    remask_args, attn_args = _small_cases("cuda")
    x0, _, commit = triton_kernels.remask(*remask_args)
    out = triton_kernels.attention(*attn_args)
    assert remask_calls == ["remask_topk"] and attn_calls == ["cached_attention"]
    x0_ref, _, commit_ref = reference.remask_topk(*remask_args)
    assert torch.equal(x0, x0_ref) and torch.equal(commit, commit_ref)
    torch.testing.assert_close(out, reference.cached_attention(*attn_args), **ATTN_TOL[torch.float32])


def test_the_kernels_can_be_switched_off_on_cuda(monkeypatch):
    from types import SimpleNamespace

    cuda_tensor = SimpleNamespace(is_cuda=True)
    assert triton_kernels._use_triton(cuda_tensor)
    monkeypatch.setenv("TRITON_KERNELS_DISABLE", "1")
    assert not triton_kernels._use_triton(cuda_tensor)
