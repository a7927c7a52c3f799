"""The sensitivity analysis on a Dask cluster (`ana --cluster`): a LocalCluster of 2 worker processes, one of them
killed while it measures a group, gives the same sensitivity file as the plain local run.

Reference: the local run in this process (analyze without a cluster), itself checked against evaluate() on each
masked model in test_prune_workflow_analysis.py. Real model and data: the bundled Yolo-Fastest on 8 bundled
images at 2 rates (36 groups, so the kill lands mid-run)."""
import json
import os
import shutil
import signal
import sys
import time

import pytest

distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed (pip install "
                                                        "darkprune[dask]); the cluster analysis cannot run")

import darkprune as dp  # noqa: E402
from darkprune.cli import main  # noqa: E402
from darkprune.evaluate import load_dataset  # noqa: E402
from darkprune.prune.analysis import Sensitivity, analyze  # noqa: E402

from conftest import BUNDLED_CFG, BUNDLED_DATA, BUNDLED_WEIGHTS  # noqa: E402

pytestmark = pytest.mark.usefixtures("quiet")

IMAGES = 8
RATES = [0.2, 0.6]


@pytest.fixture(scope="module")
def fastest():
    return dp.load(BUNDLED_CFG, BUNDLED_WEIGHTS)


@pytest.fixture
def images():
    return load_dataset(BUNDLED_DATA, IMAGES)


def _file(path) -> dict:
    """The sensitivity file without its one field that may differ between runs (the wall time)."""
    data = json.loads(path.read_text())
    assert data.pop("seconds") >= 0
    return data


def test_cluster_with_a_killed_worker_writes_the_local_runs_file(fastest, images, tmp_path):
    local_path, cluster_path = tmp_path / "local.json", tmp_path / "cluster.json"
    local = analyze(fastest, images, rates=RATES, out_path=local_path, progress=False)
    assert len(local.curves) > 20 and len({v for c in local.curves.values() for v in c.values()}) > 3

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as \
            cluster, distributed.Client(cluster) as client:
        pids = client.run(os.getpid)                # worker address -> process id
        killed = []

        def kill_a_busy_worker(group_id, curve):
            # after the first curve: SIGKILL a worker process while it is measuring a group (its nanny restarts it;
            # the scheduler must give that group to a worker again)
            if killed:
                return
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                busy = [address for address, keys in client.processing().items() if keys and address in pids]
                if busy:
                    killed.append((busy[0], list(client.processing()[busy[0]])))
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    return
                time.sleep(0.01)

        streamed = []
        sens = analyze(fastest, images, rates=RATES, out_path=cluster_path, progress=False, cluster=client,
                       callback=lambda g, c: (streamed.append(g), kill_a_busy_worker(g, c)))
        assert killed, "no worker was busy to kill"
        address, keys = killed[0]
        assert any("group" in str(key) for key in keys)
        assert pids[address] not in client.run(os.getpid).values()      # that process is gone
    assert sorted(streamed) == sorted(local.curves)                       # every group streamed back once
    assert sens.curves == local.curves and sens.baseline == local.baseline and sens.complete
    assert _file(cluster_path) == _file(local_path)          # curves, their order in the file, everything else


def test_cli_cluster_resumes_a_local_run_and_matches_it(fastest, tmp_path, capsys):
    """`ana --cluster local:2` on a workspace whose local run was interrupted measures only the groups left, and
    the file ends as the uninterrupted local run's."""
    common = [str(BUNDLED_CFG), str(BUNDLED_WEIGHTS), "--data", str(BUNDLED_DATA), "--limit", str(IMAGES),
              "--rates", ",".join(map(str, RATES)), "-q"]
    assert main(["ana", *common, "-w", str(tmp_path / "plain")]) == 0
    plain = _file(tmp_path / "plain" / "sensitivity.json")

    shutil.copytree(tmp_path / "plain", tmp_path / "ws")
    partial = Sensitivity.load(tmp_path / "ws" / "sensitivity.json")
    done = sorted(partial.curves)[:5]                 # as if the local run had been killed after 5 groups
    partial.curves = {g: partial.curves[g] for g in done}
    partial.groups = {g: partial.groups[g] for g in done}
    partial.save(tmp_path / "ws" / "sensitivity.json")
    capsys.readouterr()

    assert main(["ana", *common, "--cluster", "local:2", "--json", "-w", str(tmp_path / "ws")]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert len(payload["groups"]) == len(plain["groups"])
    assert _file(tmp_path / "ws" / "sensitivity.json") == plain


def test_bad_cluster_settings_are_refused_before_any_work(fastest, images, tmp_path, capsys):
    with pytest.raises(dp.SettingError, match="cluster tcp//nowhere: expected a Dask scheduler's address"):
        analyze(fastest, images, rates=RATES, progress=False, cluster="tcp//nowhere")
    with pytest.raises(dp.SettingError, match="local:0: a local cluster needs at least 1 worker"):
        analyze(fastest, images, rates=RATES, progress=False, cluster="local:0")
    code = main(["ana", str(BUNDLED_CFG), str(BUNDLED_WEIGHTS), "--data", str(BUNDLED_DATA), "--limit", "2",
                 "--cluster", "local:x", "-q", "-w", str(tmp_path / "ws")])
    assert code == 1 and "--cluster local:x: expected a Dask scheduler's address" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_without_dask_the_cluster_setting_says_what_to_install(fastest, images, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)          # `import distributed` now fails
    with pytest.raises(dp.DarkpruneError, match=r"needs dask.distributed.*pip install darkprune\[dask\]"):
        analyze(fastest, images, rates=RATES, progress=False, cluster="local:2")


def test_sweep_runs_its_analysis_on_the_cluster(tmp_path, capsys):
    """`sweep --cluster local:2` measures its one analysis on the cluster: the same sensitivity file as a plain
    `ana`, and a bad address is refused before any work, as `ana` refuses it."""
    common = [str(BUNDLED_CFG), str(BUNDLED_WEIGHTS), "--data", str(BUNDLED_DATA), "--limit", str(IMAGES),
              "--rates", ",".join(map(str, RATES)), "-q"]
    code = main(["sweep", *common, "--thresholds", "0.02", "--cluster", "local:x", "-w", str(tmp_path / "bad")])
    assert code == 1 and "--cluster local:x: expected a Dask scheduler's address" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["ana", *common, "-w", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main(["sweep", *common, "--thresholds", "0.02", "--timing-repeats", "1", "--cluster", "local:2",
                 "--json", "-w", str(tmp_path / "ws")]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [row["label"] for row in payload["rows"]] == ["original", "t=0.02"]
    assert _file(tmp_path / "ws" / "sensitivity.json") == _file(tmp_path / "plain" / "sensitivity.json")
