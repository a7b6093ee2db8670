"""Triton kernels against their PyTorch references: python -m benchmarks.bench_kernels

Needs a CUDA GPU (exits with code 2 otherwise). Every case is first checked against the reference
(exit code 1 on a mismatch), then timed with triton.testing.do_bench (CUDA events, median of
repeated runs). Both kernels are memory-bound, so the main figure is achieved GB/s against the
device's peak bandwidth; attention also reports TFLOP/s against the fp16 tensor-core peak.
"""

import argparse
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

# Dense fp16 tensor-core TFLOP/s and HBM TB/s from NVIDIA's data sheets, matched as substrings of the
# device name (first match wins). Bandwidth comes from the device properties when they have it.
_DATASHEET = (
    ("H200", 989.0, 4.8),
    ("H100 NVL", 835.0, 3.9),
    ("H100 PCIe", 756.0, 2.0),
    ("H100", 989.0, 3.35),  # SXM
    ("A100", 312.0, 2.0),
)
_REMASK_SIZES = [(B, 32, 126464) for B in (1, 2, 4, 8)]
_ATTN_SIZES = [(1, 32, 32, Lk, 128) for Lk in (1024, 2048, 4096, 8192, 16384)]  # B, H, Lq, Lk, D


def _peaks(device):
    """(bytes/s, source, flop/s, source); None where unknown."""
    props = torch.cuda.get_device_properties(device)
    sheet = next(((tflops, tbps) for key, tflops, tbps in _DATASHEET if key in props.name), (None, None))
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:  # double data rate: two transfers per memory clock
        bandwidth = 2 * clock_khz * 1e3 * bus_bits / 8
        bw_source = "from the device properties: 2 x memory clock x bus width"
    elif sheet[1] is not None:
        bandwidth, bw_source = sheet[1] * 1e12, f"from the data sheet for {props.name}"
    else:
        bandwidth, bw_source = None, "unknown"
    flops = sheet[0] * 1e12 if sheet[0] is not None else None
    return bandwidth, bw_source, flops, f"from the data sheet for {props.name}" if flops else "no data sheet entry"


def _pct(value, peak):
    return f"{100 * value / peak:5.1f}%" if peak else "   n/a"


def _time_ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _remask_case(B, L, V, dtype):
    g = torch.Generator(device="cuda").manual_seed(B * L)
    logits = (3 * torch.randn(B, L, V, generator=g, device="cuda")).to(dtype)
    eligible = torch.rand(B, L, generator=g, device="cuda") < 0.5
    k = torch.full((B,), 4, dtype=torch.int64, device="cuda")
    banned = torch.tensor([126080, 126081, 126346, 126347], dtype=torch.int64, device="cuda")
    return (logits, eligible, k), dict(banned_ids=banned)


def _attn_case(B, H, Lq, Lk, D, dtype):
    g = torch.Generator(device="cuda").manual_seed(Lk)
    q, k, v = (torch.randn(B, H, n, D, generator=g, device="cuda", dtype=dtype) for n in (Lq, Lk, Lk))
    key_mask = torch.ones(B, Lk, dtype=torch.bool, device="cuda")
    key_mask[:, : Lk // 20] = False  # left padding of a batched prompt
    return (q, k, v), dict(key_mask=key_mask)


def _check_remask(args, kwargs, triton_kernels):
    x0, conf, commit = triton_kernels.remask_topk(*args, **kwargs)
    x0_ref, conf_ref, commit_ref = triton_kernels.reference.remask_topk(*args, **kwargs)
    ok = torch.equal(x0, x0_ref) and torch.equal(commit, commit_ref)
    return ok and torch.allclose(conf, conf_ref, rtol=1e-5, atol=0)


def _check_attention(args, kwargs, triton_kernels):
    out = triton_kernels.cached_attention(*args, **kwargs)
    want = triton_kernels.reference.cached_attention(*args, **kwargs)
    return torch.allclose(out, want, rtol=1e-3, atol=1e-3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="the GPU: cuda or cuda:N (default: the current one)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.bench_kernels needs a CUDA GPU; none is visible to torch.", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type != "cuda":
        parser.error(f"--device {args.device}: the kernels run on CUDA devices only")
    if device.index is not None:
        torch.cuda.set_device(device)  # the cases below are made on "cuda", the current device
    import triton_kernels

    bandwidth, bw_source, flops, flops_source = _peaks(torch.device("cuda", torch.cuda.current_device()))
    print(f"device: {torch.cuda.get_device_name()}")
    print(f"peak bandwidth: {bandwidth / 1e9:.0f} GB/s" if bandwidth else "peak bandwidth: unknown", f"({bw_source})")
    print(f"peak fp16 tensor-core: {flops / 1e12:.0f} TFLOP/s" if flops else "peak TFLOP/s: unknown",
          f"({flops_source})")

    failures = []
    print("\nremask_topk (k=4, 4 banned ids, temperature 0); bytes = logits read once")
    print(f"{'B':>3} {'L':>4} {'V':>7} {'dtype':>8} | {'triton ms':>9} {'GB/s':>7} {'of peak':>7} | "
          f"{'ref ms':>8} {'speedup':>7}")
    for dtype in (torch.float16, torch.float32):
        for B, L, V in _REMASK_SIZES:
            args, kwargs = _remask_case(B, L, V, dtype)
            if not _check_remask(args, kwargs, triton_kernels):
                failures.append(f"remask_topk B={B} L={L} V={V} {dtype}")
                continue
            ms = _time_ms(lambda: triton_kernels.remask_topk(*args, **kwargs))
            ref_ms = _time_ms(lambda: triton_kernels.reference.remask_topk(*args, **kwargs))
            gbps = B * L * V * args[0].element_size() / (ms * 1e-3) / 1e9
            print(f"{B:>3} {L:>4} {V:>7} {str(dtype)[6:]:>8} | {ms:9.4f} {gbps:7.0f} {_pct(gbps * 1e9, bandwidth):>7} "
                  f"| {ref_ms:8.4f} {ref_ms / ms:6.1f}x")

    print("\ncached_attention (fp16, 5% of keys masked); bytes = q, k, v read + out written; "
          "flops = 4*B*H*Lq*Lk*D")
    print(f"{'B':>2} {'H':>3} {'Lq':>3} {'Lk':>6} {'D':>4} | {'triton ms':>9} {'GB/s':>7} {'of peak':>7} "
          f"{'TFLOP/s':>7} {'of peak':>7} | {'ref ms':>8} {'speedup':>7} | {'sdpa ms':>8}")
    for B, H, Lq, Lk, D in _ATTN_SIZES:
        args, kwargs = _attn_case(B, H, Lq, Lk, D, torch.float16)
        if not _check_attention(args, kwargs, triton_kernels):
            failures.append(f"cached_attention B={B} H={H} Lq={Lq} Lk={Lk} D={D}")
            continue
        ms = _time_ms(lambda: triton_kernels.cached_attention(*args, **kwargs))
        ref_ms = _time_ms(lambda: triton_kernels.reference.cached_attention(*args, **kwargs))
        sdpa_mask = kwargs["key_mask"][:, None, None, :]
        sdpa_ms = _time_ms(lambda: F.scaled_dot_product_attention(*args, attn_mask=sdpa_mask))
        nbytes = 2 * B * H * D * (Lq + Lk) * args[0].element_size()
        gbps = nbytes / (ms * 1e-3) / 1e9
        tflops = 4 * B * H * Lq * Lk * D / (ms * 1e-3) / 1e12
        print(f"{B:>2} {H:>3} {Lq:>3} {Lk:>6} {D:>4} | {ms:9.4f} {gbps:7.0f} {_pct(gbps * 1e9, bandwidth):>7} "
              f"{tflops:7.1f} {_pct(tflops * 1e12, flops):>7} | {ref_ms:8.4f} {ref_ms / ms:6.1f}x | {sdpa_ms:8.4f}")

    if failures:
        print("\nMISMATCH against the reference (not timed): " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
