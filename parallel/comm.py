"""Collectives the framework makes, each on the group it belongs to.

`group=None` means "no group": a world of one (plain `python`), where every collective is the
identity, so single-process runs take the same code path as torchrun ones (all_gather stacks the
one tensor to [1, ...]; shift and linear_prefix give zeros: there is no earlier rank). A group of
size 1 behaves the same. Inputs are never modified; a world of one may return the input itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def group_size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def all_reduce(x: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """x reduced over `group` (op: sum, max or min); the identity without a group."""
    if group is None or group_size(group) == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=_OPS[op], group=group)
    return out


def any_rank(flag: bool, device: torch.device, group=None) -> bool:
    """True on every rank of `group` when `flag` is true on any of them."""
    return bool(all_reduce(torch.tensor([float(flag)], device=device), "max", group).item())


def broadcast_object(obj, group=None, src_rank: int = 0):
    """`obj` of the group's rank `src_rank` (a group-local index), on every rank of `group`."""
    if group is None or group_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, group_src=src_rank, group=group)
    return box[0]


# ---------------------------------------------------------------------------------------------
# Sequence-parallel collectives. Ranks are ordered by their group rank; every rank of the group
# calls each collective (and its backward) with tensors of the same trailing shape and dtype.
# gloo has every op used here, so none needs a fallback built from others (checked on torch 2.13;
# reduce_scatter_tensor is there since 2.3, gloo composing it from all_reduce + chunk itself):
# all_gather / reduce_scatter on flat tensors, uneven all_to_all_single, batch_isend_irecv.
# ---------------------------------------------------------------------------------------------

# torch 2.13 renamed the tensor collectives (the old names warn); 2.11 has only the old ones.
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_scatter_from = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _rank(group) -> int:
    return dist.get_rank(group) if group is not None else 0


def _world_of_one(group) -> bool:
    return group is None or group_size(group) == 1


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    """[*S] -> [G, *S]: every rank's x in group-rank order (not differentiable)."""
    # flat buffers: gloo takes only the concatenated layout, and 0-dim x has no dim 0 to stack on
    out = x.new_empty(group_size(group) * x.numel())
    _gather_into(out, x.detach().reshape(-1), group=group)
    return out.view(group_size(group), *x.shape)


def _scatter(x: torch.Tensor, group) -> torch.Tensor:
    """[G, *S] -> [*S]: sum over ranks of x[this rank] (not differentiable)."""
    out = x.new_empty(x[0].numel())
    _scatter_from(out, x.detach().reshape(-1), group=group)
    return out.view(x.shape[1:])


def _exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """[sum(send_splits), *S] -> [sum(recv_splits), *S] (not differentiable)."""
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.detach().contiguous(), output_split_sizes=recv_splits,
                           input_split_sizes=send_splits, group=group)
    return out


def _p2p(sends: list, recvs: list, group) -> None:
    """Sends (tensor, group rank) and receives into (tensor, group rank) pairs as one batch, so
    the order in which neighbours post them cannot deadlock. Under NCCL a rank with nothing to do
    skips the call, which is only allowed once the group has run a collective."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(group, peer), group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, peer), group) for t, peer in recvs]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _shift(x: torch.Tensor, offset: int, group) -> torch.Tensor:
    """What rank r - offset holds (zeros where it does not exist); x goes to rank r + offset."""
    size, rank = group_size(group), _rank(group)
    out = torch.zeros_like(x, memory_format=torch.contiguous_format)
    sends = [(x.detach(), rank + offset)] if 0 <= rank + offset < size else []
    recvs = [(out, rank - offset)] if 0 <= rank - offset < size else []
    _p2p(sends, recvs, group)
    return out


class _AllGather(torch.autograd.Function):
    """x [*S] -> [G, *S]; backward: grad [G, *S] -> sum over ranks of grad[this rank] [*S]."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _scatter(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    """x [G, *S] -> sum over ranks of x[this rank] [*S]; backward: all_gather of grad [G, *S]."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group), None


class _AllToAll(torch.autograd.Function):
    """x [sum(send_splits), *S] -> [sum(recv_splits), *S]; backward: the same exchange of the
    gradient with the splits swapped."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _exchange(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return _exchange(grad, recv_splits, send_splits, ctx.group), None, None, None


class _Shift(torch.autograd.Function):
    """x [*S] -> rank r - offset's x [*S] (zeros on ranks with no such rank); backward: the
    gradient shifted by -offset (what each rank received goes back to its sender)."""

    @staticmethod
    def forward(ctx, x, offset, group):
        ctx.offset, ctx.group = offset, group
        return _shift(x, offset, group)

    @staticmethod
    def backward(ctx, grad):
        return _shift(grad, -ctx.offset, ctx.group), None, None


class _RingPrefix(torch.autograd.Function):
    """ZeCO-style all-scan. s [*S] float32, d [*D] float32 broadcastable to S -> h_r [*S].

    Forward, G-1 hops from the first rank to the last: rank r receives h_r from r-1 (h_0 = 0) and
    sends d_r * h_r + s_r to r+1. Backward, from the last rank to the first: rank r receives
    gh_{r+1}, the full gradient of the state it sent (zero on the last rank), and sends
    gh_r = grad h_r + d_r * gh_{r+1} to r-1; grad s_r = gh_{r+1}, grad d_r = gh_{r+1} * h_r
    summed over d's broadcast dims."""

    @staticmethod
    def forward(ctx, s, d, group):
        size, rank = group_size(group), _rank(group)
        h = torch.zeros_like(s, memory_format=torch.contiguous_format)
        if rank > 0:
            dist.recv(h, dist.get_global_rank(group, rank - 1), group=group)
        if rank < size - 1:
            dist.send((d * h + s).contiguous(), dist.get_global_rank(group, rank + 1), group=group)
        ctx.save_for_backward(h, d)
        ctx.group = group
        return h.clone()  # the saved h stays intact if the caller edits the result in place

    @staticmethod
    def backward(ctx, grad_h):
        h, d = ctx.saved_tensors
        group = ctx.group
        size, rank = group_size(group), _rank(group)
        g_next = torch.zeros_like(h)
        if rank < size - 1:
            dist.recv(g_next, dist.get_global_rank(group, rank + 1), group=group)
        if rank > 0:
            dist.send((grad_h + d * g_next).contiguous(), dist.get_global_rank(group, rank - 1), group=group)
        return g_next, (g_next * h).sum_to_size(d.shape), None


def _splits(name: str, splits, size: int) -> list[int]:
    splits = [int(n) for n in splits]
    if len(splits) != size:
        raise ValueError(f"all_to_all: {name} has {len(splits)} entries; the group has {size} ranks")
    if any(n < 0 for n in splits):
        raise ValueError(f"all_to_all: {name} must be >= 0, got {splits}")
    return splits


def all_gather(x: torch.Tensor, *, group=None) -> torch.Tensor:
    """x [*S] -> [G, *S]: every rank's x stacked in group-rank order. Differentiable: the gradient
    of x is the sum over ranks of their grad[this rank] (a reduce-scatter)."""
    if _world_of_one(group):
        return x.unsqueeze(0)
    return _AllGather.apply(x, group)


def reduce_scatter(x: torch.Tensor, *, group=None) -> torch.Tensor:
    """x [G, *S] -> [*S]: the sum over ranks of x[this rank]. Differentiable (backward: all_gather
    of the gradient)."""
    size = group_size(group)
    if x.dim() == 0 or x.shape[0] != size:
        raise ValueError(f"reduce_scatter: x of shape {tuple(x.shape)} needs x.shape[0] = {size}, the group size")
    if size == 1:
        return x[0]
    return _ReduceScatter.apply(x, group)


def all_to_all(x: torch.Tensor, *, send_splits=None, recv_splits=None, group=None) -> torch.Tensor:
    """x [N, *S] split along dim 0 into `send_splits` pieces (G ints summing to N; None = N / G
    each); piece i goes to rank i. Returns [M, *S]: the pieces received, concatenated in rank
    order (M = sum(recv_splits)). recv_splits None: even pieces of N / G rows when send_splits is
    None (every rank then holds N rows); otherwise the counts are exchanged first (pass
    send_splits on every rank or on none). Differentiable (backward: the splits swapped)."""
    size = group_size(group)
    if x.dim() == 0:
        raise ValueError("all_to_all: x must have a dim 0 to split, got a 0-dim tensor")
    if send_splits is None:
        if x.shape[0] % size:
            raise ValueError(f"all_to_all: x.shape[0] = {x.shape[0]} is not divisible by the group size "
                             f"{size}; pass send_splits")
        send = [x.shape[0] // size] * size
    else:
        send = _splits("send_splits", send_splits, size)
        if sum(send) != x.shape[0]:
            raise ValueError(f"all_to_all: send_splits {send} sum to {sum(send)}, but x.shape[0] = {x.shape[0]}")
    recv = None if recv_splits is None else _splits("recv_splits", recv_splits, size)
    if size == 1:
        if recv is not None and recv != send:
            raise ValueError(f"all_to_all: in a world of one recv_splits {recv} must equal send_splits {send}")
        return x
    if recv is None:
        if send_splits is None:
            recv = send
        else:
            recv = _exchange(torch.tensor(send, device=x.device), [1] * size, [1] * size, group).tolist()
    return _AllToAll.apply(x, send, recv, group)


def shift(x: torch.Tensor, *, offset: int = 1, group=None) -> torch.Tensor:
    """x [*S] -> [*S]: rank r sends x to rank r + offset and returns what rank r - offset sent;
    zeros where that rank does not exist (so zeros everywhere in a world of one, or when
    |offset| >= G). Differentiable (backward: the gradient shifted by -offset)."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset == 0:
        raise ValueError(f"shift: offset must be a nonzero int, got {offset!r}")
    if _world_of_one(group) or abs(offset) >= group_size(group):
        return torch.zeros_like(x)
    return _Shift.apply(x, offset, group)


def _peer(op: str, peer: int, group) -> int:
    size = group_size(group)
    if _world_of_one(group):
        raise ValueError(f"{op}: a world of one (group {group}) has no other rank to talk to")
    if not 0 <= peer < size or peer == _rank(group):
        raise ValueError(f"{op}: peer {peer} must be another group rank in [0, {size}); this is rank {_rank(group)}")
    return dist.get_global_rank(group, peer)


def send(x: torch.Tensor, dst: int, *, group=None) -> None:
    """Sends x [*S] to group rank `dst` (blocking; not differentiable)."""
    dist.send(x.detach().contiguous(), _peer("send", dst, group), group=group)


def recv(like: torch.Tensor, src: int, *, group=None) -> torch.Tensor:
    """A new tensor shaped, typed and placed like `like` [*S], received from group rank `src`
    (blocking; not differentiable)."""
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    dist.recv(out, _peer("recv", src, group), group=group)
    return out


def linear_prefix(s: torch.Tensor, d: torch.Tensor, *, method: str = "gather", group=None) -> torch.Tensor:
    """The state entering this rank of the recurrence h_0 = 0, h_{r+1} = d_r * h_r + s_r chained
    over the group's ranks: h_r = sum_{j<r} (prod_{j<i<r} d_i) s_j, elementwise.

    s [*S] (this rank's state contribution), d [*D] broadcastable to S (its total decay) ->
    h [*S] float32, computed in float32; zeros in a world of one. Differentiable in s and d.
    method "gather" (LASP-2): one all_gather of (s, d), then r local steps; "ring" (ZeCO all-scan):
    G-1 sequential hops carrying one state each."""
    if method not in ("gather", "ring"):
        raise ValueError(f"linear_prefix: method must be 'gather' or 'ring', got {method!r}")
    try:
        shape = torch.broadcast_shapes(s.shape, d.shape)
    except RuntimeError:
        shape = None
    if shape != s.shape:
        raise ValueError(f"linear_prefix: d of shape {tuple(d.shape)} must broadcast to s of shape {tuple(s.shape)}")
    if _world_of_one(group):
        return torch.zeros(s.shape, dtype=torch.float32, device=s.device)
    s, d = s.float(), d.float()
    if method == "ring":
        return _RingPrefix.apply(s, d, group)
    # one collective for both: d keeps its (broadcast) shape, so only its own elements travel
    both = all_gather(torch.cat([s.reshape(-1), d.reshape(-1)]), group=group)
    states, decays = both[:, :s.numel()].reshape(-1, *s.shape), both[:, s.numel():].reshape(-1, *d.shape)
    # starts from the gathered buffer (an empty sum), so rank 0 joins the backward reduce-scatter
    h = states[:0].sum(0)
    for j in range(_rank(group)):
        h = decays[j] * h + states[j]
    return h


# ---------------------------------------------------------------------------------------------
# Two-level collectives: a group laid over several nodes, inside a node first, then across.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Levels:
    """A group spread over `nodes` nodes with `per_node` of its ranks on each, numbered node by
    node (group rank g = node * per_node + local index). `local`: this rank's node's ranks of the
    group; `rail`: the group's ranks with this rank's local index, one per node (`Mesh.levels`
    builds them from `parallel.ranks_per_node`)."""

    local: object
    rail: object
    nodes: int
    per_node: int

    @property
    def size(self) -> int:
        return self.nodes * self.per_node


def regroup(rows: torch.Tensor, blocks: list[list[int]]) -> torch.Tensor:
    """rows [M, *S] laid out as blocks[a][b] (a-major; blocks[a][b] rows each) -> the same
    blocks b-major [M, *S]. split/cat: differentiable, no index tensor to build."""
    A, B = len(blocks), len(blocks[0])
    pieces = rows.split([n for row in blocks for n in row])
    return torch.cat([pieces[a * B + b] for b in range(B) for a in range(A)])


def _grid(flat: list[int], rows: int) -> list[list[int]]:
    cols = len(flat) // rows
    return [flat[r * cols:(r + 1) * cols] for r in range(rows)]


def _sums(grid: list[list[int]]) -> list[int]:
    return [sum(row) for row in grid]


def _columns(grid: list[list[int]]) -> list[list[int]]:
    return [list(col) for col in zip(*grid)]


@dataclass
class Route:
    """The sizes of one uneven all-to-all over `group` (G ranks): `send[d]` rows go to group rank
    d, `recv[s]` rows come from group rank s. With `levels` it runs in two levels: first inside
    each node (every rank hands its node's peer l the rows for rank l of every node), then across
    nodes between ranks of the same local index, which carry all of their node's rows for one
    peer in one message. The bytes crossing nodes are the same as the flat exchange's, in
    nodes - 1 messages per rank instead of G - per_node. `via[l][m]` (per_node x nodes): rows
    this rank relays from its node's rank l to node m. Both directions are differentiable."""

    send: list[int]
    recv: list[int]
    group: object = None
    levels: Levels | None = None
    via: list[list[int]] | None = None

    def there(self, x: torch.Tensor) -> torch.Tensor:
        """x [sum(send), *S] in destination order -> [sum(recv), *S] in source order."""
        if self.levels is None:
            return all_to_all(x, send_splits=self.send, recv_splits=self.recv, group=self.group)
        lv = self.levels
        by_node = _grid(self.send, lv.nodes)  # [m][l']: rows for rank l' of node m
        x = all_to_all(regroup(x, by_node), send_splits=_sums(_columns(by_node)),
                       recv_splits=_sums(self.via), group=lv.local)
        return all_to_all(regroup(x, self.via), send_splits=_sums(_columns(self.via)),
                          recv_splits=_sums(_grid(self.recv, lv.nodes)), group=lv.rail)

    def back(self, y: torch.Tensor) -> torch.Tensor:
        """The reverse exchange: y [sum(recv), *S] in source order -> [sum(send), *S] in
        destination order (each row returns to the rank it came from, by the same path)."""
        if self.levels is None:
            return all_to_all(y, send_splits=self.recv, recv_splits=self.send, group=self.group)
        lv = self.levels
        by_node = _grid(self.send, lv.nodes)
        y = all_to_all(y, send_splits=_sums(_grid(self.recv, lv.nodes)),
                       recv_splits=_sums(_columns(self.via)), group=lv.rail)
        y = all_to_all(regroup(y, _columns(self.via)), send_splits=_sums(self.via),
                       recv_splits=_sums(_columns(by_node)), group=lv.local)
        return regroup(y, _columns(by_node))


def exchange_counts(counts: torch.Tensor, group=None, levels: Levels | None = None):
    """counts [G, k] int64 (row d: what this rank sends group rank d, k numbers per rank) ->
    (recv [G, k]: row s what group rank s sends this rank; via [per_node, nodes, k] or None: what
    this rank relays in a two-level exchange, from its node's rank l to node m). Not
    differentiable; no host sync (the caller reads both in one go)."""
    if levels is None:
        return all_to_all(counts, group=group), None
    k = counts.shape[1]
    lv = levels
    # the even two-level exchange: [m][l'] -> [l'][m] -> local -> [l][m] -> [m][l] -> rail
    via = _exchange(counts.view(lv.nodes, lv.per_node, k).transpose(0, 1).reshape(-1, k),
                    [lv.nodes] * lv.per_node, [lv.nodes] * lv.per_node, lv.local)
    recv = _exchange(via.view(lv.per_node, lv.nodes, k).transpose(0, 1).reshape(-1, k),
                     [lv.per_node] * lv.nodes, [lv.per_node] * lv.nodes, lv.rail)
    return recv, via.view(lv.per_node, lv.nodes, k)


def reduce_scatter_two_level(out: torch.Tensor, x: torch.Tensor, levels: Levels, average: bool) -> None:
    """out [c] = this rank's chunk of x [G * c] (chunks in group-rank order) summed over the group
    (divided by G when `average`): a reduce-scatter inside the node ([per_node] pieces of
    nodes x c), then across nodes on 1 / per_node of the data. Not differentiable."""
    lv, c = levels, out.numel()
    node = _scatter(x.view(lv.nodes, lv.per_node, c).transpose(0, 1).reshape(lv.per_node, -1), lv.local)
    out.copy_(_scatter(node.view(lv.nodes, c), lv.rail).view_as(out))
    if average:
        out.div_(lv.size)


def all_gather_two_level(out: torch.Tensor, x: torch.Tensor, levels: Levels) -> None:
    """out [G * c] = every group rank's x [c] in group-rank order: an all-gather across nodes of
    one chunk per rank, then inside the node of nodes x c. Not differentiable."""
    lv = levels
    rail = _gather(x, lv.rail)  # [nodes, c]
    node = _gather(rail, lv.local)  # [per_node, nodes, c]
    out.view(lv.nodes, lv.per_node, -1).copy_(node.transpose(0, 1))
