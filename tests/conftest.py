"""Test set-up shared by all test modules.

Triton kernels run through Triton's interpreter on CPU tensors when no GPU is present; the variable
must be set before any kernel module is imported, hence here, at collection time.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test helper modules (tiny_whisper, kernel_testing) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
