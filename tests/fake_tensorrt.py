"""A stand-in for the `tensorrt` package and for torch's CUDA streams, so that the TensorRT paths (the build's
profiles and plan validation, exporter/trt_plan.py, runtime/backends/tensorrt.py) run on a CPU.

It enforces what TensorRT's API documents and a wrong implementation would get wrong, instead of answering
yes to everything: a "plan" holds the ONNX part (weights inlined) and its optimization profiles, and its execution context
runs that ONNX part with ONNX Runtime on the addresses it was given, after checking that a profile is
selected, every input shape lies inside that profile (set_input_shape returns False otherwise, as
IExecutionContext::setInputShape does), every address is 256-byte aligned (set_tensor_address returns False
otherwise), every input and output has an address, and device memory of at least
update_device_memory_size_for_shapes() bytes was set for the current shapes. Calls are logged in order with
the fake streams' waits, so tests can check the ordering too.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import torch

ALIGNMENT = 256
_NUMPY = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64}
_NAMES = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.INT64: "INT64"}


class FakeTensorRT:
    """Install with monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT())."""

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=0)
    BuilderFlag = SimpleNamespace(TF32="TF32")
    TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    ExecutionContextAllocationStrategy = SimpleNamespace(STATIC="STATIC", USER_MANAGED="USER_MANAGED")

    def __init__(self, corrupt_outputs: bool = False):
        self.log: list[tuple] = []  # (what, details), in call order; the fake streams log here too
        self.built: dict[str, dict] = {}  # ONNX file name -> what its build was given
        self.corrupt_outputs = corrupt_outputs

    # ---- building ------------------------------------------------------------------------------

    def Builder(self, logger):  # noqa: N802 (tensorrt's names)
        return _Builder(self)

    def OnnxParser(self, network, logger):  # noqa: N802
        def parse_from_file(path):
            network["onnx"] = path
            return True
        return SimpleNamespace(parse_from_file=parse_from_file, num_errors=0)

    # ---- running -------------------------------------------------------------------------------

    def Runtime(self, logger):  # noqa: N802
        def deserialize_cuda_engine(plan):
            header, model = bytes(plan).split(b"\n", 1)
            return _Engine(self, json.loads(header), model)
        return SimpleNamespace(deserialize_cuda_engine=deserialize_cuda_engine)


class _Builder:
    def __init__(self, fake: FakeTensorRT):
        self.fake = fake

    def create_network(self, flags):
        return {"strongly_typed": flags == 1 << 0}

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        shapes = {}
        return SimpleNamespace(shapes=shapes, set_shape=lambda name, *minoptmax: shapes.__setitem__(name, minoptmax))

    def build_serialized_network(self, network, config):
        record = {"strongly_typed": network["strongly_typed"], "tf32": config.tf32,
                  "profiles": [{name: [list(s) for s in shapes] for name, shapes in p.shapes.items()}
                               for p in config.profiles]}
        self.fake.built[network["onnx"].rsplit("/", 1)[-1]] = record
        return json.dumps(record).encode() + b"\n" + onnx.load(network["onnx"]).SerializeToString()


class _Config:
    def __init__(self):
        self.tf32, self.profiles, self.cache = True, [], None

    def clear_flag(self, flag):
        assert flag == "TF32"
        self.tf32 = False

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data):
        return SimpleNamespace(serialize=lambda: data + b"timed")

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache

    def get_timing_cache(self):
        return self.cache


class _Engine:
    def __init__(self, fake: FakeTensorRT, record: dict, model: bytes):
        self.fake, self.record = fake, record
        self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        graph = onnx.load_from_string(model).graph
        self.io = [(v.name, "INPUT", v) for v in graph.input] + [(v.name, "OUTPUT", v) for v in graph.output]
        self.num_optimization_profiles = len(record["profiles"])
        self.shape_cache = {}
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, index):
        return self.io[index][0]

    def get_tensor_mode(self, name):
        return next(mode for n, mode, _ in self.io if n == name)

    def get_tensor_dtype(self, name):
        value = next(v for n, _, v in self.io if n == name)
        return SimpleNamespace(name=_NAMES[value.type.tensor_type.elem_type])

    def create_execution_context(self, strategy):
        assert strategy == "USER_MANAGED", "contexts must not reserve their profile's largest shapes"
        return _Context(self)

    def get_device_memory_size_for_profile_v2(self, index):
        return 1 << 20


class _Context:
    def __init__(self, engine: _Engine):
        self.engine, self.profile = engine, None
        self.shapes, self.addresses, self.memory = {}, {}, None

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return 0 <= index < self.engine.num_optimization_profiles

    def set_input_shape(self, name, shape):
        low, _, high = self.engine.record["profiles"][self.profile][name]
        if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
            return False
        self.shapes[name] = tuple(shape)
        self.memory = None  # new shapes need their memory sized again
        return True

    def get_tensor_shape(self, name):
        return self._output_shapes()[name]

    def set_tensor_address(self, name, address):
        if address % ALIGNMENT:
            return False
        self.addresses[name] = address
        return True

    def update_device_memory_size_for_shapes(self):
        self.needed = 4096 + sum(int(np.prod(s)) for s in self.shapes.values())
        return self.needed

    def set_device_memory(self, address, size):
        assert address % ALIGNMENT == 0 and size >= self.needed
        self.memory = size

    def execute_async_v3(self, stream):
        self.engine.fake.log.append(("execute", stream))
        inputs = [n for n, mode, _ in self.engine.io if mode == "INPUT"]
        assert self.profile is not None and set(self.shapes) == set(inputs), "every input needs its shape"
        assert set(self.addresses) == {n for n, _, _ in self.engine.io}, "every tensor needs an address"
        assert self.memory is not None, "device memory must be set for the current shapes"
        binding = self.engine.session.io_binding()
        outputs = self._output_shapes()
        for name, mode, value in self.engine.io:
            shape = self.shapes[name] if mode == "INPUT" else outputs[name]
            dtype = _NUMPY[value.type.tensor_type.elem_type]
            bind = binding.bind_input if mode == "INPUT" else binding.bind_output
            bind(name, "cpu", 0, dtype, shape, self.addresses[name])
        self.engine.session.run_with_iobinding(binding)
        if self.engine.fake.corrupt_outputs:
            first = self.engine.session.get_outputs()[0]
            view = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_float * int(np.prod(outputs[first.name])))
                                         .from_address(self.addresses[first.name]))
            view += 1.0
        return True

    def _output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each output's shape for the current input shapes (found by running the part on zeros, as TensorRT's
        shape inference would tell)."""
        key = tuple(sorted(self.shapes.items()))
        if key not in self.engine.shape_cache:
            feed = {name: np.zeros(self.shapes[name], dtype=_NUMPY[value.type.tensor_type.elem_type])
                    for name, mode, value in self.engine.io if mode == "INPUT"}
            names = [n for n, mode, _ in self.engine.io if mode == "OUTPUT"]
            self.engine.shape_cache[key] = dict(zip(names, (o.shape for o in self.engine.session.run(names, feed))))
        return self.engine.shape_cache[key]


class FakeStream:
    """torch.cuda.Stream's part that trt_plan and the ONNX Runtime runner use; waits are logged."""

    count = 0

    def __init__(self, log: list, device=None):
        FakeStream.count += 1
        self.log, self.cuda_stream = log, 0x1000 + FakeStream.count

    def wait_stream(self, other):
        self.log.append(("wait", self.cuda_stream, other.cuda_stream))

    def synchronize(self):
        pass


def install_fake_cuda(monkeypatch, log: list) -> FakeStream:
    """torch.cuda's streams and device guard replaced by fakes that log; returns the fake caller's stream
    (handle 0, as torch's default stream has)."""
    caller = FakeStream(log)
    caller.cuda_stream = 0

    @contextmanager
    def device(_):
        yield

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream(log, device))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(torch.cuda, "device", device)
    return caller
