"""kino's Python engine: loads video diffusion models and runs kino's own denoising loops.

The control plane (TypeScript) spawns `python -m kino_engine.worker` and speaks the protocol of
src/protocol/engine.ts to it over file descriptor 3. This package owns every tensor and decides no
policy: it executes what it is asked and reports what it measured.
"""

__version__ = "0.1.0"
