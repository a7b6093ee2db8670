"""Running a TensorRT plan with torch tensors: the build runs each plan on the validation inputs with it, and
`runtime/trt_runner.py` serves with it. Needs an NVIDIA GPU and the `tensorrt` package (imported on use).

- One execution context per optimization profile (profiles.py: the denoiser's `full` and `cached`), each created
  with the user-managed allocation strategy: before each call the context computes what the call's own shapes
  need (`update_device_memory_size_for_shapes`) and gets that much of one scratch buffer, instead of every
  context reserving its profile's largest shapes for as long as it lives.
- Every address must be 256-byte aligned (IExecutionContext::setTensorAddress): a tensor that is not, a slice
  of a batch or of the KV cache, is run from an aligned copy (an output is copied back after the call).
- Every return value is checked: a rejected shape or address would otherwise leave the previous call's.
- The plan runs on its own CUDA stream, ordered after the caller's stream's work (the inputs torch just made)
  and before its later work (what reads the outputs), without a host synchronisation; TensorRT warns that the
  legacy default stream, torch's, costs it extra synchronisation. Everything is allocated on the caller's
  stream, whose later work is ordered after the plan's, so the caching allocator never hands out a block the
  plan still uses.
- The plan is mapped from its file, not read into Python memory (an 8B plan is 16 GB).
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch

ALIGNMENT = 256
_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                 "INT32": torch.int32, "BOOL": torch.bool}


class PlanError(RuntimeError):
    """TensorRT refused a plan, a shape or an address, or failed a call."""


def is_aligned(tensor: torch.Tensor) -> bool:
    return tensor.data_ptr() % ALIGNMENT == 0


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *, zero: bool = False
                  ) -> torch.Tensor:
    """An uninitialised (or zeroed) contiguous tensor that starts on a 256-byte boundary, whatever the allocator
    aligns to (CUDA's caching allocator: 512 bytes; the CPU's: 64)."""
    count = 1
    for extent in shape:
        count *= extent
    nbytes = count * torch.empty(0, dtype=dtype).element_size()
    raw = (torch.zeros if zero else torch.empty)(nbytes + ALIGNMENT, dtype=torch.uint8, device=device)
    offset = -raw.data_ptr() % ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).view(shape)


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` if it is contiguous and 256-byte aligned, else an aligned contiguous copy."""
    if tensor.is_contiguous() and (is_aligned(tensor) or tensor.numel() == 0):
        return tensor
    return aligned_empty(tuple(tensor.shape), tensor.dtype, tensor.device).copy_(tensor)


class PlanExecutor:
    """A deserialized plan on `device`, one execution context per profile name (in the plan's profile order)."""

    def __init__(self, path: Path, device: torch.device, profile_names: list[str]):
        import tensorrt as trt

        self.trt, self.path, self.device = trt, Path(path), device
        self.logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(device), open(path, "rb") as file, \
                mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as plan:
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise PlanError(f"TensorRT could not load {path} (built by another TensorRT version or for another "
                            f"GPU?): rebuild the engines on this machine")
        if self.engine.num_optimization_profiles != len(profile_names):
            raise PlanError(f"{path} has {self.engine.num_optimization_profiles} optimization profiles, the manifest "
                            f"names {len(profile_names)} ({', '.join(profile_names)}): rebuild the engines")
        self.stream = torch.cuda.Stream(device)
        self.contexts = {}  # profile name -> (its index, its context)
        with torch.cuda.device(device):
            for index, name in enumerate(profile_names):
                context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                if context is None:
                    raise PlanError(f"TensorRT could not create an execution context for {path.name} (out of GPU "
                                    f"memory?): free GPU memory or rebuild with a smaller --max-batch / --max-sequence")
                if not context.set_optimization_profile_async(index, self.stream.cuda_stream):
                    raise PlanError(f"TensorRT refused optimization profile {index} ({name}) of {path.name}")
                self.contexts[name] = index, context
            self.stream.synchronize()
        self.outputs = [name for name in map(self.engine.get_tensor_name, range(self.engine.num_io_tensors))
                        if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT]
        self._scratch = torch.empty(0, dtype=torch.uint8, device=device)
        self._empty_input = aligned_empty((ALIGNMENT,), torch.uint8, device)

    def run(self, profile: str, inputs: dict[str, torch.Tensor],
            outputs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Run the plan with the profile's context; outputs not given are allocated. Returns every output, ready
        for the caller's stream."""
        with torch.cuda.device(self.device):  # kernels launch on the current device, which may be another
            return self._run(profile, inputs, outputs)

    def _run(self, profile: str, inputs: dict[str, torch.Tensor],
             outputs: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        index, context = self.contexts[profile]
        held = {name: aligned(tensor) for name, tensor in inputs.items()}  # alive until the call is enqueued
        for name, tensor in held.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise PlanError(f"{self.path.name}: input {name} of shape {list(tensor.shape)} is outside the "
                                f"{profile!r} optimization profile: rebuild the engines for larger sizes")
            # An empty tensor (the full pass's cache) has no storage; TensorRT reads nothing at the address.
            self._bind(context, name, tensor if tensor.numel() else self._empty_input)
        results, copies = dict(outputs or {}), {}
        for name in self.outputs:
            if name not in results:
                shape = tuple(context.get_tensor_shape(name))
                dtype = _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]
                results[name] = aligned_empty(shape, dtype, self.device)
            target = results[name]
            if not (target.is_contiguous() and is_aligned(target)):
                copies[name] = target
                target = aligned_empty(tuple(target.shape), target.dtype, self.device)
            self._bind(context, name, target)
            held[name] = target
        self._provide_memory(index, context)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise PlanError(f"{self.path.name}: TensorRT execution failed (see the TensorRT log above)")
        caller.wait_stream(self.stream)
        for name, original in copies.items():
            original.copy_(held[name])
            results[name] = original
        return results

    def _bind(self, context, name: str, tensor: torch.Tensor) -> None:
        if not is_aligned(tensor):
            raise PlanError(f"{self.path.name}: {name} is not {ALIGNMENT}-byte aligned")
        if not context.set_tensor_address(name, tensor.data_ptr()):
            raise PlanError(f"{self.path.name}: TensorRT refused the address of {name}")

    def _provide_memory(self, index: int, context) -> None:
        """The activation memory this call's shapes need, from one scratch buffer grown as needed (the contexts
        run one at a time on this plan's stream, so they can share it)."""
        size = context.update_device_memory_size_for_shapes()
        if size == 0 and self.engine.get_device_memory_size_for_profile_v2(index) != 0:  # 0 also means an error
            raise PlanError(f"{self.path.name}: TensorRT could not size the activation memory for these shapes")
        if size > self._scratch.numel():
            self._scratch = aligned_empty((size,), torch.uint8, self.device)
        context.set_device_memory(self._scratch.data_ptr(), size)
