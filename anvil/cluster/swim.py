# -*- test-case-name: tests.test_swim -*-
"""
The SWIM membership protocol, transport-agnostic and driven by an injected
clock (ARCHITECTURE.md section 6, "Gossip").

Every protocol period a node pings one member, taken in shuffled round-robin
order; without an ack within C{ack_timeout} it asks C{indirect_probes} random
others to ping the member for it (ping-req); still nothing by the end of the
period and the member becomes I{suspect}.  A suspect that stays suspect for
C{suspicion_timeout} is declared I{dead}.  A node that hears it is suspected
(or declared dead, or left) refutes by bumping its incarnation and gossiping
I{alive}.

Membership changes travel as piggybacked L{Member} records (which carry
state and incarnation) on pings, acks and ping-reqs; each is sent a bounded
number of times, C{retransmit_mult * ceil(log10(n + 1))}, as in memberlist.

Precedence between two records of one member, incarnation C{i} (new) against
C{j} (known):

  - a higher incarnation always wins (C{alive(i)} overrides anything of
    C{j < i}: that is how a suspected member refutes, and how a member
    rejoining after being dead or having left comes back);
  - at equal incarnations I{left} > I{dead} > I{suspect} > I{alive}: suspect
    overrides alive, dead overrides alive and suspect, left is final;
  - a lower incarnation never wins.  Classic SWIM lets I{dead} override any
    incarnation; here a stale I{dead} must not kill a member that has
    already come back with a higher incarnation, so it does not.

Bounded gossip can miss a member now and then, and after a partition each
side believes the other dead and probes it no more; so every
C{sync_interval} a node also exchanges its full member list with one random
member (memberlist's push-pull), dead ones included.

State changes of other members in this node's view are reported to an
C{on_event(kind, member)} callback for metrics: C{JOIN} (a member first
seen, or back after leaving; the list received on joining counts too),
C{LEAVE}, C{FAILURE} (declared dead), C{RECOVERY} (alive again after being
suspect or dead) and C{SUSPECT}.

The transport is a callable C{send(cluster_addr, message)} returning a
L{Deferred} that fires with the peer's response (a L{Message} or C{None});
the peer side calls L{Swim.receive}.  Messages are plain dataclasses with
C{to_json}/C{from_json} so the HTTPS cluster listener can carry them; each
names its sender, which the transport is to check against the peer's TLS
identity.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, ClassVar, Iterable, Sequence

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from anvil.cluster.membership import Member, Membership, MemberState

#: Event kinds given to the C{on_event} callback.
JOIN = "join"
LEAVE = "leave"
FAILURE = "failure"
RECOVERY = "recovery"
SUSPECT = "suspect"

# Equal-incarnation precedence: a record wins over one of lower rank.
_RANK = {
    MemberState.ALIVE: 0,
    MemberState.SUSPECT: 1,
    MemberState.DEAD: 2,
    MemberState.LEFT: 3,
}

_PROBED = (MemberState.ALIVE, MemberState.SUSPECT)


def member_to_dict(member: Member) -> dict[str, Any]:
    """
    A member record as a JSON-ready dict.
    """
    return {
        "node_id": member.node_id,
        "region": member.region,
        "api_addr": member.api_addr,
        "cluster_addr": member.cluster_addr,
        "capacity": member.capacity,
        "incarnation": member.incarnation,
        "state": member.state.value,
    }


def member_from_dict(data: dict[str, Any]) -> Member:
    """
    The member record encoded by L{member_to_dict}.

    @raise ValueError: if a field is missing or of the wrong type.
    """
    try:
        member = Member(
            node_id=str(data["node_id"]),
            region=str(data["region"]),
            api_addr=str(data["api_addr"]),
            cluster_addr=str(data["cluster_addr"]),
            capacity=int(data["capacity"]),
            incarnation=int(data["incarnation"]),
            state=MemberState(data["state"]),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed member record: {e}") from e
    if not member.node_id or member.incarnation < 0:
        raise ValueError("malformed member record")
    return member


def overrides(new: Member, known: Member) -> bool:
    """
    Whether record C{new} supersedes record C{known} of the same member,
    by the precedence rules in the module docstring.
    """
    if new.incarnation != known.incarnation:
        return new.incarnation > known.incarnation
    return _RANK[new.state] > _RANK[known.state]


@dataclass(frozen=True)
class Message:
    """
    Base of the protocol messages.

    @ivar sender: node id of the sending member.
    """

    kind: ClassVar[str] = ""
    _kinds: ClassVar[dict[str, type[Message]]] = {}

    sender: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """
        Register each message class under its C{kind} for L{from_json}.
        """
        super().__init_subclass__(**kwargs)
        Message._kinds[cls.kind] = cls

    def to_json(self) -> str:
        """
        This message as a JSON document (with its C{kind}).
        """
        body: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Member):
                value = member_to_dict(value)
            elif isinstance(value, tuple):
                value = [member_to_dict(m) for m in value]
            body[f.name] = value
        return json.dumps(body, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Message:
        """
        Decode a message written by L{to_json}.  Called on L{Message} it
        accepts any kind; on a subclass, only that kind.

        @raise ValueError: for anything that is not such a message.
        """
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e}") from e
        if not isinstance(body, dict):
            raise ValueError("a message is a JSON object")
        kind = Message._kinds.get(body.pop("kind", None))
        if kind is None or not issubclass(kind, cls) or kind is Message:
            raise ValueError("unknown message kind")
        args: dict[str, Any] = {}
        try:
            for f in fields(kind):
                value = body[f.name]
                if f.type == "Member":
                    value = member_from_dict(value)
                elif f.type == "tuple[Member, ...]":
                    value = tuple(member_from_dict(m) for m in value)
                elif f.type == "int":
                    if not isinstance(value, int) or isinstance(value, bool):
                        raise TypeError(f"{f.name} is not an integer")
                elif not isinstance(value, str):
                    raise TypeError(f"{f.name} is not a string")
                args[f.name] = value
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed {kind.kind} message: {e}") from e
        return kind(**args)


@dataclass(frozen=True)
class Ping(Message):
    """
    A direct probe; answered by an L{Ack}.
    """

    kind: ClassVar[str] = "ping"
    seq: int = 0
    updates: tuple[Member, ...] = ()


@dataclass(frozen=True)
class PingReq(Message):
    """
    Ask the receiver to ping C{target} on the sender's behalf; answered by an
    L{Ack} if the target acked in time, else by nothing.
    """

    kind: ClassVar[str] = "ping-req"
    seq: int = 0
    target: str = ""
    target_addr: str = ""
    updates: tuple[Member, ...] = ()


@dataclass(frozen=True)
class Ack(Message):
    """
    The answer to a L{Ping} (or a successful L{PingReq}).
    """

    kind: ClassVar[str] = "ack"
    seq: int = 0
    updates: tuple[Member, ...] = ()


@dataclass(frozen=True)
class Join(Message):
    """
    A new (or returning) member asks to join; answered by L{JoinReply}.
    """

    kind: ClassVar[str] = "join"
    member: Member = field(default_factory=lambda: Member("", "", "", ""))


@dataclass(frozen=True)
class JoinReply(Message):
    """
    The full member list, as the receiver of a L{Join} knows it.
    """

    kind: ClassVar[str] = "join-reply"
    members: tuple[Member, ...] = ()


@dataclass(frozen=True)
class Sync(Message):
    """
    Anti-entropy: the sender's full member list; answered by the receiver's
    own as a L{JoinReply}.
    """

    kind: ClassVar[str] = "sync"
    members: tuple[Member, ...] = ()


@dataclass(frozen=True)
class SwimConfig:
    """
    Protocol timing and fan-out.

    @ivar protocol_period: seconds between probes.
    @ivar ack_timeout: seconds to wait for a direct ack before ping-req;
        must leave room for the indirect round trip within the period.
    @ivar indirect_probes: members asked to ping-req (SWIM's k).
    @ivar suspicion_timeout: seconds a member stays suspect before it is
        declared dead.
    @ivar dead_member_reap_after: seconds a dead or departed member stays in
        the view (so its news keeps spreading) before it is forgotten.
    @ivar piggyback_max: most updates carried by one message.
    @ivar retransmit_mult: each update is sent
        C{retransmit_mult * ceil(log10(n + 1))} times (SWIM's lambda).
    @ivar join_backoff_max: longest wait between join attempts.
    @ivar sync_interval: seconds between full-state exchanges with one
        random member (anti-entropy, as memberlist's push-pull); it repairs
        what bounded gossip missed and heals views after a partition.
        C{0} disables it.
    """

    protocol_period: float = 1.0
    ack_timeout: float = 0.4
    indirect_probes: int = 3
    suspicion_timeout: float = 5.0
    dead_member_reap_after: float = 600.0
    piggyback_max: int = 8
    retransmit_mult: int = 4
    join_backoff_max: float = 30.0
    sync_interval: float = 30.0

    def __post_init__(self) -> None:
        """
        @raise ValueError: for timings or counts the protocol cannot run with.
        """
        if not 0 < self.ack_timeout < self.protocol_period:
            raise ValueError("ack_timeout must be positive and below protocol_period")
        if self.indirect_probes < 0 or self.piggyback_max < 1 or self.retransmit_mult < 1:
            raise ValueError("indirect_probes, piggyback_max and retransmit_mult out of range")
        if self.sync_interval < 0:
            raise ValueError("sync_interval must not be negative")
        if self.suspicion_timeout <= 0 or self.dead_member_reap_after <= 0:
            raise ValueError("timeouts must be positive")


class JoinFailed(Exception):
    """
    No seed answered the join request.
    """


Send = Callable[[str, Message], "Deferred[Message | None]"]
EventCallback = Callable[[str, Member], None]


class Swim:
    """
    One member's side of the SWIM protocol.

    @ivar membership: the view this protocol maintains.
    """

    _log = Logger()

    def __init__(
        self,
        local: Member,
        clock: IReactorTime,
        send: Send,
        rng: random.Random,
        config: SwimConfig = SwimConfig(),
        on_event: EventCallback | None = None,
        membership: Membership | None = None,
    ) -> None:
        """
        @param local: this node's record (used unless C{membership} is given).
        @param clock: every timer runs on it.
        @param send: C{send(cluster_addr, message)} delivers C{message} and
            fires with the peer's response, C{None}, or a failure; the
            protocol applies its own timeouts (cancelling the L{Deferred}).
        @param rng: all random choices (deterministic in tests).
        @param on_event: called with (C{JOIN}|C{LEAVE}|C{FAILURE}|
            C{RECOVERY}|C{SUSPECT}, member) on each state change of another
            member in this node's view.
        @param membership: an existing view to maintain (its C{local} is
            this node); a new one holding C{local} otherwise.
        """
        self.membership = membership if membership is not None else Membership(local)
        self._clock = clock
        self._send = send
        self._rng = rng
        self.config = config
        self._on_event = on_event
        self._seq = 0
        self._probe_order: list[str] = []
        self._broadcasts: dict[str, list[Any]] = {}  # node id -> [record, times sent]
        self._suspicion: dict[str, IDelayedCall] = {}
        self._reap: dict[str, IDelayedCall] = {}
        self._loop: LoopingCall | None = None
        self._sync_loop: LoopingCall | None = None
        self._stopped = False
        self._left = False
        self._join_wait: Deferred[None] | None = None

    # -- public API ---------------------------------------------------

    @property
    def local(self) -> Member:
        """
        This node's current record.
        """
        return self.membership.local

    def start(self) -> None:
        """
        Start probing, one member per protocol period.
        """
        self._stopped = False
        if self._loop is None:
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self._clock
            self._loop.start(self.config.protocol_period, now=False)
        if self._sync_loop is None and self.config.sync_interval:
            self._sync_loop = LoopingCall(self._sync)
            self._sync_loop.clock = self._clock
            self._sync_loop.start(self.config.sync_interval, now=False)

    def stop(self) -> None:
        """
        Stop probing and answering; cancel every timer.  (A crash, as far as
        peers can tell; use L{leave} to depart gracefully.)
        """
        self._stopped = True
        if self._join_wait is not None:
            # A join waiting to retry ends (with CancelledError).
            self._join_wait.cancel()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._sync_loop is not None and self._sync_loop.running:
            self._sync_loop.stop()
        self._sync_loop = None
        for call in [*self._suspicion.values(), *self._reap.values()]:
            if call.active():
                call.cancel()
        self._suspicion.clear()
        self._reap.clear()

    def join(self, seed_addrs: Sequence[str], attempts: int | None = 1) -> Deferred[int]:
        """
        Join the cluster through the first seed that answers, and take its
        member list.  A seed that still knows this node as suspect, dead or
        left makes it refute (a higher incarnation), and the seed is told
        again at once.  When no seed answers, try again after a backoff that
        doubles from one protocol period up to C{join_backoff_max}.

        @param attempts: rounds over all seeds; C{None} retries forever.
        @return: fires with the number of members learned (this node
            included), or fails with L{JoinFailed} (or C{CancelledError}
            when L{stop} is called while it waits to retry).
        """
        return Deferred.fromCoroutine(self._join(list(seed_addrs), attempts))

    def leave(self) -> Deferred[None]:
        """
        Depart gracefully: mark this node I{left}, tell a few members
        directly (they gossip it on), then stop.
        """
        return Deferred.fromCoroutine(self._leave())

    def update_local(self, **changes: Any) -> Member:
        """
        Change this node's record (its capacity, say) and gossip it: a record
        only spreads with a higher incarnation, so this bumps it.
        """
        record = self.membership.set_local(
            incarnation=self.local.incarnation + 1, **changes
        )
        self._broadcast(record)
        return record

    def declare_left(self, node_id: str) -> Member:
        """
        Declare another member gone for good (an operator removed it): a
        I{left} record one incarnation above the known one, gossiped like
        any other.  (A member that is in fact running refutes it, as it
        would any suspicion.)

        @return: the new record.
        @raise KeyError: when this node does not know C{node_id}.
        @raise ValueError: for this node itself (it leaves with L{leave}).
        """
        if node_id == self.local.node_id:
            raise ValueError("this node leaves with leave(), not declare_left()")
        known = self.membership.get(node_id)
        if known is None:
            raise KeyError(node_id)
        record = replace(known, state=MemberState.LEFT, incarnation=known.incarnation + 1)
        self._apply(record)
        return record

    def receive(self, message: Message) -> Deferred[Message | None]:
        """
        Handle a message from a peer (the transport has checked that
        C{message.sender} is who sent it).

        @return: fires with the response to send back, or C{None}.
        """
        if self._stopped:
            return succeed(None)
        if isinstance(message, Ping):
            self._apply_all(message.updates)
            return succeed(self._ack(message.sender, message.seq))
        if isinstance(message, PingReq):
            self._apply_all(message.updates)
            return Deferred.fromCoroutine(self._relay(message))
        if isinstance(message, Join):
            if message.member.node_id != message.sender:
                # Only a node itself may ask to join (the transport ties the
                # sender to the peer's certificate).
                self._log.warn("refusing a join for {node_id} sent by {sender}",
                               node_id=message.member.node_id, sender=message.sender)
                return succeed(None)
            self._apply(message.member)
            return succeed(
                JoinReply(sender=self.local.node_id, members=tuple(self.membership.members()))
            )
        if isinstance(message, Sync):
            # Apply first, so that a refutation this list provokes (it may
            # say this node is dead) goes back in the reply.
            self._apply_all(message.members)
            return succeed(
                JoinReply(sender=self.local.node_id, members=tuple(self.membership.members()))
            )
        if isinstance(message, Ack):
            self._apply_all(message.updates)
            return succeed(None)
        self._log.warn("ignoring unexpected {kind} message", kind=message.kind)
        return succeed(None)

    # -- probing ------------------------------------------------------

    def _tick(self) -> None:
        """
        One protocol period: probe the next member.  A probe lasts one
        period at most, so at most two overlap at a period boundary.
        """
        if self._stopped:
            return
        target = self._next_target()
        if target is None:
            return
        d = Deferred.fromCoroutine(self._probe(target))
        d.addErrback(lambda f: self._log.failure("probe failed", f))

    def _sync(self) -> None:
        """
        Exchange full member lists with one random member.  Dead members
        are candidates too: after a partition heals, that is how the two
        sides, each believing the other dead, meet again (each then learns
        it is believed dead and refutes).
        """
        if self._stopped:
            return
        peers = [
            m for m in self.membership.members()
            if m.state is not MemberState.LEFT and m.node_id != self.local.node_id
        ]
        if not peers:
            return
        peer = self._rng.choice(peers)
        d = self._request(
            peer.cluster_addr,
            Sync(self.local.node_id, tuple(self.membership.members())),
            self.config.protocol_period,
        )

        def got(reply: Message | None) -> None:
            if isinstance(reply, JoinReply) and not self._stopped:
                self._apply_all(reply.members)

        d.addCallback(got)

    def _next_target(self) -> Member | None:
        """
        The next member to probe, in shuffled round-robin order: every
        alive or suspect member once per round, a new shuffle each round.
        """
        for _ in range(2):
            while self._probe_order:
                member = self.membership.get(self._probe_order.pop())
                if member is not None and member.state in _PROBED:
                    return member
            self._probe_order = [
                m.node_id
                for m in self.membership.members()
                if m.state in _PROBED and m.node_id != self.local.node_id
            ]
            self._rng.shuffle(self._probe_order)
        return None

    async def _probe(self, target: Member) -> None:
        """
        Ping C{target}; on silence, ping-req through k others; still silence
        by the end of the period, suspect it.
        """
        config = self.config
        ack = await self._request(
            target.cluster_addr, Ping(self.local.node_id, self._next_seq(), self._updates_for(target.node_id)),
            config.ack_timeout,
        )
        if ack is not None:
            return
        helpers = [
            m
            for m in self.membership.members()
            if m.state is MemberState.ALIVE and m.node_id not in (self.local.node_id, target.node_id)
        ]
        helpers = self._rng.sample(helpers, min(config.indirect_probes, len(helpers)))
        wait = config.protocol_period - config.ack_timeout
        if helpers and await self._any_ack(
            [
                self._request(
                    h.cluster_addr,
                    PingReq(
                        self.local.node_id,
                        self._next_seq(),
                        target.node_id,
                        target.cluster_addr,
                        self._updates_for(h.node_id),
                    ),
                    wait,
                )
                for h in helpers
            ]
        ):
            return
        if self._stopped:
            return
        current = self.membership.get(target.node_id)
        # Only suspect the incarnation probed: a refutation that arrived
        # meanwhile stands.
        if current is not None and current.state is MemberState.ALIVE and current.incarnation == target.incarnation:
            self._log.info("suspecting {node_id}", node_id=target.node_id)
            self._apply(replace(current, state=MemberState.SUSPECT))

    def _any_ack(self, requests: list[Deferred[Message | None]]) -> Deferred[bool]:
        """
        Fires with C{True} on the first response, C{False} once every
        request came back empty.
        """
        result: Deferred[bool] = Deferred()
        pending = [len(requests)]

        def one(response: Message | None) -> None:
            pending[0] -= 1
            if result.called:
                return
            if response is not None:
                result.callback(True)
            elif pending[0] == 0:
                result.callback(False)

        for d in requests:
            d.addCallback(one)
        return result

    async def _relay(self, request: PingReq) -> Message | None:
        """
        Ping the target of a ping-req for its sender; an ack if it answered.
        """
        ack = await self._request(
            request.target_addr,
            Ping(self.local.node_id, self._next_seq(), self._updates_for(request.target)),
            self.config.ack_timeout,
        )
        if ack is None:
            return None
        return self._ack(request.sender, request.seq)

    def _ack(self, to: str, seq: int) -> Ack:
        """
        The ack for a probe from C{to}, with piggybacked updates.
        """
        return Ack(self.local.node_id, seq, self._updates_for(to))

    def _request(self, addr: str, message: Message, timeout: float) -> Deferred[Message | None]:
        """
        Send C{message}; fires with the response, or C{None} on timeout,
        transport failure or an empty answer.  Piggybacked updates in the
        response are applied.
        """
        try:
            d = self._send(addr, message)
        except Exception:
            self._log.failure("send to {addr} failed", addr=addr)
            return succeed(None)
        d.addTimeout(timeout, self._clock)

        def got(response: Message | None) -> Message | None:
            if isinstance(response, (Ack, Ping, PingReq)) and not self._stopped:
                self._apply_all(response.updates)
            return response

        d.addCallback(got)
        d.addErrback(lambda f: None)
        return d

    def _next_seq(self) -> int:
        """
        A new sequence number for an outgoing probe.
        """
        self._seq += 1
        return self._seq

    # -- join and leave -----------------------------------------------

    async def _join(self, seeds: list[str], attempts: int | None) -> int:
        """
        The body of L{join}.
        """
        backoff = self.config.protocol_period
        attempt = 0
        while attempts is None or attempt < attempts:
            attempt += 1
            for addr in seeds:
                reply = await self._request(
                    addr, Join(self.local.node_id, self.local), self.config.protocol_period
                )
                if not isinstance(reply, JoinReply):
                    continue
                before = self.local.incarnation
                self._apply_all(reply.members)
                if self.local.incarnation != before:
                    # The seed knew an older life of this node; tell it the
                    # refutation now rather than by gossip.
                    await self._request(
                        addr, Join(self.local.node_id, self.local), self.config.protocol_period
                    )
                self._log.info(
                    "joined through {addr}: {count} members", addr=addr,
                    count=len(self.membership.members()),
                )
                return len(self.membership.members())
            if attempts is not None and attempt >= attempts:
                break
            if self._stopped:
                break
            self._log.warn("no seed answered; retrying in {delay}s", delay=backoff)
            # deferLater, not a bare Deferred fired by callLater: cancelling
            # the join (on shutdown) then cancels the timer too.
            self._join_wait = deferLater(self._clock, backoff)
            try:
                await self._join_wait
            finally:
                self._join_wait = None
            if self._stopped:
                break
            backoff = min(backoff * 2, self.config.join_backoff_max)
        raise JoinFailed(f"no seed answered: {', '.join(seeds)}")

    async def _leave(self) -> None:
        """
        The body of L{leave}.
        """
        self._left = True
        record = self.membership.set_local(state=MemberState.LEFT)
        peers = [
            m for m in self.membership.members()
            if m.state in _PROBED and m.node_id != self.local.node_id
        ]
        fanout = min(len(peers), max(self._retransmit_limit(), self.config.indirect_probes + 1))
        requests = [
            self._request(
                m.cluster_addr, Ping(self.local.node_id, self._next_seq(), (record,)),
                self.config.ack_timeout,
            )
            for m in self._rng.sample(peers, fanout)
        ]
        await DeferredList(requests)
        self.stop()

    # -- updates ------------------------------------------------------

    def _apply_all(self, updates: Iterable[Member]) -> None:
        """
        L{_apply} each record in turn.
        """
        for update in updates:
            self._apply(update)

    def _apply(self, update: Member) -> bool:
        """
        Take one piggybacked record into the view if it supersedes what
        this node knows; gossip it on, run the timers, report the event.

        @return: whether the view changed.
        """
        local = self.local
        if update.node_id == local.node_id:
            if self._left or self._stopped:
                return False
            if update.incarnation > local.incarnation or (
                update.incarnation == local.incarnation and update.state is not MemberState.ALIVE
            ):
                # Suspected, declared dead, or remembered from an earlier
                # life: refute with a higher incarnation.
                record = self.membership.set_local(
                    incarnation=update.incarnation + 1, state=MemberState.ALIVE
                )
                self._log.info(
                    "refuting {state} at incarnation {incarnation}",
                    state=update.state.value, incarnation=update.incarnation,
                )
                self._broadcast(record)
                return True
            if update.state is not MemberState.ALIVE and local.node_id not in self._broadcasts:
                # News of an older suspicion still circulates, so the
                # refutation has not reached everyone (its sends may have
                # been lost): announce it again.
                self._broadcast(local)
            return False
        known = self.membership.get(update.node_id)
        if known is None and update.state in (MemberState.DEAD, MemberState.LEFT):
            # Nothing to bury (as memberlist): keeping such news of a member
            # this node never knew, or already reaped, would let
            # tombstones bounce between views for ever through the sync.
            return False
        if known is not None and not overrides(update, known):
            return False
        self.membership.update([update])
        self._broadcast(update)
        self._timers(update)
        if update.state in _PROBED and update.node_id not in self._probe_order:
            # New or returning members go in at a random place of the
            # current round.
            self._probe_order.insert(self._rng.randint(0, len(self._probe_order)), update.node_id)
        self._event(known.state if known is not None else None, update)
        return True

    def _timers(self, update: Member) -> None:
        """
        Start or cancel the suspicion and reap timers for a new record.
        """
        node_id = update.node_id
        # A suspicion of a newer incarnation gets its own full timeout: the
        # member refuted the older one.
        call = self._suspicion.pop(node_id, None)
        if call is not None and call.active():
            call.cancel()
        if update.state is MemberState.SUSPECT:
            self._suspicion[node_id] = self._clock.callLater(
                self.config.suspicion_timeout, self._suspicion_expired, node_id
            )
        if update.state in (MemberState.DEAD, MemberState.LEFT):
            if node_id not in self._reap:
                self._reap[node_id] = self._clock.callLater(
                    self.config.dead_member_reap_after, self._reap_member, node_id
                )
        else:
            call = self._reap.pop(node_id, None)
            if call is not None and call.active():
                call.cancel()

    def _suspicion_expired(self, node_id: str) -> None:
        """
        A suspect stayed suspect for the whole timeout: declare it dead.
        """
        self._suspicion.pop(node_id, None)
        member = self.membership.get(node_id)
        if member is not None and member.state is MemberState.SUSPECT:
            self._log.info("declaring {node_id} dead", node_id=node_id)
            self._apply(replace(member, state=MemberState.DEAD))

    def _reap_member(self, node_id: str) -> None:
        """
        Forget a member that has been dead or departed long enough.
        """
        self._reap.pop(node_id, None)
        member = self.membership.get(node_id)
        if member is not None and member.state in (MemberState.DEAD, MemberState.LEFT):
            self.membership.remove(node_id)
            self._broadcasts.pop(node_id, None)

    def _event(self, before: MemberState | None, update: Member) -> None:
        """
        Report a state change of another member to C{on_event}.
        """
        after = update.state
        kind: str | None = None
        if after in _PROBED and before in (None, MemberState.LEFT):
            kind = JOIN
        elif after is MemberState.LEFT and before is not MemberState.LEFT:
            kind = LEAVE
        elif after is MemberState.DEAD and before in _PROBED:
            kind = FAILURE
        elif after is MemberState.ALIVE and before in (MemberState.SUSPECT, MemberState.DEAD):
            kind = RECOVERY
        elif after is MemberState.SUSPECT and before is MemberState.DEAD:
            kind = RECOVERY
        elif after is MemberState.SUSPECT and before is MemberState.ALIVE:
            kind = SUSPECT
        if kind is not None and self._on_event is not None:
            try:
                self._on_event(kind, update)
            except Exception:
                self._log.failure("membership event callback failed")

    # -- dissemination ------------------------------------------------

    def _retransmit_limit(self) -> int:
        """
        How many times each update is piggybacked: lambda * log(n).
        """
        n = len(self.membership.members())
        return self.config.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def _broadcast(self, record: Member) -> None:
        """
        Queue a record for piggybacking, replacing older news of that member.
        """
        self._broadcasts[record.node_id] = [record, 0]

    def _updates_for(self, peer: str) -> tuple[Member, ...]:
        """
        The records to piggyback on a message to C{peer}: the least-sent
        news first, at most C{piggyback_max}; and, first of all, C{peer}'s
        own record when this node does not believe it alive, so that a
        wrongly suspected peer refutes at once.
        """
        out: list[Member] = []
        own = self.membership.get(peer)
        if own is not None and own.state is not MemberState.ALIVE:
            out.append(own)
        limit = self._retransmit_limit()
        queued = sorted(self._broadcasts.values(), key=lambda entry: entry[1])
        for entry in queued:
            if len(out) >= self.config.piggyback_max:
                break
            record = entry[0]
            if record.node_id == peer and out and out[0] is own:
                continue
            out.append(record)
            entry[1] += 1
            if entry[1] >= limit:
                del self._broadcasts[record.node_id]
        return tuple(out)
