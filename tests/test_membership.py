# -*- test-case-name: tests.test_membership -*-
"""
Tests for L{anvil.cluster.membership}: member records and the node id.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from anvil.cluster.membership import (
    Member,
    Membership,
    MemberState,
    load_or_create_node_id,
)


class MembershipTests(SynchronousTestCase):
    """
    A node's view of the cluster.
    """

    def test_local_member_alive(self) -> None:
        """
        A new view holds the node itself, alive.
        """
        view = Membership(Member("n1", "r", "http://a", "a:1"))
        self.assertEqual([m.node_id for m in view.alive()], ["n1"])

    def test_update_and_states(self) -> None:
        """
        Updated records replace older ones; only alive members count as
        alive.
        """
        view = Membership(Member("n1", "r", "http://a", "a:1"))
        view.update(
            [
                Member("n2", "r", "http://b", "b:1"),
                Member("n3", "r", "http://c", "c:1", state=MemberState.DEAD),
            ]
        )
        self.assertEqual([m.node_id for m in view.members()], ["n1", "n2", "n3"])
        self.assertEqual([m.node_id for m in view.alive()], ["n1", "n2"])
        view.update([Member("n2", "r", "http://b", "b:1", incarnation=1,
                            state=MemberState.SUSPECT)])
        self.assertEqual([m.node_id for m in view.alive()], ["n1"])

    def test_set_local(self) -> None:
        """
        Changing the local record changes it in the view too.
        """
        view = Membership(Member("n1", "r", "", "a:1"))
        view.set_local(api_addr="http://x:1", capacity=10)
        self.assertEqual(view.members()[0].api_addr, "http://x:1")
        self.assertEqual(view.local.capacity, 10)


class NodeIdTests(SynchronousTestCase):
    """
    The node id is created once per data directory and kept.
    """

    def test_created_and_reused(self) -> None:
        """
        The first call creates a 32-hex-character id in C{node_id}; later
        calls return the same id.
        """
        data_dir = self.mktemp()
        os.makedirs(data_dir)
        first = load_or_create_node_id(data_dir)
        self.assertRegex(first, "^[0-9a-f]{32}$")
        self.assertEqual(load_or_create_node_id(data_dir), first)
        with open(os.path.join(data_dir, "node_id")) as f:
            self.assertEqual(f.read().strip(), first)

    def test_distinct_per_data_dir(self) -> None:
        """
        Two data directories get two ids.
        """
        a, b = self.mktemp(), self.mktemp()
        os.makedirs(a)
        os.makedirs(b)
        self.assertNotEqual(load_or_create_node_id(a), load_or_create_node_id(b))
