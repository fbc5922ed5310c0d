# -*- test-case-name: tests.test_membership -*-
"""
Cluster members as this node knows them.

A L{Member} record carries what peers need to reach a node and place shards
on it.  L{Membership} is the node's view of the cluster; until gossip joins
other nodes to it, the view holds this node alone, alive, which is exactly
what a one-node cluster is.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace
from enum import Enum
from typing import Iterable


class MemberState(str, Enum):
    """
    The SWIM states of a member.
    """

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


@dataclass(frozen=True)
class Member:
    """
    One node of the cluster.

    @ivar node_id: the node's stable identity (kept in its data dir).
    @ivar api_addr: URL of its S3 API.
    @ivar cluster_addr: C{host:port} of its cluster listener.
    @ivar capacity: bytes of shard storage it offers.
    @ivar incarnation: bumped by the node itself to refute suspicion.
    """

    node_id: str
    region: str
    api_addr: str
    cluster_addr: str
    capacity: int = 0
    incarnation: int = 0
    state: MemberState = MemberState.ALIVE


class Membership:
    """
    This node's view of the cluster members, keyed by node id.
    """

    def __init__(self, local: Member) -> None:
        """
        @param local: this node's own record; it is always a member.
        """
        self.local = local
        self._members: dict[str, Member] = {local.node_id: local}

    def members(self) -> list[Member]:
        """
        Every member this node knows of, in node id order.
        """
        return [self._members[k] for k in sorted(self._members)]

    def alive(self) -> list[Member]:
        """
        The members currently believed alive (this node included).
        """
        return [m for m in self.members() if m.state is MemberState.ALIVE]

    def get(self, node_id: str) -> Member | None:
        """
        The record of one member, or C{None} if this node does not know it.
        """
        return self._members.get(node_id)

    def remove(self, node_id: str) -> None:
        """
        Forget a member (a dead or departed one, once its news has spread).

        @raise ValueError: for this node's own record, which always stays.
        """
        if node_id == self.local.node_id:
            raise ValueError("the local member cannot be removed")
        self._members.pop(node_id, None)

    def by_state(self) -> dict[MemberState, int]:
        """
        How many known members are in each state (every state present,
        zero included), for the members-by-state gauge.
        """
        counts = {state: 0 for state in MemberState}
        for member in self._members.values():
            counts[member.state] += 1
        return counts

    def update(self, members: Iterable[Member]) -> None:
        """
        Record newer information about members.
        """
        for member in members:
            self._members[member.node_id] = member
            if member.node_id == self.local.node_id:
                # Keep C{local} and the table in step.
                self.local = member

    def set_local(self, **changes: object) -> Member:
        """
        Change this node's own record (its capacity, say) and return it.
        """
        self.local = replace(self.local, **changes)  # type: ignore[arg-type]
        self._members[self.local.node_id] = self.local
        return self.local


def load_or_create_node_id(data_dir: str) -> str:
    """
    This data directory's stable node id, generated on first use and kept in
    C{<data_dir>/node_id}.

    The id belongs to the data (its shards), not to the machine: moving a
    data directory moves the node.
    """
    path = os.path.join(data_dir, "node_id")
    try:
        with open(path) as f:
            node_id = f.read().strip()
        if node_id:
            return node_id
    except FileNotFoundError:
        pass
    node_id = uuid.uuid4().hex
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(node_id + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    return node_id
