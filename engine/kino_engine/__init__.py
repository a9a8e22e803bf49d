"""kino's Python engine: loads video diffusion models and runs kino's own denoising loops.

The control plane (TypeScript) spawns `python -m kino_engine.worker` and speaks the protocol of
src/protocol/engine.ts to it over file descriptor 3. This package owns every tensor and decides no
policy: it executes what it is asked and reports what it measured.
"""

__version__ = "0.1.0"

import os as _os

# Before torch initializes CUDA: let the caching allocator grow segments in place instead of keeping
# fixed blocks. Memory plans swap whole components and free streaming slots between phases; with
# fixed segments the freed memory fragments (a 12 GiB cap once failed a decode with 3.6 GiB cached
# but unusable). A value the user set wins.
_os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
