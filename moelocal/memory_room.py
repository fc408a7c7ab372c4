"""How much more memory this process may take: the RAM free now, or less where the process runs
under a memory limit of its cgroup (a container's --memory, systemd's MemoryMax, a job
scheduler's): past that limit the kernel kills the process, where plain RAM would only swap.
Imports no torch (the early expert reads ask it too).
"""

from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available() -> int:
    """Bytes this process may still allocate: the smallest room of RAM and its cgroups."""
    rooms = [psutil.virtual_memory().available, *cgroup_rooms()]
    return max(0, min(rooms))


def cgroup_rooms(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT):
    """For the process's memory cgroup and each above it that has a limit: the limit less what
    is charged to it now, page cache the kernel can drop (inactive files) not counted."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            files = ("memory.max", "memory.current", "inactive_file")
            base = root
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            base = root / "memory"
        else:
            continue
        group = base / path.lstrip("/")
        while True:
            room = cgroup_room(group, *files)
            if room is not None:
                rooms.append(room)
            if group == base or base not in group.parents:
                break
            group = group.parent
    return rooms


def cgroup_room(group: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    """limit - (usage - inactive file pages) of one cgroup; None without a limit (or files)."""
    try:
        limit = (group / limit_file).read_text().strip()
        usage = int((group / usage_file).read_text())
        stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return None
    if limit == "max" or int(limit) >= 2**60:  # v1 writes "no limit" as a huge number
        return None
    return int(limit) - (usage - int(stat.get(inactive_key, 0)))
