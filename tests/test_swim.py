# -*- test-case-name: tests.test_swim -*-
"""
Tests for L{anvil.cluster.swim}: the SWIM protocol in simulated time.

L{Network} is an in-memory transport between L{Swim} instances: every
message (encoded to JSON and back, as the HTTPS transport will) and every
response takes C{latency} seconds of a L{Clock}, and may be lost at random,
blocked by a partition, or dropped because its sender is down.
"""

from __future__ import annotations

import random
from dataclasses import replace

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from anvil.cluster.membership import Member, Membership, MemberState
from anvil.cluster.swim import (
    FAILURE,
    JOIN,
    LEAVE,
    RECOVERY,
    SUSPECT,
    Ack,
    Join,
    JoinFailed,
    JoinReply,
    Message,
    Ping,
    PingReq,
    Swim,
    SwimConfig,
    overrides,
)

CONFIG = SwimConfig(
    protocol_period=1.0,
    ack_timeout=0.3,
    indirect_probes=3,
    suspicion_timeout=4.0,
    dead_member_reap_after=1000.0,
    piggyback_max=8,
    retransmit_mult=4,
    sync_interval=10.0,
)


def addr(node_id: str) -> str:
    """
    The cluster address of a test node.
    """
    return f"{node_id}.test:7443"


def run(clock: Clock, seconds: float) -> None:
    """
    Advance C{clock} by C{seconds}, one scheduled call at a time, so that
    calls scheduled from inside others happen at their own time.
    """
    end = clock.seconds() + seconds
    while True:
        due = [c.getTime() for c in clock.getDelayedCalls()]
        nxt = min(due) if due else None
        if nxt is None or nxt > end:
            clock.advance(end - clock.seconds())
            return
        clock.advance(max(0.0, nxt - clock.seconds()))


class Network:
    """
    In-memory transport between L{Swim} nodes, driven by a L{Clock}.

    @ivar down: addresses that neither receive nor answer (crashed nodes).
    @ivar blocked: directed (from, to) address pairs that lose everything.
    @ivar mute: addresses whose responses are lost (their requests pass).
    @ivar loss: probability that any one message or response is lost.
    """

    def __init__(self, clock: Clock, seed: int = 0, latency: float = 0.01) -> None:
        self.clock = clock
        self.rng = random.Random(seed)
        self.latency = latency
        self.loss = 0.0
        self.nodes: dict[str, Swim] = {}
        self.down: set[str] = set()
        self.blocked: set[tuple[str, str]] = set()
        self.mute: set[str] = set()
        self.events: list[tuple[str, str, str]] = []  # (observer, kind, subject)
        # Counters for assertions on the traffic.
        self.sent = 0
        self.most_updates = 0

    def node(self, node_id: str, config: SwimConfig = CONFIG, seed: int | None = None) -> Swim:
        """
        A new node on this network (replacing any earlier one at its address).
        """
        local = Member(node_id, "r1", f"https://{node_id}.test", addr(node_id), capacity=100)
        swim = Swim(
            local,
            self.clock,
            self.sender(addr(node_id)),
            random.Random(seed if seed is not None else hash(node_id) & 0xFFFF),
            config,
            on_event=lambda kind, m: self.events.append((node_id, kind, m.node_id)),
        )
        self.nodes[addr(node_id)] = swim
        self.down.discard(addr(node_id))
        return swim

    def partition(self, a: str, b: str) -> None:
        """
        Cut the link between two addresses, both ways.
        """
        self.blocked |= {(a, b), (b, a)}

    def _lost(self, src: str, dst: str) -> bool:
        """
        Whether one message from C{src} to C{dst} is lost.
        """
        return (
            src in self.down
            or dst in self.down
            or (src, dst) in self.blocked
            or (self.loss and self.rng.random() < self.loss)
        )

    def sender(self, src: str):
        """
        The C{send} callable for the node at C{src}.
        """

        def send(dst: str, message: Message) -> Deferred[Message | None]:
            self.sent += 1
            self.most_updates = max(self.most_updates, len(getattr(message, "updates", ())))
            result: Deferred[Message | None] = Deferred()
            wire = message.to_json()

            def respond(response: Message | None) -> None:
                if response is None or self._lost(dst, src) or dst in self.mute:
                    return
                encoded = response.to_json()

                def arrive() -> None:
                    if not result.called and src not in self.down:
                        result.callback(Message.from_json(encoded))

                self.clock.callLater(self.latency, arrive)

            def deliver() -> None:
                target = self.nodes.get(dst)
                if target is None or self._lost(src, dst):
                    return
                decoded = Message.from_json(wire)
                assert decoded.sender == message.sender
                target.receive(decoded).addCallback(respond)

            if not self._lost(src, dst):
                self.clock.callLater(self.latency, deliver)
            return result

        return send

    def crash(self, swim: Swim) -> None:
        """
        Stop a node abruptly: it neither answers nor sends from now on.
        """
        swim.stop()
        self.down.add(swim.local.cluster_addr)

    def views(self, subject: str, among: list[Swim]) -> set[MemberState | None]:
        """
        The states in which the nodes C{among} see C{subject}.
        """
        out: set[MemberState | None] = set()
        for swim in among:
            m = swim.membership.get(subject)
            out.add(m.state if m is not None else None)
        return out


def cluster(test: SynchronousTestCase, n: int, seed: int = 1, config: SwimConfig = CONFIG):
    """
    C{n} nodes joined through the first, all probing; returns (clock,
    network, nodes).
    """
    clock = Clock()
    net = Network(clock, seed)
    nodes = [net.node(f"n{i:02d}", config, seed=seed * 1000 + i) for i in range(n)]
    nodes[0].start()
    for swim in nodes[1:]:
        d = swim.join([addr("n00")])
        run(clock, 0.05)
        test.assertEqual(test.successResultOf(d) >= 2, True)
        swim.start()
    test.addCleanup(lambda: [s.stop() for s in net.nodes.values()])
    return clock, net, nodes


def all_alive(nodes: list[Swim], n: int) -> bool:
    """
    Whether every node of C{nodes} sees C{n} members, all alive.
    """
    return all(
        len(s.membership.members()) == n and len(s.membership.alive()) == n for s in nodes
    )


class MessageTests(SynchronousTestCase):
    """
    Messages round-trip through JSON, and reject anything else.
    """

    def test_round_trip(self) -> None:
        """
        Every message kind decodes to an equal message, with its sender.
        """
        m = Member("a", "r", "https://a", "a:1", capacity=7, incarnation=3, state=MemberState.SUSPECT)
        for message in [
            Ping("a", 1, (m,)),
            PingReq("a", 2, "b", "b:1", (m, m)),
            Ack("b", 3, ()),
            Join("c", m),
            JoinReply("a", (m,)),
        ]:
            decoded = Message.from_json(message.to_json())
            self.assertEqual(decoded, message)
            self.assertIs(type(decoded), type(message))

    def test_malformed(self) -> None:
        """
        Unknown kinds, missing fields, bad states and non-JSON raise
        L{ValueError}; a subclass only decodes its own kind.
        """
        for text in [
            "nope",
            "[]",
            '{"kind": "shout", "sender": "a"}',
            '{"kind": "ping", "sender": "a", "seq": 1}',
            '{"kind": "ack", "sender": "a", "seq": "1", "updates": []}',
            '{"kind": "ack", "sender": ["a"], "seq": 1, "updates": []}',
            '{"kind": "join", "sender": "a", "member": {"node_id": "a"}}',
            Join("a", Member("a", "r", "", "", state=MemberState.ALIVE)).to_json().replace(
                '"alive"', '"zombie"'
            ),
        ]:
            self.assertRaises(ValueError, Message.from_json, text)
        self.assertRaises(ValueError, Ping.from_json, Ack("a", 1).to_json())


class PrecedenceTests(SynchronousTestCase):
    """
    The SWIM precedence rules between two records of one member.
    """

    def test_rules(self) -> None:
        """
        Alive overrides suspect only with a higher incarnation; suspect
        overrides alive at an equal or higher one; dead overrides alive and
        suspect; left is final for its incarnation; a higher incarnation
        brings a dead or departed member back.
        """
        base = Member("x", "r", "", "")

        def rec(state: MemberState, inc: int) -> Member:
            return replace(base, state=state, incarnation=inc)

        A, S, D, L = MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT
        self.assertTrue(overrides(rec(A, 2), rec(S, 1)))
        self.assertFalse(overrides(rec(A, 1), rec(S, 1)))
        self.assertTrue(overrides(rec(S, 1), rec(A, 1)))
        self.assertTrue(overrides(rec(S, 2), rec(A, 1)))
        self.assertFalse(overrides(rec(S, 1), rec(A, 2)))
        self.assertFalse(overrides(rec(S, 1), rec(S, 1)))
        self.assertTrue(overrides(rec(S, 2), rec(S, 1)))
        self.assertTrue(overrides(rec(D, 1), rec(A, 1)))
        self.assertTrue(overrides(rec(D, 1), rec(S, 1)))
        self.assertFalse(overrides(rec(A, 1), rec(D, 1)))
        self.assertTrue(overrides(rec(L, 1), rec(D, 1)))
        for state in (A, S, D):
            self.assertFalse(overrides(rec(state, 1), rec(L, 1)))
        self.assertTrue(overrides(rec(A, 2), rec(L, 1)))
        self.assertTrue(overrides(rec(A, 2), rec(D, 1)))


class SwimTests(SynchronousTestCase):
    """
    The protocol between many nodes in simulated time.
    """

    def test_convergence_50(self) -> None:
        """
        Fifty members joined through one seed, one after another, all see
        all fifty alive within a bounded number of protocol periods, and
        nobody is ever suspected.
        """
        clock, net, nodes = cluster(self, 50)
        periods = 0
        while not all_alive(nodes, 50):
            run(clock, 1.0)
            periods += 1
            self.assertLess(periods, 30, "no convergence after 30 periods")
        run(clock, 10.0)
        self.assertTrue(all_alive(nodes, 50))
        self.assertEqual([e for e in net.events if e[1] != JOIN], [])
        # Piggybacking stays bounded: at most piggyback_max updates, plus
        # the recipient's own record when it is not believed alive.
        self.assertLessEqual(net.most_updates, CONFIG.piggyback_max + 1)
        # Each update is sent a bounded number of times: the queues drain.
        run(clock, 30.0)
        self.assertEqual([s.local.node_id for s in nodes if s._broadcasts], [])

    def test_convergence_with_loss(self) -> None:
        """
        With 5% of messages lost, twenty members still converge, and the
        refutations keep every one of them alive (with a suspicion timeout
        long enough for a refutation to spread through twenty members).
        """
        config = replace(CONFIG, suspicion_timeout=8.0)
        clock, net, nodes = cluster(self, 20, seed=3, config=config)
        net.loss = 0.05
        run(clock, 60.0)
        net.loss = 0.0
        run(clock, 10.0)
        self.assertTrue(all_alive(nodes, 20))
        self.assertEqual([e for e in net.events if e[1] == FAILURE], [])

    def test_suspicion_and_refutation(self) -> None:
        """
        A member whose acks are lost for a while is suspected, refutes with
        a higher incarnation, and ends alive everywhere without ever being
        declared dead.
        """
        clock, net, nodes = cluster(self, 8, seed=5)
        run(clock, 10.0)
        self.assertTrue(all_alive(nodes, 8))
        victim = nodes[3]
        net.mute.add(victim.local.cluster_addr)
        run(clock, 3.0)
        net.mute.clear()
        run(clock, 15.0)
        name = victim.local.node_id
        self.assertIn(SUSPECT, {k for (_, k, s) in net.events if s == name})
        self.assertIn(RECOVERY, {k for (_, k, s) in net.events if s == name})
        self.assertNotIn(FAILURE, {k for (_, k, s) in net.events})
        self.assertGreater(victim.local.incarnation, 0)
        self.assertTrue(all_alive(nodes, 8))
        for swim in nodes:
            self.assertEqual(swim.membership.get(name).incarnation, victim.local.incarnation)

    def test_dead_detection(self) -> None:
        """
        A crashed member is marked dead by every other member within one
        period, the suspicion timeout and a few periods more, each
        reporting one failure.
        """
        clock, net, nodes = cluster(self, 10, seed=7)
        run(clock, 10.0)
        victim = nodes[6]
        net.crash(victim)
        others = [s for s in nodes if s is not victim]
        bound = CONFIG.protocol_period + CONFIG.suspicion_timeout + 5 * CONFIG.protocol_period
        run(clock, bound)
        self.assertEqual(net.views(victim.local.node_id, others), {MemberState.DEAD})
        failures = [o for (o, k, s) in net.events if k == FAILURE]
        self.assertEqual(sorted(failures), sorted(s.local.node_id for s in others))
        for swim in others:
            self.assertEqual(len(swim.membership.alive()), 9)

    def test_leave(self) -> None:
        """
        A member that leaves is I{left} everywhere, not dead, and causes
        leave events but no failure.
        """
        clock, net, nodes = cluster(self, 10, seed=9)
        run(clock, 10.0)
        leaver = nodes[4]
        d = leaver.leave()
        run(clock, 1.0)
        self.assertIsNone(self.successResultOf(d))
        run(clock, 20.0)
        others = [s for s in nodes if s is not leaver]
        self.assertEqual(net.views(leaver.local.node_id, others), {MemberState.LEFT})
        # A probe already under way may suspect the leaver for a moment;
        # the I{left} record overrides that, and nobody declares it dead.
        self.assertEqual([e for e in net.events if e[1] == FAILURE], [])
        self.assertEqual(len([e for e in net.events if e[1] == LEAVE]), 9)
        # The departed node answers nothing any more.
        self.assertIsNone(self.successResultOf(leaver.receive(Ping("n00", 1))))

    def test_rejoin_after_dead(self) -> None:
        """
        A member declared dead that starts again joins with a higher
        incarnation and is alive everywhere again.
        """
        clock, net, nodes = cluster(self, 8, seed=11)
        run(clock, 10.0)
        victim = nodes[5]
        name = victim.local.node_id
        net.crash(victim)
        run(clock, 20.0)
        others = [s for s in nodes if s is not victim]
        self.assertEqual(net.views(name, others), {MemberState.DEAD})
        dead_incarnation = others[0].membership.get(name).incarnation

        reborn = net.node(name, seed=99)
        d = reborn.join([addr("n00")])
        run(clock, 0.5)
        self.assertEqual(self.successResultOf(d), 8)
        reborn.start()
        self.assertGreater(reborn.local.incarnation, dead_incarnation)
        run(clock, 15.0)
        everyone = others + [reborn]
        self.assertTrue(all_alive(everyone, 8))
        for swim in others:
            self.assertEqual(swim.membership.get(name).incarnation, reborn.local.incarnation)
        self.assertEqual(
            sorted(o for (o, k, s) in net.events if k == RECOVERY and s == name),
            sorted(s.local.node_id for s in others),
        )

    def test_rejoin_after_leave(self) -> None:
        """
        A member that left and starts again comes back alive everywhere with
        a higher incarnation than the one it left with.
        """
        clock, net, nodes = cluster(self, 6, seed=31)
        run(clock, 5.0)
        leaver = nodes[3]
        leaver.leave()
        run(clock, 15.0)
        others = [s for s in nodes if s is not leaver]
        self.assertEqual(net.views("n03", others), {MemberState.LEFT})
        before = len(net.events)
        reborn = net.node("n03", seed=77)
        d = reborn.join([addr("n00")])
        run(clock, 0.5)
        self.assertEqual(self.successResultOf(d), 6)
        self.assertEqual(reborn.local.incarnation, 1)
        self.assertEqual(nodes[0].membership.get("n03").state, MemberState.ALIVE)
        reborn.start()
        run(clock, 10.0)
        self.assertTrue(all_alive(others + [reborn], 6))
        self.assertEqual(
            sorted(o for (o, k, s) in net.events[before:] if k == JOIN and s == "n03"),
            sorted(s.local.node_id for s in others),
        )

    def test_partitioned_member_dead(self) -> None:
        """
        A member cut off from every other is declared dead by all of them.
        """
        clock, net, nodes = cluster(self, 6, seed=13)
        run(clock, 10.0)
        victim = nodes[2].local.cluster_addr
        for swim in nodes:
            if swim.local.cluster_addr != victim:
                net.partition(victim, swim.local.cluster_addr)
        run(clock, CONFIG.protocol_period + CONFIG.suspicion_timeout + 6.0)
        others = [s for s in nodes if s is not nodes[2]]
        self.assertEqual(net.views(nodes[2].local.node_id, others), {MemberState.DEAD})

    def test_partitioned_member_relay(self) -> None:
        """
        A member reachable through one other member only stays alive
        everywhere: the indirect pings go through that relay.
        """
        clock, net, nodes = cluster(self, 5, seed=17)
        run(clock, 10.0)
        victim, relay = nodes[2].local.cluster_addr, nodes[4].local.cluster_addr
        for swim in nodes:
            if swim.local.cluster_addr not in (victim, relay):
                net.partition(victim, swim.local.cluster_addr)
        run(clock, 40.0)
        self.assertTrue(all_alive(nodes, 5))
        self.assertEqual([e for e in net.events if e[1] != JOIN], [])

    def test_partition_heals(self) -> None:
        """
        After a partition heals, the member each side declared dead is alive
        everywhere again (through the periodic full-state sync), with a
        higher incarnation.
        """
        clock, net, nodes = cluster(self, 6, seed=23)
        run(clock, 10.0)
        victim = nodes[2]
        for swim in nodes:
            if swim is not victim:
                net.partition(victim.local.cluster_addr, swim.local.cluster_addr)
        run(clock, 15.0)
        others = [s for s in nodes if s is not victim]
        self.assertEqual(net.views(victim.local.node_id, others), {MemberState.DEAD})
        self.assertEqual(len(victim.membership.alive()), 1)
        net.blocked.clear()
        run(clock, 40.0)
        self.assertTrue(all_alive(nodes, 6))
        self.assertGreater(victim.local.incarnation, 0)

    def test_dead_members_reaped(self) -> None:
        """
        A dead member is forgotten C{dead_member_reap_after} seconds after it
        was declared dead, and not before.
        """
        config = replace(CONFIG, dead_member_reap_after=30.0)
        clock, net, nodes = cluster(self, 5, seed=29, config=config)
        run(clock, 5.0)
        net.crash(nodes[1])
        run(clock, 15.0)
        others = [s for s in nodes if s is not nodes[1]]
        self.assertEqual(net.views("n01", others), {MemberState.DEAD})
        run(clock, 10.0)
        self.assertEqual(net.views("n01", others), {MemberState.DEAD})
        run(clock, 30.0)
        self.assertEqual(net.views("n01", others), {None})
        self.assertTrue(all_alive(others, 4))

    def test_join_for_another_refused(self) -> None:
        """
        A join whose member record names another node than its sender is
        refused and changes nothing.
        """
        clock = Clock()
        net = Network(clock)
        seed = net.node("s")
        forged = Join("mallory", Member("victim", "r1", "", "v:1"))
        self.assertIsNone(self.successResultOf(seed.receive(forged)))
        self.assertIsNone(seed.membership.get("victim"))

    def test_config_validated(self) -> None:
        """
        An ack timeout that does not fit in the protocol period is refused.
        """
        self.assertRaises(ValueError, SwimConfig, protocol_period=1.0, ack_timeout=1.0)
        self.assertRaises(ValueError, SwimConfig, sync_interval=-1.0)

    def test_join_retries(self) -> None:
        """
        A join while the seed is down is retried with backoff until the seed
        answers; with a bounded number of attempts it fails with
        L{JoinFailed}.
        """
        clock = Clock()
        net = Network(clock)
        seed, joiner = net.node("s"), net.node("j")
        net.down.add(seed.local.cluster_addr)
        failed = joiner.join([addr("s")], attempts=2)
        run(clock, 10.0)
        self.failureResultOf(failed, JoinFailed)
        d = joiner.join([addr("s")], attempts=None)
        run(clock, 20.0)
        self.assertNoResult(d)
        net.down.clear()
        run(clock, 40.0)
        self.assertEqual(self.successResultOf(d), 2)
        self.assertEqual([m.node_id for m in seed.membership.alive()], ["j", "s"])

    def test_update_local_spreads(self) -> None:
        """
        A change to a member's own record (its capacity) reaches every
        member, with a higher incarnation.
        """
        clock, net, nodes = cluster(self, 6, seed=19)
        run(clock, 5.0)
        nodes[1].update_local(capacity=12345)
        run(clock, 10.0)
        for swim in nodes:
            self.assertEqual(swim.membership.get("n01").capacity, 12345)

    def test_shares_membership(self) -> None:
        """
        Given an existing view, the protocol maintains it; counts by state
        follow.
        """
        clock = Clock()
        net = Network(clock)
        view = Membership(Member("a", "r1", "https://a", addr("a")))
        swim = Swim(view.local, clock, net.sender(addr("a")), random.Random(1), CONFIG,
                    membership=view)
        net.nodes[addr("a")] = swim
        other = net.node("b")
        swim.start()
        other.join([addr("a")])
        run(clock, 1.0)
        self.assertEqual([m.node_id for m in view.alive()], ["a", "b"])
        self.assertEqual(view.by_state()[MemberState.ALIVE], 2)
        self.assertEqual(view.by_state()[MemberState.DEAD], 0)
