"""Where training's workers go: the layout chosen from the cluster, and their threads."""

from mnist_ray.plumbing import cluster
from mnist_ray.training.train import TrainConfig
from mnist_ray.training.train_worker import worker_threads
from mnist_ray.training.workers import choose_layout, cpus_per_worker

cluster.configure_process_env()


def test_the_default_layout_is_one_worker_with_the_nodes_cores_and_workers_n_keeps_its_count(ray_local):
    one = choose_layout(TrainConfig())
    assert (one.workers, one.cpus_per_worker, one.threads) == (1, 1.5, 2)  # 2 CPUs less Ray Data's 0.5
    assert "one node" in one.describe()
    two = choose_layout(TrainConfig(workers=2))
    assert (two.workers, two.cpus_per_worker, two.threads) == (2, 0.75, 2)  # each computes while the other waits
    assert worker_threads(0.25, 2) == 1 and worker_threads(1.5, 2) == 2 and worker_threads(4, 64) == 8
    assert cpus_per_worker(TrainConfig(workers=1, cpus_per_worker=0.5)) == 0.5  # the flag wins
