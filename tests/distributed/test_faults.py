"""A process killed mid-round (SIGKILL at a chosen step, forced by
`launcher.KILL_AFTER_STEPS`) and started again: the run ends with the
weights of the uninterrupted run in one process, equal to the bit."""

import json
import os
import time

from splitkeras import launcher
from tests import base
from tests.distributed.runs import (
    assert_same_weights,
    in_process_weights,
    processes_weights,
    setup,
    write_npz,
)

# 256 examples, batch 32, 2 clients: a round is 8 steps (round robin, SplitFed:
# 4 per client) or 8 batches of 2 parties' messages (vertical, 16 messages).
FAULTS = {
    # (overrides, the process killed, after how many of its steps)
    "round_robin_server": ({}, "server", 10),  # client 0's turn of round 2
    "round_robin_client": ({}, "client_1", 6),  # client 1's turn of round 2
    "splitfed_v1_server": ({"method": "splitfed_v1"}, "server", 11),
    "vertical_server": ({"topology": "vertical"}, "server", 21),
}


class KilledMidRoundTest(base.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.npz = write_npz(os.path.join(base.TestCase().tempdir(), "small.npz"), 256)

    @base.parameterized.named_parameters(
        (name, *fault) for name, fault in FAULTS.items()
    )
    def test_restarted_run_equals_uninterrupted(self, overrides, victim, after):
        config, args = setup(self.npz, **overrides)
        workdir = os.path.join(self.tempdir(), "run")
        fault = {**os.environ, launcher.KILL_AFTER_STEPS: str(after)}
        run = launcher.launch(args, workdir, config, envs={victim: fault})
        try:
            process = run.processes()[victim]
            deadline = time.monotonic() + 300
            while process.poll() is None:
                self.assertLess(time.monotonic(), deadline, f"{victim} still runs")
                time.sleep(0.05)
            self.assertEqual(process.returncode, -9)  # SIGKILL, by the hook
            with open(os.path.join(workdir, f"{victim}.log")) as f:
                self.assertIn(f"{launcher.KILL_AFTER_STEPS}={after}: killing", f.read())
            run.restart(victim)
            summary = run.wait(600)
        finally:
            run.kill()
        self.assertEqual(summary["epochs"], 2)
        if victim.startswith("client"):
            # The host rolled the killed client's turn back when it began again.
            with open(os.path.join(workdir, "server.log")) as f:
                self.assertIn("client 1 began its turn of round 1 again", f.read())
        else:
            self.assertRestarted(config, workdir)
        processes = processes_weights(config, workdir)
        in_process = in_process_weights(config)
        assert_same_weights(self, processes, in_process)

    def assertRestarted(self, config, workdir):
        """The clients saw the host go back: a turn or round trained again."""
        restarted = 0
        for k in range(config.num_clients):
            with open(os.path.join(workdir, f"client_{k}", "summary.json")) as f:
                client = json.load(f)
            restarted += client["restarted_turns"] + client["restarted_rounds"]
        self.assertGreater(restarted, 0)
