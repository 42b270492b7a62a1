"""lorafuse's C++ safetensors reader/writer against the reference safetensors package, both ways."""

import struct

import pytest
import torch

from lorafuse import _C

safetensors_torch = pytest.importorskip("safetensors.torch")


def tensors():
    torch.manual_seed(0)
    return {
        "base_model.model.q_proj.lora_A.weight": torch.randn(4, 16),
        "base_model.model.q_proj.lora_B.weight": torch.randn(8, 4).to(torch.bfloat16),
        "half": torch.randn(3).half(),
        "ids": torch.arange(5),
        "flags": torch.tensor([True, False]),
        "empty": torch.empty(0, 2),
    }


def test_files_written_by_safetensors_read_here(tmp_path):
    path = str(tmp_path / "theirs.safetensors")
    safetensors_torch.save_file(tensors(), path, metadata={"format": "pt"})
    ours, metadata = _C._read_safetensors(path)
    assert metadata == {"format": "pt"}
    assert dict(ours).keys() == tensors().keys()
    for name, t in ours:
        assert t.dtype == tensors()[name].dtype and torch.equal(t, tensors()[name]), name


def test_files_written_here_read_in_safetensors(tmp_path):
    path = str(tmp_path / "ours.safetensors")
    _C._write_safetensors(path, list(tensors().items()), {"format": "pt"})
    theirs = safetensors_torch.load_file(path)
    assert theirs.keys() == tensors().keys()
    for name, t in theirs.items():
        assert torch.equal(t, tensors()[name]), name
    with safetensors_torch.safe_open(path, "pt") as f:  # the metadata, through the reference reader
        assert f.metadata() == {"format": "pt"}


def file_of(header: bytes, data: int = 0) -> bytes:
    return struct.pack("<Q", len(header)) + header + b"\0" * data


BAD = [
    (b"1234567", "8-byte header length"),
    (file_of(b'{"a": [1,'), "not valid UTF-8 JSON"),
    (file_of(b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', 8), "hold 8"),
    (file_of(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', 12), "gap"),
    (file_of(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 12), "trailing bytes"),
    (file_of(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 4), "truncated"),
    (file_of(b'{"a":{"dtype":"XX","shape":[2],"data_offsets":[0,8]}}', 8), "unknown dtype"),
]


@pytest.mark.parametrize("data, part", BAD, ids=[p for _, p in BAD])
def test_bad_files_are_rejected_here_and_by_the_reference(tmp_path, data, part):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=part):
        _C._read_safetensors(str(path))
    with pytest.raises(Exception):  # the reference reader rejects the same bytes
        safetensors_torch.load_file(str(path))


def test_a_save_killed_midway_leaves_the_old_file_intact(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import lorafuse

    path = str(tmp_path / "adapter_model.safetensors")
    old = {"a": torch.arange(10, dtype=torch.float32)}
    _C._write_safetensors(path, list(old.items()))
    # A child process saves a large file over it again and again; it is killed in the middle of one.
    package_root = os.path.dirname(os.path.dirname(lorafuse.__file__))
    code = (
        "import torch, lorafuse\n"
        "from lorafuse import _C\n"
        "big = [('a', torch.ones(64 * 1024 * 1024 // 4))]\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        f"    _C._write_safetensors({path!r}, big)\n"
    )
    env = dict(os.environ, PYTHONPATH=package_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(1.5)  # several 64 MiB writes: the kill lands inside one of them (or between two)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    tensors, _ = _C._read_safetensors(path)  # whole: the old file or a complete new one, never a torn one
    ((name, t),) = tensors
    assert name == "a"
    assert torch.equal(t, old["a"]) or (t.numel() == 64 * 1024 * 1024 // 4 and bool((t == 1).all()))
    # what a killed save leaves behind is a temporary file beside it, never under the final name
    leftovers = [f for f in os.listdir(tmp_path) if f != "adapter_model.safetensors"]
    assert all(".tmp-" in f for f in leftovers)
