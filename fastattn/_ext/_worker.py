"""Child process of :func:`fastattn._ext.build`: runs ``torch.utils.cpp_extension.load`` on a JSON job.

In its own process so that ninja's output (compiler warnings, ptxas's ``-v`` report) is captured whole
by the parent, and the library it loads (cpp_extension always loads what it built) stays out of the
caller's process.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    job = json.loads(sys.stdin.read())
    import torch.utils.cpp_extension as cpp_ext

    cpp_ext.load(
        name=job["name"],
        sources=job["sources"],
        extra_cflags=job["extra_cflags"],
        extra_cuda_cflags=job["extra_cuda_cflags"] or None,
        extra_ldflags=job["extra_ldflags"] or None,
        extra_include_paths=job["extra_include_paths"],
        build_directory=job["build_directory"],
        with_cuda=job["with_cuda"],
        is_python_module=False,
        verbose=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
