"""One queue of reads for the whole expert cache, served by a few threads, most urgent first.

A layer's own misses (DEMAND) go before the prefetcher's guesses (GUESS), and no guess starts
while a demand read runs: parallel reads share the disk, and a guess beside a miss would slow the
miss down. A guess can be promoted when its layer turns out to need it, and a guess that has not
started can be dropped once its layer has run. Equal priorities are served in the order they came.
"""

import heapq
import itertools
import threading
import time

DEMAND, GUESS = 0, 1
JOB_S_WINDOW = 16


class Job:
    """One call to run on an I/O thread: queued, running, then done (a result or an error)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args
        self.state = "new"  # new, queued, running, done, dropped
        self.result = self.error = None
        self.started = None  # when it began to run (perf_counter)
        self.seconds = self.cpu_seconds = 0.0  # how long it ran on its I/O thread; its CPU time
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
        """Seconds of it run by `now` (perf_counter): all of them once done."""
        if self.state == "done":
            return self.seconds
        return now - self.started if self.state == "running" and self.started else 0.0

    def run(self):
        start = self.started = time.perf_counter()
        cpu_start = time.thread_time()
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:  # handed to whoever waits
            self.error = e
        self.seconds = time.perf_counter() - start
        self.cpu_seconds = time.thread_time() - cpu_start
        self.state = "done"
        self.finished.set()


class IOQueue:
    def __init__(self, threads: int, name: str = "moelocal-io"):
        self.heap: list[tuple[int, int, Job]] = []
        self.order = itertools.count()
        self.lock = threading.Condition()
        self.closed = False
        self.demand_running = 0
        # a job's recent run time and CPU time, on average (0 until one has run)
        self.job_s = self.job_cpu_s = 0.0
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
            job.state = "queued"  # last: a job interrupted before this is never run
            self.lock.notify()
        return job

    def promote(self, job: Job, priority: int = DEMAND):
        """Serve a job that has not started yet at `priority` (its old entry is skipped)."""
        with self.lock:
            if job.state == "queued":
                heapq.heappush(self.heap, (priority, next(self.order), job))
                self.lock.notify()

    def drop(self, job: Job) -> bool:
        """Cancel a job that has not started; False when it has (it will finish)."""
        with self.lock:
            if job.state != "queued":
                return job.state == "dropped"
            job.state = "dropped"
        job.finished.set()
        return True

    def _next(self) -> tuple[int, Job] | None:
        """Under the lock: the next job to run and its priority, waiting until there is one;
        None once closed."""
        while True:
            while self.heap and self.heap[0][2].state != "queued":
                heapq.heappop(self.heap)  # dropped, or an entry left behind by promote
            if self.closed:
                return None
            if self.heap and (self.heap[0][0] == DEMAND or not self.demand_running):
                priority, _, job = heapq.heappop(self.heap)
                job.state = "running"
                return priority, job
            self.lock.wait()

    def _serve(self):
        while True:
            with self.lock:
                picked = self._next()
                if picked is None:
                    return
                priority, job = picked
                self.demand_running += priority == DEMAND
            job.run()
            # moving averages over ~JOB_S_WINDOW jobs (estimates: a race loses an update)
            weight = 1 / JOB_S_WINDOW if self.job_s else 1.0
            self.job_s += (job.seconds - self.job_s) * weight
            self.job_cpu_s += (job.cpu_seconds - self.job_cpu_s) * weight
            if priority == DEMAND:
                with self.lock:
                    self.demand_running -= 1
                    self.lock.notify_all()  # guesses held back may start

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
