"""Scale-out decisions that need no engine: thread bindings and the replica of each fork (issue 16)."""

from atman_vllm.core import ForkJob, KeyBias
from atman_vllm.vllm.forks import fork_cost
from atman_vllm.vllm.parallel import cpu_thread_binding_for, fork_waves, local_ranks


def test_thread_binding_gives_each_rank_its_own_cores():
    assert cpu_thread_binding_for(2, [1, 0]) == "0|1"
    assert cpu_thread_binding_for(2, [0, 1, 2, 3, 4]) == "0-2|3-4"
    assert cpu_thread_binding_for(2, [0, 2, 4, 6]) == "0,2|4,6"
    assert cpu_thread_binding_for(3, [5]) == "5|5|5"  # fewer cores than ranks: shared, but it runs
    assert local_ranks({"tensor_parallel_size": 2, "data_parallel_size": 2}) == 4
    assert local_ranks({}) == 1


def _jobs(length: int, positions: list[int]) -> list[ForkJob]:
    ids = tuple(range(length))
    return [ForkJob(ids, length - 2)] + [ForkJob(ids, length - 2, KeyBias((p,), (0.1,))) for p in positions]


def test_one_replica_is_the_plain_two_waves():
    jobs = _jobs(100, [0, 10, 50, 90])
    first, forks = fork_waves(jobs)
    assert [(r.job, r.replica, r.primary) for r in first] == [(0, None, True)]
    assert [r.job for r in forks] == [1, 2, 3, 4] and {r.replica for r in forks} == {None}


def test_forks_of_several_requests_run_in_position_order_so_the_same_unit_is_adjacent():
    # explain_many over one document: two questions' jobs concatenated; the fork suppressing
    # position p under the second question is submitted right after the first question's.
    jobs = _jobs(100, [0, 10, 50, 90]) + _jobs(100, [0, 10, 50, 90, 95])
    first, forks = fork_waves(jobs)
    assert [r.job for r in first] == [0, 5]
    assert [r.job for r in forks] == [1, 6, 2, 7, 3, 8, 4, 9, 10]


def test_replicas_get_contiguous_ranges_of_equal_cost_and_each_its_unperturbed_pass():
    block = 8
    positions = [3 * p for p in range(33)]  # forks of a 100-token sequence, 4 per block
    jobs = _jobs(100, positions[::-1])  # in any order
    first, forks = fork_waves(jobs, 2, block)
    assert [(r.job, r.replica, r.primary) for r in first] == [(0, 0, True), (0, 1, False)]
    assert sorted(r.job for r in forks) == list(range(1, len(jobs)))
    assert [jobs[r.job].bias.first_position for r in forks] == sorted(positions), "submitted in position order"
    by_position = sorted(forks, key=lambda r: jobs[r.job].bias.first_position)
    replicas = [r.replica for r in by_position]
    assert replicas == sorted(replicas), "contiguous ranges in position order"
    blocks = {}
    for r in forks:  # forks of one block stay together
        blocks.setdefault(jobs[r.job].bias.first_position // block, set()).add(r.replica)
    assert all(len(v) == 1 for v in blocks.values())
    cost = [sum(fork_cost(jobs[r.job], block) for r in forks if r.replica == k) for k in (0, 1)]
    assert abs(cost[0] - cost[1]) <= 4 * 100, cost  # within one block group's cost
    assert sum(1 for r in forks if r.replica == 0) < sum(1 for r in forks if r.replica == 1), \
        "early forks cost more, so the first replica gets fewer"


def test_more_replicas_than_fork_groups_leaves_some_idle():
    first, forks = fork_waves(_jobs(40, [1]), 4, 8)
    assert len(forks) == 1
    assert [r.replica for r in first] == [forks[0].replica]
