"""DTensor gradients (FSDP2 ``fully_shard``, tensor parallel): their local shards, and the
process groups over which each shard's norm must be reduced.

A DTensor's local tensor is what this rank holds. Along a mesh dimension whose placement is
``Shard`` the ranks hold different elements, so local values are reduced over that dimension's
group; along ``Replicate`` they hold the same elements, which must not be counted twice, so
nothing is reduced; ``Partial`` means the local tensors are addends of the gradient, whose
norm is not the sum of their norms, so the norm is taken of the summed (redistributed) tensor
while the scaling, being linear, applies to the addends in place.

Gradients are gathered into *norm sets*: the plain tensors, and one set per (mesh, sharded
mesh dimensions) of the DTensors. Each set carries the groups it is reduced over, in order;
the core (``_core.reduce_sets``) reduces them with as few all-reduces as the sets allow.
"""

from __future__ import annotations

import torch

try:  # torch >= 2.4 has the public module; 2.0 to 2.3 the private one
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - depends on the torch version
    try:
        from torch.distributed._tensor import DTensor, Replicate
    except ImportError:
        DTensor = Replicate = None


def is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def check_no_partial(tensors: list[torch.Tensor], name: str) -> None:
    """``ValueError`` for a DTensor with a ``Partial`` placement: a value clip of its addends
    would not bound their sum."""
    for index, t in enumerate(tensors):
        if is_dtensor(t) and any(p.is_partial() for p in t.placements):
            raise ValueError(
                f"{name}[{index}] is a DTensor with placements {tuple(t.placements)}: a value "
                "clip of Partial addends does not bound their sum. Redistribute it (e.g. to "
                "Replicate) first."
            )


def _splits(placement) -> bool:
    """Whether ranks along a mesh dimension with this placement hold different elements:
    every placement but Replicate and Partial (Shard, and FSDP2 x TP's _StridedShard, whose
    ``is_shard()`` is False on some torch versions)."""
    return not (placement.is_replicate() or placement.is_partial())


def norm_sets(tensors: list[torch.Tensor], outer_group=None) -> list[tuple[list, tuple]]:
    """The norm sets of ``tensors``: plain tensors reduced over ``outer_group`` (if any),
    DTensors over the groups of their mesh's ``Shard`` dimensions and then ``outer_group``.

    ``outer_group`` is a group whose ranks hold *different* parameters beyond what the
    DTensor placements say (pipeline stages; FSDP1 or hand-sharded plain tensors). With an
    ``outer_group`` the plain set is present even when empty, so a rank without gradients
    still takes part in the all-reduce.
    """
    outer = (outer_group,) if outer_group is not None else ()
    plain: list[torch.Tensor] = []
    sharded: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if not is_dtensor(t):
            plain.append(t)
            continue
        if any(p.is_partial() for p in t.placements):
            # The norm needs the summed tensor: a copy (and one collective) per such grad.
            t = t.redistribute(t.device_mesh, [Replicate() if p.is_partial() else p
                                               for p in t.placements])
        # The last sharded dimension is reduced first: sets that share the leading ones (a
        # 2-D mesh's FSDP x TP weights and FSDP-only norms) then merge before reducing them.
        dims = tuple(i for i in reversed(range(len(t.placements)))
                     if _splits(t.placements[i]))
        sharded.setdefault((t.device_mesh, dims), []).append(t.to_local())
    sets = [(plain, outer)] if plain or outer else []
    for mesh, _ in sharded:
        if outer_group is not None:
            _check_disjoint(mesh, outer_group)
    for (mesh, dims), members in sharded.items():
        sets.append((members, tuple(mesh.get_group(d) for d in dims) + outer))
    return sets


def _check_disjoint(mesh, outer_group) -> None:
    """``ValueError`` when the outer group shares ranks other than this one with a DTensor's
    mesh: the mesh already accounts for those ranks (Shard: reduced; Replicate: counted
    once), so reducing over them again would count elements twice."""
    import torch.distributed as dist

    mesh_ranks = set(mesh.mesh.flatten().tolist())
    shared = mesh_ranks & set(dist.get_process_group_ranks(outer_group))
    if shared != {dist.get_rank()}:
        raise ValueError(
            f"process_group (ranks {sorted(dist.get_process_group_ranks(outer_group))}) "
            f"overlaps the device mesh of DTensor gradients (ranks {sorted(mesh_ranks)}): "
            "their placements already say how those ranks share them. Pass a group across "
            "which the DTensors are not distributed (e.g. the pipeline group), or none."
        )
