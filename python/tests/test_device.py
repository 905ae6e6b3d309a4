"""Device communicators from Python: `phalanx.DeviceCommunicator` on the CPU stand-in
over three peers of one group (threads of this process), its unique id carried by the
master: exact sums, then a peer leaves and the survivors' next view has its own device
communicator; every other collective (reduce-scatter, all-gather, broadcast, reduce,
grouped send/recv, all-to-all) with exact values; refused arguments leave the arrays
unchanged and the device communicator usable; asking for NCCL where none can be loaded
raises DeviceError (the path tried, or the missing build feature), never a crash.

CUDA tensors cannot be used here (no GPU): a fake DLPack producer whose
`__dlpack_device__` says CUDA checks that the stand-in refuses it before asking for a
capsule, and, through the test hook `_native._dlpack_cuda_view`, what the NCCL backend
reads from a CUDA capsule built by hand (address + byte offset, length, element type,
device) and which stream it passes to the producer."""

import ctypes

import numpy as np
import pytest

import phalanx
from conftest import on_all

N = 3


@pytest.fixture
def group(make_group):
    """N communicators of one group, indexed by rank."""
    return make_group(N, left_ok=True)


def test_stand_in_sums_are_exact_before_and_after_a_leave(group):
    devs = [phalanx.DeviceCommunicator(c, backend="standin") for c in group]
    assert devs[0].backend == "standin"

    def reduce(pair):
        c, d = pair
        x = np.full(32, c.rank + 1, dtype=np.float32)
        d.all_reduce(x)
        y = np.full(5, c.rank + 1, dtype=np.float32)
        d.all_reduce(y, op="max")
        return x, y

    for x, y in on_all(list(zip(group, devs)), reduce):
        assert x.tolist() == [6.0] * 32
        assert y.tolist() == [3.0] * 5

    # Refused before anything is sent: the array is unchanged.
    wide = np.full(4, 1.5)
    with pytest.raises(TypeError, match="float32"):
        devs[0].all_reduce(wide)
    assert wide.tolist() == [1.5] * 4
    with pytest.raises(ValueError, match="read-only"):
        ro = np.ones(4, dtype=np.float32)
        ro.setflags(write=False)
        devs[0].all_reduce(ro)

    # Rank 2 leaves; the survivors' next view gets its own device communicator.
    group[2].leave()
    survivors = list(zip(group[:2], devs[:2]))

    def after(pair):
        c, d = pair
        c.update_topology()
        x = np.full(8, c.rank + 1, dtype=np.float32)
        d.all_reduce(x)
        return c.size, x

    for size, x in on_all(survivors, after):
        assert size == 2
        assert x.tolist() == [3.0] * 8


def test_a_missing_nccl_is_a_device_error(master, monkeypatch):
    comm = phalanx.Communicator.connect(master.addr, join_timeout_ms=30_000)
    try:
        monkeypatch.setenv("PHALANX_NCCL_LIBRARY", "/nonexistent/phalanx-test/libnccl.so.2")
        with pytest.raises(phalanx.DeviceError, match=r"/nonexistent/phalanx-test/libnccl\.so\.2|`nccl` feature"):
            phalanx.DeviceCommunicator(comm, backend="nccl")
        with pytest.raises(ValueError, match="unknown device backend"):
            phalanx.DeviceCommunicator(comm, backend="tpu")
    finally:
        comm.leave()


def test_every_other_collective_on_the_stand_in(group):
    devs = [phalanx.DeviceCommunicator(c, backend="standin") for c in group]

    def run(pair):
        c, d = pair
        r, out = c.rank, {}
        recv = np.zeros(4, dtype=np.float32)
        d.reduce_scatter((r + 1) * (np.arange(12, dtype=np.float32) + 1), recv)
        out["rs"] = recv.tolist()
        gathered = np.zeros(6, dtype=np.float32)
        d.all_gather(np.array([10 * r, 10 * r + 1], dtype=np.float32), gathered)
        out["ag"] = gathered.tolist()
        x = r * 100 + np.arange(4, dtype=np.float32)
        d.broadcast(x, root=1)
        out["bc"] = x.tolist()
        y = r + np.arange(4, dtype=np.float32)
        d.reduce(y, 2, op="max")
        out["rd"] = y.tolist()
        got = np.zeros(3, dtype=np.float32)
        d.send_recv(sends=[((r + 1) % N, np.full(3, r + 1, dtype=np.float32))], recvs=[((r + N - 1) % N, got)])
        out["ring"] = got.tolist()
        send = np.array([100 * r + 10 * j + k for j in range(N) for k in range(2)], dtype=np.float32)
        a2a = np.zeros(2 * N, dtype=np.float32)
        d.all_to_all(send, a2a)
        out["a2a"] = a2a.tolist()
        return out

    for r, out in enumerate(on_all(list(zip(group, devs)), run)):
        assert out["rs"] == [6.0 * (r * 4 + i + 1) for i in range(4)]
        assert out["ag"] == [0.0, 1.0, 10.0, 11.0, 20.0, 21.0]
        assert out["bc"] == [100.0, 101.0, 102.0, 103.0]
        assert out["rd"] == [(2 if r == 2 else r) + i for i in range(4)]
        assert out["ring"] == [float((r + N - 1) % N + 1)] * 3
        assert out["a2a"] == [100.0 * j + 10 * r + k for j in range(N) for k in range(2)]

    # Refused before anything is sent (on rank 0 alone): arrays unchanged, the device
    # communicator kept.
    d = devs[0]
    x = np.full(4, 7, dtype=np.float32)
    with pytest.raises(ValueError, match="root 3 of 3"):
        d.broadcast(x, root=3)
    with pytest.raises(ValueError, match="root 5 of 3"):
        d.reduce(x, 5)
    with pytest.raises(ValueError, match="peer 5 of 3"):
        d.send_recv(sends=[(5, x)])
    with pytest.raises(ValueError, match=r"send has 4 elements, but recv × 3 ranks"):
        d.reduce_scatter(x, x[:2].copy())
    with pytest.raises(ValueError, match=r"recv has 4 elements, but send × 3 ranks"):
        d.all_gather(x[:1].copy(), x)
    with pytest.raises(ValueError, match="multiple of the 3 ranks"):
        d.all_to_all(x, np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="share memory"):
        d.all_gather(x[:1], x)
    with pytest.raises(TypeError, match="must match"):
        d.all_gather(x, np.zeros(12))
    with pytest.raises(TypeError, match="float32"):
        d.broadcast(np.zeros(4), root=0)
    with pytest.raises(TypeError):
        d.send_recv(sends=[x])
    with pytest.raises(ValueError, match="read-only"):
        ro = np.zeros(4, dtype=np.float32)
        ro.setflags(write=False)
        d.reduce(ro, 0)
    with pytest.raises(ValueError, match="unknown"):
        d.reduce_scatter(np.zeros(12, dtype=np.float32), x, op="median")
    assert x.tolist() == [7.0] * 4

    def again(pair):
        c, d = pair
        z = np.full(2, 42 if c.rank == 0 else 0, dtype=np.float32)
        d.broadcast(z, 0, stream=None)
        return z.tolist()

    assert on_all(list(zip(group, devs)), again) == [[42.0, 42.0]] * N


# DLPack's C structures, to build capsules of "device memory" by hand (dlpack.h).
class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("major", ctypes.c_uint32),
        ("minor", ctypes.c_uint32),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class FakeCuda:
    """A DLPack producer of 'CUDA' memory that is never touched: a made-up address, so
    only the reading of the capsule is tested. Records the streams it is asked for."""

    def __init__(self, device=(2, 0), shape=(4,), strides=None, code=2, bits=32, versioned=False, read_only=False):
        self.device, self.streams = device, []
        self.shape = (ctypes.c_int64 * len(shape))(*shape)
        self.strides = (ctypes.c_int64 * len(strides))(*strides) if strides else None
        t = DLTensor(
            data=0x7F00_0000,
            device=DLDevice(*device),
            ndim=len(shape),
            dtype=DLDataType(code, bits, 1),
            shape=self.shape,
            strides=self.strides,
            byte_offset=16,
        )
        if versioned:
            self.managed = DLManagedTensorVersioned(major=1, minor=0, flags=1 if read_only else 0, dl_tensor=t)
            self.name = b"dltensor_versioned"
        else:
            self.managed = DLManagedTensor(dl_tensor=t)
            self.name = b"dltensor"

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, stream=None):
        self.streams.append(stream)
        # No destructor: the structures belong to this object, which outlives the call.
        return _capsule_new(ctypes.addressof(self.managed), self.name, None)


def test_cuda_tensors_are_refused_by_the_stand_in_before_export(master):
    comm = phalanx.Communicator.connect(master.addr, join_timeout_ms=30_000)
    try:
        dev = phalanx.DeviceCommunicator(comm, backend="standin")
        fake = FakeCuda()
        with pytest.raises(TypeError, match=r"device type 2 \(CUDA\), not in CPU memory"):
            dev.all_reduce(fake)
        with pytest.raises(TypeError, match="CUDA"):
            dev.all_gather(np.zeros(1, dtype=np.float32), fake)
        assert fake.streams == []  # refused from __dlpack_device__, no capsule asked for
    finally:
        comm.leave()


def test_the_nccl_backend_reads_cuda_capsules_and_passes_the_stream():
    view = phalanx._native._dlpack_cuda_view
    fake = FakeCuda(shape=(2, 3))
    assert view(fake) == (0x7F00_0000 + 16, 24, "f32", 0)
    assert view(fake, stream=0x5555_0000) == (0x7F00_0000 + 16, 24, "f32", 0)
    assert view(fake, stream=2)[1] == 24
    # No stream: the legacy default stream, 1 in the array API (0 means the same).
    view(fake, stream=0)
    assert fake.streams == [1, 0x5555_0000, 2, 1]
    with pytest.raises(ValueError, match="stream -1"):
        view(fake, stream=-1)
    assert view(FakeCuda(device=(2, 3), code=4, bits=16, versioned=True)) == (0x7F00_0000 + 16, 8, "bf16", 3)
    assert view(FakeCuda(shape=(2, 3), strides=(3, 1)))[1] == 24
    with pytest.raises(ValueError, match="C-contiguous"):
        view(FakeCuda(shape=(2, 3), strides=(1, 2)))
    with pytest.raises(ValueError, match="read-only"):
        view(FakeCuda(versioned=True, read_only=True))
    with pytest.raises(TypeError, match="type code 5"):
        view(FakeCuda(code=5, bits=64))
    cpu = FakeCuda(device=(1, 0))
    with pytest.raises(TypeError, match=r"CPU memory \(DLPack device type 1\), but the NCCL backend"):
        view(cpu)
    assert cpu.streams == []
    with pytest.raises(TypeError, match="__dlpack__"):
        view([1.0, 2.0])


def test_the_gpu_check_script_runs_on_the_stand_in():
    """scripts/gpu_check_python.py is what the GPU check runs on CUDA tensors; with
    --standin it runs the same collectives here, so it cannot rot where no GPU is."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "gpu_check_python.py")
    r = subprocess.run([sys.executable, script, "--standin"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    passes = [l for l in r.stdout.splitlines() if l.startswith("PASS: ")]
    assert len(passes) == 7 and "FAIL" not in r.stdout, r.stdout
