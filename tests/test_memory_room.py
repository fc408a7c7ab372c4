"""The memory this process may still take: RAM, and the limits of its cgroups (v1 and v2), which
the plan keeps within when no --cpu-mem is given."""

import pytest
from tiny import streaming_plan
from typer.testing import CliRunner

import moelocal
from moelocal import memory_room
from moelocal.cli import app
from moelocal.errors import MoelocalError
from moelocal.plan import ROOM_MARGIN

MiB = 2**20


def cgroup(path, limit, usage, inactive, v2=True):
    path.mkdir(parents=True, exist_ok=True)
    names = ("memory.max", "memory.current", "inactive_file") if v2 else (
        "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")  # fmt: skip
    (path / names[0]).write_text(f"{limit}\n")
    (path / names[1]).write_text(f"{usage}\n")
    (path / "memory.stat").write_text(f"anon 1\n{names[2]} {inactive}\nfile 5\n")


def test_v2_limits_of_the_group_and_the_groups_above_it(tmp_path):
    root = tmp_path / "fs"
    cgroup(root, "max", 10**12, 0)
    cgroup(root / "app.slice", 900 * MiB, 500 * MiB, 100 * MiB)  # room 500 MiB
    cgroup(root / "app.slice" / "job", "max", 300 * MiB, 0)  # no limit of its own
    proc = tmp_path / "cgroup"
    proc.write_text("0::/app.slice/job\n")
    assert memory_room.cgroup_rooms(proc, root) == [500 * MiB]


def test_v1_memory_controller(tmp_path):
    root = tmp_path / "fs"
    cgroup(root / "memory" / "box", 1024 * MiB, 700 * MiB, 200 * MiB, v2=False)
    cgroup(root / "memory", 2**63 - 4096, 10**9, 0, v2=False)  # v1's "no limit"
    proc = tmp_path / "cgroup"
    proc.write_text("5:cpu,cpuacct:/\n4:memory:/box\n0::/\n")
    assert memory_room.cgroup_rooms(proc, root) == [524 * MiB]


def test_no_cgroup_files_means_no_cgroup_limit(tmp_path):
    assert memory_room.cgroup_rooms(tmp_path / "none", tmp_path) == []
    assert memory_room.available() > 0


def test_without_cpu_mem_the_plan_keeps_within_the_memory_free(tiny, monkeypatch):
    path = tiny("mixtral")[0]
    everything = moelocal.engine.plan(path, device="cpu")
    assert everything.device_slots == everything.n_experts and not everything.notes
    room = streaming_plan(path).fixed_bytes + 2 * everything.moe_layers * everything.expert_bytes
    monkeypatch.setattr("moelocal.memory_room.available", lambda: room + ROOM_MARGIN)
    fitted = moelocal.engine.plan(path, device="cpu")
    assert fitted.device_slots == 2 and "free to this process" in fitted.notes[0]
    assert moelocal.engine.plan(path, device="cpu", cpu_mem="1GiB").device_slots == fitted.n_experts
    monkeypatch.setattr("moelocal.memory_room.available", lambda: 0)
    with pytest.raises(MoelocalError, match="needs at least .* is free to this process"):
        moelocal.engine.plan(path, device="cpu")
    result = CliRunner().invoke(app, ["generate", str(path), "-p", "hi", "-n", "1"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output


def test_a_load_within_the_memory_free_says_so_and_streams(tiny, monkeypatch):
    path = tiny("mixtral")[0]
    p = moelocal.engine.plan(path, device="cpu")
    kv = moelocal.engine.plan(path, device="cpu", cpu_mem="1GiB").kv_bytes
    room = p.resident_bytes + kv + p.staging_bytes + p.moe_layers * p.expert_bytes + ROOM_MARGIN
    monkeypatch.setattr("moelocal.memory_room.available", lambda: room)
    result = CliRunner().invoke(app, ["generate", str(path), "-p", "hi", "-n", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert "free to this process" in result.stderr
