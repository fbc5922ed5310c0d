# -*- test-case-name: tests.integration.test_cluster_e2e -*-
"""
End to end with real C{twistd anvil} processes: nodes join through
C{BOOTSTRAP_ADDRS}, a killed node is declared dead by the others within the
configured timeouts, a node leaving gracefully and coming back is seen
again, and nodes with a foreign CA or a wrong C{CLUSTER_SECRET} never get
in.  Membership is read the way operators read it: C{anvil-admin cluster
status --json} with a node's environment.
"""

from __future__ import annotations

import os
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.cluster import Cluster, ClusterNode, foreign_ca_files, wait_until

#: Slack on top of the protocol's own bound, for process scheduling on a
#: loaded machine and the ~1 s an C{anvil-admin} poll takes.
MARGIN = 6.0


def detection_bound(cluster: Cluster, members: int) -> float:
    """
    How long failure detection may take: a member is probed within a few
    protocol periods (random choice among C{members}), the direct and
    indirect probes time out, then the suspicion timeout runs.
    """
    gossip = cluster.gossip
    return gossip["period"] * 3 * members + 3 * gossip["ack_timeout"] + gossip["suspicion_timeout"]


class JoinTests(SynchronousTestCase):
    """
    Three nodes form one cluster.
    """

    def test_three_nodes_join_and_see_each_other(self) -> None:
        """
        Node 1 starts the cluster, nodes 2 and 3 join through its address,
        and each then lists all three alive with their region and addresses,
        its own id being the one in its data dir's C{node_id}.
        """
        cluster = Cluster(self, 3).start()
        ids = {node.node_id for node in cluster.nodes}
        self.assertEqual(len(ids), 3)
        by_id = {node.node_id: node for node in cluster.nodes}
        for node in cluster.nodes:
            status = cluster.cluster_status(node)
            members = {m["node_id"]: m for m in status["members"]}
            self.assertEqual(set(members), ids, f"as node {node.index} sees it")
            for node_id, member in members.items():
                self.assertEqual(member["state"], "alive")
                self.assertEqual(member["region"], cluster.region)
                self.assertEqual(member["api_addr"].rstrip("/"), by_id[node_id].url)
                self.assertEqual(member["cluster_addr"], by_id[node_id].cluster_addr)
            if "node_id" in status:
                self.assertEqual(status["node_id"], node.node_id)


class FailureDetectionTests(SynchronousTestCase):
    """
    Crashes and graceful departures are seen by the survivors.
    """

    def test_killed_node_declared_dead(self) -> None:
        """
        After C{kill -9} of one node, the other two mark it C{dead} within
        the configured timeouts (plus a margin) and still see each other
        alive.
        """
        cluster = Cluster(self, 3).start()
        victim = cluster.nodes[2]
        victim_id = victim.node_id
        survivors = cluster.nodes[:2]
        victim.kill()
        killed = time.monotonic()
        bound = detection_bound(cluster, 3) + MARGIN
        for node in survivors:
            wait_until(
                lambda: cluster.states(node).get(victim_id) == "dead",
                bound - (time.monotonic() - killed),
                f"node {node.index} declaring the killed node dead\n{cluster.logs()}",
                interval=0.1,
            )
        elapsed = time.monotonic() - killed
        self.assertLess(elapsed, bound)
        # A survivor may be suspected for a moment on a loaded machine and
        # refute it: what matters is that they see each other alive.
        cluster.wait_converged(bound, survivors)
        for node in survivors:
            self.assertEqual(cluster.states(node).get(victim_id), "dead")

    def test_graceful_leave_and_rejoin(self) -> None:
        """
        A node stopped with SIGTERM exits 0 and the others see it C{left}
        (or C{dead}) rather than alive; started again, it joins once more
        and all three are alive everywhere.
        """
        cluster = Cluster(self, 3).start()
        leaver = cluster.nodes[1]
        leaver_id = leaver.node_id
        self.assertEqual(leaver.stop(), 0)
        for node in (cluster.nodes[0], cluster.nodes[2]):
            wait_until(
                lambda: cluster.states(node).get(leaver_id) in ("left", "dead"),
                detection_bound(cluster, 3) + MARGIN,
                f"node {node.index} seeing node 2 gone",
            )
        leaver.restart()
        self.assertEqual(leaver.node_id, leaver_id)
        cluster.wait_converged(30)


class StrangerTests(SynchronousTestCase):
    """
    A node without the cluster's credentials never becomes a member.
    """

    def assertNeverJoins(self, cluster: Cluster, stranger: ClusterNode) -> None:
        """
        Start C{stranger} (told to join through node 1) and watch the
        members' lists for a while: it never appears in them, and the three
        members stay alive.
        """
        stranger.start()
        node_id_file = os.path.join(stranger.data_dir, "node_id")
        wait_until(lambda: os.path.exists(node_id_file), 60, "the stranger's node id")
        stranger_id = stranger.node_id
        members = {n.node_id for n in cluster.nodes}
        # Long enough for many join attempts and for gossip to spread
        # anything it would have let in.
        watch = 10 * cluster.gossip["period"] + cluster.gossip["suspicion_timeout"] + 4.0
        deadline = time.monotonic() + watch
        while time.monotonic() < deadline:
            for node in cluster.nodes:
                states = cluster.states(node)
                self.assertNotIn(stranger_id, states, f"node {node.index} lists the stranger")
                self.assertEqual(set(states), members, f"node {node.index}'s view")
        # The members stay healthy (a member suspected for a moment on a
        # loaded machine refutes it).
        cluster.wait_converged(30, cluster.nodes)
        # It was trying all along, not stopped by a configuration error,
        # and sees none of the members either.
        self.assertTrue(stranger.running, stranger.log_tail())
        for node in cluster.nodes:
            self.assertTrue(node.running, node.log_tail())
        seen = set(cluster.states(stranger))
        self.assertEqual(seen & members, set(), stranger.log_tail())

    def test_foreign_ca_cannot_join(self) -> None:
        """
        A node whose CA (operator files of another CA) differs from the
        cluster's, with the right secret and node 1 as bootstrap address,
        never appears in the members' lists.
        """
        cluster = Cluster(self, 3).start()
        cert, key = foreign_ca_files(os.path.join(cluster.root, "foreign-ca"))
        stranger = cluster.new_node(
            {"ANVIL_CLUSTER_CA_CERT": cert, "ANVIL_CLUSTER_CA_KEY": key}, member=False
        )
        self.assertNeverJoins(cluster, stranger)

    def test_wrong_secret_cannot_join(self) -> None:
        """
        A node with the cluster's CA (from the global database) but another
        C{CLUSTER_SECRET} never appears in the members' lists.
        """
        cluster = Cluster(self, 3).start()
        stranger = cluster.new_node({"CLUSTER_SECRET": "not-the-cluster-secret"}, member=False)
        self.assertNeverJoins(cluster, stranger)
        # It did reach node 1, which refused it for its secret.
        self.assertIn("wrong cluster secret", cluster.nodes[0].output())
