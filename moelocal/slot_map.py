"""One layer's expert cache as data: which expert is in which slot, which slots are loading, in use
or out of use, and which expert the eviction policy gives up next. No tensors, no I/O.

A load is an opaque ticket here, with `done()` (nothing of it runs any more) and `ok()` (it
landed). An expert is mapped to its slot from the moment
its load is started; a load that fails or is abandoned unmaps it at once, and its slot stays out
of use ("draining") until the read behind it has really finished, so no later load or compute
ever shares a slot with a write still in flight.
"""

from collections import OrderedDict


class LRU:
    """Evict the least recently used expert."""

    def __init__(self):
        self.order: OrderedDict[int, None] = OrderedDict()

    def insert(self, e: int):
        """e was just loaded."""
        self.order[e] = None
        self.order.move_to_end(e)

    def touch(self, e: int):
        """e was just used."""
        self.insert(e)

    def remove(self, e: int):
        self.order.pop(e, None)

    def victim(self, candidates: set[int]) -> int:
        return next(e for e in self.order if e in candidates)

    def rather_wait(self, candidates: set[int], later: set[int]) -> bool:
        """Wait for one of `later` (in use now, free once used) rather than evict a candidate?
        Never: whatever the running step uses is the most recent."""
        return False


class LFU(LRU):
    """Evict the least frequently used expert (uses counted since load); ties go to LRU."""

    def __init__(self):
        super().__init__()
        self.uses: dict[int, int] = {}

    def touch(self, e: int):
        super().touch(e)
        self.uses[e] = self.uses.get(e, 0) + 1

    def remove(self, e: int):
        super().remove(e)
        self.uses.pop(e, None)

    def victim(self, candidates: set[int]) -> int:
        rank = {e: i for i, e in enumerate(self.order)}
        return min(candidates, key=lambda e: (self.uses.get(e, 0), rank[e]))


class Learned(LRU):
    """Evict the expert least expected to be used in the next steps, as scored by a map fitted to
    the layer's hidden states (predictor.py: `moelocal calibrate`); while the layer has no
    scores, the least recently used (a model without such a fit is cached by LRU)."""

    def __init__(self):
        super().__init__()
        # the running step's scores, one per expert: a call, made only when a victim is chosen
        # (on CUDA it reads them from the device)
        self.expected = None

    def victim(self, candidates: set[int]) -> int:
        if self.expected is None or len(candidates) == 1:  # nothing to score: none or no choice
            return super().victim(candidates)
        return min(candidates, key=self.expected().__getitem__)

    def rather_wait(self, candidates: set[int], later: set[int]) -> bool:
        """Where an expert the step uses is expected less than every candidate, its slot is
        worth the wait: for its compute, or its read too where it is one of the step's misses
        (READ_BOUND_BYTES; a later miss is a whole read). With 2 slots and top 2 a step has no
        other choice."""
        if self.expected is None:
            return False
        score = self.expected()
        return min(score[e] for e in later) < min(score[e] for e in candidates)


POLICIES = {"learned": Learned, "lru": LRU, "lfu": LFU}
# an expert at least this big is read at the disk's bandwidth, so that its read and the next, one
# after the other, take as long as both at once: a miss may wait for another's read to land
# (and be used) for its slot. Smaller reads are latency: the default model's 288 KB experts,
# each such wait, lost 3% at 2 slots (paired, 512 tokens); mixtral-large's 18.6 MiB gained 7%.
READ_BOUND_BYTES = 1 << 20


def waits_for_reads(expert_bytes: int) -> bool:
    """May a miss wait for another's read (SlotMap's wait_for_reads) with experts this big?"""
    return expert_bytes >= READ_BOUND_BYTES


class SlotMap:
    def __init__(self, n_slots: int, policy: str = "lru", wait_for_reads: bool = True):
        """wait_for_reads: may a miss wait for a read of the running step's to land, rather
        than evict (see READ_BOUND_BYTES)? It may always wait for a landed expert's compute."""
        self.n_slots = n_slots
        self.wait_for_reads = wait_for_reads
        self.expert_in: list[int | None] = [None] * n_slots  # slot -> expert (ready or loading)
        self.slot_of: dict[int, int] = {}  # expert -> slot
        self.loading: dict[int, object] = {}  # expert -> its load's ticket
        self.draining: dict[int, object] = {}  # slot -> a failed or abandoned load still running
        self.in_use: set[int] = set()  # read by the layer running now
        self.policy = POLICIES[policy]()
        self.evicted: int | None = None  # the last victim: one slot more would hold it still

    def ready(self, e: int) -> bool:
        return e in self.slot_of and e not in self.loading

    def reap(self):
        """Take in every load that has finished: a landed expert is ready, a failed or dropped
        one unmapped, a draining slot free again."""
        for slot in [s for s, ticket in self.draining.items() if ticket.done()]:
            del self.draining[slot]
        for e, ticket in list(self.loading.items()):
            if ticket.done():
                if ticket.ok():
                    del self.loading[e]
                else:
                    self._unmap(e)

    def free_slot(self) -> int | None:
        """A slot to load into: an empty one, else the policy's victim among the experts neither
        in use nor loading (unmapped here); None when every slot is held, or when the policy
        would rather have the slot of an expert in use once it has been used (ask again then)."""
        for slot, e in enumerate(self.expert_in):
            if e is None and slot not in self.draining:
                return slot
        candidates = set(self.slot_of) - self.in_use - set(self.loading)
        if not candidates:
            return None
        later = self.in_use & self.slot_of.keys()  # the step's, in a slot
        if not self.wait_for_reads:
            later -= self.loading.keys()
        if later and self.policy.rather_wait(candidates, later):
            return None
        victim = self.evicted = self.policy.victim(candidates)
        slot = self.slot_of[victim]
        self._unmap(victim)
        return slot

    def start(self, e: int, slot: int, ticket):
        """e's load into slot has begun (ticket: its load)."""
        assert self.expert_in[slot] is None and slot not in self.draining and e not in self.slot_of
        self.expert_in[slot], self.slot_of[e] = e, slot
        self.loading[e] = ticket
        self.policy.insert(e)

    def add_slot(self):
        """One more slot, empty (a spare row lent to this layer)."""
        self.expert_in.append(None)
        self.n_slots += 1

    def place(self, e: int, slot: int):
        """e is in slot, ready (a preload)."""
        self.start(e, slot, None)
        del self.loading[e]

    def fail(self, e: int):
        """e's load failed or was abandoned: unmap e now; its slot is out of use until the load
        has finished."""
        slot, ticket = self.slot_of[e], self.loading.get(e)
        self._unmap(e)
        if ticket is not None and not ticket.done():
            self.draining[slot] = ticket

    def use(self, e: int):
        """e was read by a layer: it counts for the policy."""
        self.policy.touch(e)

    def _unmap(self, e: int):
        slot = self.slot_of.pop(e)
        self.expert_in[slot] = None
        self.loading.pop(e, None)
        self.in_use.discard(e)
        self.policy.remove(e)


def simulate(steps: list[set[int]], n_slots: int, policy: str = "lru", expected=None,
             wait_for_reads: bool = True) -> int:  # fmt: skip
    """Hits of one layer's slot map on a sequence of needed-expert sets, in the expert cache's
    order (expert_cache.py): the misses take free slots or victims among the experts the step
    does not need, the hits are used, and each one used may give its slot to a miss still
    waiting for one; a miss lands when its turn to be used comes. expected: per step, the
    scores a Learned policy sees. So a fit is judged by the cache's own rules (calibrate.py)."""
    m, hits = SlotMap(n_slots, policy, wait_for_reads), 0
    for t, needed in enumerate(steps):
        if expected is not None:
            m.policy.expected = (lambda row: lambda: row)(expected[t])
        order = sorted(needed)
        in_slot = [e for e in order if e in m.slot_of]
        misses = [e for e in order if e not in m.slot_of]
        queue = list(misses)  # those still waiting for a slot
        hits += len(in_slot)
        m.in_use = set(needed)
        _start_misses(m, queue)
        for e in in_slot + misses:
            m.loading.pop(e, None)  # landed
            m.in_use.discard(e)
            m.use(e)
            _start_misses(m, queue)
    return hits


def _start_misses(m: SlotMap, queue: list[int]):
    """simulate's misses take slots in order while the slot map gives them."""
    while queue and (slot := m.free_slot()) is not None:
        m.start(queue.pop(0), slot, None)  # loading until it is used
