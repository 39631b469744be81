"""glibc's allocator thresholds, as the processes on the output path set them."""

from __future__ import annotations

import os
import subprocess
import sys

from app import malloc


def test_glibc_takes_the_thresholds_again_and_again() -> None:
    assert (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")  # this project's machines
    assert malloc.tune() and malloc.tune()


def test_a_process_without_glibcs_name_for_it_is_left_alone() -> None:
    script = "import os; os.confstr = lambda name: None; from app import malloc; print(malloc.tune())"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
