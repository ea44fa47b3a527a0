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
# A host counts the training messages it applies (U-shaped: TRAIN and
# OUTPUT_GRADIENTS, two per step), a client its steps.
FAULTS = {
    # (overrides, {process killed: after how many of its steps}), in order
    "round_robin": (
        {},
        # The server in client 0's turn of round 1 (its 2nd step applied),
        # then client 1 in its own turn of round 1 (after its 2nd step).
        {"server": 10, "client_1": 6},
    ),
    "ushaped": (
        {"topology": "ushaped", "model.cut": "pool1,fc2"},
        # The server with client 0's 2nd step of round 1 open (its TRAIN
        # applied, paused for the OUTPUT_GRADIENTS), then client 1 as above.
        {"server": 19, "client_1": 6},
    ),
    "splitfed_v1_server": ({"method": "splitfed_v1"}, {"server": 11}),
    "vertical_server": ({"topology": "vertical"}, {"server": 21}),
}


class KilledMidRoundTest(base.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.npz = write_npz(os.path.join(base.TestCase().tempdir(), "small.npz"), 256)

    @base.parameterized.named_parameters(
        (name, *fault) for name, fault in FAULTS.items()
    )
    def test_restarted_run_equals_uninterrupted(self, overrides, kills):
        config, args = setup(self.npz, **overrides)
        workdir = os.path.join(self.tempdir(), "run")
        envs = {
            victim: {**os.environ, launcher.KILL_AFTER_STEPS: str(after)}
            for victim, after in kills.items()
        }
        run = launcher.launch(args, workdir, config, envs=envs)
        try:
            for victim, after in kills.items():
                process = run.processes()[victim]
                deadline = time.monotonic() + 300
                while process.poll() is None:
                    self.assertLess(time.monotonic(), deadline, f"{victim} runs")
                    time.sleep(0.05)
                self.assertEqual(process.returncode, -9)  # SIGKILL, by the hook
                with open(os.path.join(workdir, f"{victim}.log")) as f:
                    logged = f.read()
                self.assertIn(f"{launcher.KILL_AFTER_STEPS}={after}: killing", logged)
                if config.topology == "ushaped" and victim == "server":
                    # Its last message was a TRAIN: the step is open, paused
                    # for the OUTPUT_GRADIENTS that never come.
                    self.assertIn("this process after TRAIN of client 0", logged)
                run.restart(victim)  # without the hook
            summary = run.wait(600)
        finally:
            run.kill()
        self.assertEqual(summary["epochs"], 2)
        if "server" in kills:
            self.assertRestarted(config, workdir)
        if "client_1" in kills:
            # The host rolled the killed client's turn back when it began again.
            with open(os.path.join(workdir, "server.log")) as f:
                self.assertIn("client 1 began its turn of round 1 again", f.read())
        processes = processes_weights(config, workdir)
        in_process = in_process_weights(config)
        assert_same_weights(self, processes, in_process)

    def assertRestarted(self, config, workdir):
        """The clients saw the host go back to its last commit: a turn or
        round trained again."""
        restarted = 0
        for k in range(config.num_clients):
            with open(os.path.join(workdir, f"client_{k}", "summary.json")) as f:
                client = json.load(f)
            restarted += client["restarted_turns"] + client["restarted_rounds"]
        self.assertGreater(restarted, 0)
