"""The inputs of tests/data/resample_*.npy, and how those golden outputs were made (once) with
torchaudio 2.11.1's own resample: its wheel's .so cannot load with our torch, but its three
resampling functions are pure torch, so they are taken from its source and run alone.

    pip download torchaudio==2.11.1 --no-deps -d /tmp/ta && cd /tmp/ta && unzip -o torchaudio-2.11.1-*.whl \
        torchaudio/functional/functional.py
    PYTHONPATH=$PWD python tests/data/resample_golden.py /tmp/ta/torchaudio/functional/functional.py
"""
import ast
import math
import os
import sys
import warnings
from typing import Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = 16000
RATES = (44100, 48000)


def inputs(rate: int) -> np.ndarray:
    """float32 [2, 0.25 s + 3 samples] at ``rate``: a 997 Hz tone on the left, a 5 kHz one on the
    right (it reaches the kernel's rolloff region at 16 kHz), each plus seeded noise. The 3 extra
    samples make 44.1 kHz -> 16 kHz end on a fraction (ceil(160 * 11028 / 441) = 4001.08 -> 4002)."""
    n = int(0.25 * rate) + 3
    t = np.arange(n) / rate
    noise = np.random.default_rng(rate).standard_normal((2, n))
    tones = np.stack([0.5 * np.sin(2 * np.pi * 997.0 * t), 0.3 * np.sin(2 * np.pi * 5000.0 * t)])
    return (tones + 0.05 * noise).astype(np.float32)


def golden_path(rate: int) -> str:
    return os.path.join(HERE, f"resample_{rate}_{TARGET}.npy")


def torchaudio_resample(functional_py: str):
    """``resample`` from torchaudio's functional.py, with the two kernel functions it calls."""
    import torch

    tree = ast.parse(open(functional_py).read())
    wanted = {"_get_sinc_resample_kernel", "_apply_sinc_resample_kernel", "resample"}
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {n.name for n in nodes} == wanted
    scope = {"torch": torch, "math": math, "warnings": warnings, "Optional": Optional,
             "Tensor": torch.Tensor, "_CPU": torch.device("cpu")}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), functional_py, "exec"), scope)
    return scope["resample"]


if __name__ == "__main__":
    import torch

    resample = torchaudio_resample(sys.argv[1])
    for rate in RATES:
        out = resample(torch.from_numpy(inputs(rate)), rate, TARGET).numpy()
        np.save(golden_path(rate), out.astype(np.float32))
        print(golden_path(rate), out.shape, out.dtype)
