"""Check each exported part with ONNX Runtime (CPU) against the float32 PyTorch model.

Every part runs on fresh random inputs of several shapes, none of them the export shape
(`VALIDATION_DIMS`, each cut to the engines' limits): tile counts 1 and 3, batch 1 and 2 (with left
padding), several sequence lengths, logits at a few or at all positions, caches of several lengths.
The denoiser's full pass (an empty cache) is compared with the module's own full pass, the cached pass
with its cached pass. With TensorRT each plan then runs on the same inputs (check_plan).
Inputs are drawn in the engines' precision and given to the reference upcast to float32, so only the
graph's own arithmetic is measured. Denoiser inputs are realistic: token embeddings from the checkpoint, and caches that
are the reference's own keys/values.

Tolerance. Each output is compared with `atol = rel_tol * max|reference|`: an absolute tolerance
scaled to the output's magnitude, since logits, keys and features live on very different scales.
- fp32: rel_tol 1e-5. Both sides compute in float32 (unit roundoff 2^-24 = 6e-8); what differs is
  the summation order of the dot products (length C, 4C) and fused kernels, which stays far below
  1e-5 of the output scale.
- fp16: rel_tol = 16 * 2^-11 = 7.8e-3. fp16's unit roundoff is 2^-11 = 4.9e-4 and the graph
  rounds the weights and every matmul / residual output to fp16 (norms, softmax and RoPE stay
  float32), so a few rounding steps per layer add up; 16 units of roundoff of the output scale
  leaves room for that on deep models while still failing on a lost fp32 cast (overflow gives inf,
  an fp16 softmax or variance is off by far more).
- int8 / int4: rel_tol 0.1, against the reference holding the graph's own weights dequantized
  (quantize.dequantize_into). What remains is ONNX Runtime's accuracy level 4: each activation block
  is rounded to int8 (a step of 1/127 of its largest value) before every weight MatMul. Measured on a
  random 8-layer, hidden-1024 denoiser: 2.7e-2 of the output scale (1.7e-6 at the default accuracy
  level, so the activations' rounding is all of it); 0.1 leaves room for deeper models, while a weight
  packed or placed wrong is off by the order of the output scale itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
import torch

from llada_v import LladaV

from .onnx_export import PartSpec
from .profiles import EngineLimits, part_profiles, profile_for, within
from .wrappers import wrap

FP16_UNIT_ROUNDOFF = 2.0**-11
REL_TOL = {"fp32": 1e-5, "fp16": 16 * FP16_UNIT_ROUNDOFF, "int8": 0.1, "int4": 0.1}
PROVIDERS = ["CPUExecutionProvider"]
ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)"}
SEED = 0

# Shapes checked per part; the export traces with onnx_export.EXPORT_DIMS, which none of these equal.
VALIDATION_DIMS: dict[str, list[dict[str, int]]] = {
    "vision": [{"num_tiles": 1}, {"num_tiles": 3}],
    "projector": [{"num_tiles": 1}, {"num_tiles": 3}],
    "denoiser": [{"batch": 1, "sequence": 5, "positions": 1, "past_sequence": 0},
                 {"batch": 2, "sequence": 16, "positions": 16, "past_sequence": 0},
                 {"batch": 2, "sequence": 37, "positions": 6, "past_sequence": 0},
                 {"batch": 1, "sequence": 1, "positions": 1, "past_sequence": 9},
                 {"batch": 2, "sequence": 8, "positions": 3, "past_sequence": 24},
                 {"batch": 1, "sequence": 16, "positions": 16, "past_sequence": 40}],
}


class ValidationError(RuntimeError):
    """An exported part does not match the PyTorch model within its tolerance."""


@dataclass(frozen=True)
class OutputCheck:
    dims: dict[str, int]
    output: str
    max_abs_err: float  # inf when the ONNX output holds NaN or inf
    scale: float  # max |reference|
    atol: float

    @property
    def passed(self) -> bool:
        return self.max_abs_err <= self.atol

    @property
    def err_over_atol(self) -> float:
        if self.atol == 0:
            return 0.0 if self.max_abs_err == 0 else float("inf")
        return self.max_abs_err / self.atol

    def to_dict(self) -> dict:
        return {"dims": self.dims, "output": self.output, "max_abs_err": self.max_abs_err, "scale": self.scale,
                "atol": self.atol, "passed": self.passed}


@dataclass
class PartValidation:
    part: str
    rel_tol: float
    shapes: list[dict[str, int]]
    checks: list[OutputCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def worst(self) -> OutputCheck:
        """The check closest to (or furthest past) its tolerance."""
        return max(self.checks, key=lambda c: c.err_over_atol)

    def summary(self) -> str:
        w = self.worst
        worst = f"max error {w.max_abs_err:.3g} {'<=' if w.passed else '>'} atol {w.atol:.3g} ({w.output} at {w.dims})"
        if self.passed:
            return f"{self.part}: {len(self.checks)} checks passed, {worst}"
        return f"{self.part} failed validation against PyTorch: {worst}"

    def to_dict(self) -> dict:
        w = self.worst
        return {"max_abs_err": w.max_abs_err, "atol": w.atol, "passed": self.passed, "rel_tol": self.rel_tol,
                "max_rel_err": max(c.max_abs_err / c.scale for c in self.checks),
                "shapes_checked": self.shapes, "checks": [c.to_dict() for c in self.checks]}


def open_session(path, precision: str = "fp32") -> ort.InferenceSession:
    """An ONNX Runtime CPU session; raises if ORT did not take the CPU provider.

    fp16 graphs run without ONNX Runtime's graph optimizations and memory arena, in priority order: the CPU
    provider has few fp16 kernels and casts the weights to fp32; its constant folding would keep an fp32
    copy of every weight beside the fp16 one, and the default order runs every weight's cast first. Peak
    RSS on a 0.95B fp16 denoiser (1.89 GB): 5.75 GB by default, 3.68 GB unoptimised, 2.27 GB unoptimised in
    priority order. The graph checked is the same; only ONNX Runtime's rewrites of it (fusions) are left out."""
    options = ort.SessionOptions()
    if precision == "fp16":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_cpu_mem_arena = False
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    session = ort.InferenceSession(str(path), options, providers=PROVIDERS)
    if session.get_providers() != PROVIDERS:
        raise ValidationError(f"ONNX Runtime runs {path} with {session.get_providers()}, expected {PROVIDERS}")
    return session


@dataclass(frozen=True)
class Case:
    """One validation shape of a part: its inputs and the float32 reference's outputs."""

    dims: dict[str, int]
    inputs: dict[str, np.ndarray]
    expected: tuple[np.ndarray, ...]


def reference_cases(spec: PartSpec, reference: LladaV, limits: EngineLimits | None = None) -> list[Case]:
    """The float32 reference on fresh random inputs at every shape of VALIDATION_DIMS, cut to the engines'
    limits (None: as they are). The cases are small (a few positions, a few tiles), so the reference can be
    freed before any session is opened."""
    graph = wrap(spec.name, reference)
    rng = np.random.default_rng(SEED)
    profiles = None if limits is None else part_profiles(reference.config, limits)[spec.name]
    cases = []
    for dims in VALIDATION_DIMS[spec.name]:
        if profiles is not None:
            dims = within(profiles[profile_for(spec.name, dims)], dims)
        inputs = sample_inputs(spec, dims, reference, rng)
        # An empty cache is the full pass: checked against the module's own full pass (no cache inputs).
        names = spec.input_names[:4] if dims.get("past_sequence") == 0 else spec.input_names
        with torch.no_grad():
            outputs = graph(*(_as_reference(inputs[name]) for name in names))
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
        cases.append(Case(dims, inputs, tuple(o.numpy() for o in outputs)))
    return cases


def check_part(onnx_path, spec: PartSpec, cases: list[Case], precision: str) -> PartValidation:
    """Run the ONNX part on every case's inputs and compare with its expected outputs."""
    session = open_session(onnx_path, precision)
    check_io(session, spec)
    result = PartValidation(spec.name, REL_TOL[precision], [case.dims for case in cases])
    for case in cases:
        _compare(result, spec, case, session.run(spec.output_names, case.inputs))
    return result


def check_plan(plan_path, spec: PartSpec, profiles: list[str], cases: list[Case], precision: str,
               device: torch.device) -> PartValidation:
    """Run the part's TensorRT plan (trt_plan.PlanExecutor, as the runtime does) on `device` on every case's inputs
    and compare with its expected outputs, with the tolerance of the ONNX part."""
    from .trt_plan import PlanExecutor

    plan = PlanExecutor(plan_path, device, profiles)
    result = PartValidation(spec.name, REL_TOL[precision], [case.dims for case in cases])
    for case in cases:
        inputs = {name: torch.from_numpy(array).to(device) for name, array in case.inputs.items()}
        outputs = plan.run(profile_for(spec.name, case.dims), inputs)
        _compare(result, spec, case, [outputs[name].float().cpu().numpy() for name in spec.output_names])
    return result


def _compare(result: PartValidation, spec: PartSpec, case: Case, outputs) -> None:
    for out, got, want in zip(spec.outputs, outputs, case.expected, strict=True):
        if got.shape != want.shape:
            raise ValidationError(f"{spec.name}: output {out.name} has shape {got.shape} at {case.dims}, "
                                  f"PyTorch gives {want.shape}")
        got = got.astype(np.float32)
        err = float(np.abs(got - want).max()) if np.isfinite(got).all() else float("inf")
        scale = float(np.abs(want).max()) or 1.0
        result.checks.append(OutputCheck(case.dims, out.name, err, scale, result.rel_tol * scale))


def check_io(session: ort.InferenceSession, spec: PartSpec) -> None:
    """The session's inputs and outputs are the spec's: names, order, dtypes and (symbolic) shapes."""
    for kind, actual, expected in (("inputs", session.get_inputs(), spec.inputs),
                                   ("outputs", session.get_outputs(), spec.outputs)):
        got = [(a.name, a.type, list(a.shape)) for a in actual]
        want = [(t.name, ORT_TYPES[t.dtype], list(t.shape)) for t in expected]
        if got != want:
            raise ValidationError(f"{spec.name}: ONNX {kind} {got} differ from the spec {want}")


def sample_inputs(spec: PartSpec, dims: dict[str, int], reference: LladaV, rng: np.random.Generator
                  ) -> dict[str, np.ndarray]:
    """Random inputs for one part at the given sizes, in the dtypes of the spec."""
    shapes = {t.name: t.concrete_shape(dims) for t in spec.inputs}
    dtypes = {t.name: t.dtype for t in spec.inputs}
    if spec.name == "vision":
        values = {"pixel_values": rng.uniform(-1, 1, shapes["pixel_values"])}
    elif spec.name == "projector":
        pixels = rng.uniform(-1, 1, (dims["num_tiles"], *_tile_shape(reference)))
        with torch.no_grad():
            values = {"features": reference.vision_tower(torch.from_numpy(pixels).float()).numpy()}
    else:
        values = _denoiser_inputs(dims, reference, rng)
    return {name: np.ascontiguousarray(values[name], dtype=dtypes[name]) for name in spec.input_names}


def _tile_shape(reference: LladaV) -> tuple[int, int, int]:
    vis = reference.config.vision
    return vis.num_channels, vis.image_size, vis.image_size


def _denoiser_inputs(dims: dict[str, int], reference: LladaV, rng: np.random.Generator) -> dict:
    b, q, p, lc = dims["batch"], dims["sequence"], dims["positions"], dims["past_sequence"]
    lm = reference.config.language

    def token_embeddings(shape) -> torch.Tensor:  # through the module: a streamed reference reads just these rows
        with torch.no_grad():
            return reference.denoiser.embed_tokens(torch.from_numpy(rng.integers(0, lm.vocab_size, shape)))

    attention_mask = np.ones((b, q), dtype=np.int64)
    for row in range(1, b):  # left padding, longer for later rows
        attention_mask[row, :min(3 * row, q - 1)] = 0
    position_ids = lc + np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
    values = {"inputs_embeds": token_embeddings((b, q)).numpy(),
              "position_ids": position_ids, "attention_mask": attention_mask,
              "logits_index": rng.integers(0, q, (b, p))}
    if lc == 0:
        empty = np.zeros((b, lm.num_attention_heads, 0, lm.head_dim), dtype=np.float32)
        for i in range(lm.num_hidden_layers):
            values[f"past_keys.{i}"] = values[f"past_values.{i}"] = empty
        values["past_mask"] = np.zeros((b, 0), dtype=np.int64)
    else:
        # The cache is what the reference's full pass writes for lc random tokens; a random fifth is hidden.
        past_embeds = token_embeddings((b, lc))
        positions = torch.arange(lc).expand(b, lc)
        ones = torch.ones(b, lc, dtype=torch.int64)
        with torch.no_grad():
            _, keys, vals = reference.denoiser(past_embeds, positions, ones, torch.zeros(b, 1, dtype=torch.int64))
        for i, (k, v) in enumerate(zip(keys, vals)):
            values[f"past_keys.{i}"], values[f"past_values.{i}"] = k.numpy(), v.numpy()
        values["past_mask"] = (rng.uniform(size=(b, lc)) > 0.2).astype(np.int64)
    return values


def _as_reference(array: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.float() if tensor.is_floating_point() else tensor
