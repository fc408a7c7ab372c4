"""One queue of reads for the whole expert cache, served by a few threads, most urgent first.

A layer's own misses (DEMAND) go before the prefetcher's guesses (GUESS), and no guess reads
while a demand read runs: parallel reads share the disk, and a guess beside a miss would slow the
miss down. A guess reads in chunks (`pace()`, called by the reads before each chunk) and waits
there while demand reads run, or wait for a thread that is not a guess's, so that a guess started
in a quiet moment never holds a miss back by more than a chunk. A paused guess never runs a demand
read on its own thread (the reads of a thread share its staging buffer); where guesses hold every
thread they read on, and a demand read takes the first thread one frees (keeping half of the
threads from guesses instead cost 10-15% at 2 slots of 8 in the replay). A guess can be promoted
when its layer turns out to need it (it then reads at demand's pace), and dropped once its layer
has run without needing it, queued or halfway (it stops at its next chunk). Equal priorities are
served in the order they came.
"""

import heapq
import itertools
import threading
import time

DEMAND, GUESS = 0, 1
JOB_S_WINDOW = 16
# a guess's bytes a read: ~1 ms of a fast disk, which a miss may wait behind (one thread's O_DIRECT
# reads of 2 MiB ran at 1.2-1.9 GB/s here, whole 19 MB experts at 1.2-1.5)
GUESS_CHUNK = 2 << 20

_running = threading.local()  # .job: the job this thread runs


class Dropped(Exception):
    """Raised inside a job dropped while it ran: its reads stop at the next chunk."""


def pace() -> int | None:
    """Called by a job's reads before each read: the most bytes to read next (None: the rest).
    A guess's read waits here while demand reads run, and raises Dropped once it is dropped."""
    job = getattr(_running, "job", None)
    if job is None or job.priority == DEMAND:  # every miss's read: no lock, no clock
        return None
    return job.queue._pace(job)


class Job:
    """One call to run on an I/O thread: queued, running, then done (a result or an error)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args
        self.queue, self.priority = None, DEMAND  # set when queued
        self.state = "new"  # new, queued, running, done, dropped
        self.drop_asked = False  # dropped while running: stop at the next chunk
        self.result = self.error = None
        self.started = None  # when it began to run (perf_counter)
        self.guessed = False  # it began to run as a guess
        # it writes memory never written before (a slot's first read): its pages are faulted in
        # as it runs, a one-off (a 19 MB expert's first read under memcap.sh took 40 ms of CPU
        # against 0.2 ms for a read into a row used before), not what a load costs
        self.first_touch = False
        self.seconds = self.cpu_seconds = 0.0  # how long it ran on its I/O thread; its CPU time
        self.paused_s = 0.0  # of those seconds, a guess's waits for demand reads (not counted)
        self.finished = threading.Event()

    def done(self) -> bool:
        """True once nothing of this job runs any more (finished, failed or dropped), or while
        nothing of it has been queued (a start interrupted by Ctrl-C)."""
        return self.state == "new" or self.finished.is_set()

    def wait(self):
        """Block until the job has run; its result, or its error raised here."""
        if self.state == "new":
            raise RuntimeError("waited for a job never queued")
        self.finished.wait()
        if self.state == "dropped":
            raise RuntimeError("waited for a dropped job")
        if self.error is not None:
            raise self.error
        return self.result

    def ran_for(self, now: float) -> float:
        """Seconds of it run by `now` (perf_counter), pauses not counted: all once done."""
        if self.state == "done":
            return self.seconds
        running = self.state == "running" and self.started
        return now - self.started - self.paused_s if running else 0.0

    def run(self):
        start = self.started = time.perf_counter()
        cpu_start = time.thread_time()
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:  # handed to whoever waits (a Dropped job: nobody)
            self.error = e
        self.seconds = time.perf_counter() - start - self.paused_s
        self.cpu_seconds = time.thread_time() - cpu_start
        self.state = "done"
        self.finished.set()


class Average:
    """A moving average over ~JOB_S_WINDOW samples of the most telling kind seen so far (the
    lowest): the first of a kind that tells more starts it afresh, and samples of a kind that
    tells less (or of kind None) are left out. 0 until one counted. (An estimate: a race
    between I/O threads may lose an update.)"""

    def __init__(self):
        self.value, self.kind = 0.0, None

    def add(self, x: float, kind: int | None):
        if kind is None or (self.kind is not None and kind > self.kind):
            return
        if self.kind is None or kind < self.kind:
            self.value, self.kind = x, kind
        else:
            self.value += (x - self.value) / JOB_S_WINDOW


class IOQueue:
    def __init__(self, threads: int, name: str = "moelocal-io"):
        self.heap: list[tuple[int, int, Job]] = []
        self.order = itertools.count()
        self.lock = threading.Condition()
        self.closed = False
        self.demand_running = self.guesses_running = 0
        # a miss's read's recent run time (until one has run, any job's), and a job's CPU time
        # (a first touch's never): on average, 0 until one ran
        self.run_s, self.cpu_s = Average(), Average()
        self.threads = [
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self.threads:
            t.start()

    def put(self, job: Job, priority: int = DEMAND) -> Job:
        with self.lock:
            if self.closed:
                raise RuntimeError("the I/O queue is closed")
            heapq.heappush(self.heap, (priority, next(self.order), job))
            job.queue, job.priority = self, priority
            job.state = "queued"  # last: a job interrupted before this is never run
            self.lock.notify_all()  # an idle thread, not only a paused guess, must see it
        return job

    def promote(self, job: Job):
        """Serve a guess at demand's priority: queued, it goes before the other guesses (its
        old entry is skipped); running, it reads on without waiting for demand reads."""
        with self.lock:
            if job.priority == DEMAND or job.state not in ("queued", "running"):
                return
            job.priority = DEMAND
            if job.state == "queued":
                heapq.heappush(self.heap, (DEMAND, next(self.order), job))
            else:
                self.demand_running += 1
                self.guesses_running -= 1
            self.lock.notify_all()

    def drop(self, job: Job) -> bool:
        """Cancel a job: one that has not started never runs, a guess running stops at its next
        chunk (its memory then holds part of a read: done() says when nothing writes it any
        more). False for a demand job that has started (it will finish)."""
        with self.lock:
            if job.state == "running" and job.priority == GUESS:
                job.drop_asked = True
                self.lock.notify_all()
                return True
            if job.state != "queued":
                return job.state == "dropped" or job.drop_asked
            job.state = "dropped"
        job.finished.set()
        return True

    def _pace(self, job: Job) -> int | None:
        """pace() for `job`, running on this thread."""
        start = time.perf_counter()
        with self.lock:
            try:
                while True:
                    if job.drop_asked:
                        raise Dropped
                    if job.priority == DEMAND:
                        return None
                    waiting = self._next_queued()
                    # a demand read waiting for a thread that is not a guess's
                    demand_waits = waiting is not None and waiting[0] == DEMAND
                    has_thread = self.guesses_running < len(self.threads)
                    if not self.demand_running and not (demand_waits and has_thread):
                        return GUESS_CHUNK
                    self.lock.wait()
            finally:
                job.paused_s += time.perf_counter() - start

    def _next_queued(self) -> tuple[int, int, Job] | None:
        """Under the lock: the heap's first entry still queued (dropped jobs and entries left
        behind by promote are popped), or None."""
        while self.heap and self.heap[0][2].state != "queued":
            heapq.heappop(self.heap)
        return self.heap[0] if self.heap else None

    def _next(self) -> Job | None:
        """Under the lock: the next job to run, waiting until there is one; None once closed."""
        while True:
            first = self._next_queued()
            if self.closed:
                return None
            if first is not None and (first[0] == DEMAND or not self.demand_running):
                priority, _, job = heapq.heappop(self.heap)
                job.state, job.priority = "running", priority
                job.guessed = priority == GUESS  # started as a guess (promoted or not)
                self.demand_running += priority == DEMAND
                self.guesses_running += priority == GUESS
                return job
            self.lock.wait()

    def _run(self, job: Job):
        """Run a started job on this thread."""
        _running.job = job
        try:
            job.run()
        finally:
            _running.job = None
        # a dropped guess's time is not a load's. The run time is a miss's read's, once one has
        # run: a guess reads beside compute, which on the CPU stretched its reads to twice a
        # miss's (1.6-1.8 against 0.8 ms, the default model's experts, for the same CPU time);
        # a first touch's, only until a read into used memory has run
        if not isinstance(job.error, Dropped):
            self.cpu_s.add(job.cpu_seconds, None if job.first_touch else 0)
            self.run_s.add(job.seconds, 2 * job.first_touch + job.guessed)
        with self.lock:
            self.demand_running -= job.priority == DEMAND
            self.guesses_running -= job.priority == GUESS
            self.lock.notify_all()  # guesses held back may read, threads may pick a job

    @property
    def job_s(self) -> float:
        return self.run_s.value

    @property
    def job_cpu_s(self) -> float:
        return self.cpu_s.value

    def _serve(self):
        while True:
            with self.lock:
                job = self._next()
                if job is None:
                    return
            self._run(job)

    def close(self):
        """Drop what has not started, let what runs finish, and stop the threads."""
        with self.lock:
            self.closed = True
            pending = [job for _, _, job in self.heap if job.state == "queued"]
            for job in pending:
                job.state = "dropped"
            self.heap.clear()
            self.lock.notify_all()
        for job in pending:
            job.finished.set()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join()
