"""A detector for host synchronizations: records the aten ops that make the host wait for a GPU.

`SyncDetector` is a TorchDispatchMode: inside `with SyncDetector() as d:` every aten call is seen,
and those that read a device value on the host (`.item()`, `float()`, `bool()` -> _local_scalar_dense;
nonzero, masked_select, unique, repeat_interleave without output_size, equal, allclose,
linalg's error checks as in torch.linalg.solve) or copy between devices (a blocking pageable copy)
are recorded in `d.syncs`.
It works on CPU too, where those ops cost nothing but name the same code paths that stall a GPU, so
tests can hold the loop to zero without one. It cannot see CUDA-runtime waits outside aten
(event.synchronize, torch.cuda.synchronize), which are explicit in the code.

This module decides nothing; it observes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: aten overload packets whose result the host must read before it can go on.
SYNC_OPS: frozenset[str] = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::item",
        "aten::nonzero",
        "aten::is_nonzero",
        "aten::equal",
        "aten::allclose",
        "aten::masked_select",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::unique_dim_consecutive",
        "aten::_linalg_check_errors",
        # linalg ops that check their result on the host (info flag) unless called as *_ex.
        "aten::linalg_solve",
        "aten::linalg_inv",
        "aten::linalg_cholesky",
    }
)


def _devices(value: Any) -> set[torch.device]:
    if isinstance(value, torch.Tensor):
        return {value.device}
    if isinstance(value, (list, tuple)):
        return set().union(*(_devices(v) for v in value)) if value else set()
    return set()


class SyncDetector(TorchDispatchMode):
    """Records (op name, why) for every host-syncing aten call made inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func._schema.name
        if name in SYNC_OPS:
            self.syncs.append(name)
        elif name == "aten::repeat_interleave" and kwargs.get("output_size") is None:
            self.syncs.append(f"{name} without output_size")
        out = func(*args, **kwargs)
        if name in ("aten::_to_copy", "aten::copy_", "aten::to"):
            moved = _devices(args) | _devices(out)
            if len(moved) > 1:
                self.syncs.append(f"{name} across devices {sorted(str(d) for d in moved)}")
        return out
